//! What a batch writes: each entry checked against what PostgreSQL would
//! refuse, the batch's rows gathered into columns for multi-row `unnest`
//! inserts, the fenced balance updates, and the per-account undo.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::{Entry, JournalHealth};
use crate::ledger::cluster;
use crate::ledger::cluster::InstanceId;
use crate::ledger::types::*;

/// The prepared statements of one writer connection: the balance update
/// and one statement per kind of row a batch writes, in the two forms a
/// batch is written in (at once, then statement by statement if that was
/// refused), and the per-account undo.
pub(super) struct Statements {
    pub(super) update_balances: Statement,
    pub(super) rows: RowStatements,
    pub(super) undo_accounts: Statement,
    pub(super) undo_events: Statement,
    pub(super) undo_grants: Statement,
    pub(super) notify_accounts: Statement,
    pub(super) update_balances_at_once: Statement,
    pub(super) rows_at_once: RowStatements,
}

/// One statement per kind of row a batch writes.
pub(super) struct RowStatements {
    pub(super) holds: Statement,
    pub(super) transactions: Statement,
    pub(super) usages: Statement,
    pub(super) finished: Statement,
    pub(super) grants: Statement,
    pub(super) events: Statement,
}

/// A writer's connection with its statements prepared.
pub(super) struct WriterConnection {
    pub(super) client: Client,
    pub(super) statements: Statements,
}

/// One account's entries in a batch, in the order the actor produced them.
pub(super) struct Group {
    pub(super) account: AccountId,
    pub(super) entries: Vec<Entry>,
}

impl Group {
    pub(super) fn admissible(&self) -> Result<(), String> {
        self.entries.iter().try_for_each(Entry::admissible)
    }
}

/// What a committed batch did not write, by account.
#[derive(Default)]
pub(super) struct Written {
    /// Skipped: their balance row moved (fencing).
    pub(super) fenced: HashSet<AccountId>,
    /// Written, then undone in the same transaction: fewer rows were written
    /// than sent (a unique constraint, a finished hold).
    pub(super) refused: HashSet<AccountId>,
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
    if holds_nul(value) {
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
    pub(super) fn admissible(&self) -> Result<(), String> {
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
    hold_api_key: Vec<Option<Uuid>>,
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
    ev_data: Vec<tokio_postgres::types::Json<EventData>>,
    ev_created: Vec<DateTime<Utc>>,
    use_paid_by: Vec<Option<serde_json::Value>>,
    use_api_key: Vec<Option<Uuid>>,
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
                self.hold_api_key.push(h.api_key_id.map(|key| key.0));
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
                self.use_api_key.push(u.api_key_id.map(|key| key.0));
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
            self.ev_data
                .push(tokio_postgres::types::Json(event.data.clone()));
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

/// Writes the groups of one batch in one transaction: sent at once, in one
/// round trip (`write_at_once`), and when PostgreSQL refuses that, again in
/// phases: the balance rows move (an account whose row moved elsewhere is
/// fenced), the rows of the others are inserted, and an account with fewer
/// rows written than sent is undone before the commit. A batch that fails
/// is rolled back before the connection writes another; a batch dropped in
/// flight drops its connection with it (the batch owns it until it ends),
/// so no idle connection is ever left inside a transaction.
pub(super) async fn write_groups(
    connection: &mut WriterConnection,
    groups: &[Group],
    instance: &InstanceId,
    health: &JournalHealth,
) -> Result<Written, tokio_postgres::Error> {
    let client = &connection.client;
    match write_at_once(client, &connection.statements, groups, instance).await {
        AtOnce::Committed => return Ok(Written::default()),
        AtOnce::Lost(error) => return Err(error),
        AtOnce::RolledBack(error) => {
            tracing::debug!(%error, accounts = groups.len(), "batch written again statement by statement");
            health.count_rewritten();
        }
    }
    let outcome = write_in_transaction(client, &connection.statements, groups, instance).await;
    if outcome.is_err() && !client.is_closed() {
        // A rollback that fails leaves the connection unusable: its error
        // is the one the caller sees, and the connection is dropped.
        client.batch_execute("ROLLBACK").await?;
    }
    outcome
}

/// How a batch sent at once ended.
enum AtOnce {
    Committed,
    /// PostgreSQL refused a statement (or one could not be sent): the
    /// transaction rolled back, nothing of the batch was written.
    RolledBack(tokio_postgres::Error),
    /// The connection failed: whether the batch committed cannot be known.
    Lost(tokio_postgres::Error),
}

/// A statement of a batch sent at once, its rows already read.
type Sent<'a> = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;

/// Writes the batch in one round trip: `BEGIN`, the balance update, the row
/// statements and `COMMIT` go out together, in that order, and PostgreSQL
/// runs them back to back. It is how nearly every batch commits; the
/// `_AT_ONCE` statements notify the other instances of the accounts taken
/// over, and check in the transaction what the writer would otherwise check
/// between round trips (a fenced account, a row skipped or not found) and
/// raise, so any such case rolls the whole batch back, to be written again
/// statement by statement (`write_in_transaction`).
///
/// `COMMIT` is sent only once every statement before it was: tokio-postgres
/// encodes a request and queues it on the connection at its future's first
/// poll, so the statements are polled once, in order, and a statement that
/// failed before being sent (it could not be encoded) sends `ROLLBACK`
/// instead. A statement PostgreSQL refuses aborts the transaction, and the
/// `COMMIT` behind it then rolls back.
async fn write_at_once(
    client: &Client,
    statements: &Statements,
    groups: &[Group],
    instance: &InstanceId,
) -> AtOnce {
    let balances = Balances::of(groups);
    let columns = Columns::of(groups.iter());
    let rows = &statements.rows_at_once;
    let update = &statements.update_balances_at_once;
    let mut sent: Vec<Sent<'_>> = vec![
        Box::pin(client.batch_execute("BEGIN READ WRITE")),
        Box::pin(async { balances.update(client, update, instance).await.map(drop) }),
    ];
    sent.extend(
        row_writes(client, rows, &columns)
            .map(|write| -> Sent<'_> { Box::pin(async { write.await.map(drop) }) }),
    );
    let mut first: Vec<Option<Result<(), tokio_postgres::Error>>> = Vec::with_capacity(sent.len());
    for statement in &mut sent {
        let polled = std::future::poll_fn(|cx| Poll::Ready(statement.as_mut().poll(cx))).await;
        first.push(match polled {
            Poll::Ready(outcome) => Some(outcome),
            Poll::Pending => None,
        });
    }
    let unsent = first.iter().any(|outcome| matches!(outcome, Some(Err(_))));
    let end = client.batch_execute(if unsent { "ROLLBACK" } else { "COMMIT" });
    let answers = sent
        .into_iter()
        .zip(first)
        .map(|(statement, first)| async move {
            match first {
                Some(outcome) => outcome,
                None => statement.await,
            }
        });
    let (answers, ended) = tokio::join!(futures_util::future::join_all(answers), end);
    let error = match answers.into_iter().find_map(Result::err) {
        Some(error) => error,
        None => match ended {
            Ok(()) => return AtOnce::Committed,
            Err(error) => error,
        },
    };
    if connection_lost(&error, client) {
        AtOnce::Lost(error)
    } else {
        AtOnce::RolledBack(error)
    }
}

/// The error ended the session (the server closed it, was shut down, or
/// terminated the backend), or is not the database's answer: the batch did
/// not commit, or we cannot know. Anything else is the database refusing
/// the batch.
pub(super) fn connection_lost(error: &tokio_postgres::Error, client: &Client) -> bool {
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

/// The transaction of `write_groups`. `BEGIN` goes out with the balance
/// update, in one round trip: the writer's session is read-only by
/// default (`sql::WRITER_SESSION`), so an update that ran without the
/// transaction (a `BEGIN` refused) would be refused too, never committed
/// alone.
async fn write_in_transaction(
    client: &Client,
    statements: &Statements,
    groups: &[Group],
    instance: &InstanceId,
) -> Result<Written, tokio_postgres::Error> {
    let ((), updated) = tokio::try_join!(
        client.batch_execute("BEGIN READ WRITE"),
        update_balances(client, statements, groups, instance),
    )?;
    let mut written = Written::default();
    for group in groups {
        if !updated.contains(&group.account.0) {
            written.fenced.insert(group.account);
        }
    }
    let columns = Columns::of(
        groups
            .iter()
            .filter(|group| updated.contains(&group.account.0)),
    );
    let inserted = insert_rows(client, &statements.rows, &columns).await?;
    let refused = refused_accounts(&columns, &inserted);
    if !refused.is_empty() {
        undo(
            client,
            statements,
            groups,
            &refused,
            [
                &inserted.holds,
                &inserted.transactions,
                &inserted.usages,
                &inserted.finished,
            ],
        )
        .await?;
        let undone: Vec<Uuid> = inserted
            .events
            .iter()
            .filter(|(_, user)| refused.contains(user))
            .map(|(id, _)| *id)
            .collect();
        client.execute(&statements.undo_events, &[&undone]).await?;
        undo_grants(client, statements, &columns, &refused).await?;
        written.refused.extend(refused.into_iter().map(AccountId));
    }
    client.batch_execute("COMMIT").await?;
    Ok(written)
}

/// The balance rows a batch moves, column by column: each group's from the
/// version before its first entry to its last.
struct Balances {
    users: Vec<i64>,
    expected: Vec<i64>,
    versions: Vec<i64>,
    balances: Vec<i64>,
    helds: Vec<i64>,
}

impl Balances {
    fn of(groups: &[Group]) -> Balances {
        let mut columns = Balances {
            users: Vec::with_capacity(groups.len()),
            expected: Vec::with_capacity(groups.len()),
            versions: Vec::with_capacity(groups.len()),
            balances: Vec::with_capacity(groups.len()),
            helds: Vec::with_capacity(groups.len()),
        };
        for group in groups {
            let (Some(first), Some(last)) = (group.entries.first(), group.entries.last()) else {
                continue;
            };
            columns.users.push(group.account.0);
            columns.expected.push(first.seq - 1);
            columns.versions.push(last.seq);
            columns.balances.push(last.balance_after);
            columns.helds.push(last.held_after);
        }
        columns
    }

    /// Runs `statement` (`sql::UPDATE_BALANCES` or its `_AT_ONCE` form),
    /// this instance recorded as the rows' writer.
    async fn update(
        &self,
        client: &Client,
        statement: &Statement,
        instance: &InstanceId,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        client
            .query(
                statement,
                &[
                    &self.users,
                    &self.expected,
                    &self.versions,
                    &self.balances,
                    &self.helds,
                    &instance.as_str(),
                ],
            )
            .await
    }
}

/// Moves each group's balance row from the version before its first entry
/// to its last, and notifies the other instances of the accounts it took
/// over (delivered at the commit, and only if it commits): the accounts
/// whose row was at the expected version. The others are fenced.
async fn update_balances(
    client: &Client,
    statements: &Statements,
    groups: &[Group],
    instance: &InstanceId,
) -> Result<HashSet<i64>, tokio_postgres::Error> {
    let rows = Balances::of(groups)
        .update(client, &statements.update_balances, instance)
        .await?;
    let mut updated = HashSet::with_capacity(groups.len());
    let mut moved = Vec::new();
    for row in rows {
        let user = row.try_get::<_, i64>(0)?;
        updated.insert(user);
        if row.try_get::<_, bool>(2)? {
            moved.push((AccountId(user), row.try_get::<_, i64>(1)?));
        }
    }
    // Delivered at the commit, and only if it commits.
    for payload in cluster::payloads(instance, &moved) {
        client
            .execute(&statements.notify_accounts, &[&payload])
            .await?;
    }
    Ok(updated)
}

impl Columns {
    /// The rows of `groups`' entries, column by column.
    fn of<'a>(groups: impl Iterator<Item = &'a Group>) -> Columns {
        let mut columns = Columns::default();
        for group in groups {
            for entry in &group.entries {
                columns.push(group.account, &entry.record);
                columns.push_events(group.account, entry.seq, &entry.events);
                for write in &entry.grants {
                    columns.push_grant(group.account, write);
                }
            }
        }
        columns
    }
}

/// The (id, user id) of the rows each statement of a batch wrote.
struct Inserted {
    holds: Vec<(Uuid, i64)>,
    transactions: Vec<(Uuid, i64)>,
    usages: Vec<(Uuid, i64)>,
    finished: Vec<(Uuid, i64)>,
    events: Vec<(Uuid, i64)>,
    grants: Vec<(Uuid, i64)>,
}

/// Inserts the batch's rows, pipelined on one connection and executed in
/// this order by the server: holds exist before usages reference them and
/// before they finish.
async fn insert_rows(
    client: &Client,
    rows: &RowStatements,
    columns: &Columns,
) -> Result<Inserted, tokio_postgres::Error> {
    let [holds, transactions, usages, finished, grants, events] = row_writes(client, rows, columns);
    let (holds, transactions, usages, finished, grants, events) =
        tokio::try_join!(holds, transactions, usages, finished, grants, events)?;
    Ok(Inserted {
        holds: written_rows(&holds)?,
        transactions: written_rows(&transactions)?,
        usages: written_rows(&usages)?,
        finished: written_rows(&finished)?,
        events: written_rows(&events)?,
        grants: written_rows(&grants)?,
    })
}

/// One statement's write of a batch's rows, answered with the rows it returned.
type RowWrite<'a> = Pin<
    Box<dyn Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a>,
>;

/// The writes of a batch's rows, one per kind, in the order the server must
/// run them (holds, transactions, usages, finished holds, grants, events),
/// with `rows`' statements (either form). Each sends its request at its
/// first poll, and does nothing for a kind the batch has no rows of.
fn row_writes<'a>(
    client: &'a Client,
    rows: &'a RowStatements,
    columns: &'a Columns,
) -> [RowWrite<'a>; 6] {
    [
        Box::pin(insert_holds(client, &rows.holds, columns)),
        Box::pin(insert_transactions(client, &rows.transactions, columns)),
        Box::pin(insert_usages(client, &rows.usages, columns)),
        Box::pin(finish_holds(client, &rows.finished, columns)),
        Box::pin(upsert_grants(client, &rows.grants, columns)),
        Box::pin(insert_events(client, &rows.events, columns)),
    ]
}

/// The holds placed (a hold finished in the same batch is inserted finished).
async fn insert_holds(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.hold_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.hold_id,
                &columns.hold_user,
                &columns.hold_seq,
                &columns.hold_amount,
                &columns.hold_status,
                &columns.hold_created,
                &columns.hold_expires,
                &columns.hold_finished_seq,
                &columns.hold_finished_at,
                &columns.hold_api_key,
            ],
        )
        .await
}

/// The credits and debits.
async fn insert_transactions(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.tx_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.tx_id,
                &columns.tx_user,
                &columns.tx_seq,
                &columns.tx_type,
                &columns.tx_direction,
                &columns.tx_amount,
                &columns.tx_key,
                &columns.tx_description,
                &columns.tx_session,
                &columns.tx_payment,
                &columns.tx_before,
                &columns.tx_after,
                &columns.tx_metadata,
                &columns.tx_created,
                &columns.tx_paid_by,
            ],
        )
        .await
}

/// The usages.
async fn insert_usages(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.use_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.use_id,
                &columns.use_user,
                &columns.use_seq,
                &columns.use_hold,
                &columns.use_model,
                &columns.use_input,
                &columns.use_output,
                &columns.use_cache_read,
                &columns.use_cache_write,
                &columns.use_cost,
                &columns.use_held,
                &columns.use_conversation,
                &columns.use_message,
                &columns.use_before,
                &columns.use_after,
                &columns.use_created,
                &columns.use_paid_by,
                &columns.use_api_key,
            ],
        )
        .await
}

/// The holds finished that an earlier batch placed.
async fn finish_holds(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.fin_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.fin_id,
                &columns.fin_user,
                &columns.fin_status,
                &columns.fin_seq,
                &columns.fin_at,
            ],
        )
        .await
}

/// The outgoing events.
async fn insert_events(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.ev_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.ev_id,
                &columns.ev_user,
                &columns.ev_seq,
                &columns.ev_ordinal,
                &columns.ev_type,
                &columns.ev_data,
                &columns.ev_created,
            ],
        )
        .await
}

/// The grant rows made or spent from.
async fn upsert_grants(
    client: &Client,
    statement: &Statement,
    columns: &Columns,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    if columns.grant_id.is_empty() {
        return Ok(Vec::new());
    }
    client
        .query(
            statement,
            &[
                &columns.grant_id,
                &columns.grant_user,
                &columns.grant_kind,
                &columns.grant_amount,
                &columns.grant_remaining,
                &columns.grant_expires,
                &columns.grant_source,
                &columns.grant_payment,
                &columns.grant_transaction,
                &columns.grant_seq,
                &columns.grant_created,
            ],
        )
        .await
}

/// The accounts with fewer rows written than sent: a row of theirs was
/// skipped (a unique constraint) or a finish matched no active hold.
fn refused_accounts(columns: &Columns, inserted: &Inserted) -> HashSet<i64> {
    let mut missing: HashMap<i64, i64> = HashMap::new();
    for user in columns
        .hold_user
        .iter()
        .chain(&columns.tx_user)
        .chain(&columns.use_user)
        .chain(&columns.fin_user)
        .chain(&columns.ev_user)
        .chain(&columns.grant_user)
    {
        *missing.entry(*user).or_default() += 1;
    }
    for (_, user) in inserted
        .holds
        .iter()
        .chain(&inserted.transactions)
        .chain(&inserted.usages)
        .chain(&inserted.finished)
        .chain(&inserted.events)
        .chain(&inserted.grants)
    {
        *missing.entry(*user).or_default() -= 1;
    }
    let refused: HashSet<i64> = missing
        .into_iter()
        .filter(|&(_, count)| count != 0)
        .map(|(user, _)| user)
        .collect();
    refused
}

/// Puts a refused account's grant rows back: those this batch inserted
/// are deleted, the others get their remaining amount from before it.
async fn undo_grants(
    client: &Client,
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
    client
        .execute(
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
    client: &Client,
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
    client
        .execute(
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
    use std::sync::Arc;

    use tokio::sync::watch;

    use super::*;
    use crate::ledger::journal::Durable;
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
