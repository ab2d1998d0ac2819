//! The outbox's SQL: what the sender reads and marks, what operators list
//! and redeliver. The ledger's journal writer inserts the rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::accounts::ClerkUserId;

/// An account's next event to send, due now.
#[derive(Debug, Clone)]
pub struct DueEvent {
    pub id: Uuid,
    pub user_id: i64,
    pub kind: String,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    pub pending_since: DateTime<Utc>,
    /// Its number in the account's stream, if it was handed over before
    /// (a retry, a redelivery); `None`: it gets the next one when sent.
    pub sequence: Option<i64>,
    /// The account's owner as the app knows them.
    pub clerk_id: String,
}

/// Each account's next PENDING event, of those whose next attempt is due at
/// `now`, the longest-waiting first. An account's next event is the one
/// already numbered (a retry or a redelivery keeps its place), else its
/// earliest by journal order; an account whose next event is not due yet
/// sends nothing: its later events wait behind it.
pub async fn due_heads(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DueEvent>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT h.id, h.user_id, h.type, h.data, h.created_at, h.attempts, h.pending_since,
                    h.sequence, u.clerk_id
               FROM (SELECT DISTINCT ON (user_id) id, user_id, type, data, created_at,
                            attempts, pending_since, next_attempt_at, sequence
                       FROM outgoing_events
                      WHERE status = 'PENDING'
                      ORDER BY user_id, sequence, seq, ordinal) AS h
               JOIN users u ON u.id = h.user_id
              WHERE h.next_attempt_at <= $1
              ORDER BY h.next_attempt_at
              LIMIT $2",
            &[&now, &limit],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(DueEvent {
                id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                kind: row.try_get(2)?,
                data: row.try_get(3)?,
                created_at: row.try_get(4)?,
                attempts: row.try_get(5)?,
                pending_since: row.try_get(6)?,
                sequence: row.try_get(7)?,
                clerk_id: row.try_get(8)?,
            })
        })
        .collect()
}

/// Gives an event not yet numbered the next number of its account (its
/// highest + 1), committed before the event is handed over, and answers
/// the event's number. A number given is never given again nor taken
/// back: two senders racing for one account's next number are refused by
/// `UNIQUE (user_id, sequence)` but one (an error here; the next round
/// tries again), so the numbers stay 1, 2, 3… with no gap.
pub async fn assign_sequence(
    client: &impl GenericClient,
    id: Uuid,
    user_id: i64,
) -> Result<i64, SequenceError> {
    let assigned = client
        .query_opt(
            "UPDATE outgoing_events
                SET sequence = (SELECT COALESCE(max(sequence), 0) + 1
                                  FROM outgoing_events WHERE user_id = $2)
              WHERE id = $1 AND user_id = $2 AND sequence IS NULL
             RETURNING sequence",
            &[&id, &user_id],
        )
        .await?;
    if let Some(row) = assigned {
        return Ok(row.try_get(0)?);
    }
    // Numbered by another sender in the meantime: it keeps that number.
    let row = client
        .query_opt(
            "SELECT sequence FROM outgoing_events WHERE id = $1 AND user_id = $2",
            &[&id, &user_id],
        )
        .await?
        .ok_or(SequenceError::Missing(id))?;
    row.try_get::<_, Option<i64>>(0)?
        .ok_or(SequenceError::Missing(id))
}

/// Why an event could not get its number.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    /// Another sender took the account's next number first (unique
    /// violation), or the database failed.
    #[error("numbering the event failed: {0}")]
    Database(#[from] tokio_postgres::Error),
    /// The event is gone, or it has no number and none could be given.
    #[error("event {0} has no sequence and none could be given")]
    Missing(Uuid),
}

pub async fn pending_count(client: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    client
        .query_one(
            "SELECT count(*) FROM outgoing_events WHERE status = 'PENDING'",
            &[],
        )
        .await?
        .try_get(0)
}

pub async fn mark_delivered(
    client: &impl GenericClient,
    id: Uuid,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE outgoing_events
                SET status = 'DELIVERED', attempts = attempts + 1, delivered_at = $2,
                    last_error = NULL
              WHERE id = $1 AND status = 'PENDING'",
            &[&id, &at],
        )
        .await?;
    Ok(())
}

/// Records a failed attempt: retried at `next`, or FAILED when `give_up`.
pub async fn mark_attempt_failed(
    client: &impl GenericClient,
    id: Uuid,
    next: DateTime<Utc>,
    give_up: bool,
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    let status = if give_up { "FAILED" } else { "PENDING" };
    client
        .execute(
            "UPDATE outgoing_events
                SET status = $2, attempts = attempts + 1, next_attempt_at = $3,
                    last_error = $4
              WHERE id = $1 AND status = 'PENDING'",
            &[&id, &status, &next, &error],
        )
        .await?;
    Ok(())
}

/// One event and its delivery state, as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventDelivery {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub kind: String,
    /// The Clerk id of the account's owner.
    pub user_id: String,
    /// The journal seq of the change that caused it (for events without
    /// a change of their own: the change they follow).
    pub seq: i64,
    /// Its number in the account's stream as the receiver sees it (1, 2,
    /// 3… per account, no gap); null until it is first sent.
    pub sequence: Option<i64>,
    pub data: serde_json::Value,
    pub created_at: DateTime<Utc>,
    /// PENDING, DELIVERED or FAILED.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
}

const DELIVERY_COLUMNS: &str = "e.id, e.type, u.clerk_id, e.seq, e.sequence, e.data,
    e.created_at, e.status, e.attempts, e.next_attempt_at, e.last_error, e.delivered_at";

fn delivery(row: &Row) -> Result<EventDelivery, tokio_postgres::Error> {
    Ok(EventDelivery {
        id: row.try_get(0)?,
        kind: row.try_get(1)?,
        user_id: row.try_get(2)?,
        seq: row.try_get(3)?,
        sequence: row.try_get(4)?,
        data: row.try_get(5)?,
        created_at: row.try_get(6)?,
        status: row.try_get(7)?,
        attempts: row.try_get(8)?,
        next_attempt_at: row.try_get(9)?,
        last_error: row.try_get(10)?,
        delivered_at: row.try_get(11)?,
    })
}

/// The newest events, optionally of one status and one user.
pub async fn list(
    client: &impl GenericClient,
    status: Option<&str>,
    user: Option<&ClerkUserId>,
    limit: i64,
) -> Result<Vec<EventDelivery>, tokio_postgres::Error> {
    let clerk_id = user.map(ClerkUserId::as_str);
    let rows = client
        .query(
            &format!(
                "SELECT {DELIVERY_COLUMNS}
                   FROM outgoing_events e JOIN users u ON u.id = e.user_id
                  WHERE ($1::text IS NULL OR e.status = $1)
                    AND ($2::text IS NULL OR u.clerk_id = $2)
                  ORDER BY e.created_at DESC, e.seq DESC, e.ordinal DESC
                  LIMIT $3"
            ),
            &[&status, &clerk_id, &limit],
        )
        .await?;
    rows.iter().map(delivery).collect()
}

/// Puts an event back in the queue (due now, with a fresh retry window).
/// An event already sent keeps its sequence and goes before its account's
/// events not yet sent; one never sent goes out in its account's order.
/// `None` when there is no such event.
pub async fn redeliver(
    client: &impl GenericClient,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<Option<EventDelivery>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            &format!(
                "WITH e AS (
                     UPDATE outgoing_events
                        SET status = 'PENDING', next_attempt_at = $2, pending_since = $2,
                            delivered_at = NULL
                      WHERE id = $1
                  RETURNING *)
                 SELECT {DELIVERY_COLUMNS} FROM e JOIN users u ON u.id = e.user_id"
            ),
            &[&id, &now],
        )
        .await?;
    row.as_ref().map(delivery).transpose()
}

/// The outbox as operators read and steer it, each call on a connection
/// of its own.
#[derive(Clone)]
pub struct Events {
    pool: crate::db::Pool,
}

impl Events {
    pub fn new(pool: crate::db::Pool) -> Events {
        Events { pool }
    }

    /// The events, newest first (see [`list`]).
    pub async fn list(
        &self,
        status: Option<&str>,
        user: Option<&ClerkUserId>,
        limit: i64,
    ) -> Result<Vec<EventDelivery>, crate::db::DbError> {
        let client = crate::db::client(&self.pool).await?;
        Ok(list(&**client, status, user, limit).await?)
    }

    /// How many events wait (PENDING) and how many were given up (FAILED).
    pub async fn counts(&self) -> Result<(i64, i64), crate::db::DbError> {
        let client = crate::db::client(&self.pool).await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM outgoing_events WHERE status = 'PENDING'),
                        (SELECT count(*) FROM outgoing_events WHERE status = 'FAILED')",
                &[],
            )
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Puts an event back in the queue (see [`redeliver`]); `None` when
    /// there is no such event.
    pub async fn redeliver(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<Option<EventDelivery>, crate::db::DbError> {
        let client = crate::db::client(&self.pool).await?;
        Ok(redeliver(&**client, id, now).await?)
    }
}
