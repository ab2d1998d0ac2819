//! Reserve+settle cycles through the ledger engine: durable on PostgreSQL
//! (one hot account; 10,000 accounts), each with the hold's commit waited for
//! (two commits in series) and as a chat runs it (the hold answered once
//! applied, the settlement once durable: one commit), and in memory with
//! persistence stubbed.
//!
//! `cargo bench --bench ledger` (BENCH_SECS sets each run's length, default 5;
//! BENCH_CLIENTS the concurrent callers, default 512; BENCH_PIPELINE_DEPTH
//! the journal's batches in flight per writer, default `config.toml`'s).
//! Starts a private, durable (fsync on) PostgreSQL cluster under
//! `target/bench-postgres`.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditd::accounts::users::ensure_user;
use creditd::config::Settings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};
use creditd::ledger::{AccountId, Engine, HoldId, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;

struct Run {
    name: String,
    cycles: u64,
    elapsed: Duration,
    latencies: Vec<u64>,
    errors: u64,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        Duration::from_nanos(self.latencies[index])
    }
}

/// How a cycle waits for durability.
#[derive(Clone, Copy)]
enum Cycle {
    /// A chat's: the hold answered once applied (`admit`), the settlement
    /// once durable: one commit waited for.
    OneCommit,
    /// The hold's commit, then the settlement's: two commits in series.
    TwoCommits,
}

/// `clients` callers loop reserve → settle on `accounts` for `secs`.
async fn drive(
    name: &str,
    engine: Arc<Engine>,
    accounts: Arc<Vec<AccountId>>,
    clients: usize,
    secs: u64,
    cycle: Cycle,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let engine = engine.clone();
            let accounts = accounts.clone();
            let stop = stop.clone();
            let errors = errors.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 16);
                let mut next = client;
                while !stop.load(Ordering::Relaxed) {
                    let account = accounts[next % accounts.len()];
                    next = next
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407)
                        >> 1;
                    let begun = Instant::now();
                    let hold = HoldId::generate();
                    let amount = Micros::new(100_000);
                    let held = match cycle {
                        Cycle::OneCommit => engine.admit(account, hold, amount).await,
                        Cycle::TwoCommits => engine.reserve(account, hold, amount).await,
                    };
                    let ok = match held {
                        Ok(_) => engine.settle(account, hold, common::charge()).await.is_ok(),
                        Err(_) => false,
                    };
                    if ok {
                        latencies.push(begun.elapsed().as_nanos() as u64);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    Run {
        name: name.to_owned(),
        cycles: latencies.len() as u64,
        elapsed,
        latencies,
        errors: errors.load(Ordering::Relaxed),
    }
}

fn posting(index: usize) -> Posting {
    Posting {
        key: IdempotencyKey::parse(format!("bench-seed-{index}")).expect("key"),
        kind: TransactionType::TopUp,
        amount: Micros::new(1_000_000_000_000),
        description: None,
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: None,
        expires_at: None,
    }
}

async fn seed(engine: &Engine, client: &tokio_postgres::Client, count: usize) -> Vec<AccountId> {
    let mut accounts = Vec::with_capacity(count);
    for index in 0..count {
        let account = ensure_user(client, &format!("bench_{index}"))
            .await
            .expect("user");
        accounts.push(account);
    }
    // Load every account (and fund it) with bounded concurrency.
    for chunk in accounts.chunks(256) {
        let loads = chunk.iter().enumerate().map(|(i, &account)| async move {
            engine
                .credit(account, posting(i))
                .await
                .expect("fund account");
        });
        futures_util::future::join_all(loads).await;
    }
    accounts
}

fn print(runs: &[Run], clients: usize) {
    println!();
    println!("| scenario | clients | cycles | cycles/s | p50 | p99 | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        let rate = run.cycles as f64 / run.elapsed.as_secs_f64();
        println!(
            "| {} | {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} |",
            run.name,
            clients,
            run.cycles,
            rate,
            run.percentile(0.50).as_secs_f64() * 1e3,
            run.percentile(0.99).as_secs_f64() * 1e3,
            run.errors
        );
    }
}

fn main() {
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let clients: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let mut settings = Settings::default_file().expect("default config");
    settings.engine.call_timeout_ms = 30_000;
    settings.database.pool_wait_timeout_ms = 30_000;
    if let Some(depth) = std::env::var("BENCH_PIPELINE_DEPTH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        settings.journal.pipeline_depth = depth;
    }
    println!(
        "journal: {} writers, pipeline depth {}",
        settings.journal.writers, settings.journal.pipeline_depth
    );
    let system = actix::System::new();
    let runs = system.block_on(async move {
        let mut runs = Vec::new();

        let memory = Arc::new(Engine::in_memory(
            &settings.engine,
            &settings.journal,
            Micros::new(i64::MAX / 2),
        ));
        let hot = Arc::new(vec![AccountId(1)]);
        runs.push(
            drive(
                "in memory, 1 hot account",
                memory.clone(),
                hot,
                clients,
                secs,
                Cycle::TwoCommits,
            )
            .await,
        );
        let many = Arc::new((1..=10_000).map(AccountId).collect::<Vec<_>>());
        runs.push(
            drive(
                "in memory, 10,000 accounts",
                memory.clone(),
                many,
                clients,
                secs,
                Cycle::TwoCommits,
            )
            .await,
        );
        memory.shutdown(Duration::from_secs(5)).await;

        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-postgres");
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = tokio::task::spawn_blocking(move || {
            PrivateCluster::start(&dir, Durability::Durable).expect("bench cluster")
        })
        .await
        .expect("start");
        let database = Database {
            config: cluster.config("postgres"),
            cluster: None,
        }
        .with_settings(&settings.database);
        let mut client = database.connect().await.expect("connect");
        db::migrate(&mut client).await.expect("migrate");
        let pool = database.pool(&settings.database).expect("pool");
        let engine = Arc::new(Engine::start(
            &settings.engine,
            &settings.journal,
            database,
            pool,
        ));
        let accounts = seed(&engine, &client, 10_001).await;
        let hot = Arc::new(vec![accounts[0]]);
        let many = Arc::new(accounts[1..].to_vec());
        for (cycle, label) in [
            (Cycle::TwoCommits, "two commits"),
            (Cycle::OneCommit, "one commit (a chat's)"),
        ] {
            let name = format!("durable, 1 hot account, {label}");
            runs.push(drive(&name, engine.clone(), hot.clone(), clients, secs, cycle).await);
            let name = format!("durable, 10,000 accounts, {label}");
            runs.push(drive(&name, engine.clone(), many.clone(), clients, secs, cycle).await);
        }
        engine.shutdown(Duration::from_secs(30)).await;
        let report = creditd::ledger::reconcile::reconcile(&mut client)
            .await
            .expect("reconcile");
        assert!(
            report.clean,
            "reconcile after the bench: {:#?}",
            report.problems
        );
        drop(client);
        cluster.stop();
        runs
    });
    print(&runs, clients);
}
