//! Clerk as the app sees it: RS256 session tokens signed by a key of the
//! test's own, published by a local JWKS server in Clerk's format.

use std::sync::OnceLock;

pub const ISSUER: &str = "https://clerk.creditd.test";
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// A signing key of the test's own, published by a local JWKS server as
/// Clerk publishes its keys.
pub struct SigningKey {
    pub kid: String,
    encoding: jsonwebtoken::EncodingKey,
    pub jwk: serde_json::Value,
}

impl SigningKey {
    /// A fresh 2048-bit RSA key (generated once per test binary per `kid`).
    pub fn generate(kid: &str) -> SigningKey {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;

        let mut rng = rand::thread_rng();
        let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public = private.to_public_key();
        SigningKey {
            kid: kid.to_owned(),
            encoding: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: serde_json::json!({
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    }

    /// Signs `claims` with RS256 under this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

/// The key every test app trusts first (RSA generation is slow: once per binary).
pub fn primary_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("test-key-1"))
}

/// A local JWKS server publishing the primary key.
pub async fn jwks_server() -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let jwks = wiremock::MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(JWKS_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "keys": [primary_key().jwk] })),
        )
        .mount(&jwks)
        .await;
    jwks
}
