//! The database's health as probes and scrapes see it, refreshed by one
//! background task on a connection of its own every
//! `database.health_check_interval_ms`. `/readyz` and the database gauges
//! of `/metrics` read the last result: probing or scraping hard never takes
//! a pooled connection from the user routes.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::db::Database;

/// What the last check found.
pub struct Health {
    started: Instant,
    interval: Duration,
    database_up: AtomicBool,
    active_holds: AtomicI64,
    /// Milliseconds after `started` of the last successful check.
    checked_ms: AtomicU64,
    /// SIGTERM arrived: `/readyz` fails so the balancer moves the accounts.
    draining: AtomicBool,
}

impl Health {
    pub fn new(interval: Duration) -> Health {
        Health {
            started: Instant::now(),
            interval,
            database_up: AtomicBool::new(false),
            active_holds: AtomicI64::new(0),
            checked_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        }
    }

    /// From now on `/readyz` fails: the instance is stopping.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The database answered the last check, and that check is recent
    /// (within three intervals: a stuck checker is not taken for health).
    pub fn database_up(&self) -> bool {
        let checked = Duration::from_millis(self.checked_ms.load(Ordering::Acquire));
        let age = self.started.elapsed().saturating_sub(checked);
        self.database_up.load(Ordering::Acquire) && age <= self.interval * 3
    }

    /// Active holds in PostgreSQL at the last successful check.
    pub fn active_holds(&self) -> i64 {
        self.active_holds.load(Ordering::Acquire)
    }

    fn record(&self, active_holds: Option<i64>) {
        match active_holds {
            Some(count) => {
                self.active_holds.store(count, Ordering::Release);
                let now = self.started.elapsed().as_millis() as u64;
                self.checked_ms.store(now, Ordering::Release);
                self.database_up.store(true, Ordering::Release);
            }
            None => self.database_up.store(false, Ordering::Release),
        }
    }
}

/// Checks the database every interval until `health` is dropped (the
/// application is gone). A check that fails or outlasts the interval marks
/// the database down and drops the connection; the next check reconnects.
pub async fn run(database: Database, health: Weak<Health>, interval: Duration) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(health) = health.upgrade() else {
            return;
        };
        let found = tokio::time::timeout(
            interval.max(Duration::from_millis(500)),
            check(&database, &mut client),
        )
        .await
        .ok()
        .flatten();
        if found.is_none() {
            client = None;
        }
        health.record(found);
        drop(health);
    }
}

async fn check(database: &Database, client: &mut Option<tokio_postgres::Client>) -> Option<i64> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        *client = Some(database.connect().await.ok()?);
    }
    let row = client
        .as_ref()?
        .query_one(
            "SELECT count(*) FROM credit_holds WHERE status = 'ACTIVE'",
            &[],
        )
        .await
        .map_err(|error| tracing::warn!(%error, "database health check failed"))
        .ok()?;
    Some(row.get(0))
}

/// Checks once (so the first probe sees the truth), then starts the
/// checker of `health` on the current runtime.
pub async fn start(database: Database, health: &Arc<Health>) {
    let interval = health.interval;
    let mut client = None;
    let found = tokio::time::timeout(
        interval.max(Duration::from_millis(500)),
        check(&database, &mut client),
    )
    .await
    .ok()
    .flatten();
    health.record(found);
    actix_web::rt::spawn(run(database, Arc::downgrade(health), interval));
}
