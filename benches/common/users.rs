//! The benches' users: an RSA key of their own published by a local JWKS
//! server as Clerk publishes its keys, a session token per user, a history
//! seeded through the ledger, and `wrk` scripts that send each request with
//! the next user's token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use creditd::accounts::users::ensure_user;
use creditd::config::Settings;
use creditd::db::Database;
use creditd::ledger::{AccountId, Engine, HoldId, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;

/// The issuer the tokens name and the server is configured to expect.
pub const ISSUER: &str = "https://clerk.creditd.bench";
/// Where the local JWKS server publishes the key.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
const KID: &str = "bench-key-1";

/// An RSA key of the bench's own, published by the local JWKS server as
/// Clerk publishes its keys.
pub struct SigningKey {
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    pub fn generate() -> SigningKey {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;

        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public = private.to_public_key();
        SigningKey {
            encoding: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: serde_json::json!({
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": KID,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    }

    /// A session token for `clerk_id`, valid for an hour.
    pub fn token(&self, clerk_id: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "sub": clerk_id,
            "iss": ISSUER,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 3600,
            "azp": "http://localhost:3000",
            "sid": "sess_bench",
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("sign token")
    }

    /// A local JWKS server publishing this key; its URL is
    /// `{server.uri()}{JWKS_PATH}`.
    pub async fn serve(&self) -> wiremock::MockServer {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, ResponseTemplate};

        let jwks = wiremock::MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(JWKS_PATH))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({ "keys": [self.jwk] })),
            )
            .mount(&jwks)
            .await;
        jwks
    }
}

/// The Clerk id of the bench's user number `user`.
pub fn clerk_id(user: usize) -> String {
    format!("user_bench_{user}")
}

/// Every user with a top-up and `cycles` settled usages, written through an
/// engine of its own that is shut down before the app starts.
pub async fn seed_history(database: &Database, settings: &Settings, users: usize, cycles: usize) {
    let client = database.connect().await.expect("connect");
    let pool = database.pool(&settings.database).expect("pool");
    let engine = Arc::new(Engine::start(
        &settings.engine,
        &settings.journal,
        database.clone(),
        pool,
    ));
    let mut accounts = Vec::with_capacity(users);
    for user in 0..users {
        accounts.push(ensure_user(&client, &clerk_id(user)).await.expect("user"));
    }
    for chunk in accounts.chunks(256) {
        let work = chunk.iter().map(|&account: &AccountId| {
            let engine = engine.clone();
            async move {
                let posting = Posting {
                    key: IdempotencyKey::parse(format!("bench-topup-{}", account.0)).expect("key"),
                    kind: TransactionType::TopUp,
                    amount: Micros::new(100_000_000),
                    description: None,
                    stripe_session_id: None,
                    stripe_payment_id: None,
                    metadata: None,
                    expires_at: None,
                };
                engine.credit(account, posting).await.expect("top-up");
                for _ in 0..cycles {
                    let hold = HoldId::generate();
                    engine
                        .reserve(account, hold, Micros::new(100_000))
                        .await
                        .expect("reserve");
                    engine
                        .settle(account, hold, super::charge())
                        .await
                        .expect("settle");
                }
            }
        });
        futures_util::future::join_all(work).await;
    }
    assert!(
        engine.shutdown(Duration::from_secs(30)).await,
        "seeding journal drained"
    );
}

/// A wrk script sending each request with the next user's token, and
/// `body` (JSON) when given.
pub fn write_script(
    path: &Path,
    key: &SigningKey,
    users: usize,
    method: &str,
    body: Option<&str>,
    clerk_id: fn(usize) -> String,
) {
    let tokens: Vec<String> = (0..users)
        .map(|user| format!("  \"{}\",", key.token(&clerk_id(user))))
        .collect();
    let body = match body {
        Some(body) => format!("[[{body}]]"),
        None => "nil".to_owned(),
    };
    let script = format!(
        "local tokens = {{\n{}\n}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
         return wrk.format(\"{method}\", nil, {{ [\"Authorization\"] = \"Bearer \" .. tokens[(i % #tokens) + 1], \
         [\"Content-Type\"] = \"application/json\" }}, {body})\nend\n",
        tokens.join("\n")
    );
    std::fs::write(path, script).expect("write the wrk script");
}
