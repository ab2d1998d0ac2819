//! Observability that cannot be abused: closed label sets, probes and
//! scrapes that take no pooled connection, a token on `/metrics`.

use futures_util::future::join_all;

use crate::support::*;

/// The series of requests no route matched or with a method no route
/// knows, in a `/metrics` text (other tests of this process share the
/// recorder, but none of them sends a made-up method).
fn unmatched_series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|line| line.starts_with("creditd_http_requests_total"))
        .filter(|line| line.contains("route=\"unmatched\"") || line.contains("method=\"OTHER\""))
        .map(|line| line.rsplit_once(' ').map_or(line, |(series, _)| series))
        .collect()
}

#[actix::test]
async fn a_thousand_made_up_methods_and_a_thousand_random_paths_add_no_metric_series() {
    let app = spawn_app_with(|s| s.rate_limits.unauthenticated_per_ip_per_second = 1_000_000).await;
    let made_up = |n: usize| reqwest::Method::from_bytes(format!("ZZMETH{n}").as_bytes()).unwrap();
    // One of each first: the series they may add once (`OTHER`, `unmatched`).
    app.http
        .request(made_up(0), app.url("/healthz"))
        .send()
        .await
        .unwrap();
    app.http.get(app.url("/no/such/path")).send().await.unwrap();
    let text = app.metrics().await;
    let before = unmatched_series(&text);
    assert!(
        before.iter().any(|s| s.contains("method=\"OTHER\"")),
        "{before:?}"
    );
    let app = &app;

    for chunk in (1..=1000).collect::<Vec<_>>().chunks(100) {
        join_all(chunk.iter().map(|&n| async move {
            let method = app.http.request(made_up(n), app.url("/healthz")).send();
            let path = app
                .http
                .get(app.url(&format!("/random/{}/{n}", uuid::Uuid::new_v4())))
                .send();
            let (method, path) = futures_util::join!(method, path);
            let refused = method.unwrap().status().as_u16();
            assert!(matches!(refused, 404 | 405), "{refused}");
            assert_eq!(path.unwrap().status(), 404);
        }))
        .await;
    }

    let text = app.metrics().await;
    let after = unmatched_series(&text);
    let added: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(added.is_empty(), "new series: {added:?}");
    assert!(after.len() <= 20, "{after:?}");
    assert!(!text.contains("ZZMETH"));
    assert!(!text.contains("/random/"));
}

#[actix::test]
async fn metrics_and_readyz_hammered_by_500_concurrent_requests_leave_user_routes_answering() {
    let default_pool = creditd::config::Settings::default_file()
        .unwrap()
        .database
        .pool_size;
    let app = spawn_app_with(move |s| {
        s.database.pool_size = default_pool;
        s.rate_limits.unauthenticated_per_ip_per_second = 1_000_000;
    })
    .await;
    app.get_as("user_steady", "/api/credits").await;
    let app = &app;

    let probes = join_all((0..500).map(|n| {
        let path = if n % 2 == 0 { "/metrics" } else { "/readyz" };
        app.http.get(app.url(path)).send()
    }));
    let users = join_all((0..40).map(|n| async move {
        app.get_as(&format!("user_steady_{}", n % 8), "/api/credits")
            .await
            .status()
            .as_u16()
    }));
    let (probes, users) = futures_util::join!(probes, users);

    assert!(users.iter().all(|&s| s == 200), "{users:?}");
    let probe_statuses: Vec<u16> = probes
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    assert!(
        probe_statuses.iter().all(|&s| s == 200),
        "{probe_statuses:?}"
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn readyz_follows_the_background_check_of_the_database() {
    let app = spawn_app_with(|s| s.database.health_check_interval_ms = 100).await;
    assert_eq!(
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let client = app.db.client().await;
    // The checker's query fails while the table it counts is gone.
    client
        .batch_execute("ALTER TABLE credit_holds RENAME TO credit_holds_away")
        .await
        .unwrap();
    // The check runs in the background: wait for it to see the failure.
    let down = readyz_becomes(&app, 503).await;
    // The gauge is the process's: other tests' apps, running at once, set
    // it back to 1 between this app's checks. Read it until this app's
    // check (every 100 ms) was the last to write it, for a few seconds.
    let mut gauge = app.metrics().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !gauge.contains("creditd_database_up 0") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        gauge = app.metrics().await;
    }
    client
        .batch_execute("ALTER TABLE credit_holds_away RENAME TO credit_holds")
        .await
        .unwrap();
    let up = readyz_becomes(&app, 200).await;

    assert_eq!(down, 503);
    assert!(gauge.contains("creditd_database_up 0"), "{gauge}");
    assert_eq!(up, 200);
}

/// Polls `/readyz` until it answers `status` (or 30 s pass); its last status.
async fn readyz_becomes(app: &TestApp, status: u16) -> u16 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = app
            .http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if now == status || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[actix::test]
async fn with_a_metrics_token_metrics_answer_only_its_bearer() {
    let app = spawn_app_with(|s| {
        s.metrics.token = creditd::config::Secret::new("scrape-token-0123456789");
    })
    .await;

    let anonymous = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .status();
    let wrong = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("scrape-token-0123456788")
        .send()
        .await
        .unwrap()
        .status();
    let right = app
        .http
        .get(app.url("/metrics"))
        .bearer_auth("scrape-token-0123456789")
        .send()
        .await
        .unwrap();

    assert_eq!((anonymous.as_u16(), wrong.as_u16()), (401, 401));
    assert_eq!(right.status(), 200);
    assert!(right
        .text()
        .await
        .unwrap()
        .contains("creditd_http_requests_total"));
}
