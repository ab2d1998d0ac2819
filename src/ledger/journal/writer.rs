//! A writer's gathering loop and its batches in flight: connections,
//! per-account ordering between batches, publishing outcomes.

use super::batch::{
    connection_lost, write_groups, Group, RowStatements, Statements, WriterConnection, Written,
};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Semaphore};
use tokio_postgres::Client;

use super::{Entry, JournalHealth};
use crate::db::Database;
use crate::ledger::cluster::InstanceId;
use crate::ledger::types::*;

/// One writer's gathering loop. Batches it dispatches run as tasks of their
/// own (up to `depth` at once), each on a connection of its own.
pub(super) struct JournalWriter {
    pub(super) rx: mpsc::Receiver<Entry>,
    pub(super) shared: Arc<LaneShared>,
    pub(super) batch_max: usize,
    pub(super) batch_delay: Duration,
    /// Wait `batch_delay` for company even with nothing in flight.
    pub(super) gather_when_idle: bool,
    pub(super) depth: usize,
    /// Per account, the last batch dispatched with entries of it: a later
    /// batch holding the account waits until that one has published.
    pub(super) latest: HashMap<AccountId, watch::Receiver<bool>>,
}

/// What a writer's gathering loop and its batches in flight share.
pub(super) struct LaneShared {
    pub(super) database: Option<Database>,
    /// Connections not in use by a batch.
    pub(super) idle: Mutex<Vec<WriterConnection>>,
    /// Per account, the newest actor incarnation whose write failed: its
    /// later entries were computed on a state that will never exist.
    pub(super) failed_epochs: Mutex<HashMap<AccountId, u64>>,
    pub(super) health: Arc<JournalHealth>,
    /// This instance, recorded as the writer of every account it moves.
    pub(super) instance: InstanceId,
}

enum WriteError {
    /// The connection is gone: nothing in the batch committed (or we can't know).
    Connection(String),
    /// The database refused something: another split may succeed.
    Refused(String),
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
    pub(super) async fn run(mut self) {
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
            metrics::histogram!(crate::telemetry::JOURNAL_BATCH_SIZE.name)
                .record(batch.len() as f64);
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

    /// Takes what is queued behind `first`, then waits up to `batch_delay`
    /// for more only when a commit now would be alone in its hurry: see
    /// `worth_waiting`.
    async fn gather(&mut self, first: Entry) -> Vec<Entry> {
        let mut batch = Vec::with_capacity(self.batch_max.min(1024));
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.batch_delay;
        while batch.len() < self.batch_max {
            match self.rx.try_recv() {
                Ok(entry) => batch.push(entry),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !self.worth_waiting(&batch) {
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

    /// Whether a batch whose queue ran dry should wait for company. Group
    /// commit forms under load by itself: entries queue up while the
    /// batches in flight commit. With nothing in flight a lone batch
    /// commits at once (unless `journal.gather_when_idle`): the gathering
    /// delay would only lengthen its callers' wait (a chat's answer waits
    /// for its settlement's commit), and tokio's timer rounds it up to the
    /// next millisecond. Two cases still wait: a batch while another of
    /// this writer is committing (two tiny batches in flight would cost
    /// PostgreSQL a commit each for nothing), and a batch ending with a
    /// hold's placement, which the account's actor sends just before the
    /// chat's settlement (a held-back hold) or which no chat waits for.
    fn worth_waiting(&self, batch: &[Entry]) -> bool {
        if self.batch_delay.is_zero() {
            return false;
        }
        let in_flight = self.shared.health.in_flight.load(Ordering::Acquire) > 0;
        let ends_with_hold = batch
            .last()
            .is_some_and(|entry| matches!(entry.record, Record::HoldPlaced(_)));
        self.gather_when_idle || in_flight || ends_with_hold
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
                    metrics::counter!(crate::telemetry::JOURNAL_ENTRIES_TOTAL.name, "outcome" => "dropped")
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
                    metrics::counter!(crate::telemetry::JOURNAL_ENTRIES_TOTAL.name, "outcome" => "dropped")
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
                metrics::histogram!(crate::telemetry::JOURNAL_COMMIT_SECONDS.name)
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
            metrics::counter!(crate::telemetry::JOURNAL_ENTRIES_TOTAL.name, "outcome" => "committed")
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
        metrics::counter!(crate::telemetry::JOURNAL_ENTRIES_TOTAL.name, "outcome" => "failed")
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
        client
            .batch_execute(crate::ledger::store::sql::WRITER_SESSION)
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
        match write_groups(current, groups, &self.instance, &self.health).await {
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

impl Group {
    fn is_contiguous(&self) -> bool {
        self.entries
            .windows(2)
            .all(|pair| pair[1].seq == pair[0].seq + 1 && pair[1].epoch == pair[0].epoch)
    }
}

impl Statements {
    /// Prepares the journal's statements (`sql::JOURNAL`), once per
    /// connection, pipelined (one round trip).
    async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        let [update_balances, insert_transactions, insert_holds, insert_usages, finish_holds, undo_accounts, insert_events, undo_events, upsert_grants, undo_grants, notify_accounts, update_balances_at_once, insert_transactions_at_once, insert_holds_at_once, insert_usages_at_once, finish_holds_at_once, insert_events_at_once, upsert_grants_at_once] =
            crate::ledger::store::sql::JOURNAL.map(|statement| client.prepare(statement.sql));
        let (
            update_balances,
            insert_transactions,
            insert_holds,
            insert_usages,
            finish_holds,
            undo_accounts,
            insert_events,
            undo_events,
            upsert_grants,
            undo_grants,
            notify_accounts,
            update_balances_at_once,
            insert_transactions_at_once,
            insert_holds_at_once,
            insert_usages_at_once,
            finish_holds_at_once,
            insert_events_at_once,
            upsert_grants_at_once,
        ) = tokio::try_join!(
            update_balances,
            insert_transactions,
            insert_holds,
            insert_usages,
            finish_holds,
            undo_accounts,
            insert_events,
            undo_events,
            upsert_grants,
            undo_grants,
            notify_accounts,
            update_balances_at_once,
            insert_transactions_at_once,
            insert_holds_at_once,
            insert_usages_at_once,
            finish_holds_at_once,
            insert_events_at_once,
            upsert_grants_at_once
        )?;
        Ok(Statements {
            update_balances,
            rows: RowStatements {
                holds: insert_holds,
                transactions: insert_transactions,
                usages: insert_usages,
                finished: finish_holds,
                grants: upsert_grants,
                events: insert_events,
            },
            undo_accounts,
            undo_events,
            undo_grants,
            notify_accounts,
            update_balances_at_once,
            rows_at_once: RowStatements {
                holds: insert_holds_at_once,
                transactions: insert_transactions_at_once,
                usages: insert_usages_at_once,
                finished: finish_holds_at_once,
                grants: upsert_grants_at_once,
                events: insert_events_at_once,
            },
        })
    }
}
