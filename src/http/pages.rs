//! The billing page and its assets, compiled into the binary: plain ES
//! modules defining custom elements (`<credit-balance>`,
//! `<credit-topup-dialog>`, `<credit-history>`, `<credit-usage-chart>`,
//! `<credit-auto-recharge>`, `<credit-limits>`, `<credit-referral>`,
//! `<credit-api-keys>`, `<credit-email-preferences>`) that
//! `/billing` composes and any other front end can embed. No build step:
//! `assets/credits/` is embedded whole and served by file name.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use include_dir::{include_dir, Dir};

use super::auth::authenticate_operator;
use super::error::{ApiError, Code};
use super::state::State;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/billing", web::get().to(billing))
        .route("/demo", web::get().to(demo))
        .route("/assets/credits/{file}", web::get().to(asset))
        .route("/admin", web::get().to(console))
        .route("/assets/admin/{file}", web::get().to(console_asset))
        .route("/favicon.ico", web::get().to(no_icon));
}

/// The files served under `/assets/credits/`: the directory as it was at
/// build time, so a file added there is served without a line here.
static ASSETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/assets/credits");
/// The operator console's files, served under `/assets/admin/`.
static CONSOLE_ASSETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/assets/admin");

const BILLING_PAGE: &str = include_str!("../../assets/billing.html");
const DEMO_PAGE: &str = include_str!("../../assets/demo.html");
const CONSOLE_PAGE: &str = include_str!("../../assets/admin.html");
const CONSOLE_SIGN_IN_PAGE: &str = include_str!("../../assets/admin-sign-in.html");

/// No inline script or style, nothing from elsewhere, no framing by others.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    base-uri 'none'; frame-ancestors 'self'";

/// The security headers of every page and asset.
pub fn secured(mut response: HttpResponseBuilder) -> HttpResponseBuilder {
    response
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "same-origin"));
    response
}

/// The demo banner (only under `creditd demo`), for every page; `base` is
/// creditd's URL on the stand-ins' pages, empty on creditd's own.
pub fn demo_banner(base: &str, sign_in_url: &str, mailbox_url: &str) -> String {
    format!(
        r#"<div class="demo-banner" role="note"><strong>Démo locale</strong> : aucun vrai paiement, aucune vraie IA, tout tourne sur cette machine. <a href="{base}/demo">Chat</a> · <a href="{base}/billing">Facturation</a> · <a href="{mailbox}">Boîte mail</a> · <a href="{sign_in}">Changer d'utilisateur</a></div>"#,
        base = escape(base),
        mailbox = escape(mailbox_url),
        sign_in = escape(sign_in_url)
    )
}

/// No icon (and no 404 in the browser's console for it).
async fn no_icon() -> HttpResponse {
    HttpResponse::NoContent().finish()
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(state: &State, template: &str) -> HttpResponse {
    let settings = &state.settings;
    let banner = settings
        .demo_sign_in_url
        .as_deref()
        .map(|sign_in_url| {
            let mailbox = settings.demo_mailbox_url.as_deref().unwrap_or_default();
            demo_banner("", sign_in_url, mailbox)
        })
        .unwrap_or_default();
    let body = template
        .replace("{{demo_banner}}", &banner)
        .replace(
            "{{topup_cents_min}}",
            &settings.stripe.topup_cents_min.to_string(),
        )
        .replace(
            "{{topup_cents_max}}",
            &settings.stripe.topup_cents_max.to_string(),
        );
    secured(HttpResponse::Ok())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/html; charset=utf-8")
        .body(body)
}

/// `/billing`: balance, top-up, usage chart and history.
#[utoipa::path(get, path = "/billing", tag = "pages",
    responses(
        (status = 200, description = "The billing page", content_type = "text/html", body = String),
        super::error::RateLimited
    ))]
async fn billing(state: State) -> HttpResponse {
    page(&state, BILLING_PAGE)
}

/// `/demo`: a chat box on the `demo-echo` model; only under `creditd demo`.
async fn demo(state: State) -> Result<HttpResponse, ApiError> {
    if state.settings.demo_sign_in_url.is_none() {
        return Err(ApiError::not_found("no such route"));
    }
    Ok(page(&state, DEMO_PAGE))
}

/// `/admin`: the operator console for an operator (see
/// `auth::authenticate_operator`); anyone else gets the sign-in page, 401
/// (403 for a signed-in Clerk user who is not an operator).
#[utoipa::path(get, path = "/admin", tag = "pages",
    params(("signin" = Option<String>, Query, description = "`refused` or `invalid` after a failed sign-in; `closed` after signing out")),
    responses(
        (status = 200, description = "The console", content_type = "text/html", body = String),
        (status = 401, description = "The sign-in page", content_type = "text/html", body = String),
        (status = 403, description = "The sign-in page, for a signed-in Clerk user who is not an operator", content_type = "text/html", body = String),
        (status = 404, description = "NOT_FOUND (neither admin.token nor admin.operator_ids configured)", body = super::error::ErrorBody),
        super::error::RateLimited,
        (status = 503, description = "UNAVAILABLE (Clerk's keys unreachable)", body = super::error::ErrorBody)
    ))]
async fn console(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let now = chrono::Utc::now().timestamp();
    let refused =
        match authenticate_operator(&state.settings.admin, &state.clerk, &request, now).await {
            Ok(operator) => {
                let body = CONSOLE_PAGE.replace("{{operator}}", &escape(operator.as_str()));
                return Ok(secured(HttpResponse::Ok())
                    .insert_header((header::CACHE_CONTROL, "no-store"))
                    .content_type("text/html; charset=utf-8")
                    .body(body));
            }
            Err(error) if matches!(error.code, Code::Unauthorized | Code::Forbidden) => error,
            Err(error) => return Err(error),
        };
    let message = match request.query_string() {
        "signin=refused" => "Jeton refusé.",
        "signin=invalid" => "Indiquez votre nom (1 à 100 caractères) et le jeton.",
        "signin=closed" => "Session fermée.",
        _ if refused.code == Code::Forbidden => {
            "Votre compte Clerk n'est pas opérateur : connectez-vous avec le jeton administrateur."
        }
        _ => "",
    };
    let body = CONSOLE_SIGN_IN_PAGE
        .replace("{{message}}", message)
        .replace(
            "{{message_hidden}}",
            if message.is_empty() { "hidden" } else { "" },
        )
        .replace(
            "{{session_minutes}}",
            &(state.settings.admin.session_ttl_s / 60).to_string(),
        );
    let status = if refused.code == Code::Forbidden {
        actix_web::http::StatusCode::FORBIDDEN
    } else {
        actix_web::http::StatusCode::UNAUTHORIZED
    };
    Ok(secured(HttpResponse::build(status))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .content_type("text/html; charset=utf-8")
        .body(body))
}

/// `/assets/admin/{file}`: a file of the console's embedded directory,
/// found as `asset` finds one.
async fn console_asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    embedded(&CONSOLE_ASSETS, file.as_str())
}

/// `/assets/credits/{file}`: a file of the embedded directory, by its
/// name alone (the route's segment holds no `/`, and a name is looked up in
/// the listing, never on disk: nothing outside it can be reached).
async fn asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    embedded(&ASSETS, file.as_str())
}

fn embedded(assets: &Dir<'static>, name: &str) -> Result<HttpResponse, ApiError> {
    let found = assets
        .get_file(name)
        .filter(|_| !name.contains(['/', '\\']) && !name.starts_with('.'))
        .ok_or_else(|| ApiError::not_found("no such asset"))?;
    Ok(secured(HttpResponse::Ok())
        .insert_header((header::CONTENT_TYPE, content_type(name)))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(found.contents()))
}

/// The content type of an asset, by its extension.
fn content_type(name: &str) -> HeaderValue {
    let value = match name.rsplit_once('.').map(|(_, extension)| extension) {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    };
    HeaderValue::from_static(value)
}
