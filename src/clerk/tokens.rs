//! Clerk session tokens (RS256 JWTs) verified against the instance's JWKS
//! (`jsonwebtoken`'s `Jwk` and `DecodingKey::from_jwk`), keys refetched on
//! a schedule and when an unknown key id shows up; verified tokens cached
//! until they expire or the key set changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::ClerkSettings;

/// A Clerk user id (a session token's `sub`, a webhook's `data.id`, an
/// operator's path), as each edge checked it (not empty, no control
/// characters, not over-long: each names its own field when it refuses).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClerkUserId(String);

impl ClerkUserId {
    /// An id its edge has checked.
    pub fn new(checked: impl Into<String>) -> ClerkUserId {
        ClerkUserId(checked.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClerkUserId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::ops::Deref for ClerkUserId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Why a session token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token is not valid (answered 401 with this reason).
    #[error("{0}")]
    Refused(&'static str),
    /// The JWKS cannot be fetched: nothing can be verified now (503).
    #[error("cannot verify session tokens right now; retry")]
    Unavailable,
}

/// The JWKS document, each key kept raw until read on its own.
#[derive(Debug, Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    azp: Option<String>,
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

    /// The Clerk user id (`sub`) of a valid session token.
    pub async fn verify(&self, token: &str) -> Result<ClerkUserId, TokenError> {
        if self.settings.jwks_url.is_empty() {
            return Err(TokenError::Refused(
                "end-user authentication is not configured (clerk.jwks_url)",
            ));
        }
        let leeway = self.settings.leeway_s as i64;
        if let Some(subject) = self.cached(token, leeway) {
            return Ok(ClerkUserId::new(subject));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError::Refused("malformed session token"))?;
        if header.alg != Algorithm::RS256 {
            return Err(TokenError::Refused(
                "session token must be signed with RS256",
            ));
        }
        let kid = header
            .kid
            .ok_or(TokenError::Refused("session token has no key id (kid)"))?;
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
            TokenError::Refused(reason)
        })?;
        let claims = data.claims;
        if !self.settings.authorized_parties.is_empty() {
            let allowed = claims
                .azp
                .as_deref()
                .is_some_and(|azp| self.settings.authorized_parties.iter().any(|p| p == azp));
            if !allowed {
                return Err(TokenError::Refused(
                    "session token was issued for another party (azp)",
                ));
            }
        }
        if claims.sub.is_empty() {
            return Err(TokenError::Refused("session token has an empty subject"));
        }
        if crate::ledger::check_text("sub", &claims.sub).is_err() {
            return Err(TokenError::Refused(
                "session token subject contains control or invisible formatting characters, or is too long",
            ));
        }
        self.remember(token, &claims, &kid);
        Ok(ClerkUserId::new(claims.sub))
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
    /// once per `jwks_refresh_s_min`).
    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if let Some(key) = read(&self.keys).get(kid) {
            return Ok(key.clone());
        }
        let mut last = self.last_fetch.lock().await;
        if let Some(key) = read(&self.keys).get(kid) {
            return Ok(key.clone());
        }
        let min_refresh = Duration::from_secs(self.settings.jwks_refresh_s_min);
        if last.is_some_and(|at| at.elapsed() < min_refresh) {
            return Err(TokenError::Refused(
                "session token signed with an unknown key",
            ));
        }
        *last = Some(Instant::now());
        let keys = self.fetch().await.inspect_err(|_| refresh_failed())?;
        let found = keys.get(kid).cloned();
        self.install(keys);
        found.ok_or(TokenError::Refused(
            "session token signed with an unknown key",
        ))
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

    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, TokenError> {
        let unavailable = |error: String| {
            tracing::warn!(%error, "cannot fetch the Clerk JWKS");
            TokenError::Unavailable
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
        // Each key is read on its own: one of a shape this service does not
        // use (another type, a future parameter) is skipped, not fatal.
        let jwks: RawJwkSet = response
            .json()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let mut keys = HashMap::new();
        for raw in jwks.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(raw) else {
                continue;
            };
            let rs256 = jwk
                .common
                .key_algorithm
                .is_none_or(|algorithm| algorithm == KeyAlgorithm::RS256);
            if !matches!(jwk.algorithm, AlgorithmParameters::RSA(_)) || !rs256 {
                continue;
            }
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            match DecodingKey::from_jwk(&jwk) {
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
    metrics::counter!(crate::telemetry::JWKS_REFRESH_FAILURES_TOTAL.name).increment(1);
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
