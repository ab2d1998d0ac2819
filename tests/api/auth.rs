//! Clerk session tokens: only a valid RS256 token from the configured issuer
//! and party opens the end-user routes; the admin token opens the admin routes.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

async fn status_with_token(app: &TestApp, token: &str) -> (u16, serde_json::Value) {
    let response = app
        .http
        .get(app.url("/api/credits"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

fn assert_unauthorized((status, body): (u16, serde_json::Value)) {
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"], "UNAUTHORIZED", "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[actix::test]
async fn a_request_without_a_token_is_unauthorized() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/api/credits"))
        .send()
        .await
        .expect("request");
    assert_unauthorized(json_of(response).await);
}

#[actix::test]
async fn a_malformed_token_is_unauthorized() {
    let app = spawn_app().await;
    assert_unauthorized(status_with_token(&app, "not.a.jwt").await);
    assert_unauthorized(status_with_token(&app, "garbage").await);
}

#[actix::test]
async fn an_expired_token_is_unauthorized() {
    let app = spawn_app().await;
    let mut claims = app.claims("user_expired");
    let now = chrono::Utc::now().timestamp();
    claims["exp"] = json!(now - 60);
    claims["iat"] = json!(now - 600);
    claims["nbf"] = json!(now - 600);
    assert_unauthorized(status_with_token(&app, &primary_key().sign(&claims)).await);
}

#[actix::test]
async fn a_token_not_valid_yet_is_unauthorized() {
    let app = spawn_app().await;
    let mut claims = app.claims("user_early");
    claims["nbf"] = json!(chrono::Utc::now().timestamp() + 60);
    assert_unauthorized(status_with_token(&app, &primary_key().sign(&claims)).await);
}

#[actix::test]
async fn a_token_from_another_issuer_is_unauthorized() {
    let app = spawn_app().await;
    let mut claims = app.claims("user_foreign");
    claims["iss"] = json!("https://evil.clerk.accounts.dev");
    assert_unauthorized(status_with_token(&app, &primary_key().sign(&claims)).await);
}

#[actix::test]
async fn a_token_for_another_authorized_party_is_unauthorized() {
    let app = spawn_app_with(|settings| {
        settings.clerk.authorized_parties = vec!["http://localhost:3000".into()];
    })
    .await;
    let mut claims = app.claims("user_azp");
    claims["azp"] = json!("https://phishing.example");
    assert_unauthorized(status_with_token(&app, &primary_key().sign(&claims)).await);

    let (status, body) = status_with_token(&app, &app.token("user_azp")).await;
    assert_eq!(status, 200, "the configured party is accepted: {body}");
}

#[actix::test]
async fn an_unsigned_token_with_alg_none_is_unauthorized() {
    let app = spawn_app().await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"test-key-1"}"#);
    let claims = URL_SAFE_NO_PAD.encode(app.claims("user_none").to_string());
    assert_unauthorized(status_with_token(&app, &format!("{header}.{claims}.")).await);
}

#[actix::test]
async fn a_token_signed_with_hs256_and_the_public_key_as_secret_is_unauthorized() {
    let app = spawn_app().await;
    let public_modulus = primary_key().jwk["n"].as_str().expect("modulus").to_owned();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(primary_key().kid.clone());
    let token = jsonwebtoken::encode(
        &header,
        &app.claims("user_confused"),
        &jsonwebtoken::EncodingKey::from_secret(public_modulus.as_bytes()),
    )
    .expect("sign");
    assert_unauthorized(status_with_token(&app, &token).await);
}

#[actix::test]
async fn a_token_signed_by_an_unknown_key_is_unauthorized() {
    let app = spawn_app().await;
    let token = rotated_key().sign(&app.claims("user_stranger"));
    assert_unauthorized(status_with_token(&app, &token).await);
}

fn rotated_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("test-key-2"))
}

#[actix::test]
async fn a_rotated_signing_key_is_picked_up_without_a_restart() {
    let app = spawn_app_with(|settings| settings.clerk.jwks_refresh_s_min = 1).await;
    let (status, _) = status_with_token(&app, &app.token("user_rotation")).await;
    assert_eq!(status, 200, "the first key works");

    app.jwks.reset().await;
    Mock::given(method("GET"))
        .and(path(JWKS_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "keys": [primary_key().jwk, rotated_key().jwk]
        })))
        .mount(&app.jwks)
        .await;
    // Refused until a second passed since the last fetch, then fetched on
    // its next use.
    let token = rotated_key().sign(&app.claims("user_rotation"));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = status_with_token(&app, &token).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 401, "{body}");
        assert!(
            Instant::now() < deadline,
            "the new key was never fetched on use: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix::test]
async fn unknown_key_ids_refetch_the_key_set_at_most_once_per_refresh_interval() {
    let app = spawn_app().await;
    let stranger = rotated_key();
    for index in 0..5 {
        let token = stranger.sign(&app.claims(&format!("user_probe_{index}")));
        assert_unauthorized(status_with_token(&app, &token).await);
    }
    let fetches = app
        .jwks
        .received_requests()
        .await
        .map_or(0, |requests| requests.len());
    assert_eq!(
        fetches, 1,
        "five unknown-kid tokens inside 5 s fetch the JWKS once"
    );
}

async fn publish(app: &TestApp, response: ResponseTemplate) {
    app.jwks.reset().await;
    Mock::given(method("GET"))
        .and(path(JWKS_PATH))
        .respond_with(response)
        .mount(&app.jwks)
        .await;
}

async fn jwks_failures(app: &TestApp) -> f64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|line| line.starts_with("creditd_jwks_refresh_failures_total"))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[actix::test]
async fn a_withdrawn_key_is_refused_after_the_scheduled_refresh_and_a_failed_refresh_keeps_the_last_keys(
) {
    let app = spawn_app_with(|settings| settings.clerk.jwks_refresh_s = 1).await;
    publish(
        &app,
        ResponseTemplate::new(200).set_body_json(json!({
            "keys": [primary_key().jwk, rotated_key().jwk]
        })),
    )
    .await;
    let withdrawn = rotated_key().sign(&app.claims("user_withdrawn"));
    assert_eq!(status_with_token(&app, &withdrawn).await.0, 200);
    let kept = app.token("user_kept");
    assert_eq!(status_with_token(&app, &kept).await.0, 200);

    // Clerk withdraws the rotated key: the same token, already verified
    // and cached, is refused once the schedule refetched the set.
    publish(
        &app,
        ResponseTemplate::new(200).set_body_json(json!({ "keys": [primary_key().jwk] })),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = status_with_token(&app, &withdrawn).await;
        if status == 401 {
            assert_unauthorized((status, body));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the withdrawn key is still trusted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status_with_token(&app, &kept).await.0, 200);

    let failures_before = jwks_failures(&app).await;
    publish(&app, ResponseTemplate::new(500)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while jwks_failures(&app).await <= failures_before {
        assert!(Instant::now() < deadline, "no refresh failed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(
        status_with_token(&app, &app.token("user_kept")).await.0,
        200,
        "the last good keys stay"
    );
    assert!(jwks_failures(&app).await > failures_before);
}

#[actix::test]
async fn admin_routes_refuse_a_missing_or_wrong_token() {
    let app = spawn_app().await;
    for path in ["/admin/accounts/user_x", "/admin/reconcile"] {
        let missing = app.http.get(app.url(path)).send().await.expect("request");
        assert_unauthorized(json_of(missing).await);
        let wrong = app
            .http
            .get(app.url(path))
            .bearer_auth("not-the-admin-token")
            .send()
            .await
            .expect("request");
        assert_unauthorized(json_of(wrong).await);
        let user_token = app
            .http
            .get(app.url(path))
            .bearer_auth(app.token("user_x"))
            .send()
            .await
            .expect("request");
        assert_unauthorized(json_of(user_token).await);
    }
    let post = app
        .http
        .post(app.url("/admin/accounts/user_x/credits"))
        .bearer_auth("not-the-admin-token")
        .json(&json!({"amountMicros": 1, "key": "k", "reason": "r"}))
        .send()
        .await
        .expect("request");
    assert_unauthorized(json_of(post).await);
    let client = app.db.client().await;
    let count: i64 = client
        .query_one("SELECT count(*) FROM credit_transactions", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 0);
}

#[actix::test]
async fn admin_routes_do_not_exist_when_no_admin_token_is_configured() {
    let app = spawn_app_with(|settings| {
        settings.admin.token = creditd::config::Secret::new("");
    })
    .await;
    let response = app
        .http
        .get(app.url("/admin/reconcile"))
        .bearer_auth("")
        .send()
        .await
        .expect("request");
    let (status, body) = json_of(response).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "NOT_FOUND");
}

/// A POST with the `__session` cookie alone, from `origin` (if any).
async fn cookie_post(
    app: &TestApp,
    clerk_id: &str,
    origin: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut request = app
        .http
        .post(app.url("/api/credits/claim-bonus"))
        .header("Cookie", format!("__session={}", app.token(clerk_id)));
    if let Some(origin) = origin {
        request = request.header("Origin", origin);
    }
    json_of(request.send().await.expect("request")).await
}

#[actix::test]
async fn the_session_cookie_authenticates_like_a_bearer_token() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/api/credits"))
        .header(
            "Cookie",
            format!("theme=dark; __session={}", app.token("user_cookie")),
        )
        .send()
        .await
        .expect("request");
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balanceMicros"], 0);

    let forged = app
        .http
        .get(app.url("/api/credits"))
        .header("Cookie", "__session=not.a.token")
        .send()
        .await
        .expect("request");
    assert_unauthorized(json_of(forged).await);
}

#[actix::test]
async fn a_cookie_authenticated_write_from_a_foreign_origin_is_forbidden_and_from_an_allowed_one_accepted(
) {
    let app = spawn_app_with(|settings| {
        settings.server.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;

    let (status, body) = cookie_post(&app, "user_csrf", Some("https://evil.example")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "FORBIDDEN");
    assert!(body["message"]
        .as_str()
        .unwrap_or_default()
        .contains("https://evil.example"));
    let (status, body) = cookie_post(&app, "user_csrf", None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (403, json!("FORBIDDEN")),
        "no Origin at all"
    );
    let (_, overview) = json_of(app.get_as("user_csrf", "/api/credits").await).await;
    assert_eq!(
        overview["balanceMicros"], 0,
        "nothing was granted by refused requests"
    );

    let (status, body) = cookie_post(&app, "user_csrf", Some("https://app.example.com")).await;
    assert_eq!(status, 201, "{body}");
    let own = app.address.clone();
    let (status, body) = cookie_post(&app, "user_csrf", Some(&own)).await;
    assert_eq!(status, 200, "the service's own origin: {body}");

    let bearer = app
        .http
        .post(app.url("/api/credits/claim-bonus"))
        .bearer_auth(app.token("user_bearer"))
        .header("Origin", "https://evil.example")
        .send()
        .await
        .expect("request");
    assert_eq!(
        bearer.status(),
        201,
        "a bearer token is never sent by a browser on its own"
    );
}

#[actix::test]
async fn allowed_origins_get_cors_answers_and_others_do_not() {
    let app = spawn_app_with(|settings| {
        settings.server.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/api/credits/topup"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header(
                "Access-Control-Request-Headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com")
        .await
        .expect("preflight");
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://app.example.com")
    );
    assert_eq!(
        allowed
            .headers()
            .get("access-control-allow-credentials")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    let foreign = preflight("https://evil.example").await.expect("preflight");
    assert!(foreign
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}
