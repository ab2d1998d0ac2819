//! End users: a Clerk session token (verified by `crate::clerk::tokens`)
//! from `Authorization: Bearer` or, as Clerk sets it for same-origin pages,
//! the `__session` cookie. Operators: the admin bearer token compared in
//! constant time, a console session cookie made from it (`creditd_admin`,
//! HttpOnly, SameSite=Strict, signed with the admin token, short-lived), or
//! the Clerk session of a user listed in `admin.operator_ids`.
//!
//! A browser sends cookies by itself, also on requests another site makes
//! it send: a cookie-authenticated request that changes anything must come
//! from an allowed origin (`server.allowed_origins` or the service's own).

use actix_web::http::header::HeaderMap;
use actix_web::http::Method;
use actix_web::HttpRequest;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::error::{ApiError, Code};
use crate::clerk::tokens::{ClerkUserId, ClerkVerifier, TokenError};
use crate::config::{AdminSettings, MetricsSettings, Secret};
use crate::operators::OperatorId;

/// The Clerk user id (`sub`) of a valid token in `Authorization: Bearer`
/// or, without that header, in the `__session` cookie.
pub async fn authenticate(
    verifier: &ClerkVerifier,
    request: &HttpRequest,
) -> Result<ClerkUserId, ApiError> {
    let verified = if request
        .headers()
        .contains_key(actix_web::http::header::AUTHORIZATION)
    {
        verifier.verify(bearer(request)?).await
    } else {
        match session_cookie(request.headers()) {
            Some(token) => verifier.verify(&token).await,
            None => {
                return Err(ApiError::unauthorized(
                    "missing Authorization: Bearer token (or __session cookie)",
                ))
            }
        }
    };
    verified.map_err(|error| match error {
        TokenError::Refused(reason) => ApiError::unauthorized(reason),
        TokenError::Unavailable => ApiError::new(Code::Unavailable, error.to_string()),
    })
}

fn bearer(request: &HttpRequest) -> Result<&str, ApiError> {
    let header = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer token"))?;
    // `from_utf8` validates a whole token at once; a session token is ~1 KiB
    // read on every request, and anything but base64url fails verification.
    let value = std::str::from_utf8(header.as_bytes())
        .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
    let token = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("Authorization must be `Bearer <token>`"))?;
    Ok(token)
}

/// The name of the cookie Clerk keeps the session token in.
pub const SESSION_COOKIE: &str = "__session";

/// The cookie of an operator console session.
pub const ADMIN_SESSION_COOKIE: &str = "creditd_admin";

/// The `__session` cookie's value, if the request carries a non-empty one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// The value of the cookie `wanted`, if the request carries a non-empty one.
fn cookie(headers: &HeaderMap, wanted: &str) -> Option<String> {
    headers
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == wanted && !value.is_empty())
        .map(|(_, value)| value.trim_matches('"').to_owned())
}

/// Why a request must be refused as cross-site: it changes state (not GET,
/// HEAD or OPTIONS), authenticates by a cookie alone (`__session` or the
/// console's; a bearer token is never sent by a browser on its own) and its `Origin` is
/// missing or neither in `allowed` nor the service's own origin
/// (`own_origin` is asked only then: most requests are reads).
pub fn cross_site_refusal(
    method: &Method,
    headers: &HeaderMap,
    own_origin: impl FnOnce() -> String,
    allowed: &[String],
) -> Option<ApiError> {
    if *method == Method::GET
        || *method == Method::HEAD
        || *method == Method::OPTIONS
        || headers.contains_key(actix_web::http::header::AUTHORIZATION)
        || (session_cookie(headers).is_none() && cookie(headers, ADMIN_SESSION_COOKIE).is_none())
    {
        return None;
    }
    let origin = headers
        .get(actix_web::http::header::ORIGIN)
        .and_then(|value| value.to_str().ok());
    match origin {
        Some(origin) if allowed.iter().any(|a| a == origin) || origin == own_origin() => None,
        Some(origin) => Some(ApiError::new(
            Code::Forbidden,
            format!(
                "Origin {origin} may not change anything with the session cookie (server.allowed_origins)"
            ),
        )),
        None => Some(ApiError::new(
            Code::Forbidden,
            "a request authenticated by the session cookie must carry an Origin header",
        )),
    }
}

/// The operator a request comes from, in the order checked: the admin
/// bearer token (or, with operators listed, an operator's Clerk session
/// token as bearer), the console session cookie, the Clerk `__session`
/// cookie of a listed operator. With neither a token nor operators
/// configured the admin routes do not exist (404); a Clerk user who is not
/// listed is refused (403).
pub async fn authenticate_operator(
    settings: &AdminSettings,
    verifier: &ClerkVerifier,
    request: &HttpRequest,
    now: i64,
) -> Result<OperatorId, ApiError> {
    if settings.token.is_empty() && settings.operator_ids.is_empty() {
        return Err(ApiError::not_found("no such route"));
    }
    if request
        .headers()
        .contains_key(actix_web::http::header::AUTHORIZATION)
    {
        let presented = bearer(request)?;
        if is_admin_token(settings, presented) {
            return Ok(OperatorId::token("bearer"));
        }
        if settings.operator_ids.is_empty() {
            return Err(ApiError::unauthorized("invalid admin token"));
        }
        return clerk_operator(settings, verifier.verify(presented).await);
    }
    let console = cookie(request.headers(), ADMIN_SESSION_COOKIE);
    if let Some(name) = console
        .as_deref()
        .and_then(|value| console_session_name(&settings.token, value, now))
    {
        return Ok(OperatorId::token(&name));
    }
    if let Some(token) = session_cookie(request.headers()) {
        return clerk_operator(settings, verifier.verify(&token).await);
    }
    Err(ApiError::unauthorized(if console.is_some() {
        "the console session expired: sign in again at /admin"
    } else {
        "missing Authorization: Bearer admin token (or a console session)"
    }))
}

/// Whether `presented` is the admin token (compared in constant time).
pub fn is_admin_token(settings: &AdminSettings, presented: &str) -> bool {
    !settings.token.is_empty()
        && constant_time_eq(presented.as_bytes(), settings.token.expose().as_bytes())
}

fn clerk_operator(
    settings: &AdminSettings,
    verified: Result<ClerkUserId, TokenError>,
) -> Result<OperatorId, ApiError> {
    match verified {
        Ok(id) if settings.operator_ids.iter().any(|o| o == id.as_str()) => {
            Ok(OperatorId::clerk(id.as_str()))
        }
        Ok(_) => Err(ApiError::new(
            Code::Forbidden,
            "this Clerk user is not an operator (admin.operator_ids)",
        )),
        Err(TokenError::Refused(reason)) => Err(ApiError::unauthorized(reason)),
        Err(error @ TokenError::Unavailable) => {
            Err(ApiError::new(Code::Unavailable, error.to_string()))
        }
    }
}

/// The console session cookie's value for `name` until `expires` (unix s):
/// `<expires>.<base64url name>.<hex HMAC-SHA256(admin token, label, both)>`.
/// Signed with the admin token, so every instance accepts it and changing
/// the token ends every session; nothing is stored.
pub fn console_session_value(token: &Secret, name: &str, expires: i64) -> String {
    let payload = format!("{expires}.{}", URL_SAFE_NO_PAD.encode(name));
    format!("{payload}.{}", console_session_mac(token, &payload))
}

fn console_session_mac(token: &Secret, payload: &str) -> String {
    let mac = crate::signatures::hmac_sha256(
        token.expose().as_bytes(),
        &[b"creditd-console-session", payload.as_bytes()],
    );
    use hmac::Mac;
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The operator's name of a console session value still valid at `now`.
fn console_session_name(token: &Secret, value: &str, now: i64) -> Option<String> {
    if token.is_empty() {
        return None;
    }
    let (payload, mac) = value.rsplit_once('.')?;
    if !constant_time_eq(
        mac.as_bytes(),
        console_session_mac(token, payload).as_bytes(),
    ) {
        return None;
    }
    let (expires, name) = payload.split_once('.')?;
    if expires.parse::<i64>().ok()? <= now {
        return None;
    }
    String::from_utf8(URL_SAFE_NO_PAD.decode(name).ok()?).ok()
}

/// Checks the bearer token of `/metrics` when `metrics.token` is set
/// (compared in constant time); without one, `/metrics` is open.
pub fn require_metrics_token(
    settings: &MetricsSettings,
    request: &HttpRequest,
) -> Result<(), ApiError> {
    if settings.token.is_empty() {
        return Ok(());
    }
    let presented = bearer(request)?;
    if constant_time_eq(presented.as_bytes(), settings.token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid metrics token"))
    }
}

/// Compares without an early exit on the first differing byte (`subtle`).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    subtle::ConstantTimeEq::ct_eq(presented, expected).into()
}

/// The Clerk user id an operator names (in a path or a query), checked.
pub(super) fn clerk_id_from_operator(path: &str) -> Result<ClerkUserId, ApiError> {
    let id = path.trim();
    if id.is_empty() || id.len() > 200 || crate::text::refused_in(id).is_some() {
        return Err(ApiError::invalid("field `userId`: not a Clerk user id"));
    }
    Ok(ClerkUserId::new(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let found = session_cookie(&headers(&[("cookie", "a=1; __session=tok.en.sig; b=2")]));
        assert_eq!(found.as_deref(), Some("tok.en.sig"));
        assert_eq!(session_cookie(&headers(&[("cookie", "__session=")])), None);
        assert_eq!(
            session_cookie(&headers(&[("cookie", "x__session=t")])),
            None
        );
    }

    #[test]
    fn only_cookie_authenticated_writes_need_an_allowed_origin() {
        let own = "http://127.0.0.1:8080";
        let allowed = vec!["https://app.example".to_owned()];
        let cookie = ("cookie", "__session=t");
        let refused = |method: Method, pairs: &[(&'static str, &'static str)]| {
            cross_site_refusal(&method, &headers(pairs), || own.to_owned(), &allowed)
                .map(|e| e.code)
        };
        assert_eq!(
            refused(Method::GET, &[cookie, ("origin", "https://evil.example")]),
            None
        );
        assert_eq!(
            refused(Method::POST, &[cookie, ("origin", "https://evil.example")]),
            Some(Code::Forbidden)
        );
        assert_eq!(refused(Method::DELETE, &[cookie]), Some(Code::Forbidden));
        assert_eq!(
            refused(Method::POST, &[cookie, ("origin", "https://app.example")]),
            None
        );
        assert_eq!(
            refused(Method::PUT, &[cookie, ("origin", "http://127.0.0.1:8080")]),
            None
        );
        assert_eq!(
            refused(
                Method::POST,
                &[
                    cookie,
                    ("origin", "https://evil.example"),
                    ("authorization", "Bearer t")
                ]
            ),
            None
        );
        assert_eq!(
            refused(Method::POST, &[("origin", "https://evil.example")]),
            None
        );
    }

    #[test]
    fn a_console_session_holds_until_it_expires_and_only_under_its_token() {
        let token = Secret::new("admin-token");
        let value = console_session_value(&token, "Léa", 1_000);
        assert_eq!(
            console_session_name(&token, &value, 999).as_deref(),
            Some("Léa")
        );
        assert_eq!(console_session_name(&token, &value, 1_000), None);
        assert_eq!(
            console_session_name(&Secret::new("rotated"), &value, 999),
            None
        );
        let forged = value.replacen("1000.", "9999.", 1);
        assert_eq!(console_session_name(&token, &forged, 999), None);
    }

    #[test]
    fn the_console_cookie_alone_is_enough_to_need_an_allowed_origin() {
        let refused = cross_site_refusal(
            &Method::POST,
            &headers(&[
                ("cookie", "creditd_admin=v"),
                ("origin", "https://evil.example"),
            ]),
            || "http://127.0.0.1:8080".to_owned(),
            &[],
        );
        assert_eq!(refused.map(|e| e.code), Some(Code::Forbidden));
    }

    #[test]
    fn constant_time_comparison_accepts_only_equal_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
