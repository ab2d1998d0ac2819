//! The engine against the seed's design, side by side on one PostgreSQL.
//!
//! Both sides run the same reserve+settle cycles from the same driver:
//! - engine: one actor per account, group-committed write-behind journal;
//!   a cycle is a chat's: the hold applied without waiting for its commit
//!   (`Engine::admit`), then the settlement waited for (one durable commit);
//! - baseline: the seed's way, one PostgreSQL transaction per request that
//!   locks the balance row (`SELECT … FOR UPDATE`), checks it and updates it.
//!
//! Workloads: one hot account, 10,000 accounts picked uniformly, 10,000
//! accounts picked with Zipf popularity. Each is run closed-loop (every
//! client starts its next cycle when the last one ends: peak throughput), then
//! open-loop at half of that side's peak (latency under half load, measured
//! from each cycle's scheduled start so queueing counts).
//!
//! `cargo bench --bench compare`. Knobs (environment): BENCH_SECS (each
//! measured run, default 3), BENCH_WARMUP_SECS (default 1), BENCH_CLIENTS
//! (default 64), BENCH_ACCOUNTS (default 10000), BENCH_ZIPF_S (default 1.1),
//! BENCH_SEED (default 42), BENCH_HISTORY (settled cycles already in each
//! account's history before the run, default 10). Starts a private durable
//! cluster (fsync and synchronous_commit on) under
//! `target/bench-compare-postgres`, with one database per side, and checks
//! both ledgers with `reconcile` at the end. Also prints the CPU each side
//! used and the engine's journal batches (commits/s, entries per commit).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::Utc;
use creditd::config::Settings;
use creditd::db::Database;
use creditd::ledger::{AccountId, Engine, HoldId};
use creditd::money::Micros;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const HOLD_MICROS: i64 = 100_000;
const MODEL: &str = "claude-sonnet-4-5";
const INPUT_TOKENS: i64 = 500;
const OUTPUT_TOKENS: i64 = 2000;
const OPENING_MICROS: i64 = 1_000_000_000_000;

/// The seed's request path in Rust: every reserve and every settle is one
/// transaction holding the account's balance row lock until it commits.
struct Baseline {
    pool: deadpool_postgres::Pool,
    hold_ttl: chrono::Duration,
}

const LOCK_BALANCE: &str = "
    SELECT balance_micros, held_micros, version FROM credit_balances
     WHERE user_id = $1 FOR UPDATE";
const RESERVE_BALANCE: &str = "
    UPDATE credit_balances SET held_micros = $2, version = $3, updated_at = now()
     WHERE user_id = $1";
const INSERT_HOLD: &str = "
    INSERT INTO credit_holds (id, user_id, seq, amount_micros, status, created_at, expires_at)
    VALUES ($1, $2, $3, $4, 'ACTIVE', $5, $6)";
const LOCK_HOLD: &str = "
    SELECT user_id, amount_micros, status FROM credit_holds WHERE id = $1 FOR UPDATE";
const SETTLE_BALANCE: &str = "
    UPDATE credit_balances SET balance_micros = $2, held_micros = $3, version = $4,
           updated_at = now()
     WHERE user_id = $1";
const FINISH_HOLD: &str = "
    UPDATE credit_holds SET status = 'SETTLED', finished_seq = $2, finished_at = $3
     WHERE id = $1";
const INSERT_USAGE: &str = "
    INSERT INTO credit_usages (id, user_id, seq, hold_id, model, input_tokens, output_tokens,
           cache_read_tokens, cache_write_tokens, total_tokens, cost_micros, held_micros,
           balance_before_micros, balance_after_micros, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, $8, $9, $10, $11, $12, $13)";

impl Baseline {
    /// Locks the balance row, checks `available >= amount`, raises `held`
    /// and inserts the hold: one transaction.
    async fn reserve(&self, account: i64, hold: Uuid, amount: i64) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.context("pool")?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one(&tx.prepare_cached(LOCK_BALANCE).await?, &[&account])
            .await?;
        let (balance, held, version): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let available = balance.checked_sub(held).context("overflow")?;
        if available < amount {
            bail!("insufficient credits: available {available}, required {amount}");
        }
        let seq = version + 1;
        let held_after = held.checked_add(amount).context("overflow")?;
        let now = Utc::now();
        tx.execute(
            &tx.prepare_cached(RESERVE_BALANCE).await?,
            &[&account, &held_after, &seq],
        )
        .await?;
        tx.execute(
            &tx.prepare_cached(INSERT_HOLD).await?,
            &[&hold, &account, &seq, &amount, &now, &(now + self.hold_ttl)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Locks the balance row and the hold, posts the usage, finishes the
    /// hold and moves the balance: one transaction.
    async fn settle(&self, account: i64, hold: Uuid, cost: i64) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.context("pool")?;
        let tx = client.transaction().await?;
        let row = tx
            .query_one(&tx.prepare_cached(LOCK_BALANCE).await?, &[&account])
            .await?;
        let (balance, held, version): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let Some(hold_row) = tx
            .query_opt(&tx.prepare_cached(LOCK_HOLD).await?, &[&hold])
            .await?
        else {
            bail!("no hold {hold}");
        };
        let (owner, hold_amount, status): (i64, i64, &str) =
            (hold_row.get(0), hold_row.get(1), hold_row.get(2));
        if owner != account || status != "ACTIVE" {
            bail!("hold {hold} is not an active hold of account {account}");
        }
        let seq = version + 1;
        let balance_after = balance.checked_sub(cost).context("overflow")?;
        let held_after = held.checked_sub(hold_amount).context("overflow")?;
        let now = Utc::now();
        tx.execute(
            &tx.prepare_cached(SETTLE_BALANCE).await?,
            &[&account, &balance_after, &held_after, &seq],
        )
        .await?;
        tx.execute(&tx.prepare_cached(FINISH_HOLD).await?, &[&hold, &seq, &now])
            .await?;
        tx.execute(
            &tx.prepare_cached(INSERT_USAGE).await?,
            &[
                &Uuid::new_v4(),
                &account,
                &seq,
                &hold,
                &MODEL,
                &INPUT_TOKENS,
                &OUTPUT_TOKENS,
                &(INPUT_TOKENS + OUTPUT_TOKENS),
                &cost,
                &hold_amount,
                &balance,
                &balance_after,
                &now,
            ],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

#[derive(Clone)]
enum Side {
    Engine(Arc<Engine>),
    Baseline(Arc<Baseline>),
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Engine(_) => "engine",
            Side::Baseline(_) => "baseline",
        }
    }

    /// One reserve, then the settle of that hold (the engine's reserve is a
    /// chat's admission: answered once applied, its commit not waited for).
    async fn cycle(&self, account: AccountId) -> anyhow::Result<()> {
        match self {
            Side::Engine(engine) => {
                let hold = HoldId::generate();
                engine
                    .admit(account, hold, Micros::new(HOLD_MICROS))
                    .await?;
                engine.settle(account, hold, common::charge()).await?;
            }
            Side::Baseline(baseline) => {
                let hold = Uuid::new_v4();
                baseline.reserve(account.0, hold, HOLD_MICROS).await?;
                baseline
                    .settle(account.0, hold, common::COST_MICROS)
                    .await?;
            }
        }
        Ok(())
    }
}

/// Exact Zipf(s) over ranks 1..=n: the cumulative distribution, searched.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut total = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|rank| {
                total += (rank as f64).powf(-s);
                total
            })
            .collect();
        for point in &mut cdf {
            *point /= total;
        }
        Zipf { cdf }
    }

    /// A rank from 0 (the most popular) to n - 1.
    fn sample(&self, rng: &mut StdRng) -> usize {
        let u: f64 = rng.gen();
        self.cdf
            .partition_point(|&point| point < u)
            .min(self.cdf.len() - 1)
    }

    /// Share of picks that land on the most popular account.
    fn top_share(&self) -> f64 {
        self.cdf[0]
    }
}

enum Popularity {
    Uniform,
    Zipf(Zipf),
}

struct Workload {
    name: String,
    accounts: Vec<AccountId>,
    popularity: Popularity,
}

impl Workload {
    fn pick(&self, rng: &mut StdRng) -> AccountId {
        let index = match &self.popularity {
            Popularity::Uniform => rng.gen_range(0..self.accounts.len()),
            Popularity::Zipf(zipf) => zipf.sample(rng),
        };
        self.accounts[index]
    }
}

/// How the clients start cycles.
#[derive(Clone, Copy)]
enum Load {
    /// Each client starts its next cycle as soon as the last one ends.
    Closed,
    /// Cycles start on a fixed schedule adding up to this many per second.
    Paced(f64),
}

struct Run {
    cycles: u64,
    elapsed: Duration,
    latencies: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.cycles as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return 0.0;
        }
        let index = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[index] as f64 / 1e6
    }
}

struct Knobs {
    started: std::time::Instant,
    clients: usize,
    secs: u64,
    warmup_secs: u64,
    seed: u64,
}

/// `knobs.clients` clients run cycles of `workload` on `side` for `secs`.
async fn drive(
    side: &Side,
    workload: &Arc<Workload>,
    knobs: &Knobs,
    secs: u64,
    load: Load,
    round: u64,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let started = tokio::time::Instant::now();
    let end = started + Duration::from_secs(secs);
    let clients = knobs.clients;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let side = side.clone();
            let workload = workload.clone();
            let stop = stop.clone();
            let errors = errors.clone();
            let first_error = first_error.clone();
            let mut rng = StdRng::seed_from_u64(knobs.seed ^ (round << 32) ^ client as u64);
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut record =
                    |result: anyhow::Result<()>, begun: tokio::time::Instant| match result {
                        Ok(()) => latencies.push(begun.elapsed().as_nanos() as u64),
                        Err(error) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            let mut first = first_error.lock().unwrap_or_else(|p| p.into_inner());
                            first.get_or_insert_with(|| format!("{error:#}"));
                        }
                    };
                match load {
                    Load::Closed => {
                        while !stop.load(Ordering::Relaxed) {
                            let account = workload.pick(&mut rng);
                            let begun = tokio::time::Instant::now();
                            record(side.cycle(account).await, begun);
                        }
                    }
                    Load::Paced(rate) => {
                        let interval = Duration::from_secs_f64(clients as f64 / rate);
                        let mut scheduled =
                            started + interval.mul_f64(client as f64 / clients as f64);
                        while scheduled < end {
                            tokio::time::sleep_until(scheduled).await;
                            let account = workload.pick(&mut rng);
                            record(side.cycle(account).await, scheduled);
                            scheduled += interval;
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep_until(end).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("client task"));
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let first_error = first_error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Run {
        cycles: latencies.len() as u64,
        elapsed,
        latencies,
        errors: errors.load(Ordering::Relaxed),
        first_error,
    }
}

struct Row {
    workload: String,
    side: &'static str,
    peak: Run,
    half: Run,
    /// The engine's journal during the peak run.
    journal: Option<JournalStats>,
    /// CPU used during the peak run.
    cpu: common::Cpu,
}

/// Totals of the journal writer's histograms (batch size, commit time).
#[derive(Clone, Copy, Default)]
struct JournalStats {
    batches: f64,
    entries: f64,
    commit_seconds: f64,
}

impl JournalStats {
    fn read(metrics: &metrics_exporter_prometheus::PrometheusHandle) -> JournalStats {
        let text = metrics.render();
        let value = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or(0.0)
        };
        JournalStats {
            batches: value("creditd_journal_commit_seconds_count"),
            entries: value("creditd_journal_batch_size_sum"),
            commit_seconds: value("creditd_journal_commit_seconds_sum"),
        }
    }

    fn since(self, earlier: JournalStats) -> JournalStats {
        JournalStats {
            batches: self.batches - earlier.batches,
            entries: self.entries - earlier.entries,
            commit_seconds: self.commit_seconds - earlier.commit_seconds,
        }
    }
}

/// Warm-up (discarded), peak (closed loop), then half of that peak (paced).
async fn measure(
    side: &Side,
    workload: &Arc<Workload>,
    knobs: &Knobs,
    round: u64,
    metrics: &metrics_exporter_prometheus::PrometheusHandle,
) -> Row {
    drive(
        side,
        workload,
        knobs,
        knobs.warmup_secs,
        Load::Closed,
        round,
    )
    .await;
    let before = JournalStats::read(metrics);
    let cpu_before = common::Cpu::now(knobs.started);
    let peak = drive(side, workload, knobs, knobs.secs, Load::Closed, round + 1).await;
    let cpu = common::Cpu::now(knobs.started).since(cpu_before);
    let journal = match side {
        Side::Engine(_) => Some(JournalStats::read(metrics).since(before)),
        Side::Baseline(_) => None,
    };
    let half_rate = (peak.rate() / 2.0).max(1.0);
    let half = drive(
        side,
        workload,
        knobs,
        knobs.secs,
        Load::Paced(half_rate),
        round + 2,
    )
    .await;
    eprintln!(
        "{:>8} {:<32} peak {:>9.0} cycles/s p50 {:>7.2} ms p99 {:>7.2} ms | half {:>9.0}/s p99 {:>7.2} ms | errors {}",
        side.name(),
        workload.name,
        peak.rate(),
        peak.percentile_ms(0.50),
        peak.percentile_ms(0.99),
        half.rate(),
        half.percentile_ms(0.99),
        peak.errors + half.errors,
    );
    Row {
        workload: workload.name.clone(),
        side: side.name(),
        peak,
        half,
        journal,
        cpu,
    }
}

/// Loads every account's actor, as in steady state where active accounts
/// are resident (a cold load is a one-off cost per account per idle period).
async fn preload(engine: &Engine, count: i64) {
    let ids: Vec<i64> = (1..=count).collect();
    for chunk in ids.chunks(256) {
        let loads = chunk
            .iter()
            .map(|&id| async move { engine.balance(AccountId(id)).await.expect("load account") });
        futures_util::future::join_all(loads).await;
    }
}

/// Users 1..=count, each with a top-up (seq 1) and its grant, then `history`
/// settled cycles (a hold and its usage), as the engine would have written them, so
/// both sides start on tables of realistic size with fresh statistics.
async fn seed(database: &Database, count: i64, history: i64) {
    let client = database.connect().await.expect("connect");
    client
        .batch_execute("SET statement_timeout = 0")
        .await
        .expect("no statement timeout while seeding");
    let steps: [(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)]); 6] = [
        (
            "INSERT INTO users (id, clerk_id)
             SELECT g, 'bench_' || g FROM generate_series(1, $1::int8) g",
            &[&count],
        ),
        ("SELECT setval('users_id_seq', $1::int8)", &[&count]),
        (
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                    idempotency_key, balance_before_micros, balance_after_micros, created_at)
             SELECT gen_random_uuid(), g, 1, 'TOP_UP', 'CREDIT', $2::int8,
                    'bench-seed-' || g, 0, $2::int8, now()
               FROM generate_series(1, $1::int8) g",
            &[&count, &OPENING_MICROS],
        ),
        (
            "WITH holds AS (
                INSERT INTO credit_holds (id, user_id, seq, amount_micros, status, created_at,
                       expires_at, finished_seq, finished_at)
                SELECT gen_random_uuid(), g, 2 * k, $4::int8, 'SETTLED', now(),
                       now() + interval '15 minutes', 2 * k + 1, now()
                  FROM generate_series(1, $1::int8) g, generate_series(1, $3::int8) k
                RETURNING id, user_id, seq)
             INSERT INTO credit_usages (id, user_id, seq, hold_id, model, input_tokens,
                    output_tokens, cache_read_tokens, cache_write_tokens, total_tokens,
                    cost_micros, held_micros, balance_before_micros, balance_after_micros,
                    created_at)
             SELECT gen_random_uuid(), user_id, seq + 1, id, $6::text, $7::int8, $8::int8, 0, 0,
                    $7::int8 + $8::int8, $5::int8, $4::int8, $2::int8 - (seq / 2 - 1) * $5::int8,
                    $2::int8 - (seq / 2) * $5::int8, now()
               FROM holds",
            &[
                &count,
                &OPENING_MICROS,
                &history,
                &HOLD_MICROS,
                &common::COST_MICROS,
                &MODEL,
                &INPUT_TOKENS,
                &OUTPUT_TOKENS,
            ],
        ),
        (
            "INSERT INTO credit_balances (user_id, balance_micros, held_micros, version)
             SELECT g, $2::int8 - $3::int8 * $4::int8, 0, 2 * $3::int8 + 1
               FROM generate_series(1, $1::int8) g",
            &[&count, &OPENING_MICROS, &history, &common::COST_MICROS],
        ),
        // What the balance is made of: the top-up's paid grant, with what
        // the usages left of it (an account loads only if they agree).
        (
            "INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
                    source, transaction_id, seq, created_at)
             SELECT gen_random_uuid(), user_id, 'PAID', $1::int8, $1::int8 - $2::int8 * $3::int8,
                    idempotency_key, id, 1, now()
               FROM credit_transactions WHERE idempotency_key LIKE 'bench-seed-%'",
            &[&OPENING_MICROS, &history, &common::COST_MICROS],
        ),
    ];
    for (statement, params) in steps {
        client
            .execute(statement, params)
            .await
            .unwrap_or_else(|e| panic!("seed: {e:?}"));
    }
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .expect("vacuum after seeding");
}

async fn show(database: &Database, setting: &str) -> String {
    let client = database.connect().await.expect("connect");
    let rows = client
        .simple_query(&format!("SHOW {setting}"))
        .await
        .expect("show");
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_default()
}

/// Reconciles a side after its runs. The row-locking baseline is the seed's
/// design, which moves balance rows only: its grants keep what they were
/// seeded with, so the grants check does not apply to it.
async fn reconcile(database: &Database, side: &str) {
    let mut client = database.connect().await.expect("connect");
    let report = creditd::ledger::reconcile::reconcile(&mut client)
        .await
        .expect("reconcile");
    let problems: Vec<_> = report
        .problems
        .iter()
        .filter(|problem| side != "baseline" || problem.check != "grants")
        .collect();
    assert!(
        problems.is_empty(),
        "{side}: reconcile after the bench: {problems:#?}"
    );
    eprintln!(
        "{side}: reconcile clean over {} accounts",
        report.accounts_checked
    );
}

fn ratio(engine: f64, baseline: f64) -> String {
    if baseline > 0.0 {
        format!("{:.1}×", engine / baseline)
    } else {
        "n/a".into()
    }
}

fn print(rows: &[Row], knobs: &Knobs) {
    println!();
    println!(
        "Peak (closed loop, {} clients, {} s per row):",
        knobs.clients, knobs.secs
    );
    println!();
    println!("| workload | side | cycles/s | p50 | p99 | errors | engine/baseline |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for pair in rows.chunks(2) {
        let [engine, baseline] = pair else { continue };
        for row in pair {
            let shown_ratio = if row.side == "engine" {
                ratio(engine.peak.rate(), baseline.peak.rate())
            } else {
                String::new()
            };
            println!(
                "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {} |",
                row.workload,
                row.side,
                row.peak.rate(),
                row.peak.percentile_ms(0.50),
                row.peak.percentile_ms(0.99),
                row.peak.errors,
                shown_ratio
            );
        }
    }
    println!();
    println!("Half of each side's peak (paced, latency from the scheduled start):");
    println!();
    println!("| workload | side | offered/s | achieved/s | p50 | p99 | p99.9 | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} ms | {:.2} ms | {:.2} ms | {} |",
            row.workload,
            row.side,
            row.peak.rate() / 2.0,
            row.half.rate(),
            row.half.percentile_ms(0.50),
            row.half.percentile_ms(0.99),
            row.half.percentile_ms(0.999),
            row.half.errors
        );
    }
    println!();
    println!(
        "CPU during each peak run (cores busy on average; the machine has {} cores):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| workload | side | bench process | postgres | others | idle | CPU ms per cycle (bench + postgres) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in rows {
        let cpu = row.cpu;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} |",
            row.workload,
            row.side,
            cpu.cores(cpu.bench),
            cpu.cores(cpu.postgres),
            cpu.others(),
            (cores - cpu.cores(cpu.machine)).max(0.0),
            (cpu.bench + cpu.postgres) * 1e3 / row.peak.cycles.max(1) as f64
        );
    }
    println!();
    println!("The engine's journal during each peak run:");
    println!();
    println!("| workload | commits/s | entries per commit | mean commit time |");
    println!("|---|---:|---:|---:|");
    for row in rows {
        let Some(journal) = row.journal else { continue };
        let secs = row.peak.elapsed.as_secs_f64();
        let batches = journal.batches.max(1.0);
        println!(
            "| {} | {:.0} | {:.1} | {:.2} ms |",
            row.workload,
            journal.batches / secs,
            journal.entries / batches,
            journal.commit_seconds / batches * 1e3
        );
    }
    for row in rows {
        if let Some(error) = row
            .peak
            .first_error
            .as_ref()
            .or(row.half.first_error.as_ref())
        {
            println!();
            println!("{} / {}: first error: {error}", row.workload, row.side);
        }
    }
}

fn main() {
    let knobs = Knobs {
        started: std::time::Instant::now(),
        clients: common::env_or("BENCH_CLIENTS", 64),
        secs: common::env_or("BENCH_SECS", 3),
        warmup_secs: common::env_or("BENCH_WARMUP_SECS", 1),
        seed: common::env_or("BENCH_SEED", 42),
    };
    let account_count: usize = common::env_or("BENCH_ACCOUNTS", 10_000);
    let zipf_s: f64 = common::env_or("BENCH_ZIPF_S", 1.1);
    let history: i64 = common::env_or("BENCH_HISTORY", 10);
    let mut settings = Settings::default_file().expect("default config");
    settings.engine.call_timeout_ms = 30_000;
    settings.database.pool_wait_timeout_ms = 30_000;
    let metrics = creditd::app::metrics_handle().expect("metrics recorder");
    let system = actix::System::new();
    let rows = system.block_on(async move {
        let cluster = common::start_cluster("bench-compare-postgres").await;
        let engine_db = common::create_database(&cluster, "bench_engine", &settings.database).await;
        let baseline_db =
            common::create_database(&cluster, "bench_baseline", &settings.database).await;
        let users = account_count as i64 + 1;
        seed(&engine_db, users, history).await;
        seed(&baseline_db, users, history).await;
        eprintln!(
            "cluster: fsync={} synchronous_commit={}; pool_size={} on each side; {} clients",
            show(&engine_db, "fsync").await,
            show(&engine_db, "synchronous_commit").await,
            settings.database.pool_size,
            knobs.clients
        );

        let engine = Arc::new(Engine::start(
            &settings.engine,
            &settings.journal,
            engine_db.clone(),
            engine_db.pool(&settings.database).expect("engine pool"),
        ));
        let baseline = Arc::new(Baseline {
            pool: baseline_db.pool(&settings.database).expect("baseline pool"),
            hold_ttl: chrono::Duration::seconds(settings.engine.hold_ttl_s as i64),
        });
        let sides = [Side::Engine(engine.clone()), Side::Baseline(baseline)];
        let loading = std::time::Instant::now();
        preload(&engine, users).await;
        eprintln!(
            "engine: {} accounts loaded in {:.1} s",
            engine.stats().resident_actors,
            loading.elapsed().as_secs_f64()
        );

        let many: Vec<AccountId> = (2..=users).map(AccountId).collect();
        let zipf = Zipf::new(many.len(), zipf_s);
        eprintln!(
            "zipf s={zipf_s}: the most popular account gets {:.1}% of cycles",
            zipf.top_share() * 100.0
        );
        let workloads = [
            Workload {
                name: "1 hot account".into(),
                accounts: vec![AccountId(1)],
                popularity: Popularity::Uniform,
            },
            Workload {
                name: format!("{account_count} accounts, uniform"),
                accounts: many.clone(),
                popularity: Popularity::Uniform,
            },
            Workload {
                name: format!("{account_count} accounts, Zipf s={zipf_s}"),
                accounts: many,
                popularity: Popularity::Zipf(zipf),
            },
        ];
        let mut rows = Vec::new();
        let mut round = 0;
        for workload in workloads {
            let workload = Arc::new(workload);
            for side in &sides {
                rows.push(measure(side, &workload, &knobs, round, &metrics).await);
                round += 3;
            }
        }
        engine.shutdown(Duration::from_secs(30)).await;
        reconcile(&engine_db, "engine").await;
        reconcile(&baseline_db, "baseline").await;
        cluster.stop();
        (rows, knobs)
    });
    let (rows, knobs) = rows;
    print(&rows, &knobs);
}
