//! End users: Clerk session tokens (RS256 JWTs) verified against the
//! instance's JWKS, from `Authorization: Bearer` or, as Clerk sets it for
//! same-origin pages, the `__session` cookie. Operators: a bearer token
//! compared in constant time.
//!
//! A browser sends cookies by itself, also on requests another site makes
//! it send: a cookie-authenticated request that changes anything must come
//! from an allowed origin (`server.allowed_origins` or the service's own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix_web::http::header::HeaderMap;
use actix_web::http::Method;
use actix_web::HttpRequest;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::error::{ApiError, Code};
use crate::config::{AdminSettings, ClerkSettings, MetricsSettings};

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    azp: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    alg: Option<String>,
}

struct CachedToken {
    subject: String,
    expires_at: i64,
}

/// Verifies Clerk session tokens; keeps keys and verified tokens cached.
pub struct ClerkVerifier {
    settings: ClerkSettings,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    verified: Mutex<HashMap<String, CachedToken>>,
}

fn now_s() -> i64 {
    chrono::Utc::now().timestamp()
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ClerkVerifier {
    pub fn new(settings: ClerkSettings) -> anyhow::Result<ClerkVerifier> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.jwks_timeout_ms))
            .build()?;
        Ok(ClerkVerifier {
            settings,
            http,
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The Clerk user id (`sub`) of a valid token in `Authorization: Bearer`
    /// or, without that header, in the `__session` cookie.
    pub async fn authenticate(&self, request: &HttpRequest) -> Result<String, ApiError> {
        if request
            .headers()
            .contains_key(actix_web::http::header::AUTHORIZATION)
        {
            return self.verify(bearer(request)?).await;
        }
        match session_cookie(request.headers()) {
            Some(token) => self.verify(&token).await,
            None => Err(ApiError::unauthorized(
                "missing Authorization: Bearer token (or __session cookie)",
            )),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<String, ApiError> {
        if self.settings.jwks_url.is_empty() {
            return Err(ApiError::unauthorized(
                "end-user authentication is not configured (clerk.jwks_url)",
            ));
        }
        let leeway = self.settings.leeway_s as i64;
        if let Some(subject) = self.cached(token, leeway) {
            return Ok(subject);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| ApiError::unauthorized("malformed session token"))?;
        if header.alg != Algorithm::RS256 {
            return Err(ApiError::unauthorized(
                "session token must be signed with RS256",
            ));
        }
        let kid = header
            .kid
            .ok_or_else(|| ApiError::unauthorized("session token has no key id (kid)"))?;
        let key = self.key(&kid).await?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = self.settings.leeway_s;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        validation.set_issuer(&[self.settings.issuer.as_str()]);
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            let reason = match error.kind() {
                ErrorKind::ExpiredSignature => "session token expired",
                ErrorKind::ImmatureSignature => "session token not valid yet (nbf)",
                ErrorKind::InvalidIssuer => "session token issuer is not accepted",
                ErrorKind::InvalidSignature => "session token signature is invalid",
                ErrorKind::MissingRequiredClaim(_) => "session token lacks a required claim",
                _ => "invalid session token",
            };
            ApiError::unauthorized(reason)
        })?;
        let claims = data.claims;
        if !self.settings.authorized_parties.is_empty() {
            let allowed = claims
                .azp
                .as_deref()
                .is_some_and(|azp| self.settings.authorized_parties.iter().any(|p| p == azp));
            if !allowed {
                return Err(ApiError::unauthorized(
                    "session token was issued for another party (azp)",
                ));
            }
        }
        if claims.sub.is_empty() {
            return Err(ApiError::unauthorized("session token has an empty subject"));
        }
        if crate::ledger::check_text("sub", &claims.sub).is_err() {
            return Err(ApiError::unauthorized(
                "session token subject contains control characters or is too long",
            ));
        }
        self.remember(token, &claims, &kid);
        Ok(claims.sub)
    }

    fn cached(&self, token: &str, leeway: i64) -> Option<String> {
        let cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        let entry = cache.get(token)?;
        (entry.expires_at + leeway > now_s()).then(|| entry.subject.clone())
    }

    /// Caches a verified token while its key is still published (a
    /// refresh that withdrew the key meanwhile has emptied the cache).
    fn remember(&self, token: &str, claims: &Claims, kid: &str) {
        let capacity = self.settings.token_cache_entries;
        if capacity == 0 {
            return;
        }
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if !read(&self.keys).contains_key(kid) {
            return;
        }
        if cache.len() >= capacity {
            let now = now_s();
            cache.retain(|_, entry| entry.expires_at > now);
            if cache.len() >= capacity {
                cache.clear();
            }
        }
        cache.insert(
            token.to_owned(),
            CachedToken {
                subject: claims.sub.clone(),
                expires_at: claims.exp,
            },
        );
    }

    /// The key for `kid`, refetching the JWKS when it is unknown (at most
    /// once per `jwks_min_refresh_s`).
    async fn key(&self, kid: &str) -> Result<DecodingKey, ApiError> {
        if let Some(key) = read(&self.keys).get(kid) {
            return Ok(key.clone());
        }
        let mut last = self.last_fetch.lock().await;
        if let Some(key) = read(&self.keys).get(kid) {
            return Ok(key.clone());
        }
        let min_refresh = Duration::from_secs(self.settings.jwks_min_refresh_s);
        if last.is_some_and(|at| at.elapsed() < min_refresh) {
            return Err(ApiError::unauthorized(
                "session token signed with an unknown key",
            ));
        }
        *last = Some(Instant::now());
        let keys = self.fetch().await.inspect_err(|_| refresh_failed())?;
        let found = keys.get(kid).cloned();
        self.install(keys);
        found.ok_or_else(|| ApiError::unauthorized("session token signed with an unknown key"))
    }

    /// Refetches the JWKS (the schedule of `clerk.jwks_refresh_s`). A failed
    /// refetch keeps the last good keys; it is logged and counted.
    pub async fn refresh(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) if !keys.is_empty() => {
                self.install(keys);
                true
            }
            Ok(_) | Err(_) => {
                refresh_failed();
                false
            }
        }
    }

    /// Publishes a fetched key set. Verified tokens are forgotten: one
    /// signed by a key the set no longer has must not pass from the cache.
    fn install(&self, keys: HashMap<String, DecodingKey>) {
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, ApiError> {
        let unavailable = |error: String| {
            tracing::warn!(%error, "cannot fetch the Clerk JWKS");
            ApiError::new(
                Code::Unavailable,
                "cannot verify session tokens right now; retry",
            )
        };
        let response = self
            .http
            .get(&self.settings.jwks_url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !response.status().is_success() {
            return Err(unavailable(format!("JWKS answered {}", response.status())));
        }
        let jwks: Jwks = response
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            if jwk.kty != "RSA" || jwk.alg.as_deref().is_some_and(|alg| alg != "RS256") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else {
                continue;
            };
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    keys.insert(kid, key);
                }
                Err(error) => tracing::warn!(%kid, %error, "skipping an unusable JWKS key"),
            }
        }
        Ok(keys)
    }
}

fn refresh_failed() {
    tracing::warn!("JWKS refetch failed; the last good keys stay in use");
    metrics::counter!("creditd_jwks_refresh_failures_total").increment(1);
}

/// Refetches the JWKS every `clerk.jwks_refresh_s` while the verifier
/// lives, so a key Clerk withdrew stops being trusted without a restart.
pub fn spawn_jwks_refresh(verifier: &Arc<ClerkVerifier>) {
    if verifier.settings.jwks_url.is_empty() {
        return;
    }
    let period = Duration::from_secs(verifier.settings.jwks_refresh_s);
    let verifier = Arc::downgrade(verifier);
    actix_web::rt::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let Some(verifier) = verifier.upgrade() else {
                return;
            };
            verifier.refresh().await;
        }
    });
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

/// The `__session` cookie's value, if the request carries a non-empty one.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(actix_web::http::header::COOKIE)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.trim_matches('"').to_owned())
}

/// Why a request must be refused as cross-site: it changes state (not GET,
/// HEAD or OPTIONS), authenticates by the `__session` cookie alone (a
/// bearer token is never sent by a browser on its own) and its `Origin` is
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
        || session_cookie(headers).is_none()
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

/// Checks the admin bearer token. With no token configured the admin
/// routes do not exist (404).
pub fn require_admin(settings: &AdminSettings, request: &HttpRequest) -> Result<(), ApiError> {
    if settings.token.is_empty() {
        return Err(ApiError::not_found("no such route"));
    }
    let presented = bearer(request)?;
    if constant_time_eq(presented.as_bytes(), settings.token.expose().as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid admin token"))
    }
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
    let equal: bool =
        subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), settings.token.expose().as_bytes())
            .into();
    if equal {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid metrics token"))
    }
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for index in 0..a.len().max(b.len()) {
        let x = a.get(index).copied().unwrap_or(0);
        let y = b.get(index).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0
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
    fn constant_time_comparison_accepts_only_equal_tokens() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
