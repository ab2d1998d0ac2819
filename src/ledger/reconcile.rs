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
//!   that caused it, committed in the same transaction);
//! - the sequences given to an account's events are exactly 1..=n, each
//!   once (a receiver sees every gap for what it is: an event not taken);
//! - grants: Σ remaining − debt = balance with debt ≥ 0, and debt only
//!   once no unexpired grant has money left; remaining ≤ amount; a grant
//!   never paid more than it had (its spends + remaining ≤ amount);
//! - every debit's and usage's `paid_by` names grants of its account, each
//!   part positive, their sum at most its amount (the rest is debt);
//! - no grant paid after its expiry, except the settlement of a hold
//!   placed before it. (What is left of a grant past its expiry may still
//!   be there: an account not loaded expires its grants when it loads.)

use serde::Serialize;
use tokio_postgres::{Client, IsolationLevel, Transaction};

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
/// Accounts whose events' sequences are not exactly 1..=n, each once.
const EVENT_SEQUENCES: &str = "
    SELECT user_id, count(*), count(DISTINCT sequence), max(sequence) FROM outgoing_events
     WHERE sequence IS NOT NULL
     GROUP BY user_id
    HAVING count(*) <> max(sequence) OR count(DISTINCT sequence) <> max(sequence)
     ORDER BY user_id LIMIT $1";
/// Per account: the balance, Σ remaining, and what unexpired grants hold.
/// "Unexpired" as of the account's last entry or now, whichever is later:
/// the engine's clock wrote the entries' times.
const GRANT_SUMS: &str = "
    WITH last AS (
        SELECT user_id, max(created_at) AS at FROM (
            SELECT user_id, created_at FROM credit_transactions
            UNION ALL SELECT user_id, created_at FROM credit_usages) e
         GROUP BY user_id),
    g AS (
        SELECT g.user_id, sum(g.remaining_micros) AS granted,
               sum(g.remaining_micros) FILTER (
                   WHERE g.expires_at IS NULL OR g.expires_at > greatest(now(), l.at))
                   AS spendable
          FROM credit_grants g LEFT JOIN last l USING (user_id)
         GROUP BY g.user_id)
    SELECT b.user_id, b.balance_micros::text, coalesce(g.granted, 0)::text,
           coalesce(g.spendable, 0)::text
      FROM credit_balances b LEFT JOIN g USING (user_id)
     WHERE coalesce(g.granted, 0) < b.balance_micros
        OR (coalesce(g.granted, 0) > b.balance_micros AND coalesce(g.spendable, 0) > 0)
     ORDER BY b.user_id LIMIT $1";

/// Every part of every `paid_by`, with its entry.
const SPENDS: &str = "
    spends AS (
        SELECT t.user_id, t.seq, 'debit' AS entry, t.type, t.amount_micros AS total,
               t.created_at, NULL::uuid AS hold_id,
               (p->>'grantId')::uuid AS grant_id, (p->>'amountMicros')::int8 AS amount
          FROM credit_transactions t, jsonb_array_elements(t.paid_by) p
         WHERE t.paid_by IS NOT NULL
        UNION ALL
        SELECT u.user_id, u.seq, 'usage', NULL, u.cost_micros, u.created_at, u.hold_id,
               (p->>'grantId')::uuid, (p->>'amountMicros')::int8
          FROM credit_usages u, jsonb_array_elements(u.paid_by) p
         WHERE u.paid_by IS NOT NULL)";

const PAID_BY: &str = "
    WITH {SPENDS},
    entries AS (
        SELECT user_id, seq, entry, total, sum(amount) AS paid, min(amount) AS smallest
          FROM spends GROUP BY user_id, seq, entry, total)
    SELECT user_id, seq, entry || ' ' || seq || ': paid_by sums to ' || paid
           || ' (smallest part ' || smallest || ') for an amount of ' || total
      FROM entries WHERE paid > total OR smallest <= 0
    UNION ALL
    SELECT s.user_id, s.seq, s.entry || ' ' || s.seq || ': paid by grant ' || s.grant_id
           || ', not a grant of this account'
      FROM spends s
     WHERE NOT EXISTS (SELECT 1 FROM credit_grants g
                        WHERE g.id = s.grant_id AND g.user_id = s.user_id)
    UNION ALL
    SELECT g.user_id, 0, 'grant ' || g.id || ': remaining ' || g.remaining_micros
           || ' plus ' || coalesce(sum(s.amount), 0) || ' spent exceeds its amount '
           || g.amount_micros
      FROM credit_grants g LEFT JOIN spends s ON s.grant_id = g.id AND s.user_id = g.user_id
     GROUP BY g.id, g.user_id, g.remaining_micros, g.amount_micros
    HAVING g.remaining_micros + coalesce(sum(s.amount), 0) > g.amount_micros
        OR g.remaining_micros > g.amount_micros
    ORDER BY 1, 2 LIMIT $1";

const EXPIRY: &str = "
    WITH {SPENDS}
    SELECT s.user_id, s.seq, s.entry || ' ' || s.seq || ': paid ' || s.amount
           || ' by grant ' || g.id || ' after it expired at ' || g.expires_at
      FROM spends s JOIN credit_grants g ON g.id = s.grant_id AND g.user_id = s.user_id
     WHERE g.expires_at IS NOT NULL AND s.created_at > g.expires_at
       AND s.type IS DISTINCT FROM 'EXPIRED'
       AND NOT EXISTS (SELECT 1 FROM credit_holds h
                        WHERE s.hold_id IS NOT NULL AND h.id = s.hold_id
                          AND h.user_id = s.user_id AND h.created_at < g.expires_at)
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
    problems.extend(balance_problems(&tx).await?);
    problems.extend(chain_problems(&tx).await?);
    problems.extend(orphan_problems(&tx).await?);
    problems.extend(sequence_problems(&tx).await?);
    problems.extend(event_problems(&tx).await?);
    problems.extend(event_sequence_problems(&tx).await?);
    problems.extend(grant_problems(&tx).await?);
    problems.extend(spend_problems(&tx).await?);
    tx.commit().await?;
    Ok(ReconcileReport {
        clean: problems.is_empty(),
        accounts_checked,
        problems,
    })
}

/// balance = credits − debits − usage costs, and held = the sum of active holds.
async fn balance_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
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
    Ok(problems)
}

/// Entries whose `balance_before` does not follow the previous `balance_after`, or whose `balance_after` does not follow from their amount.
async fn chain_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
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
    Ok(problems)
}

/// Journal rows without their account, usages without their settled hold, late usages with one.
async fn orphan_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for row in tx.query(ORPHANS, &[&LIMIT]).await? {
        let (user_id, seq, kind, reason): (i64, i64, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        problems.push(Problem {
            user_id,
            check: "orphan",
            detail: format!("{kind} {seq}: {reason}"),
        });
    }
    Ok(problems)
}

/// Accounts whose journal seqs are not exactly 1..=version, each once.
async fn sequence_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
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
    Ok(problems)
}

/// Outgoing events that name no journal entry of their account.
async fn event_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for row in tx.query(EVENTS, &[&LIMIT]).await? {
        let (user_id, seq, kind): (i64, i64, String) = (row.get(0), row.get(1), row.get(2));
        problems.push(Problem {
            user_id,
            check: "event",
            detail: format!("{kind} event of seq {seq}: no journal entry has this seq"),
        });
    }
    Ok(problems)
}

/// Accounts whose events are not numbered exactly 1..=n, each once.
async fn event_sequence_problems(
    tx: &Transaction<'_>,
) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for row in tx.query(EVENT_SEQUENCES, &[&LIMIT]).await? {
        let user_id: i64 = row.get(0);
        let (n, distinct, top): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
        problems.push(Problem {
            user_id,
            check: "eventSequence",
            detail: format!(
                "{n} events numbered ({distinct} distinct numbers) up to {top}: a number was skipped or given twice"
            ),
        });
    }
    Ok(problems)
}

/// Balances that are not what the grants hold less a debt, or a debt while an unexpired grant has money left.
async fn grant_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for row in tx.query(GRANT_SUMS, &[&LIMIT]).await? {
        let user_id: i64 = row.get(0);
        let (balance, granted, spendable): (String, String, String) =
            (row.get(1), row.get(2), row.get(3));
        problems.push(Problem {
            user_id,
            check: "grants",
            detail: format!(
                "balance_micros is {balance}; grants hold {granted}, {spendable} of it unexpired: \
                 the balance must be what the grants hold less a debt, and debt only once no \
                 unexpired grant has money left"
            ),
        });
    }
    Ok(problems)
}

/// Debits and usages whose `paid_by` names grants of another account, a part not positive or more than their amount (`paidBy`), and grants that paid after their expiry other than for a hold placed before it (`expiry`).
async fn spend_problems(tx: &Transaction<'_>) -> Result<Vec<Problem>, tokio_postgres::Error> {
    let mut problems = Vec::new();
    for (check, query) in [("paidBy", PAID_BY), ("expiry", EXPIRY)] {
        for row in tx
            .query(&query.replace("{SPENDS}", SPENDS), &[&LIMIT])
            .await?
        {
            let (user_id, detail): (i64, String) = (row.get(0), row.get(2));
            problems.push(Problem {
                user_id,
                check,
                detail,
            });
        }
    }
    Ok(problems)
}
