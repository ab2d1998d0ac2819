//! Several instances, the parts that are not accounts: singletons run on
//! one instance at a time and move when their lock's connection dies;
//! settings written outside the journal reach the other instances' copies;
//! SIGTERM drains the real binary.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditd::db::singleton::{Election, Singleton};
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

/// Polls `condition` until it holds; panics after `within`.
async fn wait_for(within: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The `application_name` of the session holding `singleton`'s lock in
/// this test's database (other tests' databases hold theirs), and its pid.
async fn holder(db: &TestDb, singleton: Singleton) -> Option<(String, i32)> {
    db.client()
        .await
        .query_opt(
            "SELECT a.application_name, a.pid FROM pg_locks l
               JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND ((l.classid::int8 << 32) | l.objid::int8) = $1",
            &[&singleton.lock_key()],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

/// An instance's election running work that notes, while it runs, that
/// this instance works and how many instances work at once.
fn elect(
    election: Election,
    working: Arc<AtomicBool>,
    together: Arc<AtomicUsize>,
    most_together: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    struct Working(Arc<AtomicBool>, Arc<AtomicUsize>);
    impl Drop for Working {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
            self.1.fetch_sub(1, Ordering::SeqCst);
        }
    }
    tokio::spawn(async move {
        election
            .run(Singleton::AutoRecharge, || {
                let (working, together, most) =
                    (working.clone(), together.clone(), most_together.clone());
                async move {
                    working.store(true, Ordering::SeqCst);
                    most.fetch_max(
                        together.fetch_add(1, Ordering::SeqCst) + 1,
                        Ordering::SeqCst,
                    );
                    let _guard = Working(working, together);
                    std::future::pending::<()>().await;
                }
            })
            .await;
    })
}

#[actix::test]
async fn a_singleton_whose_lock_connection_is_killed_steps_down_and_the_other_instance_takes_over_never_both_at_once(
) {
    let db = TestDb::new().await;
    let settings = settings();
    let check = Duration::from_millis(settings.cluster.singleton_check_ms);
    let together = Arc::new(AtomicUsize::new(0));
    let most_together = Arc::new(AtomicUsize::new(0));
    let working: Vec<Arc<AtomicBool>> = (0..2).map(|_| Arc::default()).collect();
    let tasks: Vec<_> = ["a", "b"]
        .iter()
        .zip(&working)
        .map(|(name, working)| {
            elect(
                db.election(&settings, name),
                working.clone(),
                together.clone(),
                most_together.clone(),
            )
        })
        .collect();
    wait_for(Duration::from_secs(5), "one instance works", async || {
        working.iter().any(|w| w.load(Ordering::SeqCst))
    })
    .await;
    let (first, pid) = holder(&db, Singleton::AutoRecharge)
        .await
        .expect("a holder");
    let first_index = usize::from(first.ends_with("@b"));
    assert!(
        working[first_index].load(Ordering::SeqCst),
        "{first} holds the lock"
    );
    assert!(!working[1 - first_index].load(Ordering::SeqCst));

    db.client()
        .await
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();

    let stepped_down = Instant::now();
    wait_for(check * 3, "the killed holder steps down", async || {
        !working[first_index].load(Ordering::SeqCst)
    })
    .await;
    eprintln!("stepped down {:?} after the kill", stepped_down.elapsed());
    wait_for(check * 10, "the other instance takes over", async || {
        working[1 - first_index].load(Ordering::SeqCst)
    })
    .await;
    let (second, _) = holder(&db, Singleton::AutoRecharge)
        .await
        .expect("a holder");
    assert_ne!(second, first, "the other instance holds the lock now");
    assert_eq!(
        most_together.load(Ordering::SeqCst),
        1,
        "never both at once"
    );
    for task in tasks {
        task.abort();
    }
}

#[actix::test]
async fn a_spending_limit_set_on_one_instance_applies_at_once_on_another_that_had_the_account_resident(
) {
    let fakes = fakes().await;
    let a = app_with(&fakes, |s| s.cluster.instance_id = "a".into()).await;
    let b = a.peer("b").await;
    fund(&a, "user_limits_elsewhere", 5_000_000).await;
    let (status, before) = json_of(
        b.get_as("user_limits_elsewhere", "/api/credits/limits")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["dailyMicros"], serde_json::Value::Null);

    let response = a
        .http
        .put(a.url("/api/credits/limits"))
        .bearer_auth(a.token("user_limits_elsewhere"))
        .json(&json!({ "dailyMicros": 1_000 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    wait_for(
        Duration::from_secs(2),
        "b shows the new limit",
        async || {
            let (_, seen) = json_of(
                b.get_as("user_limits_elsewhere", "/api/credits/limits")
                    .await,
            )
            .await;
            seen["dailyMicros"] == 1_000
        },
    )
    .await;
}

#[actix::test]
async fn sigterm_fails_readyz_at_once_serves_for_the_drain_finishes_the_chat_in_flight_charged_and_exits_0(
) {
    let db = TestDb::new().await;
    let jwks = jwks_server().await;
    let anthropic = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("slow answer", 100, 50, 0, 0))
                .set_delay(Duration::from_millis(1_500)),
        )
        .mount(&anthropic)
        .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("serve")
        .env("CREDITD__DATABASE__URL", db.url())
        .env(
            "CREDITD__CLERK__JWKS_URL",
            format!("{}{JWKS_PATH}", jwks.uri()),
        )
        .env("CREDITD__CLERK__ISSUER", ISSUER)
        .env("CREDITD__PROVIDERS__ANTHROPIC_BASE_URL", anthropic.uri())
        .env(
            "CREDITD__PROVIDERS__ANTHROPIC_API_KEY",
            PLATFORM_ANTHROPIC_KEY,
        )
        .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("CREDITD__ADMIN__TOKEN", ADMIN_TOKEN)
        .env("CREDITD__DATABASE__POOL_SIZE", "4")
        .env("CREDITD__CLUSTER__DRAIN_S", "2")
        .env("CREDITD__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start creditd");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_for(Duration::from_secs(30), "creditd ready", async || {
        http.get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    let token = primary_key().sign(&json!({
        "sub": "user_drained", "iss": ISSUER, "iat": chrono::Utc::now().timestamp(),
        "nbf": chrono::Utc::now().timestamp() - 10, "exp": chrono::Utc::now().timestamp() + 300,
    }));
    let funded = http
        .post(format!("{base}/admin/accounts/user_drained/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "amountMicros": 5_000_000, "key": "drain-fund", "reason": "test funds" }))
        .send()
        .await
        .unwrap();
    assert!(funded.status().is_success(), "{}", funded.status());
    let chat = {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        tokio::spawn(async move {
            let response = http
                .post(format!("{base}/api/chat"))
                .bearer_auth(token)
                .json(&json!({ "messages": conversation(), "maxTokens": 1000 }))
                .send()
                .await
                .expect("the chat in flight is answered");
            json_of(response).await
        })
    };
    wait_for(
        Duration::from_secs(5),
        "the chat reached the provider",
        async || {
            !anthropic
                .received_requests()
                .await
                .unwrap_or_default()
                .is_empty()
        },
    )
    .await;

    // SAFETY: kill(2) on the child we spawned, with a valid signal.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let signalled = Instant::now();
    wait_for(
        Duration::from_millis(500),
        "/readyz fails at once",
        async || {
            http.get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 503)
        },
    )
    .await;
    let (status, body) = json_of(
        http.get(format!("{base}/api/credits"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("still served while draining"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        signalled.elapsed() < Duration::from_secs(2),
        "asked within the drain"
    );

    let (status, answer) = chat.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .expect("creditd exits");
    assert!(exit.success(), "{exit:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "served the whole drain"
    );
    let charged: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_usages u JOIN users p ON p.id = u.user_id
              WHERE p.clerk_id = 'user_drained'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(charged, 1, "the chat in flight was charged once");
}
