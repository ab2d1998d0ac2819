//! The crash drill: the real `creditd` binary under load from a client that
//! logs every acknowledged operation is killed with SIGKILL at a random
//! moment and restarted. Every acknowledged operation must be in PostgreSQL,
//! none twice, `reconcile` clean, and every unacknowledged one must be safe
//! to retry with its key.
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

struct Server {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

async fn start_server(db: &TestDb) -> Server {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("serve")
        .env("CREDITD__DATABASE__URL", db.url())
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

/// What the client saw of each operation, by key.
#[derive(Default)]
struct Log {
    acknowledged: BTreeMap<String, (String, i64)>,
    unacknowledged: BTreeMap<String, (String, i64)>,
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
    let mut server = start_server(&db).await;
    for run in 0..runs {
        let loader = actix_web::rt::spawn(load(server.base.clone(), run, log.clone()));
        let delay = rand::thread_rng().gen_range(200..1500);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.child.kill().expect("SIGKILL");
        server.child.wait().expect("reaped");
        loader.await.expect("load");
        server = start_server(&db).await;

        let client = db.client().await;
        let snapshot = {
            let log = lock(&log);
            (log.acknowledged.clone(), log.unacknowledged.clone())
        };
        let (acknowledged, unacknowledged) = snapshot;
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
        println!(
            "crash drill run {}/{runs}: killed after {delay} ms, {} acknowledged so far, lost 0, duplicated 0",
            run + 1,
            acknowledged
        );
    }
    server.child.kill().expect("stop");
    let _ = server.child.wait();
}

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

    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.stop();
    tokio::time::sleep(Duration::from_secs(outage_s)).await;
    let restarted = Instant::now();
    let cluster = own_cluster("outage-drill").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    assert!(!acknowledged.is_empty());
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
