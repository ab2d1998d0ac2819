//! The demo's sign-in, standing in for Clerk: a page that signs a person
//! in by name, an RS256 session token signed with a key made at start, set
//! as Clerk's `__session` cookie, and the JWKS that publishes the key.
//! creditd verifies these tokens exactly as it verifies Clerk's. At each
//! sign-in it also tells creditd the person's address, as Clerk's webhook
//! does when an address is set (a Svix-signed `user.updated`), so creditd's
//! emails reach the demo's mailbox; the signup bonus stays the page's to
//! claim, as for a user Clerk never announced.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use anyhow::Context;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::Mac;
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
    let subject = format!("user_demo_{user}");
    if let Err(error) = announce(&shared, &subject, user).await {
        // The person still signs in; only their emails wait for an address.
        tracing::error!(error = %format!("{error:#}"), "demo: telling creditd the address failed");
    }
    match shared.identity.token(&subject, &shared.creditd_url) {
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

/// The address the demo gives `user`: on the `.test` domain, which never
/// reaches anyone.
pub fn demo_address(user: &str) -> String {
    format!("{}@demo.test", user.to_ascii_lowercase())
}

/// Sends creditd Clerk's `user.updated` for `subject` with its address,
/// signed as Svix signs (HMAC-SHA256 of `id.timestamp.body` keyed with the
/// secret's base64 part; `hmac_sha256` puts the dots). Replayed at every
/// sign-in: creditd's effects are idempotent.
async fn announce(shared: &Shared, subject: &str, user: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({
        "object": "event",
        "type": "user.updated",
        "data": {
            "id": subject,
            "object": "user",
            "first_name": user,
            "email_addresses": [{
                "id": "idn_demo",
                "email_address": demo_address(user),
                "verification": { "status": "verified" },
            }],
            "primary_email_address_id": "idn_demo",
            "created_at": chrono::Utc::now().timestamp_millis(),
        },
    })
    .to_string();
    let id = format!("msg_demo_{}", uuid::Uuid::new_v4().simple());
    let timestamp = chrono::Utc::now().timestamp().to_string();
    let key = base64::engine::general_purpose::STANDARD
        .decode(shared.clerk_webhook_secret.trim_start_matches("whsec_"))
        .context("the demo's Clerk webhook secret")?;
    let mac = crate::signatures::hmac_sha256(
        &key,
        &[id.as_bytes(), timestamp.as_bytes(), body.as_bytes()],
    );
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let response = shared
        .http
        .post(format!("{}/api/webhooks/clerk", shared.creditd_url))
        .header("svix-id", id)
        .header("svix-timestamp", timestamp)
        .header("svix-signature", format!("v1,{signature}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .context("POST /api/webhooks/clerk")?;
    anyhow::ensure!(
        response.status().is_success(),
        "creditd answered {} to user.updated",
        response.status()
    );
    Ok(())
}
