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
//! - Only an unexpected database error (not a lost connection) still aborts
//!   the batch; it is then retried one account per transaction, so the
//!   accounts that can commit do.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::types::*;
use crate::config::JournalSettings;
use crate::db::Database;

/// What one entry makes durable.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    Transaction(TransactionRecord),
    HoldPlaced(HoldRecord),
    Settled { usage: UsageRecord },
    Released(ReleaseRecord),
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
}

impl JournalHealth {
    fn new() -> JournalHealth {
        JournalHealth {
            started: Instant::now(),
            last_progress_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
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
        self.queue_depth() > 0 || self.health.busy.load(Ordering::Acquire)
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
    ) -> Result<mpsc::Permit<'_, Entry>, LedgerError> {
        self.lane(account)
            .tx
            .try_reserve()
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(()) => LedgerError::Overloaded,
                mpsc::error::TrySendError::Closed(()) => {
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
                database: database.clone(),
                connection: None,
                batch_max: settings.batch_max,
                batch_delay: Duration::from_micros(settings.batch_delay_us),
                failed_epochs: HashMap::new(),
                health: health.clone(),
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
}

struct WriterConnection {
    client: Client,
    statements: Statements,
}

struct JournalWriter {
    rx: mpsc::Receiver<Entry>,
    database: Option<Database>,
    connection: Option<WriterConnection>,
    batch_max: usize,
    batch_delay: Duration,
    /// Per account, the newest actor incarnation whose write failed: its
    /// later entries were computed on a state that will never exist.
    failed_epochs: HashMap<AccountId, u64>,
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

impl JournalWriter {
    async fn run(mut self) {
        while let Some(first) = self.rx.recv().await {
            self.health.busy.store(true, Ordering::Release);
            let batch = self.gather(first).await;
            metrics::histogram!("creditd_journal_batch_size").record(batch.len() as f64);
            self.process(batch).await;
            self.health.touch();
            self.health.busy.store(false, Ordering::Release);
        }
        tracing::info!("journal writer stopped: every sender is gone");
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

    async fn process(&mut self, batch: Vec<Entry>) {
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<AccountId, usize> = HashMap::new();
        for entry in batch {
            if self
                .failed_epochs
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
        if valid.is_empty() {
            return;
        }
        if self.database.is_none() {
            self.finish(valid, &Written::default());
            return;
        }
        let started = Instant::now();
        match self.write(&valid).await {
            Ok(written) => {
                metrics::histogram!("creditd_journal_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.health.count_batch("committed");
                self.finish(valid, &written);
            }
            Err(WriteError::Refused(reason)) if valid.len() > 1 => {
                // Not expected: the check above and the row counts catch what
                // entries can do wrong. Keep the other accounts' work anyway.
                tracing::error!(%reason, "batch refused; retrying one account per transaction");
                self.health.count_batch("split");
                for group in valid {
                    match self.write(std::slice::from_ref(&group)).await {
                        Ok(written) => self.finish(vec![group], &written),
                        Err(WriteError::Refused(reason) | WriteError::Connection(reason)) => {
                            self.fail(group, &reason)
                        }
                    }
                }
            }
            Err(WriteError::Refused(reason) | WriteError::Connection(reason)) => {
                tracing::error!(%reason, accounts = valid.len(), "journal batch failed");
                self.health.count_batch("failed");
                for group in valid {
                    self.fail(group, &reason);
                }
            }
        }
    }

    fn finish(&mut self, groups: Vec<Group>, written: &Written) {
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
            if self
                .failed_epochs
                .get(&group.account)
                .is_some_and(|&failed| first.epoch > failed)
            {
                self.failed_epochs.remove(&group.account);
            }
            let seq = last.seq;
            last.durable
                .send_modify(|durable| durable.seq = durable.seq.max(seq));
            metrics::counter!("creditd_journal_entries_total", "outcome" => "committed")
                .increment(group.entries.len() as u64);
        }
    }

    fn fail(&mut self, group: Group, reason: &str) {
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
        let failed = self.failed_epochs.entry(group.account).or_insert(epoch);
        *failed = (*failed).max(epoch);
        for entry in &group.entries {
            entry.durable.send_modify(|durable| durable.failed = true);
        }
        metrics::counter!("creditd_journal_entries_total", "outcome" => "failed")
            .increment(group.entries.len() as u64);
    }

    async fn connection(&mut self) -> Result<&mut WriterConnection, WriteError> {
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.client.is_closed())
        {
            self.connection = None;
        }
        if self.connection.is_none() {
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
            self.connection = Some(WriterConnection { client, statements });
        }
        self.connection
            .as_mut()
            .ok_or_else(|| WriteError::Connection("no connection".into()))
    }

    /// Writes the groups in one transaction; returns the accounts it did
    /// not write (fenced or refused).
    async fn write(&mut self, groups: &[Group]) -> Result<Written, WriteError> {
        let result = {
            let connection = self.connection().await?;
            write_groups(connection, groups).await
        };
        match result {
            Ok(written) => Ok(written),
            Err(error) => {
                let closed = self
                    .connection
                    .as_ref()
                    .is_none_or(|c| c.client.is_closed());
                if closed || error.as_db_error().is_none() {
                    self.connection = None;
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
    use serde_json::Value;
    match value {
        Value::String(string) => text(column, string),
        Value::Array(items) => items.iter().try_for_each(|item| json(column, item)),
        Value::Object(fields) => fields.iter().try_for_each(|(key, item)| {
            text(column, key)?;
            json(column, item)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
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
            Record::Settled { usage: u } => {
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
            Record::Settled { usage: u } => {
                self.finish_hold(account, u.hold_id, HoldStatus::Settled, u.seq, u.created_at);
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
            }
            Record::Released(r) => {
                self.finish_hold(account, r.hold_id, r.status, r.seq, r.finished_at);
            }
        }
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
    // Pipelined on one connection, executed in this order by the server:
    // holds exist before usages reference them and before they finish.
    let (holds, transactions, usages, finished) =
        tokio::try_join!(holds, transactions, usages, finished)?;
    let holds = written_rows(&holds)?;
    let transactions = written_rows(&transactions)?;
    let usages = written_rows(&usages)?;
    let finished = written_rows(&finished)?;

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
    {
        *missing.entry(*user).or_default() += 1;
    }
    for (_, user) in holds
        .iter()
        .chain(&transactions)
        .chain(&usages)
        .chain(&finished)
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
        written.refused.extend(refused.into_iter().map(AccountId));
    }
    tx.commit().await?;
    Ok(written)
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
