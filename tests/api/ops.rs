//! Health, readiness and metrics; and the whole service through a database
//! outage: readiness fails, money routes answer 503 at once, both recover.

use std::time::{Duration, Instant};

use creditd::db::Database;
use reqwest::Method;
use serde_json::json;

use crate::support::*;

#[actix::test]
async fn health_answers_while_the_process_is_up_and_readiness_checks_the_database() {
    let app = spawn_app().await;
    let health = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    let ready = app
        .http
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(ready.status().as_u16(), 200);
}

#[actix::test]
async fn every_response_carries_a_request_id_and_keeps_a_sane_one_from_the_caller() {
    let app = spawn_app().await;
    let generated = app
        .http
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    let kept = app
        .http
        .get(app.url("/healthz"))
        .header("X-Request-Id", "front-end-42")
        .send()
        .await
        .expect("healthz");
    let id = generated.headers().get("x-request-id").expect("an id");
    assert_eq!(id.len(), 32);
    assert_eq!(
        kept.headers().get("x-request-id").expect("an id"),
        "front-end-42"
    );
}

#[actix::test]
async fn unknown_routes_answer_404_in_the_common_error_shape() {
    let app = spawn_app().await;
    let (status, body) = json_of(app.http.get(app.url("/nope")).send().await.expect("get")).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "NOT_FOUND");
}

#[actix::test]
async fn metrics_expose_every_family_after_some_traffic() {
    let app = spawn_app().await;
    app.post_as("user_m", "/api/credits/claim-bonus", &json!({}))
        .await;
    app.get_as("user_m", "/api/credits").await;
    app.admin(Method::POST, "/admin/accounts/user_m/credits")
        .json(&json!({"amountMicros": -1, "key": "m", "reason": "metrics"}))
        .send()
        .await
        .expect("debit");

    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");

    for family in [
        "creditd_http_requests_total",
        "creditd_http_request_duration_seconds",
        "creditd_ledger_operations_total",
        "creditd_reserves_refused_total",
        "creditd_active_holds",
        "creditd_account_actors_resident",
        "creditd_journal_batch_size",
        "creditd_journal_commit_seconds",
        "creditd_journal_queue_depth",
        "creditd_credited_micros_total",
        "creditd_charged_micros_total",
    ] {
        assert!(text.contains(family), "/metrics lacks {family}");
    }
    assert!(
        text.contains(r#"route="/api/credits""#),
        "HTTP metrics are labelled by route template"
    );
    assert!(
        text.contains(r#"route="/admin/accounts/{userId}/credits""#),
        "path parameters stay templated"
    );
    assert!(!text.contains("user_m"), "no user id in any label");
    assert!(text.contains(r#"creditd_charged_micros_total{model="claude-sonnet-4-5"}"#));
}

#[actix::test]
async fn a_database_outage_fails_readiness_and_money_routes_fast_and_both_recover() {
    let cluster = own_cluster("http-outage").await;
    let jwks = jwks_server().await;
    let settings = outage_settings(&jwks);
    let database = Database {
        config: cluster.config("postgres"),
        cluster: None,
    }
    .with_settings(&settings.database);
    let (base, _handle) = start_app(database, &settings).await;
    let http = reqwest::Client::new();
    let token = |user: &str| {
        primary_key().sign(&json!({
            "sub": user, "iss": ISSUER,
            "exp": chrono::Utc::now().timestamp() + 600,
        }))
    };
    let claim = |user: &str| {
        http.post(format!("{base}/api/credits/claim-bonus"))
            .bearer_auth(token(user))
            .send()
    };
    let grant = || {
        http.post(format!("{base}/admin/accounts/user_resident/credits"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"amountMicros": 3_000_000, "key": "during-outage", "reason": "drill"}))
            .send()
    };
    assert_eq!(
        claim("user_resident")
            .await
            .expect("claim")
            .status()
            .as_u16(),
        201
    );

    cluster.stop();
    let began = Instant::now();
    // Readiness follows the background check: down within an interval.
    let mut ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .expect("readyz");
    while ready.status().is_success() && began.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
    }
    let granted = grant().await.expect("grant");
    let grant_retry_after = granted.headers().get("Retry-After").cloned();
    let (grant_status, grant_body) = json_of(granted).await;
    let (new_user_status, _) = json_of(claim("user_newcomer").await.expect("claim")).await;
    let (read_status, _) = json_of(
        http.get(format!("{base}/api/credits/transactions"))
            .bearer_auth(token("user_resident"))
            .send()
            .await
            .expect("history"),
    )
    .await;
    assert_eq!(ready.status().as_u16(), 503);
    assert_eq!(grant_status, 503, "{grant_body}");
    assert_eq!(grant_body["error"], "UNAVAILABLE");
    assert_eq!(
        grant_retry_after
            .as_ref()
            .and_then(|value| value.to_str().ok()),
        Some("1"),
        "a database outage tells the client when to retry"
    );
    assert_eq!(new_user_status, 503);
    assert_eq!(read_status, 503);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "no request hangs while the database is down"
    );
    assert!(
        !grant_body.to_string().contains("postgres"),
        "no internals leak: {grant_body}"
    );

    let cluster = own_cluster("http-outage").await;
    let mut recovered = false;
    for _ in 0..50 {
        let ready = http
            .get(format!("{base}/readyz"))
            .send()
            .await
            .expect("readyz");
        if ready.status().is_success() {
            let grant = grant().await.expect("grant").status().as_u16();
            let claim = claim("user_newcomer")
                .await
                .expect("claim")
                .status()
                .as_u16();
            assert_eq!(
                (grant, claim),
                (201, 201),
                "the refused operations apply now, once"
            );
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        recovered,
        "readiness and money routes recover without a restart"
    );
    let mut client = connect(&cluster.config("postgres")).await.expect("connect");
    let report = creditd::ledger::reconcile::reconcile(&mut client)
        .await
        .expect("reconcile");
    assert!(report.clean, "{:#?}", report.problems);
    let bonuses: i64 = client
        .query_one(
            "SELECT count(*) FROM credit_transactions WHERE type = 'SIGNUP_BONUS'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(bonuses, 2);
}
