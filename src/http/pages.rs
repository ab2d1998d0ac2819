//! The billing page and its assets, compiled into the binary: plain ES
//! modules defining custom elements (`<credit-balance>`,
//! `<credit-topup-dialog>`, `<credit-history>`, `<credit-usage-chart>`,
//! `<credit-auto-recharge>`, `<credit-limits>`, `<credit-referral>`,
//! `<credit-email-preferences>`) that
//! `/billing` composes and any other front end can embed. No build step:
//! `assets/credits/` is embedded whole and served by file name.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse, HttpResponseBuilder};
use include_dir::{include_dir, Dir};

use super::error::ApiError;
use super::state::State;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/billing", web::get().to(billing))
        .route("/demo", web::get().to(demo))
        .route("/assets/credits/{file}", web::get().to(asset))
        .route("/favicon.ico", web::get().to(no_icon));
}

/// The files served under `/assets/credits/`: the directory as it was at
/// build time, so a file added there is served without a line here.
static ASSETS: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/assets/credits");

const BILLING_PAGE: &str = include_str!("../../assets/billing.html");
const DEMO_PAGE: &str = include_str!("../../assets/demo.html");

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

/// `/assets/credits/{file}`: a file of the embedded directory, by its
/// name alone (the route's segment holds no `/`, and a name is looked up in
/// the listing, never on disk: nothing outside it can be reached).
async fn asset(file: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let name = file.as_str();
    let found = ASSETS
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
