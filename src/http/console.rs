//! The operator console's session: `POST /admin/session` exchanges the
//! admin token (and the operator's name, recorded with each of their
//! actions) for a short-lived `creditd_admin` cookie (HttpOnly,
//! SameSite=Strict, Path=/admin, Secure over https, `admin.session_ttl_s`),
//! `POST /admin/session/close` ends it. Plain HTML forms, answered by a
//! redirect to `/admin` (Post/Redirect/Get), so the console's sign-in needs
//! no script. The console itself is `pages::console`.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;

use super::auth::{console_session_value, is_admin_token, ADMIN_SESSION_COOKIE};
use super::error::{ApiError, Code};
use super::state::State;
use crate::operators::{Action, OperatorId};

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/admin/session", web::post().to(open))
        .route("/admin/session/close", web::post().to(close));
}

/// The sign-in form.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct SignIn {
    /// The operator's name, recorded with each of their actions.
    name: String,
    /// The admin token (`admin.token`).
    token: String,
}

/// `Location: /admin?<query>`, 303.
fn back_to_console(query: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, format!("/admin{query}")))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// The browser's own origin for this service, as `Origin` names it.
fn own_origin(request: &HttpRequest) -> String {
    let info = request.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// `Set-Cookie` of the console session (`value` empty and `max_age_s` 0:
/// the cookie removed).
fn session_cookie(request: &HttpRequest, value: &str, max_age_s: u64) -> String {
    let secure = if request.connection_info().scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{ADMIN_SESSION_COOKIE}={value}; Path=/admin; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    )
}

/// Opens a console session for the admin token's bearer, under the name
/// they give. Only from the console's own page (`Origin`: this service).
#[utoipa::path(post, path = "/admin/session", tag = "admin",
    request_body(content = SignIn, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "To /admin: with the session cookie, or `?signin=refused` (wrong token) or `?signin=invalid` (a name of 1 to 100 characters and a token are needed)"),
        (status = 403, description = "FORBIDDEN (not sent from this service's own page)", body = super::error::ErrorBody),
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::RateLimited,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn open(
    state: State,
    request: HttpRequest,
    form: Result<web::Form<SignIn>, actix_web::Error>,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings.admin;
    if settings.token.is_empty() {
        return Err(ApiError::not_found("no such route"));
    }
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok());
    if origin != Some(own_origin(&request).as_str()) {
        return Err(ApiError::new(
            Code::Forbidden,
            "a console session opens only from the console's own sign-in page",
        ));
    }
    let Ok(web::Form(SignIn { name, token })) = form else {
        return Ok(back_to_console("?signin=invalid"));
    };
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 || crate::text::refused_in(name).is_some() {
        return Ok(back_to_console("?signin=invalid"));
    }
    if !is_admin_token(settings, &token) {
        tracing::warn!(operator = name, "console sign-in with a wrong admin token");
        return Ok(back_to_console("?signin=refused"));
    }
    let ttl = settings.session_ttl_s;
    let expires = chrono::Utc::now()
        .timestamp()
        .saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX));
    let value = console_session_value(&settings.token, name, expires);
    let action = Action {
        action: "session",
        user_id: None,
        reason: None,
        detail: serde_json::json!({ "expiresAt": expires }),
    };
    state
        .operators
        .record(&OperatorId::token(name), action)
        .await?;
    let mut response = back_to_console("");
    let cookie = header::HeaderValue::from_str(&session_cookie(&request, &value, ttl))
        .map_err(|e| ApiError::internal("console session", e))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}

/// Ends the console session (removes its cookie).
#[utoipa::path(post, path = "/admin/session/close", tag = "admin",
    responses(
        (status = 303, description = "To /admin?signin=closed, the session cookie removed"),
        (status = 403, description = "FORBIDDEN (a cookie-authenticated request from another origin)", body = super::error::ErrorBody),
        super::error::RateLimited
    ))]
pub(super) async fn close(request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let mut response = back_to_console("?signin=closed");
    let cookie = header::HeaderValue::from_str(&session_cookie(&request, "", 0))
        .map_err(|e| ApiError::internal("console session", e))?;
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    Ok(response)
}
