//! `reconcile`: checks the ledger's invariants against what PostgreSQL holds,
//! from one consistent snapshot.
//!
//! - balance = credits − debits − usage costs, for every account;
//! - held = the sum of active holds;
//! - every `balance_before` follows the previous entry's `balance_after`, and
//!   every `balance_after` follows from its own amount;
//! - an account's journal seqs are exactly 1..=version, each used once
//!   (so no operation was applied twice or lost);
//! - every journal row belongs to an account, every usage to its settled
//!   hold; a usage charged late (`held_micros` 0: its hold had expired, was
//!   released or was lost) to no active or settled hold;
//! - every outgoing event names a journal entry of its account (the change
//!   that caused it, committed in the same transaction).

use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub user_id: i64,
    pub check: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileReport {
    pub clean: bool,
    pub accounts_checked: i64,
    pub problems: Vec<Problem>,
}

/// Most problems reported per check.
const LIMIT: i64 = 1000;

const BALANCES: &str = "
    WITH moves AS (
        SELECT user_id,
               CASE direction WHEN 'CREDIT' THEN amount_micros ELSE -amount_micros END AS delta
          FROM credit_transactions
        UNION ALL
        SELECT user_id, -cost_micros FROM credit_usages),
    sums AS (SELECT user_id, sum(delta) AS total FROM moves GROUP BY user_id),
    holds AS (SELECT user_id, sum(amount_micros) AS held FROM credit_holds
               WHERE status = 'ACTIVE' GROUP BY user_id)
    SELECT b.user_id, b.balance_micros::text, coalesce(s.total, 0)::text,
           b.held_micros::text, coalesce(h.held, 0)::text
      FROM credit_balances b
      LEFT JOIN sums s USING (user_id)
      LEFT JOIN holds h USING (user_id)
     WHERE b.balance_micros <> coalesce(s.total, 0) OR b.held_micros <> coalesce(h.held, 0)
     ORDER BY b.user_id LIMIT $1";

const CHAIN: &str = "
    WITH entries AS (
        SELECT user_id, seq, balance_before_micros AS before, balance_after_micros AS after,
               CASE direction WHEN 'CREDIT' THEN amount_micros ELSE -amount_micros END AS delta
          FROM credit_transactions
        UNION ALL
        SELECT user_id, seq, balance_before_micros, balance_after_micros, -cost_micros
          FROM credit_usages),
    chained AS (
        SELECT user_id, seq, before, after, delta,
               lag(after, 1, 0::bigint) OVER (PARTITION BY user_id ORDER BY seq) AS previous
          FROM entries)
    SELECT user_id, seq, before, after, delta, previous FROM chained
     WHERE before <> previous OR after::numeric <> before::numeric + delta::numeric
     ORDER BY user_id, seq LIMIT $1";

const SEQUENCES: &str = "
    WITH events AS (
        SELECT user_id, seq FROM credit_transactions
        UNION ALL SELECT user_id, seq FROM credit_usages
        UNION ALL SELECT user_id, seq FROM credit_holds
        UNION ALL SELECT user_id, finished_seq FROM credit_holds
                   WHERE status IN ('RELEASED', 'EXPIRED')),
    per AS (
        SELECT user_id, count(*) AS n, count(DISTINCT seq) AS distinct_n,
               max(seq) AS top, min(seq) AS bottom
          FROM events GROUP BY user_id)
    SELECT b.user_id, b.version, coalesce(p.n, 0), coalesce(p.distinct_n, 0),
           coalesce(p.top, 0), coalesce(p.bottom, 1)
      FROM credit_balances b LEFT JOIN per p USING (user_id)
     WHERE coalesce(p.n, 0) <> b.version OR coalesce(p.distinct_n, 0) <> b.version
        OR coalesce(p.top, 0) <> b.version OR coalesce(p.bottom, 1) <> 1
     ORDER BY b.user_id LIMIT $1";

/// Journal rows without their account's balance row, and usages without
/// their settled hold of the same account (the journal tables carry no
/// foreign keys; see sql/0001_ledger.sql).
const ORPHANS: &str = "
    WITH rows AS (
        SELECT user_id, seq, 'transaction' AS kind FROM credit_transactions
        UNION ALL SELECT user_id, seq, 'hold' FROM credit_holds
        UNION ALL SELECT user_id, seq, 'usage' FROM credit_usages)
    SELECT r.user_id, r.seq, r.kind, 'no balance row for this account' FROM rows r
     WHERE NOT EXISTS (SELECT 1 FROM credit_balances b WHERE b.user_id = r.user_id)
    UNION ALL
    SELECT u.user_id, u.seq, 'usage', 'its hold is not a settled hold of this account'
      FROM credit_usages u
     WHERE u.held_micros > 0
       AND NOT EXISTS (SELECT 1 FROM credit_holds h
                        WHERE h.id = u.hold_id AND h.user_id = u.user_id
                          AND h.status = 'SETTLED' AND h.finished_seq = u.seq)
    UNION ALL
    SELECT u.user_id, u.seq, 'usage', 'charged late, but its hold is active, settled or another account''s'
      FROM credit_usages u
     WHERE u.held_micros = 0
       AND EXISTS (SELECT 1 FROM credit_holds h
                    WHERE h.id = u.hold_id
                      AND (h.user_id <> u.user_id OR h.status IN ('ACTIVE', 'SETTLED')))
     ORDER BY 1, 2 LIMIT $1";

/// Outgoing events whose seq names no journal entry of their account.
const EVENTS: &str = "
    SELECT e.user_id, e.seq, e.type FROM outgoing_events e
     WHERE NOT EXISTS (SELECT 1 FROM credit_transactions t
                        WHERE t.user_id = e.user_id AND t.seq = e.seq)
       AND NOT EXISTS (SELECT 1 FROM credit_usages u
                        WHERE u.user_id = e.user_id AND u.seq = e.seq)
       AND NOT EXISTS (SELECT 1 FROM credit_holds h
                        WHERE h.user_id = e.user_id
                          AND (h.seq = e.seq OR h.finished_seq = e.seq))
     ORDER BY 1, 2 LIMIT $1";

/// Runs every check in one read-only snapshot.
pub async fn reconcile(client: &mut Client) -> Result<ReconcileReport, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let accounts_checked: i64 = tx
        .query_one("SELECT count(*) FROM credit_balances", &[])
        .await?
        .get(0);
    let mut problems = Vec::new();
    for row in tx.query(BALANCES, &[&LIMIT]).await? {
        let user_id: i64 = row.get(0);
        let (balance, expected): (String, String) = (row.get(1), row.get(2));
        let (held, active): (String, String) = (row.get(3), row.get(4));
        if balance != expected {
            problems.push(Problem {
                user_id,
                check: "balance",
                detail: format!("balance_micros is {balance} but the journal sums to {expected}"),
            });
        }
        if held != active {
            problems.push(Problem {
                user_id,
                check: "held",
                detail: format!("held_micros is {held} but active holds sum to {active}"),
            });
        }
    }
    for row in tx.query(CHAIN, &[&LIMIT]).await? {
        let (user_id, seq): (i64, i64) = (row.get(0), row.get(1));
        let (before, after, delta, previous): (i64, i64, i64, i64) =
            (row.get(2), row.get(3), row.get(4), row.get(5));
        problems.push(Problem {
            user_id,
            check: "chain",
            detail: format!(
                "entry {seq}: before {before}, after {after}, amount {delta}; previous after {previous}"
            ),
        });
    }
    for row in tx.query(ORPHANS, &[&LIMIT]).await? {
        let (user_id, seq, kind, reason): (i64, i64, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        problems.push(Problem {
            user_id,
            check: "orphan",
            detail: format!("{kind} {seq}: {reason}"),
        });
    }
    for row in tx.query(SEQUENCES, &[&LIMIT]).await? {
        let user_id: i64 = row.get(0);
        let (version, n, distinct, top, bottom): (i64, i64, i64, i64, i64) =
            (row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
        problems.push(Problem {
            user_id,
            check: "sequence",
            detail: format!(
                "version {version}; journal has {n} entries, {distinct} distinct seqs, from {bottom} to {top}"
            ),
        });
    }
    for row in tx.query(EVENTS, &[&LIMIT]).await? {
        let (user_id, seq, kind): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
        problems.push(Problem {
            user_id,
            check: "event",
            detail: format!("{kind} event of seq {seq}: no journal entry has this seq"),
        });
    }
    tx.commit().await?;
    Ok(ReconcileReport {
        clean: problems.is_empty(),
        accounts_checked,
        problems,
    })
}
