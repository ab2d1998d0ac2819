//! The crash drill: the real `creditd` binary under load from a client that
//! logs every acknowledged operation is killed with SIGKILL at a random
//! moment and restarted. Every acknowledged operation must be in PostgreSQL,
//! none twice, `reconcile` clean, and every unacknowledged one must be safe
//! to retry with its key.
//!
//! Some clients chat on the platform's key (a local fake Anthropic): after
//! every kill, each chat answered 200 must be charged exactly once, for the
//! credits its answer showed.
//!
//! Short form here (`DRILL_RUNS`, default 3); the long form is
//! `DRILL_RUNS=20 cargo test --test api drills -- --nocapture`.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;

use crate::support::*;

const CLIENTS: usize = 16;
const USERS: usize = 4;
/// Of the crash drill's clients, these chat instead of crediting.
const CHAT_CLIENTS: usize = 6;

struct Server {
    child: Child,
    base: String,
}

/// The outside services the drill's server talks to: Clerk's JWKS and a
/// fake Anthropic answering every chat with the same usage.
struct Outside {
    jwks: wiremock::MockServer,
    anthropic: wiremock::MockServer,
}

async fn outside() -> Outside {
    use wiremock::matchers::method;
    use wiremock::{Mock, ResponseTemplate};

    let anthropic = wiremock::MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message(
            "drill answer",
            40,
            12,
            0,
            0,
        )))
        .mount(&anthropic)
        .await;
    Outside {
        jwks: jwks_server().await,
        anthropic,
    }
}

fn chat_token(clerk_id: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    primary_key().sign(&json!({
        "sub": clerk_id, "iss": ISSUER, "iat": now, "nbf": now - 10, "exp": now + 3600,
    }))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

async fn start_server(db: &TestDb, outside: &Outside) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("serve")
        .env("CREDITD__DATABASE__URL", db.url())
        .env(
            "CREDITD__CLERK__JWKS_URL",
            format!("{}{JWKS_PATH}", outside.jwks.uri()),
        )
        .env("CREDITD__CLERK__ISSUER", ISSUER)
        .env(
            "CREDITD__PROVIDERS__ANTHROPIC_BASE_URL",
            outside.anthropic.uri(),
        )
        .env(
            "CREDITD__PROVIDERS__ANTHROPIC_API_KEY",
            PLATFORM_ANTHROPIC_KEY,
        )
        .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("CREDITD__ADMIN__TOKEN", ADMIN_TOKEN)
        .env("CREDITD__DATABASE__POOL_SIZE", "4")
        .env("CREDITD__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start creditd");
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{}/readyz", server.base)).send().await {
            if response.status().is_success() {
                return server;
            }
        }
        assert!(Instant::now() < deadline, "creditd did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Operations a crash drill run must have acknowledged before its kill.
const MIN_ACKNOWLEDGED_PER_RUN: usize = 50;

/// What the client saw of each operation, by key.
#[derive(Default)]
struct Log {
    acknowledged: BTreeMap<String, (String, i64)>,
    unacknowledged: BTreeMap<String, (String, i64)>,
    /// Chats answered 200, by message id: the credits their answer showed.
    chats_answered: BTreeMap<String, i64>,
}

impl Log {
    /// Operations of run `run` acknowledged so far (keys `drill-{run}-…`).
    fn acknowledged_in_run(&self, run: usize) -> usize {
        let prefix = format!("drill-{run}-");
        self.acknowledged
            .keys()
            .filter(|key| key.starts_with(&prefix))
            .count()
    }
}

/// One platform chat; the `usedMicros` of its answer when it was answered.
async fn chat(http: &reqwest::Client, base: &str, user: &str, message_id: &str) -> Option<i64> {
    let response = http
        .post(format!("{base}/api/chat"))
        .bearer_auth(chat_token(user))
        .json(&json!({
            "messages": [{ "role": "user", "content": "drill" }],
            "maxTokens": 64,
            "messageId": message_id,
        }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    let body: serde_json::Value = response.json().await.ok()?;
    body["credits"]["usedMicros"].as_i64()
}

fn body(key: &str, amount: i64) -> serde_json::Value {
    json!({"amountMicros": amount, "key": key, "reason": "crash drill"})
}

async fn send(
    http: &reqwest::Client,
    base: &str,
    user: &str,
    key: &str,
    amount: i64,
) -> Option<u16> {
    http.post(format!("{base}/admin/accounts/{user}/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body(key, amount))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|response| response.status().as_u16())
}

/// Clients credit and debit until the server dies under them.
async fn load(base: String, run: usize, log: Arc<Mutex<Log>>) {
    let http = reqwest::Client::new();
    let clients = (0..CLIENTS).map(|client| {
        let (http, base, log) = (http.clone(), base.clone(), log.clone());
        async move {
            if client < CHAT_CLIENTS {
                for n in 0.. {
                    let message = format!("drill-chat-{run}-{client}-{n}");
                    let user = format!("user_drill_chat_{}", client % 2);
                    match chat(&http, &base, &user, &message).await {
                        Some(used) => {
                            lock(&log).chats_answered.insert(message, used);
                        }
                        // Refused or cut by the kill: nothing was delivered.
                        None => {
                            if http.get(format!("{base}/healthz")).send().await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
            for n in 0.. {
                let key = format!("drill-{run}-{client}-{n}");
                let user = format!("user_drill_{}", (client + n) % USERS);
                let amount = if n % 3 == 2 {
                    -7_000
                } else {
                    10_000 + n as i64
                };
                let status = send(&http, &base, &user, &key, amount).await;
                let mut log = lock(&log);
                match status {
                    Some(201 | 200) => {
                        log.acknowledged.insert(key, (user, amount));
                    }
                    Some(_) => {
                        log.unacknowledged.insert(key, (user, amount));
                    }
                    None => {
                        log.unacknowledged.insert(key, (user, amount));
                        return;
                    }
                }
            }
        }
    });
    futures_util::future::join_all(clients).await;
}

#[actix::test]
async fn acknowledged_operations_survive_sigkill_and_restarts_none_lost_none_twice() {
    let runs: usize = std::env::var("DRILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let db = TestDb::new().await;
    let log = Arc::new(Mutex::new(Log::default()));
    let outside = outside().await;
    let mut server = start_server(&db, &outside).await;
    let http = reqwest::Client::new();
    for user in ["user_drill_chat_0", "user_drill_chat_1"] {
        let funded = http
            .post(format!("{}/admin/accounts/{user}/credits", server.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"amountMicros": 1_000_000_000, "key": format!("fund-{user}"), "reason": "drill funds"}))
            .send()
            .await
            .expect("fund");
        assert!(funded.status().is_success());
    }
    for run in 0..runs {
        let loader = actix_web::rt::spawn(load(server.base.clone(), run, log.clone()));
        // The kill lands while the load runs: once this run has a minimum of
        // acknowledged operations, at a random moment after that.
        let deadline = Instant::now() + Duration::from_secs(60);
        while lock(&log).acknowledged_in_run(run) < MIN_ACKNOWLEDGED_PER_RUN {
            assert!(
                Instant::now() < deadline,
                "run {run}: the load never reached {MIN_ACKNOWLEDGED_PER_RUN} acknowledged operations"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = rand::thread_rng().gen_range(0..800);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.child.kill().expect("SIGKILL");
        server.child.wait().expect("reaped");
        loader.await.expect("load");
        server = start_server(&db, &outside).await;

        let client = db.client().await;
        let snapshot = {
            let log = lock(&log);
            (log.acknowledged.clone(), log.unacknowledged.clone())
        };
        let (acknowledged, unacknowledged) = snapshot;
        let acknowledged_in_run = lock(&log).acknowledged_in_run(run);
        assert!(
            acknowledged_in_run >= MIN_ACKNOWLEDGED_PER_RUN,
            "run {run}: {acknowledged_in_run} acknowledged operations"
        );
        let stored: BTreeMap<String, Vec<(String, i64)>> = client
            .query(
                "SELECT substr(t.idempotency_key, 7), u.clerk_id,
                        CASE t.direction WHEN 'DEBIT' THEN -t.amount_micros ELSE t.amount_micros END
                   FROM credit_transactions t JOIN users u ON u.id = t.user_id
                  WHERE t.idempotency_key LIKE 'admin:drill-%'",
                &[],
            )
            .await
            .expect("stored operations")
            .iter()
            .fold(BTreeMap::new(), |mut stored, row| {
                stored
                    .entry(row.get::<_, String>(0))
                    .or_insert_with(Vec::new)
                    .push((row.get(1), row.get(2)));
                stored
            });
        for (key, sent) in &acknowledged {
            assert_eq!(
                stored.get(key).map(Vec::as_slice),
                Some(std::slice::from_ref(sent)),
                "run {run}: acknowledged {key} must be stored once, as sent"
            );
        }
        let charged: BTreeMap<String, (i64, i64)> = client
            .query(
                "SELECT message_id, count(*), sum(cost_micros)::int8 FROM credit_usages
                  WHERE message_id LIKE 'drill-chat-%' GROUP BY message_id",
                &[],
            )
            .await
            .expect("stored usages")
            .iter()
            .map(|row| (row.get(0), (row.get(1), row.get(2))))
            .collect();
        let answered = lock(&log).chats_answered.clone();
        assert!(
            run > 0 || !answered.is_empty(),
            "run {run}: no chat was answered before the kill"
        );
        for (message, used) in &answered {
            assert_eq!(
                charged.get(message),
                Some(&(1, *used)),
                "run {run}: answered chat {message} must be charged once, as shown"
            );
        }
        assert!(
            charged.values().all(|(count, _)| *count == 1),
            "run {run}: a chat was charged twice"
        );
        db.reconcile_is_clean().await;
        // Unacknowledged operations are safe to retry: applied at most once.
        let http = reqwest::Client::new();
        for (key, (user, amount)) in &unacknowledged {
            let status = send(&http, &server.base, user, key, *amount).await;
            assert!(
                matches!(status, Some(200 | 201)),
                "run {run}: retrying {key} answered {status:?}"
            );
        }
        let acknowledged = {
            let mut log = lock(&log);
            let retried = std::mem::take(&mut log.unacknowledged);
            log.acknowledged.extend(retried);
            log.acknowledged.len()
        };
        db.reconcile_is_clean().await;
        let total: i64 = client
            .query_one(
                "SELECT count(*) FROM credit_transactions WHERE idempotency_key LIKE 'admin:drill-%'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(
            total as usize, acknowledged,
            "run {run}: none twice, none extra"
        );
        let chats = lock(&log).chats_answered.len();
        println!(
            "crash drill run {}/{runs}: killed {delay} ms after {MIN_ACKNOWLEDGED_PER_RUN} were \
             acknowledged ({acknowledged_in_run} by then), {} acknowledged and {chats} chats \
             answered so far, lost 0, duplicated 0, every answered chat charged once",
            run + 1,
            acknowledged
        );
    }
    server.child.kill().expect("stop");
    let _ = server.child.wait();
}

/// Acknowledged requests the outage drill waits for before it stops the
/// database.
const MIN_BEFORE_OUTAGE: usize = 20;

/// The outage drill: PostgreSQL stops under load. Requests fail fast with
/// 503, the service recovers by itself once the database is back, nothing
/// acknowledged is lost. `DRILL_OUTAGE_S` sets the outage (default 2; the
/// long form is 10).
#[actix::test]
async fn under_load_a_database_outage_fails_fast_recovers_by_itself_and_loses_nothing() {
    let outage_s: u64 = std::env::var("DRILL_OUTAGE_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let cluster = own_cluster("outage-drill").await;
    let jwks = jwks_server().await;
    let settings = outage_settings(&jwks);
    let database = creditd::db::Database {
        config: cluster.config("postgres"),
        cluster: None,
    }
    .with_settings(&settings.database);
    let (base, _handle) = start_app(database, &settings).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(BTreeMap::<String, (String, i64)>::new()));
    let slowest_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let successes = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let http = reqwest::Client::new();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (http, base, stop) = (http.clone(), base.clone(), stop.clone());
            let (acknowledged, slowest_ms, successes) =
                (acknowledged.clone(), slowest_ms.clone(), successes.clone());
            actix_web::rt::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("outage-{client}-{n}");
                    let user = format!("user_outage_{}", client % USERS);
                    let began = Instant::now();
                    let status = send(&http, &base, &user, &key, 10_000).await;
                    let took = began.elapsed().as_millis() as u64;
                    slowest_ms.fetch_max(took, std::sync::atomic::Ordering::Relaxed);
                    match status {
                        Some(200 | 201) => {
                            lock(&acknowledged).insert(key, (user, 10_000));
                            lock(&successes).push(Instant::now());
                            n += 1;
                        }
                        Some(503) => {
                            // Retried with the same key: safe, and it is what a client does.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("{key}: unexpected answer {other:?}"),
                    }
                }
            })
        })
        .collect();

    // The load is running (a minimum acknowledged) before the database stops.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lock(&acknowledged).len() < MIN_BEFORE_OUTAGE {
        assert!(Instant::now() < deadline, "no load before the outage");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_outage = lock(&acknowledged).len();
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(outage_s)).await;
    let restarted = Instant::now();
    let cluster = own_cluster("outage-drill").await;
    // Load goes on until requests succeed again (the recovery bound is
    // asserted below), not for a fixed window.
    while !lock(&successes).iter().any(|at| *at > restarted) {
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "the service did not recover"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }

    let slowest = slowest_ms.load(std::sync::atomic::Ordering::Relaxed);
    let first_success_after = lock(&successes)
        .iter()
        .find(|at| **at > restarted)
        .map(|at| at.duration_since(restarted));
    assert!(
        slowest < 2_000,
        "a request took {slowest} ms around the outage"
    );
    let recovery = first_success_after.expect("the service recovered");
    assert!(
        recovery < Duration::from_secs(5),
        "recovered after {recovery:?}"
    );
    let mut client = connect(&cluster.config("postgres")).await.expect("connect");
    let report = creditd::ledger::reconcile::reconcile(&mut client)
        .await
        .expect("reconcile");
    assert!(report.clean, "{:#?}", report.problems);
    let stored: std::collections::BTreeSet<String> = client
        .query(
            "SELECT substr(idempotency_key, 7) FROM credit_transactions
              WHERE idempotency_key LIKE 'admin:outage-%'",
            &[],
        )
        .await
        .expect("stored")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let acknowledged = lock(&acknowledged).clone();
    assert!(before_outage >= MIN_BEFORE_OUTAGE);
    assert!(
        acknowledged.len() > before_outage,
        "acknowledged again after the restart"
    );
    for key in acknowledged.keys() {
        assert!(stored.contains(key), "acknowledged {key} was lost");
    }
    let acknowledged = acknowledged.len();
    println!(
        "outage drill: {outage_s} s outage, slowest request {slowest} ms, \
         recovered {recovery:?} after the restart, {acknowledged} acknowledged, lost 0"
    );
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
