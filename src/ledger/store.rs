//! Reads of the ledger tables, and the SQL the journal writer runs. The
//! engine writes only through the journal writer; everything here reads.
//! Private to the ledger: other modules read the history through
//! [`LedgerHistory`], and reach PostgreSQL through `crate::db`.

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

use super::types::*;
use crate::db::{DbError, Pool};
use crate::money::Micros;

// The parts the journal's statements share between a batch written
// statement by statement and one written in one round trip
// (`sql::UPDATE_BALANCES` and `sql::UPDATE_BALANCES_AT_ONCE`, and so on):
// macros, so that each statement stays one literal and the two never drift.
macro_rules! locked_balances {
    () => {
        "before AS (
            SELECT user_id, written_by FROM credit_balances
             WHERE user_id = ANY($1::int8[])
             ORDER BY user_id
               FOR UPDATE)"
    };
}

macro_rules! update_balances {
    () => {
        "UPDATE credit_balances AS b
           SET balance_micros = u.balance, held_micros = u.held,
               version = u.version, written_by = $6, updated_at = now()
          FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])
               AS u(user_id, expected, version, balance, held)
          JOIN before ON before.user_id = u.user_id
         WHERE b.user_id = u.user_id AND b.version = u.expected"
    };
}

macro_rules! insert_holds {
    () => {
        "INSERT INTO credit_holds (id, user_id, seq, amount_micros, status, created_at,
               expires_at, finished_seq, finished_at, api_key_id)
        SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int8[], $5::text[],
                      $6::timestamptz[], $7::timestamptz[], $8::int8[], $9::timestamptz[],
                      $10::uuid[])"
    };
}

macro_rules! insert_transactions {
    () => {
        "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
               idempotency_key, description, stripe_session_id, stripe_payment_id,
               balance_before_micros, balance_after_micros, metadata, created_at, paid_by)
        SELECT * FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::text[], $5::text[],
               $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[], $11::int8[],
               $12::int8[], $13::jsonb[], $14::timestamptz[], $15::jsonb[])"
    };
}

macro_rules! insert_usages {
    () => {
        "INSERT INTO credit_usages (id, user_id, seq, hold_id, model, input_tokens,
               output_tokens, cache_read_tokens, cache_write_tokens, total_tokens,
               cost_micros, held_micros, conversation_id, message_id,
               balance_before_micros, balance_after_micros, created_at, paid_by, api_key_id)
        SELECT id, user_id, seq, hold_id, model, input, output, cache_read, cache_write,
               input + output + cache_read + cache_write,
               cost, held, conversation_id, message_id, before, after, created_at, paid_by,
               api_key_id
          FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::uuid[], $5::text[],
                      $6::int8[], $7::int8[], $8::int8[], $9::int8[], $10::int8[],
                      $11::int8[], $12::text[], $13::text[], $14::int8[], $15::int8[],
                      $16::timestamptz[], $17::jsonb[], $18::uuid[])
               AS u(id, user_id, seq, hold_id, model, input, output, cache_read,
                    cache_write, cost, held, conversation_id, message_id, before,
                    after, created_at, paid_by, api_key_id)"
    };
}

macro_rules! finish_holds {
    () => {
        "UPDATE credit_holds AS h
           SET status = f.status, finished_seq = f.seq, finished_at = f.at
          FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::timestamptz[])
               AS f(id, user_id, status, seq, at)
         WHERE h.id = f.id AND h.user_id = f.user_id AND h.finished_seq IS NULL"
    };
}

macro_rules! upsert_grants {
    () => {
        "INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
               expires_at, source, stripe_payment_id, transaction_id, seq, created_at)
        SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::int8[], $5::int8[],
                      $6::timestamptz[], $7::text[], $8::text[], $9::uuid[], $10::int8[],
                      $11::timestamptz[])
        ON CONFLICT (id) DO UPDATE
           SET remaining_micros = EXCLUDED.remaining_micros, updated_at = now()
         WHERE credit_grants.user_id = EXCLUDED.user_id"
    };
}

macro_rules! insert_events {
    () => {
        "INSERT INTO outgoing_events (id, user_id, seq, ordinal, type, data, created_at,
               pending_since, next_attempt_at)
        SELECT id, user_id, seq, ordinal, type, data, created_at, created_at, created_at
          FROM unnest($1::uuid[], $2::int8[], $3::int8[], $4::int4[], $5::text[],
                      $6::jsonb[], $7::timestamptz[])
               AS e(id, user_id, seq, ordinal, type, data, created_at)"
    };
}

/// The statements of a journal batch, arrays in. A batch is first sent
/// whole, in one round trip, with the `_AT_ONCE` statements, which raise on
/// anything the writer would have to handle per account. Written statement
/// by statement instead, the inserts skip rows that would break a unique
/// constraint (`ON CONFLICT DO NOTHING`) and return the rows they wrote, so
/// the writer can tell, per account, whether everything it sent was written.
pub(crate) mod sql {
    /// An account's durable version (its balance row's).
    pub const DURABLE_VERSION: &str = "SELECT version FROM credit_balances WHERE user_id = $1";
    /// Sums as numeric, cast back to bigint: an hour of micros cannot
    /// reach 2^63 (a cast that would fails the query, never wraps).
    pub const ACTIVITY_SINCE: &str = "SELECT
         (SELECT count(*) FROM credit_usages WHERE created_at >= $1),
         (SELECT COALESCE(sum(cost_micros), 0)::bigint FROM credit_usages WHERE created_at >= $1),
         (SELECT count(*) FROM credit_transactions WHERE created_at >= $1 AND type = 'TOP_UP'),
         (SELECT COALESCE(sum(amount_micros), 0)::bigint FROM credit_transactions
           WHERE created_at >= $1 AND type = 'TOP_UP'),
         (SELECT count(*) FROM credit_transactions WHERE created_at >= $1 AND type = 'REFUND'),
         (SELECT COALESCE(sum(amount_micros), 0)::bigint FROM credit_transactions
           WHERE created_at >= $1 AND type = 'REFUND')";
    /// The journal writer's session. Its statements are planned once per
    /// connection (a generic plan), not at every batch: planning them was
    /// a third of PostgreSQL's time per chat. A generic plan is made for
    /// whatever size the tables have then (empty, on a new deployment),
    /// and kept as they grow, so the plans that would suit a small table
    /// are switched off: every statement of the writer looks rows up by
    /// key, as nested loops over the batch's keys probing an index
    /// (`tests/api/ledger/plans.rs` checks each plan on an empty database).
    /// Read-only unless a batch's `BEGIN READ WRITE` opened its
    /// transaction: a statement that ran outside it is refused, not
    /// committed alone.
    pub const WRITER_SESSION: &str = "SET plan_cache_mode = force_generic_plan;
        SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off;
        SET default_transaction_read_only = on";

    /// Moves each balance row forward, only from the version its actor
    /// holds (fencing), and records this instance ($6) as its writer.
    /// Returns the user ids it moved, their new version, and whether the writer changed
    /// (the other instances must then drop their copy). The rows are
    /// locked first, in id order, so `before` is the writer as of the
    /// update, not as of the statement's snapshot (a load elsewhere may
    /// have cleared it in between).
    pub const UPDATE_BALANCES: &str = concat!(
        "WITH ",
        locked_balances!(),
        " ",
        update_balances!(),
        " RETURNING b.user_id, b.version, before.written_by IS DISTINCT FROM $6"
    );

    /// `UPDATE_BALANCES` for a batch written in one round trip: raises
    /// (aborting the batch's transaction) unless every row was at its
    /// expected version (an account fenced is handled statement by
    /// statement), and notifies the other instances of the accounts it
    /// took over, as `cluster::payloads` does (at most 150 accounts per
    /// notification: an item is at most 41 bytes and an instance id 256,
    /// well under PostgreSQL's 8,000-byte payload).
    pub const UPDATE_BALANCES_AT_ONCE: &str = concat!(
        "WITH ",
        locked_balances!(),
        ", written AS (",
        update_balances!(),
        " RETURNING b.user_id, b.version, before.written_by IS DISTINCT FROM $6 AS moved),
        notified AS (
            SELECT pg_notify('creditd_accounts',
                             $6 || ' ' || string_agg(user_id::text || ':' || version::text, ','
                                                     ORDER BY user_id))
              FROM (SELECT user_id, version,
                           (row_number() OVER (ORDER BY user_id) - 1) / 150 AS part
                      FROM written WHERE moved) AS taken
             GROUP BY part)
        SELECT creditd_journal_expect(count(*) = cardinality($1::int8[]),
                                      'a balance row not at its expected version'),
               (SELECT count(*) FROM notified)
          FROM written"
    );

    /// Tells the other instances, at the commit of the transaction that
    /// sends it, which accounts this instance now writes
    /// (`cluster::payload`).
    pub const NOTIFY_ACCOUNTS: &str = "SELECT pg_notify('creditd_accounts', $1)";

    /// Before an instance loads an account it did not write last, it
    /// clears the writer ($2: this instance), so the writer's next batch
    /// notifies this instance too. Runs before the load's snapshot: a
    /// batch that commits after it notifies, one before it is in the
    /// snapshot.
    pub const CLAIM_READER: &str = "
        UPDATE credit_balances SET written_by = NULL
         WHERE user_id = $1 AND written_by <> $2";

    /// New holds; one placed and finished in the same batch is inserted
    /// finished (one row write instead of an insert and an update).
    pub const INSERT_HOLDS: &str = concat!(
        insert_holds!(),
        " ON CONFLICT DO NOTHING RETURNING id, user_id"
    );

    pub const INSERT_TRANSACTIONS: &str = concat!(
        insert_transactions!(),
        " ON CONFLICT DO NOTHING RETURNING id, user_id"
    );

    pub const INSERT_USAGES: &str = concat!(
        insert_usages!(),
        " ON CONFLICT DO NOTHING RETURNING id, user_id"
    );

    /// Finishes active holds of their own account; the writer checks, per
    /// account, that every one matched. Active is said as `finished_seq IS
    /// NULL` (the same, by the table's CHECK): `status = 'ACTIVE'` would
    /// let the planner read every active hold through the partial index.
    pub const FINISH_HOLDS: &str = concat!(finish_holds!(), " RETURNING h.id, h.user_id");

    /// New grants, and the remaining amount of grants an entry spent from
    /// (one row per grant per batch: its last state). An id of another
    /// account's grant writes nothing, which the writer counts as refused.
    pub const UPSERT_GRANTS: &str = concat!(upsert_grants!(), " RETURNING id, user_id");

    /// Undoes a refused account's grant writes: deletes those it inserted
    /// ($1 ids, $2 users), puts back the remaining amount of the others
    /// ($3 ids, $4 users, $5 remaining before the batch).
    pub const UNDO_GRANTS: &str = "
        WITH inserted AS (
            DELETE FROM credit_grants g
             USING unnest($1::uuid[], $2::int8[]) AS n(id, user_id)
             WHERE g.id = n.id AND g.user_id = n.user_id)
        UPDATE credit_grants AS g
           SET remaining_micros = o.remaining, updated_at = now()
          FROM unnest($3::uuid[], $4::int8[], $5::int8[]) AS o(id, user_id, remaining)
         WHERE g.id = o.id AND g.user_id = o.user_id";

    /// Undoes a refused account's writes inside the batch's transaction:
    /// the rows it inserted ($1 holds, $2 transactions, $3 usages, by id),
    /// the holds it finished back to ACTIVE ($4), and its balance row back to
    /// what it was before the batch ($5..$8: user, version, balance, held).
    /// The rows touched by each part are disjoint (a hold placed and finished
    /// in one batch is inserted finished, never finished by `FINISH_HOLDS`).
    pub const UNDO_ACCOUNTS: &str = "
        WITH holds AS (DELETE FROM credit_holds WHERE id = ANY($1::uuid[])),
             transactions AS (DELETE FROM credit_transactions WHERE id = ANY($2::uuid[])),
             usages AS (DELETE FROM credit_usages WHERE id = ANY($3::uuid[])),
             reopened AS (
                 UPDATE credit_holds
                    SET status = 'ACTIVE', finished_seq = NULL, finished_at = NULL
                  WHERE id = ANY($4::uuid[]))
        UPDATE credit_balances AS b
           SET balance_micros = u.balance, held_micros = u.held,
               version = u.version, updated_at = now()
          FROM unnest($5::int8[], $6::int8[], $7::int8[], $8::int8[])
               AS u(user_id, version, balance, held)
         WHERE b.user_id = u.user_id";

    /// The events caused by the batch's changes, pending delivery.
    pub const INSERT_EVENTS: &str = concat!(
        insert_events!(),
        " ON CONFLICT DO NOTHING RETURNING id, user_id"
    );

    /// The row statements of a batch written in one round trip, inside
    /// its transaction: a row PostgreSQL would skip or not find (a unique
    /// constraint, a finish matching no active hold, another account's
    /// grant id) raises instead of being counted, which aborts the
    /// transaction; the writer then writes the batch again statement by
    /// statement, where it is counted and undone per account.
    pub const INSERT_HOLDS_AT_ONCE: &str = insert_holds!();
    pub const INSERT_TRANSACTIONS_AT_ONCE: &str = insert_transactions!();
    pub const INSERT_USAGES_AT_ONCE: &str = insert_usages!();
    pub const INSERT_EVENTS_AT_ONCE: &str = insert_events!();
    pub const FINISH_HOLDS_AT_ONCE: &str = concat!(
        "WITH finished AS (",
        finish_holds!(),
        " RETURNING h.id)
        SELECT creditd_journal_expect(count(*) = cardinality($1::uuid[]),
                                      'a finished hold that was not active')
          FROM finished"
    );
    pub const UPSERT_GRANTS_AT_ONCE: &str = concat!(
        "WITH written AS (",
        upsert_grants!(),
        " RETURNING id)
        SELECT creditd_journal_expect(count(*) = cardinality($1::uuid[]),
                                      'a grant id of another account')
          FROM written"
    );

    /// Undoes a refused account's events inside the batch's transaction.
    pub const UNDO_EVENTS: &str = "DELETE FROM outgoing_events WHERE id = ANY($1::uuid[])";

    /// One statement of the journal writer, named for the plan checks.
    #[derive(Clone, Copy, Debug)]
    pub struct Journal {
        pub name: &'static str,
        pub sql: &'static str,
    }

    /// Every statement the journal writer prepares, in the order
    /// `Statements::prepare` takes them.
    pub const JOURNAL: [Journal; 18] = [
        Journal {
            name: "update_balances",
            sql: UPDATE_BALANCES,
        },
        Journal {
            name: "insert_transactions",
            sql: INSERT_TRANSACTIONS,
        },
        Journal {
            name: "insert_holds",
            sql: INSERT_HOLDS,
        },
        Journal {
            name: "insert_usages",
            sql: INSERT_USAGES,
        },
        Journal {
            name: "finish_holds",
            sql: FINISH_HOLDS,
        },
        Journal {
            name: "undo_accounts",
            sql: UNDO_ACCOUNTS,
        },
        Journal {
            name: "insert_events",
            sql: INSERT_EVENTS,
        },
        Journal {
            name: "undo_events",
            sql: UNDO_EVENTS,
        },
        Journal {
            name: "upsert_grants",
            sql: UPSERT_GRANTS,
        },
        Journal {
            name: "undo_grants",
            sql: UNDO_GRANTS,
        },
        Journal {
            name: "notify_accounts",
            sql: NOTIFY_ACCOUNTS,
        },
        Journal {
            name: "update_balances_at_once",
            sql: UPDATE_BALANCES_AT_ONCE,
        },
        Journal {
            name: "insert_transactions_at_once",
            sql: INSERT_TRANSACTIONS_AT_ONCE,
        },
        Journal {
            name: "insert_holds_at_once",
            sql: INSERT_HOLDS_AT_ONCE,
        },
        Journal {
            name: "insert_usages_at_once",
            sql: INSERT_USAGES_AT_ONCE,
        },
        Journal {
            name: "finish_holds_at_once",
            sql: FINISH_HOLDS_AT_ONCE,
        },
        Journal {
            name: "insert_events_at_once",
            sql: INSERT_EVENTS_AT_ONCE,
        },
        Journal {
            name: "upsert_grants_at_once",
            sql: UPSERT_GRANTS_AT_ONCE,
        },
    ];
}

/// A database failure as the engine reports it, classified by `DbError`:
/// out of reach is `Unavailable` (retry), a constraint or a bug is
/// `Internal` (no retry), the cause chain kept in the message.
pub fn database_error(error: impl Into<DbError>) -> LedgerError {
    LedgerError::from(error.into())
}

/// A client from the pool, or `Unavailable`.
pub async fn client(pool: &Pool) -> Result<crate::db::Client, LedgerError> {
    Ok(crate::db::client(pool).await?)
}

/// A database failure reaching the engine's callers: out of reach is
/// `Unavailable` (retry), anything else (a constraint, a bug) is
/// `Internal`, never a retry. The message keeps the whole cause chain.
impl From<DbError> for LedgerError {
    fn from(error: DbError) -> LedgerError {
        if error.is_unavailable() {
            LedgerError::Unavailable(error.chain())
        } else {
            LedgerError::Internal(error.chain())
        }
    }
}

/// The committed history of accounts, newest first, for the pages and the
/// operators: the one way into the ledger's tables from above the ledger.
#[derive(Clone)]
pub struct LedgerHistory {
    pool: Pool,
}

impl LedgerHistory {
    pub fn new(pool: Pool) -> LedgerHistory {
        LedgerHistory { pool }
    }

    /// What every account did since `since`, from the committed journal:
    /// chats and what they cost, top-ups and refunds with their amounts.
    pub async fn activity_since(&self, since: DateTime<Utc>) -> Result<Activity, LedgerError> {
        let client = client(&self.pool).await?;
        let row = client
            .query_one(sql::ACTIVITY_SINCE, &[&since])
            .await
            .map_err(DbError::from)?;
        Ok(Activity {
            chats: row.get(0),
            spend_micros: Micros::new(row.get(1)),
            top_ups: row.get(2),
            top_up_micros: Micros::new(row.get(3)),
            refunds: row.get(4),
            refund_micros: Micros::new(row.get(5)),
        })
    }

    /// Committed transactions, newest first, strictly before `before_seq`.
    pub async fn transactions(
        &self,
        account: AccountId,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<TransactionRecord>, LedgerError> {
        let client = client(&self.pool).await?;
        transactions_page(&**client, account, before_seq, limit).await
    }

    /// Committed usages, newest first, strictly before `before_seq`.
    pub async fn usages(
        &self,
        account: AccountId,
        before_seq: Option<i64>,
        limit: i64,
    ) -> Result<Vec<UsageRecord>, LedgerError> {
        let client = client(&self.pool).await?;
        usages_page(&**client, account, before_seq, limit).await
    }

    /// The latest transactions and usages, read on one connection.
    pub async fn latest(
        &self,
        account: AccountId,
        limit: i64,
    ) -> Result<(Vec<TransactionRecord>, Vec<UsageRecord>), LedgerError> {
        let client = client(&self.pool).await?;
        futures_util::try_join!(
            transactions_page(&**client, account, None, limit),
            usages_page(&**client, account, None, limit),
        )
    }

    /// The account's durable version and its latest transactions and
    /// usages, on one connection with the version read first: every entry
    /// up to that version is visible to the page queries that follow, so
    /// a page read here may be cached under the version.
    pub async fn latest_at_version(
        &self,
        account: AccountId,
        limit: i64,
    ) -> Result<Versioned, LedgerError> {
        let client = client(&self.pool).await?;
        let version = async {
            let row = client
                .query_one(sql::DURABLE_VERSION, &[&account.0])
                .await
                .map_err(DbError::from)?;
            Ok::<i64, LedgerError>(row.get(0))
        };
        let (version, transactions, usages) = futures_util::try_join!(
            version,
            transactions_page(&**client, account, None, limit),
            usages_page(&**client, account, None, limit),
        )?;
        Ok(Versioned {
            version,
            transactions,
            usages,
        })
    }

    /// Checks every ledger invariant against PostgreSQL (a repeatable-read
    /// snapshot; see `reconcile`).
    pub async fn reconcile(&self) -> Result<super::reconcile::ReconcileReport, DbError> {
        let mut client = crate::db::client(&self.pool).await?;
        Ok(super::reconcile::reconcile(&mut client).await?)
    }
}

/// An account's latest entries and the durable version they are read at.
#[derive(Debug, Clone)]
pub struct Versioned {
    /// The account's version as PostgreSQL has it.
    pub version: i64,
    pub transactions: Vec<TransactionRecord>,
    pub usages: Vec<UsageRecord>,
}

/// An account as PostgreSQL has it.
#[derive(Debug, Clone)]
pub struct StoredAccount {
    pub balance: Micros,
    pub held: Micros,
    pub version: i64,
    pub holds: Vec<HoldRecord>,
    /// Its grants with money left.
    pub grants: Vec<GrantRecord>,
}

const GRANT_COLUMNS: &str = "id, kind, amount_micros, remaining_micros, expires_at, source,
    stripe_payment_id, transaction_id, seq, created_at";

fn grant_from_row(row: &Row) -> Result<GrantRecord, LedgerError> {
    let kind: String = row.get(1);
    Ok(GrantRecord {
        id: row.get(0),
        kind: GrantKind::parse(&kind)
            .ok_or_else(|| LedgerError::Internal(format!("unknown grant kind {kind}")))?,
        amount_micros: Micros::new(row.get(2)),
        remaining_micros: Micros::new(row.get(3)),
        expires_at: row.get(4),
        source: row.get(5),
        stripe_payment_id: row.get(6),
        transaction_id: row.get(7),
        seq: row.get(8),
        created_at: row.get(9),
    })
}

/// An account's grants with money left.
pub async fn active_grants(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Vec<GrantRecord>, LedgerError> {
    let query = format!(
        "SELECT {GRANT_COLUMNS} FROM credit_grants
          WHERE user_id = $1 AND remaining_micros > 0 ORDER BY seq, id"
    );
    client
        .query(&query, &[&account.0])
        .await
        .map_err(database_error)?
        .iter()
        .map(grant_from_row)
        .collect()
}

/// `paid_by` as stored ([{grantId, kind, amountMicros}]; NULL: none).
fn paid_by_from(value: Option<serde_json::Value>) -> Result<Vec<GrantSpend>, LedgerError> {
    match value {
        None => Ok(Vec::new()),
        Some(value) => serde_json::from_value(value)
            .map_err(|e| LedgerError::Internal(format!("unreadable paid_by: {e}"))),
    }
}

/// Loads an account and its active holds, creating its balance row at zero
/// when the user exists and has none yet.
pub async fn load_account(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<StoredAccount, LedgerError> {
    let row = client
        .query_opt(
            "SELECT balance_micros, held_micros, version FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .map_err(database_error)?;
    let row = match row {
        Some(row) => row,
        None => {
            let exists = client
                .query_opt(
                    "SELECT 1 FROM users WHERE id = $1 AND deleted_at IS NULL",
                    &[&account.0],
                )
                .await
                .map_err(database_error)?
                .is_some();
            if !exists {
                return Err(LedgerError::AccountNotFound(account));
            }
            client
                .execute(
                    "INSERT INTO credit_balances (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    &[&account.0],
                )
                .await
                .map_err(database_error)?;
            client
                .query_one(
                    "SELECT balance_micros, held_micros, version FROM credit_balances
                      WHERE user_id = $1",
                    &[&account.0],
                )
                .await
                .map_err(database_error)?
        }
    };
    let holds = client
        .query(
            "SELECT id, seq, amount_micros, created_at, expires_at, api_key_id FROM credit_holds
              WHERE user_id = $1 AND status = 'ACTIVE' ORDER BY seq",
            &[&account.0],
        )
        .await
        .map_err(database_error)?
        .iter()
        .map(|row| HoldRecord {
            id: HoldId(row.get(0)),
            seq: row.get(1),
            amount_micros: Micros::new(row.get(2)),
            created_at: row.get(3),
            expires_at: row.get(4),
            api_key_id: row.get::<_, Option<uuid::Uuid>>(5).map(ApiKeyId),
        })
        .collect();
    let grants = active_grants(client, account).await?;
    Ok(StoredAccount {
        balance: Micros::new(row.get(0)),
        held: Micros::new(row.get(1)),
        version: row.get(2),
        holds,
        grants,
    })
}

const TRANSACTION_COLUMNS: &str = "id, seq, type, direction, amount_micros, idempotency_key,
    description, stripe_session_id, stripe_payment_id, metadata, balance_before_micros,
    balance_after_micros, created_at, paid_by";

fn transaction_from_row(row: &Row) -> Result<TransactionRecord, LedgerError> {
    let kind: String = row.get(2);
    let direction: String = row.get(3);
    let key: String = row.get(5);
    Ok(TransactionRecord {
        id: row.get(0),
        seq: row.get(1),
        kind: TransactionType::parse(&kind)
            .ok_or_else(|| LedgerError::Internal(format!("unknown transaction type {kind}")))?,
        direction: Direction::parse(&direction)
            .ok_or_else(|| LedgerError::Internal(format!("unknown direction {direction}")))?,
        amount_micros: Micros::new(row.get(4)),
        idempotency_key: IdempotencyKey::parse(key).map_err(LedgerError::Internal)?,
        description: row.get(6),
        stripe_session_id: row.get(7),
        stripe_payment_id: row.get(8),
        metadata: row.get(9),
        balance_before_micros: Micros::new(row.get(10)),
        balance_after_micros: Micros::new(row.get(11)),
        created_at: row.get(12),
        paid_by: paid_by_from(row.get(13))?,
    })
}

const USAGE_COLUMNS: &str = "id, seq, hold_id, model, input_tokens, output_tokens,
    cache_read_tokens, cache_write_tokens, cost_micros, held_micros, conversation_id,
    message_id, balance_before_micros, balance_after_micros, created_at, paid_by, api_key_id";

/// Token counts are checked `>= 0` by the schema.
fn count(row: &Row, index: usize) -> u64 {
    row.get::<_, i64>(index).unsigned_abs()
}

fn usage_from_row(row: &Row) -> Result<UsageRecord, LedgerError> {
    Ok(UsageRecord {
        paid_by: paid_by_from(row.get(15))?,
        id: row.get(0),
        seq: row.get(1),
        hold_id: HoldId(row.get(2)),
        model: row.get(3),
        input_tokens: count(row, 4),
        output_tokens: count(row, 5),
        cache_read_tokens: count(row, 6),
        cache_write_tokens: count(row, 7),
        cost_micros: Micros::new(row.get(8)),
        held_micros: Micros::new(row.get(9)),
        conversation_id: row.get(10),
        message_id: row.get(11),
        balance_before_micros: Micros::new(row.get(12)),
        balance_after_micros: Micros::new(row.get(13)),
        created_at: row.get(14),
        api_key_id: row.get::<_, Option<uuid::Uuid>>(16).map(ApiKeyId),
    })
}

/// The committed transaction under an idempotency key, if any.
pub async fn find_transaction(
    client: &impl GenericClient,
    account: AccountId,
    key: &IdempotencyKey,
) -> Result<Option<TransactionRecord>, LedgerError> {
    let query = format!(
        "SELECT {TRANSACTION_COLUMNS} FROM credit_transactions
          WHERE user_id = $1 AND idempotency_key = $2"
    );
    client
        .query_opt(&query, &[&account.0, &key.as_str()])
        .await
        .map_err(database_error)?
        .map(|row| transaction_from_row(&row))
        .transpose()
}

/// How a hold of this account ended, if it did: its usage when one was
/// posted under its id (settled, or charged after it expired, was released
/// or was lost), else its release.
pub async fn find_finished_hold(
    client: &impl GenericClient,
    account: AccountId,
    hold: HoldId,
) -> Result<Option<FinishedHold>, LedgerError> {
    let query =
        format!("SELECT {USAGE_COLUMNS} FROM credit_usages WHERE hold_id = $1 AND user_id = $2");
    if let Some(usage) = client
        .query_opt(&query, &[&hold.0, &account.0])
        .await
        .map_err(database_error)?
    {
        return Ok(Some(FinishedHold::Settled(Box::new(usage_from_row(
            &usage,
        )?))));
    }
    let Some(row) = client
        .query_opt(
            "SELECT status, finished_seq, amount_micros, finished_at FROM credit_holds
              WHERE id = $1 AND user_id = $2",
            &[&hold.0, &account.0],
        )
        .await
        .map_err(database_error)?
    else {
        return Ok(None);
    };
    let status: String = row.get(0);
    match HoldStatus::parse(&status) {
        Some(HoldStatus::Active) => Ok(None),
        None => Err(LedgerError::Internal(format!(
            "hold {hold} has an unknown status {status}"
        ))),
        Some(HoldStatus::Settled) => Err(LedgerError::Internal(format!(
            "hold {hold} is settled but has no usage"
        ))),
        Some(status) => {
            // The schema ties a finished status to its seq and time.
            let (Some(seq), Some(finished_at)) = (
                row.get::<_, Option<i64>>(1),
                row.get::<_, Option<DateTime<Utc>>>(3),
            ) else {
                return Err(LedgerError::Internal(format!(
                    "hold {hold} is {status:?} without its finishing seq and time"
                )));
            };
            Ok(Some(FinishedHold::Released(ReleaseRecord {
                hold_id: hold,
                seq,
                amount_micros: Micros::new(row.get(2)),
                status,
                finished_at,
            })))
        }
    }
}

/// What this account already clawed back for a Stripe object (its REFUND
/// debits carrying `{"chargeId": object}`).
pub async fn clawed_back(
    client: &impl GenericClient,
    account: AccountId,
    object: &str,
) -> Result<Micros, LedgerError> {
    let total: i64 = client
        .query_one(
            "SELECT COALESCE(sum(amount_micros), 0)::int8 FROM credit_transactions
              WHERE user_id = $1 AND type = 'REFUND' AND direction = 'DEBIT'
                AND metadata->>'chargeId' = $2",
            &[&account.0, &object],
        )
        .await
        .map_err(database_error)?
        .get(0);
    Ok(Micros::new(total))
}

/// Committed transactions, newest first, strictly before `before_seq`.
pub async fn transactions_page(
    client: &impl GenericClient,
    account: AccountId,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<TransactionRecord>, LedgerError> {
    let query = format!(
        "SELECT {TRANSACTION_COLUMNS} FROM credit_transactions
          WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
    );
    client
        .query(
            &query,
            &[&account.0, &before_seq.unwrap_or(i64::MAX), &limit],
        )
        .await
        .map_err(database_error)?
        .iter()
        .map(transaction_from_row)
        .collect()
}

/// Committed usages, newest first, strictly before `before_seq`.
pub async fn usages_page(
    client: &impl GenericClient,
    account: AccountId,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<UsageRecord>, LedgerError> {
    let query = format!(
        "SELECT {USAGE_COLUMNS} FROM credit_usages
          WHERE user_id = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3"
    );
    client
        .query(
            &query,
            &[&account.0, &before_seq.unwrap_or(i64::MAX), &limit],
        )
        .await
        .map_err(database_error)?
        .iter()
        .map(usage_from_row)
        .collect()
}
