//! The journal writer: gathers entries from every account for up to
//! `batch_max` entries or `batch_delay_us` (only while another batch is in
//! flight: a lone batch commits at once), writes them in one PostgreSQL
//! transaction (multi-row `unnest` inserts plus fenced balance updates), then
//! publishes each account's new durable seq. A caller is answered only once
//! its entry's seq is durable.
//!
//! Here: the entries and the actors' handle on the writers; `writer.rs`:
//! the gathering loop and the batches in flight; `batch.rs`: what one batch
//! writes (admissibility, columns, fenced updates, the per-account undo).
//!
//! One round trip. A batch goes to PostgreSQL whole: `BEGIN`, the balance
//! update, the row statements and `COMMIT`, sent together and run back to
//! back, with statements that notify the other instances of the accounts
//! taken over and raise on any case the writer would handle per account (a
//! fenced account, a row skipped or not found). Such a batch rolls back and
//! is written again statement by statement, as below
//! (`creditd_journal_batches_rewritten_total`).
//!
//! Failure handling, per account: entries of an account whose balance row
//! moved (fencing) or whose write failed are failed, the account's actor is
//! told (its durable watch turns `failed`) and reloads; entries of that actor
//! incarnation still queued are dropped unwritten.
//!
//! One account's bad entry never fails, nor slows, other accounts' entries:
//!
//! - Before writing, every entry is checked in Rust against what PostgreSQL
//!   would refuse (NUL characters in text and jsonb, timestamps out of range,
//!   the schema's CHECK constraints, an overflowing `total_tokens`). An
//!   account with an entry that fails the check is failed and nothing of it
//!   is sent.
//! - What only the database can tell (a unique constraint: a reused hold id,
//!   a seq or key already taken; a finish that matches no active hold of the
//!   account) is counted instead of raised: the inserts are `ON CONFLICT DO
//!   NOTHING ... RETURNING`, the finish returns the holds it finished, and
//!   the writer compares, per account, rows written with rows sent. An
//!   account whose counts differ is undone inside the same transaction (its
//!   inserted rows deleted by id, its finished holds made ACTIVE again, its
//!   balance row put back to the amounts and version it had before the
//!   batch) and failed; the other accounts commit in that transaction.
//! - Only an unexpected database error still aborts the batch; it is then
//!   retried one account per transaction, so the accounts that can commit
//!   do. A lost connection (or a terminated backend) fails the whole batch
//!   instead: whether it committed cannot be known, and every account of it
//!   reloads from what PostgreSQL has.
//!
//! Pipelining. Each writer (one per lane, accounts by `id % writers`) may
//! have up to `journal.pipeline_depth` batches in flight, each on a
//! connection of its own: the next batch gathers, and writes the accounts
//! it does not share with batches in flight, while earlier ones commit.
//!
//! - Per-account order. A batch holding an account that an earlier batch
//!   in flight also holds waits, before its balance UPDATE, until that
//!   batch has published its outcome; then it drops the entries of any
//!   incarnation that batch failed (they were computed on a state that will
//!   never exist) and fences the rest on the version the earlier batch
//!   wrote (`WHERE b.version = expected`). The fence alone is not enough:
//!   it compares numbers, and another writer (a second instance, or the
//!   transactions of a killed process that still commit) can bring the
//!   version to exactly the number a failed incarnation's later entries
//!   expect. Waiting for the outcome costs about one round trip: the UPDATE
//!   would have waited for the earlier batch's row lock anyway.
//! - No deadlock between batches of one writer: two batches in flight never
//!   hold the same balance row (the later one waits first), so their
//!   UPDATEs never wait for each other. Journal rows of different accounts
//!   could only meet on a duplicated id; PostgreSQL's deadlock detector
//!   would then abort one (a database error: the split fallback).
//! - Publishing. An account's durable seq only moves forward (`max`). A
//!   failure sets the watch's `failed` flag and nothing clears it: a batch
//!   that commits after an earlier one failed holds only entries of other
//!   accounts or of a newer incarnation (with a watch of its own), so it
//!   cannot make a failed incarnation look healthy. `failed_epochs` is
//!   shared by the gathering loop and the batches; a failure is recorded
//!   there before the actor can hear of it (its watch), so entries of the
//!   failed incarnation gathered afterwards are dropped too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::cluster::InstanceId;
use super::types::*;
use crate::config::JournalSettings;
use crate::db::Database;

mod batch;
mod writer;

use writer::{JournalWriter, LaneShared};

/// An account's durability as the writer last saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Durable {
    /// Highest seq committed.
    pub seq: i64,
    /// A write of this actor incarnation failed: nothing after `seq` will commit.
    pub failed: bool,
}

pub(crate) type DurableSender = Arc<watch::Sender<Durable>>;

/// Sent from an account actor to the journal writer when an operation applied.
pub(crate) struct Entry {
    pub account: AccountId,
    /// The actor incarnation that produced it.
    pub epoch: u64,
    pub seq: i64,
    /// The account's amounts before this entry's operation (to put the
    /// balance row back if the entry's account is refused in its batch).
    pub balance_before: i64,
    pub held_before: i64,
    pub balance_after: i64,
    pub held_after: i64,
    pub record: Record,
    /// The events this entry's change caused, committed with it.
    pub events: Vec<OutgoingEvent>,
    /// The grant rows its operation inserted or changed.
    pub grants: Vec<GrantWrite>,
    pub durable: DurableSender,
}

/// Waits until `seq` is durable, or reports that it never will be.
pub(crate) async fn wait_durable(
    mut durable: watch::Receiver<Durable>,
    seq: i64,
) -> Result<(), LedgerError> {
    loop {
        let state = *durable.borrow_and_update();
        if state.seq >= seq {
            return Ok(());
        }
        if state.failed {
            return Err(LedgerError::Unavailable(
                "the operation was not committed: the journal write failed; retry".into(),
            ));
        }
        if durable.changed().await.is_err() {
            return Err(LedgerError::Unavailable(
                "the journal writer stopped before the operation committed".into(),
            ));
        }
    }
}

/// Waits until nothing up to `seq` is still in flight: durable, or failed
/// (it never will be). An error only when the writer stopped first.
pub(crate) async fn wait_resolved(
    mut durable: watch::Receiver<Durable>,
    seq: i64,
) -> Result<(), LedgerError> {
    loop {
        let state = *durable.borrow_and_update();
        if state.seq >= seq || state.failed {
            return Ok(());
        }
        if durable.changed().await.is_err() {
            return Err(LedgerError::Unavailable(
                "the journal writer stopped before the account's changes committed".into(),
            ));
        }
    }
}

/// Liveness and counters of one writer, for `/readyz`, metrics and tests.
pub struct JournalHealth {
    started: Instant,
    last_progress_ms: AtomicU64,
    busy: AtomicBool,
    /// Batches written or being written.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Batch transactions committed at the first try.
    committed: AtomicU64,
    /// Batches retried one account per transaction after a database error.
    split: AtomicU64,
    /// Batches written again statement by statement after a refusal at once.
    rewritten: AtomicU64,
    /// Batches failed whole (connection lost).
    failed: AtomicU64,
    /// Accounts failed because an entry of theirs was refused (by the check
    /// before writing or by a row count inside the transaction).
    refused: AtomicU64,
}

/// The writers' counters, summed over every writer of an engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Batch transactions committed at the first try.
    pub batches_committed: u64,
    /// Batches retried one account per transaction after a database error.
    pub batches_split: u64,
    /// Batches PostgreSQL refused when sent at once (a fenced account, a
    /// row skipped or not found), written again statement by statement.
    pub batches_rewritten: u64,
    /// Batches failed whole (connection lost).
    pub batches_failed: u64,
    /// Accounts failed because an entry of theirs was refused.
    pub accounts_refused: u64,
    /// Most batches one writer had in flight at once.
    pub peak_in_flight: u64,
}

impl JournalHealth {
    fn new() -> JournalHealth {
        JournalHealth {
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            split: AtomicU64::new(0),
            rewritten: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    fn count_batch(&self, outcome: &'static str) {
        let counter = match outcome {
            "committed" => &self.committed,
            "split" => &self.split,
            _ => &self.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::JOURNAL_BATCHES_TOTAL.name, "outcome" => outcome)
            .increment(1);
    }

    pub(super) fn count_rewritten(&self) {
        self.rewritten.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::JOURNAL_BATCHES_REWRITTEN_TOTAL.name).increment(1);
    }

    fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::JOURNAL_ACCOUNTS_REFUSED_TOTAL.name).increment(1);
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_progress_ms.store(ms, Ordering::Relaxed);
    }

    fn since_progress(&self) -> Duration {
        let last = self.last_progress_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// One journal writer: its queue and its liveness.
struct Lane {
    tx: mpsc::Sender<Entry>,
    health: Arc<JournalHealth>,
}

impl Lane {
    fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    fn busy(&self) -> bool {
        self.queue_depth() > 0
            || self.health.busy.load(Ordering::Acquire)
            || self.health.in_flight.load(Ordering::Acquire) > 0
    }
}

/// The actors' and the operators' side of the writers. Accounts are spread
/// over `journal.writers` writers by id, each with its own connection, so
/// batches of different accounts commit in parallel while every account's
/// entries stay in one writer, in order.
#[derive(Clone)]
pub struct WriterHandle {
    lanes: Arc<[Lane]>,
    stall_after: Duration,
}

impl WriterHandle {
    fn lane(&self, account: AccountId) -> &Lane {
        &self.lanes[account.0.unsigned_abs() as usize % self.lanes.len()]
    }

    /// Room for one entry of `account`, taken before the operation applies,
    /// so a full queue refuses the operation instead of losing its entry.
    pub(crate) fn reserve(
        &self,
        account: AccountId,
    ) -> Result<mpsc::OwnedPermit<Entry>, LedgerError> {
        self.lane(account)
            .tx
            .clone()
            .try_reserve_owned()
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => LedgerError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => {
                    LedgerError::Unavailable("the journal writer has stopped".into())
                }
            })
    }

    /// Entries waiting, over all writers.
    pub fn queue_depth(&self) -> usize {
        self.lanes.iter().map(Lane::queue_depth).sum()
    }

    /// A writer has entries waiting and wrote none for `stall_after`.
    pub fn is_stalled(&self) -> bool {
        self.lanes
            .iter()
            .any(|lane| lane.busy() && lane.health.since_progress() > self.stall_after)
    }

    /// The counters of every writer, summed.
    pub fn stats(&self) -> JournalStats {
        self.lanes
            .iter()
            .fold(JournalStats::default(), |mut stats, lane| {
                let health = &lane.health;
                stats.batches_committed += health.committed.load(Ordering::Relaxed);
                stats.batches_split += health.split.load(Ordering::Relaxed);
                stats.batches_rewritten += health.rewritten.load(Ordering::Relaxed);
                stats.batches_failed += health.failed.load(Ordering::Relaxed);
                stats.accounts_refused += health.refused.load(Ordering::Relaxed);
                stats.peak_in_flight = stats
                    .peak_in_flight
                    .max(health.peak_in_flight.load(Ordering::Relaxed));
                stats
            })
    }

    /// Waits until every entry queued so far has been written or failed.
    pub async fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.lanes.iter().any(Lane::busy) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }
}

/// Starts the writers on `arbiter`. Without a database every entry is
/// acknowledged as soon as it is gathered (persistence stubbed).
pub(crate) fn spawn_writer(
    arbiter: &actix::ArbiterHandle,
    database: Option<Database>,
    settings: &JournalSettings,
    instance: InstanceId,
) -> WriterHandle {
    let lanes: Vec<Lane> = (0..settings.writers.max(1))
        .map(|_| {
            let (tx, rx) = mpsc::channel(settings.queue_capacity);
            let health = Arc::new(JournalHealth::new());
            let writer = JournalWriter {
                rx,
                shared: Arc::new(LaneShared {
                    database: database.clone(),
                    idle: Mutex::new(Vec::new()),
                    failed_epochs: Mutex::new(HashMap::new()),
                    health: health.clone(),
                    instance: instance.clone(),
                }),
                batch_max: settings.batch_max,
                batch_delay: Duration::from_micros(settings.batch_delay_us),
                gather_when_idle: settings.gather_when_idle,
                depth: settings.pipeline_depth.max(1),
                latest: HashMap::new(),
            };
            arbiter.spawn(writer.run());
            Lane { tx, health }
        })
        .collect();
    WriterHandle {
        lanes: lanes.into(),
        stall_after: Duration::from_millis(settings.stall_after_ms),
    }
}
