//! The database stops while operations are in flight: those operations fail
//! with a typed error, nothing is half-applied, and the engine serves again
//! once the database is back, without a restart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};
use creditd::ledger::{AccountId, Engine, HoldId, LedgerError, TransactionType, UsageCharge};
use creditd::pricing::TokenUsage;
use futures_util::future::join_all;

use crate::support::*;

fn charge(cost: i64) -> UsageCharge {
    UsageCharge {
        model: "claude-haiku-4-5".into(),
        tokens: TokenUsage {
            input_tokens: 10,
            output_tokens: 10,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost: micros(cost),
        conversation_id: None,
        message_id: None,
        api_key: None,
    }
}

async fn start_cluster(dir: std::path::PathBuf) -> Arc<PrivateCluster> {
    let cluster =
        tokio::task::spawn_blocking(move || PrivateCluster::start(&dir, Durability::Throwaway))
            .await
            .expect("start task")
            .expect("the cluster starts");
    Arc::new(cluster)
}

/// A migrated cluster of the test's own in `dir`, and an engine on it that
/// fails fast when the cluster stops.
async fn engine_on_own_cluster(
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut creditd::config::Settings),
) -> (Arc<PrivateCluster>, Engine, tokio_postgres::Client) {
    let _ = std::fs::remove_dir_all(dir);
    let cluster = start_cluster(dir.to_path_buf()).await;
    let mut client = connect(&cluster.config("postgres")).await.unwrap();
    db::migrate(&mut client).await.unwrap();
    let mut settings = settings();
    settings.database.connect_timeout_ms = 500;
    settings.database.pool_wait_timeout_ms = 500;
    adjust(&mut settings);
    let database = Database {
        config: cluster.config("postgres"),
        cluster: None,
    }
    .with_settings(&settings.database);
    let pool = database.pool(&settings.database).unwrap();
    let engine = Engine::start(&settings.engine, &settings.journal, database, pool);
    (cluster, engine, client)
}

#[derive(Default)]
struct Seen {
    reserved: Vec<(AccountId, HoldId)>,
    settled: Vec<(AccountId, HoldId)>,
    errors: Vec<LedgerError>,
}

#[actix::test]
async fn operations_in_flight_when_the_database_stops_fail_cleanly_and_the_engine_recovers() {
    let dir = std::env::temp_dir().join(format!("creditd-test-{}-outage", std::process::id()));
    let (cluster, engine, client) =
        engine_on_own_cluster(&dir, |settings| settings.engine.call_timeout_ms = 3_000).await;
    let engine = Arc::new(engine);
    let mut accounts = Vec::new();
    for index in 0..8 {
        let account = creditd::accounts::users::ensure_user(&client, &format!("outage_{index}"))
            .await
            .unwrap();
        engine
            .credit(account, posting("seed", TransactionType::TopUp, eur(100)))
            .await
            .unwrap();
        accounts.push(account);
    }
    drop(client);

    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let workers = accounts.iter().flat_map(|&account| {
        (0..4).map({
            let engine = engine.clone();
            let stop = stop.clone();
            let seen = seen.clone();
            move |_| {
                let engine = engine.clone();
                let stop = stop.clone();
                let seen = seen.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let hold = HoldId::generate();
                        let failed = match engine.reserve(account, hold, micros(1_000)).await {
                            Ok(_) => {
                                seen.lock().unwrap().reserved.push((account, hold));
                                match engine.settle(account, hold, charge(700)).await {
                                    Ok(_) => {
                                        seen.lock().unwrap().settled.push((account, hold));
                                        None
                                    }
                                    Err(error) => Some(error),
                                }
                            }
                            Err(error) => Some(error),
                        };
                        if let Some(error) = failed {
                            seen.lock().unwrap().errors.push(error);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                })
            }
        })
    });
    let workers: Vec<_> = workers.collect();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled_before = seen.lock().unwrap().settled.len();
    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for finished in join_all(workers).await {
        finished.expect("a worker ended without a panic");
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(settled_before > 0, "work committed before the outage");
    assert!(!seen.errors.is_empty(), "the outage was noticed");
    for error in &seen.errors {
        assert!(
            matches!(error, LedgerError::Unavailable(_) | LedgerError::Overloaded),
            "only typed unavailability errors, got {error:?}"
        );
    }
    // While the database is down, new work is refused, not queued forever.
    let down = engine
        .reserve(accounts[0], HoldId::generate(), micros(1))
        .await;
    assert!(matches!(down, Err(LedgerError::Unavailable(_))), "{down:?}");

    drop(cluster);
    let cluster = start_cluster(dir.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for &account in &accounts {
        loop {
            match engine.reserve(account, HoldId::generate(), micros(1)).await {
                Ok(outcome) => {
                    engine.release(account, outcome.record.id).await.unwrap();
                    break;
                }
                Err(error) if Instant::now() < deadline => {
                    assert!(matches!(error, LedgerError::Unavailable(_)), "{error:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("the engine did not recover: {error:?}"),
            }
        }
    }

    let client = connect(&cluster.config("postgres")).await.unwrap();
    for &(account, hold) in &seen.reserved {
        let found = client
            .query_opt(
                "SELECT 1 FROM credit_holds WHERE id = $1 AND user_id = $2",
                &[&hold.0, &account.0],
            )
            .await
            .unwrap();
        assert!(found.is_some(), "acknowledged hold {hold} is durable");
    }
    for &(_, hold) in &seen.settled {
        let found = client
            .query_opt("SELECT 1 FROM credit_usages WHERE hold_id = $1", &[&hold.0])
            .await
            .unwrap();
        assert!(found.is_some(), "acknowledged settle of {hold} is durable");
    }
    for &account in &accounts {
        let snapshot = engine.balance(account).await.unwrap();
        let row = client
            .query_one(
                "SELECT balance_micros, held_micros, version FROM credit_balances WHERE user_id = $1",
                &[&account.0],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                snapshot.balance_micros.get(),
                snapshot.held_micros.get(),
                snapshot.version
            ),
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2)
            ),
            "the engine and PostgreSQL agree on {account:?}"
        );
    }
    let mut client = client;
    let report = creditd::ledger::reconcile::reconcile(&mut client)
        .await
        .unwrap();
    assert!(report.clean, "{:#?}", report.problems);
    assert!(
        engine.shutdown(Duration::from_secs(5)).await,
        "the journal drained"
    );
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
}

#[actix::test]
async fn a_balance_read_never_shows_an_operation_whose_write_failed() {
    let dir = std::env::temp_dir().join(format!("creditd-test-{}-void-read", std::process::id()));
    let (cluster, engine, client) = engine_on_own_cluster(&dir, |_| {}).await;
    let account = creditd::accounts::users::ensure_user(&client, "user_void")
        .await
        .unwrap();
    drop(client);
    engine
        .credit(account, posting("durable", TransactionType::TopUp, eur(10)))
        .await
        .unwrap();
    assert_eq!(
        engine
            .balance_summary(account)
            .await
            .unwrap()
            .balance_micros,
        eur(10)
    );

    let stopping = cluster.clone();
    tokio::task::spawn_blocking(move || stopping.stop())
        .await
        .unwrap();
    // A hold id needs no lookup: the reserve applies in memory at once and
    // only its journal write fails.
    let lost = engine.reserve(account, HoldId::generate(), eur(5)).await;
    let read = engine.balance_summary(account).await;

    assert!(matches!(lost, Err(LedgerError::Unavailable(_))), "{lost:?}");
    match read {
        Err(LedgerError::Unavailable(_)) => {}
        Ok(summary) => assert_eq!(summary.held_micros, eur(0), "the failed hold shows"),
        Err(other) => panic!("unexpected {other:?}"),
    }
    drop(cluster);
    let _cluster = start_cluster(dir.clone()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let summary = loop {
        match engine.balance_summary(account).await {
            Ok(summary) => break summary,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("no recovery: {error:?}"),
        }
    };
    assert_eq!(
        (summary.balance_micros, summary.held_micros),
        (eur(10), eur(0))
    );
    assert!(
        engine.shutdown(Duration::from_secs(5)).await,
        "the journal drained"
    );
}
