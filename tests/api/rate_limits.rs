//! Abuse limits: platform chats in flight per account, the per-IP rate of
//! the routes that need no token; over a limit, 429 with `Retry-After`.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

/// The value of a counter series in `/metrics`, 0 when absent.
pub async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

#[actix::test]
async fn fifty_concurrent_platform_chats_of_one_account_with_a_limit_of_8_serve_8_and_refuse_42_with_retry_after(
) {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("Done.", 40, 10, 0, 0))
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |s| s.rate_limits.chats_in_flight_per_account = 8).await;
    fund(&app, "user_busy", 100_000_000).await;
    let refused_before = metric(
        &app,
        "creditd_rate_limited_total{limit=\"chats_in_flight\"}",
    )
    .await;

    let body = json!({ "messages": conversation(), "maxTokens": 100 });
    let answers = join_all((0..50).map(|_| app.post_as("user_busy", "/api/chat", &body))).await;

    let mut served = 0;
    let mut refused = 0;
    for answer in answers {
        match answer.status().as_u16() {
            200 => served += 1,
            429 => {
                let retry_after = answer
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(retry_after.is_some_and(|s| s >= 1), "{retry_after:?}");
                let (_, body) = json_of(answer).await;
                assert_eq!(body["error"], "RATE_LIMITED");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((served, refused), (8, 42));
    let (_, overview) = json_of(app.get_as("user_busy", "/api/credits").await).await;
    assert_eq!(overview["heldMicros"], 0, "nothing held after");
    let counted = metric(
        &app,
        "creditd_rate_limited_total{limit=\"chats_in_flight\"}",
    )
    .await;
    assert!(
        counted - refused_before >= 42.0,
        "{counted} - {refused_before}"
    );
    let served_after = app
        .post_as(
            "user_busy",
            "/api/chat",
            &json!({ "messages": conversation(), "maxTokens": 100 }),
        )
        .await
        .status();
    assert_eq!(served_after, 200, "the places were given back");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn unauthenticated_requests_over_the_per_ip_rate_get_429_while_user_routes_answer() {
    let app = spawn_app_with(|s| s.rate_limits.unauthenticated_per_ip_per_second = 10).await;

    let probes = join_all((0..60).map(|_| app.http.get(app.url("/healthz")).send())).await;
    let user = app
        .get_as("user_after_probes", "/api/credits")
        .await
        .status();

    let statuses: Vec<u16> = probes
        .iter()
        .map(|r| r.as_ref().expect("probe").status().as_u16())
        .collect();
    let passed = statuses.iter().filter(|&&s| s == 200).count();
    let limited: Vec<_> = probes
        .iter()
        .flatten()
        .filter(|r| r.status().as_u16() == 429)
        .collect();
    assert!((10..=16).contains(&passed), "{statuses:?}");
    assert_eq!(passed + limited.len(), 60, "{statuses:?}");
    assert!(limited
        .iter()
        .all(|r| r.headers().contains_key("retry-after")));
    assert_eq!(user, 200, "user routes are not limited per IP");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_webhook_body_sent_too_slowly_is_cut_with_408_before_the_worker_is_held_long() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = spawn_app_with(|s| {
        s.server.client_request_timeout_ms = 500;
        s.stripe.webhook_secret = creditd::config::Secret::new("whsec_slow_body_test");
    })
    .await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let started = std::time::Instant::now();
    stream
        .write_all(
            b"POST /api/webhooks/stripe HTTP/1.1\r\nHost: creditd\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\":",
        )
        .await
        .unwrap();

    let mut answer = vec![0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
        .await
        .expect("answered before the client finished its body")
        .unwrap();

    let head = String::from_utf8_lossy(&answer[..read]).into_owned();
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(head.contains("REQUEST_TIMEOUT"), "{head}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}
