//! The demo's sign-in, standing in for Clerk: a page that signs a person
//! in by name, an RS256 session token signed with a key made at start, set
//! as Clerk's `__session` cookie, and the JWKS that publishes the key.
//! creditd verifies these tokens exactly as it verifies Clerk's.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde::Deserialize;

use super::pages::{escape, page};
use super::Shared;
use crate::http::auth::SESSION_COOKIE;

pub const JWKS_PATH: &str = "/.well-known/jwks.json";
const SIGN_IN_PATH: &str = "/sign-in";
/// How long a demo session token is valid.
const SESSION_S: i64 = 12 * 3600;
const KID: &str = "creditd-demo";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route(JWKS_PATH, web::get().to(jwks))
        .route(SIGN_IN_PATH, web::get().to(sign_in_page))
        .route(SIGN_IN_PATH, web::post().to(sign_in));
}

pub fn sign_in_url(shared: &Shared) -> String {
    format!("{}{SIGN_IN_PATH}", shared.stand_ins_url)
}

/// The demo's signing key and the JWK that publishes it.
pub struct Issuer {
    issuer: String,
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl Issuer {
    /// A fresh 2048-bit RSA key (a second or so of CPU).
    pub fn generate(issuer: String) -> anyhow::Result<Issuer> {
        let mut rng = rsa::rand_core::OsRng;
        let private = rsa::RsaPrivateKey::new(&mut rng, 2048).context("RSA key generation")?;
        let der = private.to_pkcs1_der().context("RSA key encoding")?;
        let public = private.to_public_key();
        Ok(Issuer {
            issuer,
            encoding: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: serde_json::json!({
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": KID,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        })
    }

    /// A session token for `subject`, with Clerk's claims.
    pub fn token(&self, subject: &str, authorized_party: &str) -> anyhow::Result<String> {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "sub": subject,
            "iss": self.issuer,
            "iat": now,
            "nbf": now - 5,
            "exp": now + SESSION_S,
            "azp": authorized_party,
            "sid": format!("sess_demo_{}", uuid::Uuid::new_v4().simple()),
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).context("signing a session token")
    }
}

async fn jwks(shared: web::Data<Shared>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "keys": [shared.identity.jwk] }))
}

async fn sign_in_page(shared: web::Data<Shared>) -> HttpResponse {
    let body = format!(
        r#"<h1>Connexion (démo)</h1>
<form class="panel chat__form" method="post" action="{action}">
<label>Identifiant<input class="chat__input" name="user" value="demo-user" pattern="[A-Za-z0-9_\-]{{1,40}}" required autofocus></label>
<p class="credit-balance__message">Aucun mot de passe : la démo signe un jeton de session local pour ce nom.</p>
<button type="submit" class="chat__send">Se connecter</button>
</form>"#,
        action = escape(&sign_in_url(&shared)),
    );
    page(&shared, "Connexion · Démo", &body)
}

#[derive(Deserialize)]
struct SignIn {
    user: String,
}

/// Signs `user` in: the `__session` cookie (host-only, so creditd on
/// another port of the same host receives it, as Clerk sets it for the
/// app's domain), then on to the demo page.
async fn sign_in(shared: web::Data<Shared>, form: web::Form<SignIn>) -> HttpResponse {
    let user = form.user.trim();
    let valid = !user.is_empty()
        && user.len() <= 40
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return HttpResponse::BadRequest()
            .content_type("text/plain; charset=utf-8")
            .body("field `user`: 1 to 40 letters, digits, _ or -");
    }
    match shared
        .identity
        .token(&format!("user_demo_{user}"), &shared.creditd_url)
    {
        Ok(token) => HttpResponse::SeeOther()
            .insert_header((header::LOCATION, format!("{}/demo", shared.creditd_url)))
            .insert_header((
                header::SET_COOKIE,
                format!(
                    "{SESSION_COOKIE}={token}; Path=/; Max-Age={SESSION_S}; HttpOnly; SameSite=Lax"
                ),
            ))
            .finish(),
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "demo sign-in failed");
            HttpResponse::InternalServerError().body("sign-in failed")
        }
    }
}
