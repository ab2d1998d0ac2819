//! The journal writer: gathers entries from every account for up to
//! `batch_max` entries or `batch_delay_us`, writes them in one PostgreSQL
//! transaction (multi-row `unnest` inserts plus fenced balance updates), then
//! publishes each account's new durable seq. A caller is answered only once
//! its entry's seq is durable.
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

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::outbox::OutgoingEvent;
use super::types::*;
use crate::config::JournalSettings;
use crate::db::Database;

/// What one entry makes durable.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    Transaction(TransactionRecord),
    HoldPlaced(HoldRecord),
    /// `late`: its hold was no longer active (expired, released or
    /// unknown), so no hold row is finished by it.
    Settled {
        usage: UsageRecord,
        late: bool,
    },
    Released(ReleaseRecord),
}

/// A grant row an entry inserts (`before` none) or whose remaining
/// amount it moves (from `before`).
#[derive(Debug, Clone)]
pub(crate) struct GrantWrite {
    pub grant: GrantRecord,
    pub before: Option<crate::money::Micros>,
}

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
        metrics::counter!("creditd_journal_batches_total", "outcome" => outcome).increment(1);
    }

    fn count_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("creditd_journal_accounts_refused_total").increment(1);
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
                }),
                batch_max: settings.batch_max,
                batch_delay: Duration::from_micros(settings.batch_delay_us),
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

struct Statements {
    update_balances: Statement,
    insert_transactions: Statement,
    insert_holds: Statement,
    insert_usages: Statement,
    finish_holds: Statement,
    undo_accounts: Statement,
    insert_events: Statement,
    undo_events: Statement,
    upsert_grants: Statement,
    undo_grants: Statement,
}

struct WriterConnection {
    client: Client,
    statements: Statements,
}

/// One writer's gathering loop. Batches it dispatches run as tasks of their
/// own (up to `depth` at once), each on a connection of its own.
struct JournalWriter {
    rx: mpsc::Receiver<Entry>,
    shared: Arc<LaneShared>,
    batch_max: usize,
    batch_delay: Duration,
    depth: usize,
    /// Per account, the last batch dispatched with entries of it: a later
    /// batch holding the account waits until that one has published.
    latest: HashMap<AccountId, watch::Receiver<bool>>,
}

/// What a writer's gathering loop and its batches in flight share.
struct LaneShared {
    database: Option<Database>,
    /// Connections not in use by a batch.
    idle: Mutex<Vec<WriterConnection>>,
    /// Per account, the newest actor incarnation whose write failed: its
    /// later entries were computed on a state that will never exist.
    failed_epochs: Mutex<HashMap<AccountId, u64>>,
    health: Arc<JournalHealth>,
}

/// One account's entries in a batch, in the order the actor produced them.
struct Group {
    account: AccountId,
    entries: Vec<Entry>,
}

enum WriteError {
    /// The connection is gone: nothing in the batch committed (or we can't know).
    Connection(String),
    /// The database refused something: another split may succeed.
    Refused(String),
}

/// What a committed batch did not write, by account.
#[derive(Default)]
struct Written {
    /// Skipped: their balance row moved (fencing).
    fenced: HashSet<AccountId>,
    /// Written, then undone in the same transaction: fewer rows were written
    /// than sent (a unique constraint, a finished hold).
    refused: HashSet<AccountId>,
}

/// Signals, once a batch has published its outcome, that the batches
/// behind it holding the same accounts may go on.
type Done = watch::Sender<bool>;

/// Waits until a batch published its outcome (or its task ended).
async fn finished(mut done: watch::Receiver<bool>) {
    let _ = done.wait_for(|done| *done).await;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned map is still valid.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl JournalWriter {
    async fn run(mut self) {
        let slots = Arc::new(Semaphore::new(self.depth));
        let health = self.shared.health.clone();
        while let Some(first) = self.rx.recv().await {
            health.busy.store(true, Ordering::Release);
            // A slot first: entries arriving while every batch slot is busy
            // join this batch.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let batch = self.gather(first).await;
            metrics::histogram!("creditd_journal_batch_size").record(batch.len() as f64);
            let groups = self.shared.prepare(batch);
            if groups.is_empty() {
                health.touch();
            } else if self.shared.database.is_none() {
                self.shared.finish(groups, &Written::default());
                health.touch();
            } else {
                let (done, after) = watch::channel(false);
                let before = self.depends_on(&groups, &after);
                let in_flight = health.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
                health
                    .peak_in_flight
                    .fetch_max(in_flight, Ordering::Relaxed);
                let shared = self.shared.clone();
                actix::spawn(async move {
                    shared.commit(groups, before, done).await;
                    shared.health.touch();
                    shared.health.in_flight.fetch_sub(1, Ordering::AcqRel);
                    drop(slot);
                });
            }
            health.busy.store(false, Ordering::Release);
        }
        tracing::info!("journal writer stopped: every sender is gone");
    }

    /// The batches in flight that hold an account of `groups`, which this
    /// batch must wait for; records this batch (`after`) as the last one of
    /// its accounts.
    fn depends_on(
        &mut self,
        groups: &[Group],
        after: &watch::Receiver<bool>,
    ) -> Vec<watch::Receiver<bool>> {
        let mut before: Vec<watch::Receiver<bool>> = Vec::new();
        for group in groups {
            if let Some(previous) = self.latest.insert(group.account, after.clone()) {
                if !*previous.borrow() && !before.iter().any(|b| b.same_channel(&previous)) {
                    before.push(previous);
                }
            }
        }
        if self.latest.len() > 4 * self.depth * self.batch_max.min(4096) {
            // Forget the accounts whose last batch has published.
            self.latest.retain(|_, done| !*done.borrow());
        }
        before
    }

    async fn gather(&mut self, first: Entry) -> Vec<Entry> {
        let mut batch = Vec::with_capacity(self.batch_max.min(1024));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch_delay;
        while batch.len() < self.batch_max {
            match self.rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if self.batch_delay.is_zero() {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(entry)) => batch.push(entry),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        batch
    }
}

impl LaneShared {
    /// Groups a batch by account, dropping entries of failed incarnations
    /// and failing the accounts whose entries are out of order or would be
    /// refused by PostgreSQL.
    fn prepare(&self, batch: Vec<Entry>) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<AccountId, usize> = HashMap::new();
        {
            let failed_epochs = lock(&self.failed_epochs);
            for entry in batch {
                if failed_epochs
                    .get(&entry.account)
                    .is_some_and(|&failed| entry.epoch <= failed)
                {
                    // Its actor already knows (its durable watch says failed).
                    metrics::counter!("creditd_journal_entries_total", "outcome" => "dropped")
                        .increment(1);
                    continue;
                }
                let slot = *index.entry(entry.account).or_insert_with(|| {
                    groups.push(Group {
                        account: entry.account,
                        entries: Vec::new(),
                    });
                    groups.len() - 1
                });
                groups[slot].entries.push(entry);
            }
        }
        let mut valid = Vec::with_capacity(groups.len());
        for group in groups {
            if !group.is_contiguous() {
                tracing::error!(account = group.account.0, "journal entries out of order");
                self.fail(group, "entries out of order");
                continue;
            }
            // What PostgreSQL would refuse is never sent: it would abort the
            // whole transaction, every other account's entries with it.
            if let Err(reason) = group.admissible() {
                tracing::warn!(account = group.account.0, %reason, "journal entry refused");
                self.health.count_refused();
                self.fail(group, &reason);
                continue;
            }
            valid.push(group);
        }
        valid
    }

    /// Writes one batch on a connection of its own and publishes the
    /// outcome, once the batches it depends on have published theirs.
    async fn commit(&self, groups: Vec<Group>, before: Vec<watch::Receiver<bool>>, done: Done) {
        for previous in before {
            finished(previous).await;
        }
        // An earlier batch may have failed an incarnation whose later entries
        // are here: they were computed on a state that will never exist.
        let groups = self.drop_failed(groups);
        if !groups.is_empty() {
            self.write_and_publish(groups).await;
        }
        done.send_replace(true);
    }

    fn drop_failed(&self, groups: Vec<Group>) -> Vec<Group> {
        let failed_epochs = lock(&self.failed_epochs);
        groups
            .into_iter()
            .filter(|group| {
                let failed = failed_epochs
                    .get(&group.account)
                    .is_some_and(|&failed| group.entries.iter().any(|e| e.epoch <= failed));
                if failed {
                    // Its actor already knows (its durable watch says failed).
                    metrics::counter!("creditd_journal_entries_total", "outcome" => "dropped")
                        .increment(group.entries.len() as u64);
                }
                !failed
            })
            .collect()
    }

    async fn write_and_publish(&self, groups: Vec<Group>) {
        let mut connection = lock(&self.idle).pop();
        let started = Instant::now();
        match self.write(&mut connection, &groups).await {
            Ok(written) => {
                metrics::histogram!("creditd_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.health.count_batch("committed");
                self.finish(groups, &written);
            }
            Err(WriteError::Refused(reason)) if groups.len() > 1 => {
                // Not expected: the check before writing and the row counts
                // catch what entries can do wrong. Keep the other accounts'
                // work anyway.
                tracing::error!(%reason, "batch refused; retrying one account per transaction");
                self.health.count_batch("split");
                for group in groups {
                    let one = std::slice::from_ref(&group);
                    match self.write(&mut connection, one).await {
                        Ok(written) => self.finish(vec![group], &written),
                        Err(WriteError::Refused(reason) | WriteError::Connection(reason)) => {
                            self.fail(group, &reason)
                        }
                    }
                }
            }
            Err(WriteError::Refused(reason) | WriteError::Connection(reason)) => {
                tracing::error!(%reason, accounts = groups.len(), "journal batch failed");
                self.health.count_batch("failed");
                for group in groups {
                    self.fail(group, &reason);
                }
            }
        }
        if let Some(connection) = connection.filter(|c| !c.client.is_closed()) {
            lock(&self.idle).push(connection);
        }
    }

    /// Publishes a committed batch: each written account's durable seq moves
    /// forward (never back: batches of one writer may complete out of
    /// order); fenced and refused accounts fail.
    fn finish(&self, groups: Vec<Group>, written: &Written) {
        for group in groups {
            if written.fenced.contains(&group.account) {
                tracing::warn!(
                    account = group.account.0,
                    "balance row moved under this actor (fencing); reloading it"
                );
                self.fail(group, "fenced: the balance row version moved");
                continue;
            }
            if written.refused.contains(&group.account) {
                tracing::warn!(
                    account = group.account.0,
                    "journal entry refused by a unique constraint or a finished hold; undone"
                );
                self.health.count_refused();
                self.fail(group, "refused: a row could not be written");
                continue;
            }
            let (Some(first), Some(last)) = (group.entries.first(), group.entries.last()) else {
                continue;
            };
            {
                // A newer incarnation committed: the failed one's entries
                // are all behind it in the queue, so none is left to drop.
                let mut failed_epochs = lock(&self.failed_epochs);
                if failed_epochs
                    .get(&group.account)
                    .is_some_and(|&failed| first.epoch > failed)
                {
                    failed_epochs.remove(&group.account);
                }
            }
            let seq = last.seq;
            // Only `seq` moves: a `failed` set by an earlier batch stays set.
            last.durable
                .send_modify(|durable| durable.seq = durable.seq.max(seq));
            metrics::counter!("creditd_journal_entries_total", "outcome" => "committed")
                .increment(group.entries.len() as u64);
        }
    }

    fn fail(&self, group: Group, reason: &str) {
        let Some(last) = group.entries.last() else {
            return;
        };
        tracing::debug!(account = group.account.0, %reason, "journal entries failed");
        let epoch = group
            .entries
            .iter()
            .map(|e| e.epoch)
            .max()
            .unwrap_or(last.epoch);
        {
            // Recorded before the actor can learn of it (below), so its
            // queued entries are dropped before it reloads.
            let mut failed_epochs = lock(&self.failed_epochs);
            let failed = failed_epochs.entry(group.account).or_insert(epoch);
            *failed = (*failed).max(epoch);
        }
        for entry in &group.entries {
            entry.durable.send_modify(|durable| durable.failed = true);
        }
        metrics::counter!("creditd_journal_entries_total", "outcome" => "failed")
            .increment(group.entries.len() as u64);
    }

    async fn connect(&self) -> Result<WriterConnection, WriteError> {
        let database = self
            .database
            .as_ref()
            .ok_or_else(|| WriteError::Connection("no database".into()))?;
        let client = database
            .connect()
            .await
            .map_err(|e| WriteError::Connection(format!("cannot connect: {e}")))?;
        // A generic plan made while the journal tables were small (a new
        // deployment) keeps seq-scanning them as they grow; planning each
        // batch's statements for the tables as they are costs far less.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .await
            .map_err(|e| WriteError::Connection(format!("cannot configure: {e}")))?;
        let statements = Statements::prepare(&client)
            .await
            .map_err(|e| WriteError::Connection(format!("cannot prepare: {e}")))?;
        Ok(WriterConnection { client, statements })
    }

    /// Writes the groups in one transaction on `connection` (opened when
    /// missing, dropped when lost); returns the accounts it did not write
    /// (fenced or refused).
    async fn write(
        &self,
        connection: &mut Option<WriterConnection>,
        groups: &[Group],
    ) -> Result<Written, WriteError> {
        if connection.as_ref().is_some_and(|c| c.client.is_closed()) {
            *connection = None;
        }
        let current = match connection {
            Some(current) => current,
            None => connection.insert(self.connect().await?),
        };
        match write_groups(current, groups).await {
            Ok(written) => Ok(written),
            Err(error) => {
                if connection_lost(&error, &current.client) {
                    *connection = None;
                    Err(WriteError::Connection(error.to_string()))
                } else {
                    Err(WriteError::Refused(
                        error
                            .as_db_error()
                            .map(|e| e.message().to_owned())
                            .unwrap_or_else(|| error.to_string()),
                    ))
                }
            }
        }
    }
}

/// The error ended the session (the server closed it, was shut down, or
/// terminated the backend): the batch did not commit, or we cannot know.
/// Anything else is the database refusing the batch.
fn connection_lost(error: &tokio_postgres::Error, client: &Client) -> bool {
    if client.is_closed() || error.is_closed() {
        return true;
    }
    match error.as_db_error() {
        None => true,
        Some(db) => {
            let code = db.code().code();
            matches!(db.severity(), "FATAL" | "PANIC")
                || code.starts_with("08")
                || code.starts_with("57P")
        }
    }
}

impl Group {
    fn is_contiguous(&self) -> bool {
        self.entries
            .windows(2)
            .all(|pair| pair[1].seq == pair[0].seq + 1 && pair[1].epoch == pair[0].epoch)
    }

    fn admissible(&self) -> Result<(), String> {
        self.entries.iter().try_for_each(Entry::admissible)
    }
}

/// PostgreSQL refuses a NUL character in text (and in jsonb strings).
fn text(column: &str, value: &str) -> Result<(), String> {
    if value.contains('\0') {
        return Err(format!("{column} contains a NUL character"));
    }
    Ok(())
}

fn optional_text(column: &str, value: &Option<String>) -> Result<(), String> {
    value.as_deref().map_or(Ok(()), |value| text(column, value))
}

fn json(column: &str, value: &serde_json::Value) -> Result<(), String> {
    if super::state::holds_nul(value) {
        return Err(format!("{column} contains a NUL character"));
    }
    Ok(())
}

/// `timestamptz` starts in 4714 BC; chrono reaches further back.
fn time(column: &str, at: &DateTime<Utc>) -> Result<(), String> {
    use chrono::Datelike;
    if at.year() < -4712 {
        return Err(format!("{column} is before the range of timestamptz"));
    }
    Ok(())
}

fn positive(column: &str, amount: i64) -> Result<(), String> {
    if amount <= 0 {
        return Err(format!("{column} must be positive, got {amount}"));
    }
    Ok(())
}

impl Entry {
    /// What PostgreSQL would refuse in this entry's rows: NUL characters,
    /// timestamps out of range, the schema's CHECK constraints, an overflow
    /// of a sum PostgreSQL computes. The enumerated columns (type,
    /// direction, status) come from Rust enums and are not checked here.
    fn admissible(&self) -> Result<(), String> {
        if self.held_after < 0 {
            return Err(format!("held_micros would be {}", self.held_after));
        }
        for write in &self.grants {
            let g = &write.grant;
            positive("grant amount_micros", g.amount_micros.get())?;
            if g.remaining_micros.is_negative() || g.remaining_micros > g.amount_micros {
                return Err(format!(
                    "grant remaining_micros {} is outside 0..={}",
                    g.remaining_micros.get(),
                    g.amount_micros.get()
                ));
            }
            if g.kind == GrantKind::Paid && g.expires_at.is_some() {
                return Err("a paid grant cannot expire".into());
            }
            text("grant source", &g.source)?;
            optional_text("grant stripe_payment_id", &g.stripe_payment_id)?;
            time("grant created_at", &g.created_at)?;
            if let Some(at) = &g.expires_at {
                time("grant expires_at", at)?;
            }
        }
        match &self.record {
            Record::Transaction(t) => {
                positive("amount_micros", t.amount_micros.get())?;
                text("idempotency_key", t.idempotency_key.as_str())?;
                optional_text("description", &t.description)?;
                optional_text("stripe_session_id", &t.stripe_session_id)?;
                optional_text("stripe_payment_id", &t.stripe_payment_id)?;
                if let Some(metadata) = &t.metadata {
                    json("metadata", metadata)?;
                }
                time("created_at", &t.created_at)
            }
            Record::HoldPlaced(h) => {
                positive("amount_micros", h.amount_micros.get())?;
                time("created_at", &h.created_at)?;
                time("expires_at", &h.expires_at)
            }
            Record::Settled { usage: u, .. } => {
                // total_tokens is their sum, computed by PostgreSQL in int8.
                [
                    u.input_tokens,
                    u.output_tokens,
                    u.cache_read_tokens,
                    u.cache_write_tokens,
                ]
                .into_iter()
                .try_fold(0_i64, |sum, count| sum.checked_add(tokens(count)))
                .ok_or_else(|| "total_tokens would overflow".to_owned())?;
                if u.cost_micros.get() < 0 {
                    return Err(format!("cost_micros is negative: {}", u.cost_micros.get()));
                }
                text("model", &u.model)?;
                optional_text("conversation_id", &u.conversation_id)?;
                optional_text("message_id", &u.message_id)?;
                time("created_at", &u.created_at)
            }
            Record::Released(r) => time("finished_at", &r.finished_at),
        }
    }
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            update_balances: client.prepare(super::store::sql::UPDATE_BALANCES).await?,
            insert_transactions: client
                .prepare(super::store::sql::INSERT_TRANSACTIONS)
                .await?,
            insert_holds: client.prepare(super::store::sql::INSERT_HOLDS).await?,
            insert_usages: client.prepare(super::store::sql::INSERT_USAGES).await?,
            finish_holds: client.prepare(super::store::sql::FINISH_HOLDS).await?,
            undo_accounts: client.prepare(super::store::sql::UNDO_ACCOUNTS).await?,
            insert_events: client.prepare(super::store::sql::INSERT_EVENTS).await?,
            undo_events: client.prepare(super::store::sql::UNDO_EVENTS).await?,
            upsert_grants: client.prepare(super::store::sql::UPSERT_GRANTS).await?,
            undo_grants: client.prepare(super::store::sql::UNDO_GRANTS).await?,
        })
    }
}

#[derive(Default)]
struct Columns {
    // credit_transactions
    tx_id: Vec<Uuid>,
    tx_user: Vec<i64>,
    tx_seq: Vec<i64>,
    tx_type: Vec<&'static str>,
    tx_direction: Vec<&'static str>,
    tx_amount: Vec<i64>,
    tx_key: Vec<String>,
    tx_description: Vec<Option<String>>,
    tx_session: Vec<Option<String>>,
    tx_payment: Vec<Option<String>>,
    tx_before: Vec<i64>,
    tx_after: Vec<i64>,
    tx_metadata: Vec<Option<serde_json::Value>>,
    tx_created: Vec<DateTime<Utc>>,
    tx_paid_by: Vec<Option<serde_json::Value>>,
    // credit_grants (one row per grant: its last state in the batch)
    grant_id: Vec<Uuid>,
    grant_user: Vec<i64>,
    grant_kind: Vec<&'static str>,
    grant_amount: Vec<i64>,
    grant_remaining: Vec<i64>,
    grant_expires: Vec<Option<DateTime<Utc>>>,
    grant_source: Vec<String>,
    grant_payment: Vec<Option<String>>,
    grant_transaction: Vec<Option<Uuid>>,
    grant_seq: Vec<i64>,
    grant_created: Vec<DateTime<Utc>>,
    /// Grants written in this batch, by id: their row index above and
    /// their remaining amount before the batch (none: inserted by it).
    grant_rows: HashMap<Uuid, (usize, Option<i64>)>,
    // credit_holds (new)
    hold_id: Vec<Uuid>,
    hold_user: Vec<i64>,
    hold_seq: Vec<i64>,
    hold_amount: Vec<i64>,
    hold_status: Vec<&'static str>,
    hold_created: Vec<DateTime<Utc>>,
    hold_expires: Vec<DateTime<Utc>>,
    hold_finished_seq: Vec<Option<i64>>,
    hold_finished_at: Vec<Option<DateTime<Utc>>>,
    /// Holds placed in this batch, by account and id: their row index above.
    placed: HashMap<(i64, Uuid), usize>,
    // credit_holds (placed in an earlier batch, finished in this one)
    fin_id: Vec<Uuid>,
    fin_user: Vec<i64>,
    fin_status: Vec<&'static str>,
    fin_seq: Vec<i64>,
    fin_at: Vec<DateTime<Utc>>,
    // credit_usages
    use_id: Vec<Uuid>,
    use_user: Vec<i64>,
    use_seq: Vec<i64>,
    use_hold: Vec<Uuid>,
    use_model: Vec<String>,
    use_input: Vec<i64>,
    use_output: Vec<i64>,
    use_cache_read: Vec<i64>,
    use_cache_write: Vec<i64>,
    use_cost: Vec<i64>,
    use_held: Vec<i64>,
    use_conversation: Vec<Option<String>>,
    use_message: Vec<Option<String>>,
    use_before: Vec<i64>,
    use_after: Vec<i64>,
    use_created: Vec<DateTime<Utc>>,
    // outgoing_events
    ev_id: Vec<Uuid>,
    ev_user: Vec<i64>,
    ev_seq: Vec<i64>,
    ev_ordinal: Vec<i32>,
    ev_type: Vec<&'static str>,
    ev_data: Vec<serde_json::Value>,
    ev_created: Vec<DateTime<Utc>>,
    use_paid_by: Vec<Option<serde_json::Value>>,
}

/// `paid_by` as stored: [{grantId, kind, amountMicros}].
fn paid_by_json(paid_by: &[GrantSpend]) -> Option<serde_json::Value> {
    Some(serde_json::Value::Array(
        paid_by
            .iter()
            .map(|spend| {
                serde_json::json!({
                    "grantId": spend.grant_id,
                    "kind": spend.kind.as_str(),
                    "amountMicros": spend.amount_micros.get(),
                })
            })
            .collect(),
    ))
}

/// Token counts are u64 in memory and BIGINT in PostgreSQL; counts past
/// i64::MAX cannot be priced anyway (the cost overflows first).
fn tokens(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

impl Columns {
    fn push(&mut self, account: AccountId, record: &Record) {
        match record {
            Record::Transaction(t) => {
                self.tx_id.push(t.id);
                self.tx_user.push(account.0);
                self.tx_seq.push(t.seq);
                self.tx_type.push(t.kind.as_str());
                self.tx_direction.push(t.direction.as_str());
                self.tx_amount.push(t.amount_micros.get());
                self.tx_key.push(t.idempotency_key.as_str().to_owned());
                self.tx_description.push(t.description.clone());
                self.tx_session.push(t.stripe_session_id.clone());
                self.tx_payment.push(t.stripe_payment_id.clone());
                self.tx_before.push(t.balance_before_micros.get());
                self.tx_after.push(t.balance_after_micros.get());
                self.tx_metadata.push(t.metadata.clone());
                self.tx_created.push(t.created_at);
                self.tx_paid_by.push(match t.direction {
                    Direction::Debit => paid_by_json(&t.paid_by),
                    Direction::Credit => None,
                });
            }
            Record::HoldPlaced(h) => {
                self.placed.insert((account.0, h.id.0), self.hold_id.len());
                self.hold_id.push(h.id.0);
                self.hold_user.push(account.0);
                self.hold_seq.push(h.seq);
                self.hold_amount.push(h.amount_micros.get());
                self.hold_status.push(HoldStatus::Active.as_str());
                self.hold_created.push(h.created_at);
                self.hold_expires.push(h.expires_at);
                self.hold_finished_seq.push(None);
                self.hold_finished_at.push(None);
            }
            Record::Settled { usage: u, late } => {
                if !late {
                    self.finish_hold(account, u.hold_id, HoldStatus::Settled, u.seq, u.created_at);
                }
                self.use_id.push(u.id);
                self.use_user.push(account.0);
                self.use_seq.push(u.seq);
                self.use_hold.push(u.hold_id.0);
                self.use_model.push(u.model.clone());
                self.use_input.push(tokens(u.input_tokens));
                self.use_output.push(tokens(u.output_tokens));
                self.use_cache_read.push(tokens(u.cache_read_tokens));
                self.use_cache_write.push(tokens(u.cache_write_tokens));
                self.use_cost.push(u.cost_micros.get());
                self.use_held.push(u.held_micros.get());
                self.use_conversation.push(u.conversation_id.clone());
                self.use_message.push(u.message_id.clone());
                self.use_before.push(u.balance_before_micros.get());
                self.use_after.push(u.balance_after_micros.get());
                self.use_created.push(u.created_at);
                self.use_paid_by.push(paid_by_json(&u.paid_by));
            }
            Record::Released(r) => {
                self.finish_hold(account, r.hold_id, r.status, r.seq, r.finished_at);
            }
        }
    }

    fn push_events(&mut self, account: AccountId, seq: i64, events: &[OutgoingEvent]) {
        for (ordinal, event) in events.iter().enumerate() {
            self.ev_id.push(event.id);
            self.ev_user.push(account.0);
            self.ev_seq.push(seq);
            self.ev_ordinal
                .push(i32::try_from(ordinal).unwrap_or(i32::MAX));
            self.ev_type.push(event.kind.as_str());
            self.ev_data.push(event.data.clone());
            self.ev_created.push(event.created_at);
        }
    }

    /// A grant's state after this entry; its row carries the last one.
    fn push_grant(&mut self, account: AccountId, write: &GrantWrite) {
        let g = &write.grant;
        if let Some((row, _)) = self.grant_rows.get(&g.id) {
            self.grant_remaining[*row] = g.remaining_micros.get();
            return;
        }
        self.grant_rows.insert(
            g.id,
            (self.grant_id.len(), write.before.map(|before| before.get())),
        );
        self.grant_id.push(g.id);
        self.grant_user.push(account.0);
        self.grant_kind.push(g.kind.as_str());
        self.grant_amount.push(g.amount_micros.get());
        self.grant_remaining.push(g.remaining_micros.get());
        self.grant_expires.push(g.expires_at);
        self.grant_source.push(g.source.clone());
        self.grant_payment.push(g.stripe_payment_id.clone());
        self.grant_transaction.push(g.transaction_id);
        self.grant_seq.push(g.seq);
        self.grant_created.push(g.created_at);
    }

    fn finish_hold(
        &mut self,
        account: AccountId,
        hold: HoldId,
        status: HoldStatus,
        seq: i64,
        at: DateTime<Utc>,
    ) {
        match self.placed.remove(&(account.0, hold.0)) {
            Some(row) => {
                self.hold_status[row] = status.as_str();
                self.hold_finished_seq[row] = Some(seq);
                self.hold_finished_at[row] = Some(at);
            }
            None => {
                self.fin_id.push(hold.0);
                self.fin_user.push(account.0);
                self.fin_status.push(status.as_str());
                self.fin_seq.push(seq);
                self.fin_at.push(at);
            }
        }
    }
}

async fn write_groups(
    connection: &mut WriterConnection,
    groups: &[Group],
) -> Result<Written, tokio_postgres::Error> {
    let statements = &connection.statements;
    let tx = connection.client.transaction().await?;
    let mut users = Vec::with_capacity(groups.len());
    let mut expected = Vec::with_capacity(groups.len());
    let mut versions = Vec::with_capacity(groups.len());
    let mut balances = Vec::with_capacity(groups.len());
    let mut helds = Vec::with_capacity(groups.len());
    for group in groups {
        let (Some(first), Some(last)) = (group.entries.first(), group.entries.last()) else {
            continue;
        };
        users.push(group.account.0);
        expected.push(first.seq - 1);
        versions.push(last.seq);
        balances.push(last.balance_after);
        helds.push(last.held_after);
    }
    let mut updated = HashSet::with_capacity(groups.len());
    for row in tx
        .query(
            &statements.update_balances,
            &[&users, &expected, &versions, &balances, &helds],
        )
        .await?
    {
        updated.insert(row.try_get::<_, i64>(0)?);
    }
    let mut columns = Columns::default();
    let mut written = Written::default();
    for group in groups {
        if !updated.contains(&group.account.0) {
            written.fenced.insert(group.account);
            continue;
        }
        for entry in &group.entries {
            columns.push(group.account, &entry.record);
            columns.push_events(group.account, entry.seq, &entry.events);
            for write in &entry.grants {
                columns.push_grant(group.account, write);
            }
        }
    }
    let c = &columns;
    let holds = async {
        if c.hold_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.insert_holds,
            &[
                &c.hold_id,
                &c.hold_user,
                &c.hold_seq,
                &c.hold_amount,
                &c.hold_status,
                &c.hold_created,
                &c.hold_expires,
                &c.hold_finished_seq,
                &c.hold_finished_at,
            ],
        )
        .await
    };
    let transactions = async {
        if c.tx_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.insert_transactions,
            &[
                &c.tx_id,
                &c.tx_user,
                &c.tx_seq,
                &c.tx_type,
                &c.tx_direction,
                &c.tx_amount,
                &c.tx_key,
                &c.tx_description,
                &c.tx_session,
                &c.tx_payment,
                &c.tx_before,
                &c.tx_after,
                &c.tx_metadata,
                &c.tx_created,
                &c.tx_paid_by,
            ],
        )
        .await
    };
    let usages = async {
        if c.use_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.insert_usages,
            &[
                &c.use_id,
                &c.use_user,
                &c.use_seq,
                &c.use_hold,
                &c.use_model,
                &c.use_input,
                &c.use_output,
                &c.use_cache_read,
                &c.use_cache_write,
                &c.use_cost,
                &c.use_held,
                &c.use_conversation,
                &c.use_message,
                &c.use_before,
                &c.use_after,
                &c.use_created,
                &c.use_paid_by,
            ],
        )
        .await
    };
    let finished = async {
        if c.fin_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.finish_holds,
            &[&c.fin_id, &c.fin_user, &c.fin_status, &c.fin_seq, &c.fin_at],
        )
        .await
    };
    let events = async {
        if c.ev_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.insert_events,
            &[
                &c.ev_id,
                &c.ev_user,
                &c.ev_seq,
                &c.ev_ordinal,
                &c.ev_type,
                &c.ev_data,
                &c.ev_created,
            ],
        )
        .await
    };
    let grants = async {
        if c.grant_id.is_empty() {
            return Ok(Vec::new());
        }
        tx.query(
            &statements.upsert_grants,
            &[
                &c.grant_id,
                &c.grant_user,
                &c.grant_kind,
                &c.grant_amount,
                &c.grant_remaining,
                &c.grant_expires,
                &c.grant_source,
                &c.grant_payment,
                &c.grant_transaction,
                &c.grant_seq,
                &c.grant_created,
            ],
        )
        .await
    };
    // Pipelined on one connection, executed in this order by the server:
    // holds exist before usages reference them and before they finish.
    let (holds, transactions, usages, finished, grants, events) =
        tokio::try_join!(holds, transactions, usages, finished, grants, events)?;
    let holds = written_rows(&holds)?;
    let transactions = written_rows(&transactions)?;
    let usages = written_rows(&usages)?;
    let finished = written_rows(&finished)?;
    let events = written_rows(&events)?;
    let grants = written_rows(&grants)?;

    // Per account, rows sent minus rows written: anything but zero means a
    // row of it was skipped (a unique constraint) or a finish matched no
    // active hold of it.
    let mut missing: HashMap<i64, i64> = HashMap::new();
    for user in c
        .hold_user
        .iter()
        .chain(&c.tx_user)
        .chain(&c.use_user)
        .chain(&c.fin_user)
        .chain(&c.ev_user)
        .chain(&c.grant_user)
    {
        *missing.entry(*user).or_default() += 1;
    }
    for (_, user) in holds
        .iter()
        .chain(&transactions)
        .chain(&usages)
        .chain(&finished)
        .chain(&events)
        .chain(&grants)
    {
        *missing.entry(*user).or_default() -= 1;
    }
    let refused: HashSet<i64> = missing
        .into_iter()
        .filter(|&(_, count)| count != 0)
        .map(|(user, _)| user)
        .collect();
    if !refused.is_empty() {
        undo(
            &tx,
            statements,
            groups,
            &refused,
            [&holds, &transactions, &usages, &finished],
        )
        .await?;
        let undone: Vec<Uuid> = events
            .iter()
            .filter(|(_, user)| refused.contains(user))
            .map(|(id, _)| *id)
            .collect();
        tx.execute(&statements.undo_events, &[&undone]).await?;
        undo_grants(&tx, statements, &columns, &refused).await?;
        written.refused.extend(refused.into_iter().map(AccountId));
    }
    tx.commit().await?;
    Ok(written)
}

/// Puts a refused account's grant rows back: those this batch inserted
/// are deleted, the others get their remaining amount from before it.
async fn undo_grants(
    tx: &tokio_postgres::Transaction<'_>,
    statements: &Statements,
    columns: &Columns,
    refused: &HashSet<i64>,
) -> Result<(), tokio_postgres::Error> {
    let (mut new_ids, mut new_users) = (Vec::new(), Vec::new());
    let (mut old_ids, mut old_users, mut old_remaining) = (Vec::new(), Vec::new(), Vec::new());
    for (id, (row, before)) in &columns.grant_rows {
        let user = columns.grant_user[*row];
        if !refused.contains(&user) {
            continue;
        }
        match before {
            None => {
                new_ids.push(*id);
                new_users.push(user);
            }
            Some(before) => {
                old_ids.push(*id);
                old_users.push(user);
                old_remaining.push(*before);
            }
        }
    }
    if new_ids.is_empty() && old_ids.is_empty() {
        return Ok(());
    }
    tx.execute(
        &statements.undo_grants,
        &[&new_ids, &new_users, &old_ids, &old_users, &old_remaining],
    )
    .await?;
    Ok(())
}

/// The (id, user id) of each row a statement wrote.
fn written_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<(Uuid, i64)>, tokio_postgres::Error> {
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// Takes back, inside the batch's transaction, everything the refused
/// accounts wrote in it: their inserted rows (by id: a skipped row's id may
/// be an older row of the same account), their finished holds, and their
/// balance rows, put back to their amounts and version before the batch.
async fn undo(
    tx: &tokio_postgres::Transaction<'_>,
    statements: &Statements,
    groups: &[Group],
    refused: &HashSet<i64>,
    [holds, transactions, usages, finished]: [&[(Uuid, i64)]; 4],
) -> Result<(), tokio_postgres::Error> {
    let ids = |rows: &[(Uuid, i64)]| -> Vec<Uuid> {
        rows.iter()
            .filter(|(_, user)| refused.contains(user))
            .map(|(id, _)| *id)
            .collect()
    };
    let mut users = Vec::with_capacity(refused.len());
    let mut versions = Vec::with_capacity(refused.len());
    let mut balances = Vec::with_capacity(refused.len());
    let mut helds = Vec::with_capacity(refused.len());
    for group in groups.iter().filter(|g| refused.contains(&g.account.0)) {
        let Some(first) = group.entries.first() else {
            continue;
        };
        users.push(group.account.0);
        versions.push(first.seq - 1);
        balances.push(first.balance_before);
        helds.push(first.held_before);
    }
    tx.execute(
        &statements.undo_accounts,
        &[
            &ids(holds),
            &ids(transactions),
            &ids(usages),
            &ids(finished),
            &users,
            &versions,
            &balances,
            &helds,
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Micros;

    fn entry(record: Record) -> Entry {
        let (durable, _) = watch::channel(Durable::default());
        Entry {
            account: AccountId(1),
            epoch: 1,
            seq: 1,
            balance_before: 0,
            held_before: 0,
            balance_after: 0,
            held_after: 0,
            record,
            events: Vec::new(),
            grants: Vec::new(),
            durable: Arc::new(durable),
        }
    }

    fn transaction(description: &str, metadata: serde_json::Value) -> Record {
        Record::Transaction(TransactionRecord {
            id: Uuid::new_v4(),
            seq: 1,
            kind: TransactionType::Adjustment,
            direction: Direction::Credit,
            amount_micros: Micros::new(5),
            idempotency_key: IdempotencyKey::parse("k").unwrap_or_else(|e| panic!("{e}")),
            description: Some(description.into()),
            stripe_session_id: None,
            stripe_payment_id: None,
            metadata: Some(metadata),
            balance_before_micros: Micros::ZERO,
            balance_after_micros: Micros::new(5),
            created_at: Utc::now(),
            paid_by: Vec::new(),
        })
    }

    #[test]
    fn an_entry_postgresql_would_refuse_is_caught_before_it_is_written() {
        let clean = entry(transaction("ok", serde_json::json!({ "chargeId": "ch_1" })));
        assert_eq!(clean.admissible(), Ok(()));
        let nul_text = entry(transaction("a\0b", serde_json::json!({})));
        assert!(nul_text.admissible().is_err());
        let nul_key = entry(transaction("ok", serde_json::json!({ "a\0": 1 })));
        assert!(nul_key.admissible().is_err());
        let nul_value = entry(transaction("ok", serde_json::json!({ "a": ["\0"] })));
        assert!(nul_value.admissible().is_err());
    }
}
