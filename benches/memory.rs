//! Resident memory per account: the process's VmRSS after touching 100,000
//! and 1,000,000 accounts (one reserve+settle each, so every actor holds the
//! state a real user leaves behind), then again once the idle actors have
//! passivated.
//!
//! `cargo bench --bench memory`. Knobs (environment): BENCH_ACCOUNT_COUNTS
//! (comma-separated, default `100000,1000000`), BENCH_IDLE_MS (the shortest
//! engine.idle_timeout_ms used, default 10000; raised for a size when touching
//! it takes longer, so that every actor is still resident when measured),
//! BENCH_TOUCH_CONCURRENCY (default 1024). Persistence is stubbed
//! (`Engine::in_memory`): this measures the engine's own memory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use creditd::config::Settings;
use creditd::ledger::{AccountId, Engine, HoldId};
use creditd::money::Micros;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid value")),
        _ => default,
    }
}

/// VmRSS of this process, in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

/// Hands freed heap pages back to the kernel, so RSS shows what is in use.
fn trim_heap() {
    // SAFETY: malloc_trim only walks glibc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// One reserve+settle on each of `count` accounts, `concurrency` at a time.
async fn touch(engine: &Arc<Engine>, count: i64, concurrency: i64) -> Duration {
    let started = Instant::now();
    let mut first = 1;
    while first <= count {
        let last = (first + concurrency - 1).min(count);
        let cycles = (first..=last).map(|id| {
            let engine = engine.clone();
            async move {
                let account = AccountId(id);
                let hold = HoldId::generate();
                engine
                    .reserve(account, hold, Micros::new(100_000))
                    .await
                    .expect("reserve");
                engine
                    .settle(account, hold, common::charge())
                    .await
                    .expect("settle");
            }
        });
        futures_util::future::join_all(cycles).await;
        first = last + 1;
    }
    started.elapsed()
}

struct Measure {
    accounts: i64,
    idle_timeout_ms: u64,
    touch: Duration,
    before: u64,
    resident_actors: usize,
    all_resident: u64,
    passivated_after: Duration,
    after_passivation: u64,
    after_trim: u64,
}

async fn measure(
    settings: &Settings,
    accounts: i64,
    idle_timeout_ms: u64,
    concurrency: i64,
) -> Measure {
    let mut engine_settings = settings.engine.clone();
    engine_settings.idle_timeout_ms = idle_timeout_ms;
    let engine = Arc::new(Engine::in_memory(
        &engine_settings,
        &settings.journal,
        Micros::new(1_000_000_000_000),
    ));
    trim_heap();
    let before = rss_bytes();
    let touch_time = touch(&engine, accounts, concurrency).await;
    let resident_actors = engine.stats().resident_actors;
    let all_resident = rss_bytes();
    eprintln!(
        "{accounts} accounts touched in {:.1} s; {resident_actors} resident; waiting for passivation",
        touch_time.as_secs_f64()
    );
    let waiting = Instant::now();
    let limit = Duration::from_millis(idle_timeout_ms) * 3 + Duration::from_secs(30);
    while engine.stats().resident_actors > 0 && waiting.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let passivated_after = waiting.elapsed();
    assert_eq!(
        engine.stats().resident_actors,
        0,
        "idle actors still resident after {limit:?}"
    );
    let after_passivation = rss_bytes();
    trim_heap();
    let after_trim = rss_bytes();
    engine.shutdown(Duration::from_secs(5)).await;
    Measure {
        accounts,
        idle_timeout_ms,
        touch: touch_time,
        before,
        resident_actors,
        all_resident,
        passivated_after,
        after_passivation,
        after_trim,
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn print(measures: &[Measure]) {
    println!();
    println!(
        "| accounts | idle timeout | touch | RSS before | RSS all resident | resident actors | bytes per resident account | RSS after passivation | RSS after passivation + malloc_trim |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in measures {
        let per_account =
            m.all_resident.saturating_sub(m.before) as f64 / m.resident_actors.max(1) as f64;
        println!(
            "| {} | {:.0} s | {:.1} s | {} | {} | {} | {:.0} B | {} (after {:.1} s) | {} |",
            m.accounts,
            m.idle_timeout_ms as f64 / 1000.0,
            m.touch.as_secs_f64(),
            mib(m.before),
            mib(m.all_resident),
            m.resident_actors,
            per_account,
            mib(m.after_passivation),
            m.passivated_after.as_secs_f64(),
            mib(m.after_trim),
        );
    }
}

fn main() {
    let counts: Vec<i64> = env_or("BENCH_ACCOUNT_COUNTS", "100000,1000000".to_owned())
        .split(',')
        .map(|count| count.trim().parse().expect("BENCH_ACCOUNT_COUNTS: numbers"))
        .collect();
    let idle_ms: u64 = env_or("BENCH_IDLE_MS", 10_000);
    let concurrency: i64 = env_or("BENCH_TOUCH_CONCURRENCY", 1024);
    let mut settings = Settings::default_file().expect("default config");
    settings.engine.call_timeout_ms = 60_000;
    let system = actix::System::new();
    let measures = system.block_on(async move {
        let mut measures = Vec::new();
        let mut seconds_per_account = 0.0;
        for count in counts {
            // Touching must end before the first actor touched goes idle.
            let expected_touch_ms = (seconds_per_account * count as f64 * 1000.0) as u64;
            let idle_timeout_ms = idle_ms.max(expected_touch_ms * 2);
            let measure = measure(&settings, count, idle_timeout_ms, concurrency).await;
            seconds_per_account = measure.touch.as_secs_f64() / count as f64;
            measures.push(measure);
        }
        measures
    });
    print(&measures);
}
