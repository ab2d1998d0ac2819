//! The email deliveries' SQL (`email_deliveries`, one row per event that
//! may become an email, inserted by a trigger with the event), and each
//! person's choice of alert emails (`users.alert_emails`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::db::DbError;
use crate::ledger::AccountId;

/// An account's next email to send, due now, with what decides it.
#[derive(Debug, Clone)]
pub struct DueEmail {
    pub event_id: Uuid,
    /// The event's type (`balance.low`, …).
    pub kind: String,
    pub data: serde_json::Value,
    /// When the event was recorded.
    pub created_at: DateTime<Utc>,
    pub attempts: i32,
    /// The address Clerk gave (none: no email).
    pub address: Option<String>,
    pub deleted: bool,
    /// The person's choice of alert emails.
    pub alerts_on: bool,
}

/// Each account's earliest PENDING delivery (journal order), of those due
/// at `now`, the longest-waiting first: an account's later emails wait
/// behind one being retried, so they arrive in order.
pub async fn due_heads(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DueEmail>, DbError> {
    let rows = client
        .query(
            "SELECT d.event_id, d.type, e.data, e.created_at, d.attempts,
                    u.email, u.deleted_at IS NOT NULL, u.alert_emails
               FROM (SELECT DISTINCT ON (user_id) event_id, user_id, type, attempts,
                            next_attempt_at
                       FROM email_deliveries
                      WHERE status = 'PENDING'
                      ORDER BY user_id, seq, ordinal) AS d
               JOIN outgoing_events e ON e.id = d.event_id
               JOIN users u ON u.id = d.user_id
              WHERE d.next_attempt_at <= $1
              ORDER BY d.next_attempt_at
              LIMIT $2",
            &[&now, &limit],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(DueEmail {
                event_id: row.try_get(0)?,
                kind: row.try_get(1)?,
                data: row.try_get(2)?,
                created_at: row.try_get(3)?,
                attempts: row.try_get(4)?,
                address: row.try_get(5)?,
                deleted: row.try_get(6)?,
                alerts_on: row.try_get(7)?,
            })
        })
        .collect()
}

/// A top-up's invoice link as its follow-up stored it, and whether that
/// follow-up is still open (the link may still come).
pub async fn invoice_of(
    client: &impl GenericClient,
    transaction: Uuid,
) -> Result<(Option<String>, bool), DbError> {
    let row = client
        .query_opt(
            "SELECT metadata->>'invoiceUrl',
                    stripe_session_id IS NOT NULL
                        AND followup_done_at IS NULL AND followup_failed_at IS NULL
               FROM credit_transactions WHERE id = $1",
            &[&transaction],
        )
        .await?;
    match row {
        Some(row) => {
            let url: Option<String> = row.try_get(0)?;
            let url = url.filter(|u| u.starts_with("https://") || u.starts_with("http://"));
            Ok((url, row.try_get(1)?))
        }
        None => Ok((None, false)),
    }
}

pub async fn pending_count(client: &impl GenericClient) -> Result<i64, DbError> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM email_deliveries WHERE status = 'PENDING'",
            &[],
        )
        .await?
        .try_get(0)?)
}

pub async fn mark_sent(
    client: &impl GenericClient,
    event_id: Uuid,
    recipient: &str,
    at: DateTime<Utc>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE email_deliveries
                SET status = 'SENT', attempts = attempts + 1, sent_at = $2, recipient = $3,
                    last_error = NULL
              WHERE event_id = $1 AND status = 'PENDING'",
            &[&event_id, &at, &recipient],
        )
        .await?;
    Ok(())
}

/// Records a failed attempt: retried at `next`, or FAILED when `give_up`.
pub async fn mark_attempt_failed(
    client: &impl GenericClient,
    event_id: Uuid,
    next: DateTime<Utc>,
    give_up: bool,
    error: &str,
) -> Result<(), DbError> {
    let status = if give_up { "FAILED" } else { "PENDING" };
    client
        .execute(
            "UPDATE email_deliveries
                SET status = $2, attempts = attempts + 1, next_attempt_at = $3, last_error = $4
              WHERE event_id = $1 AND status = 'PENDING'",
            &[&event_id, &status, &next, &error],
        )
        .await?;
    Ok(())
}

/// Records that this event sends no email, and why.
pub async fn mark_skipped(
    client: &impl GenericClient,
    event_id: Uuid,
    reason: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE email_deliveries SET status = 'SKIPPED', skipped_reason = $2
              WHERE event_id = $1 AND status = 'PENDING'",
            &[&event_id, &reason],
        )
        .await?;
    Ok(())
}

/// Looks at the delivery again at `next`, with no attempt counted (a
/// receipt waiting for its invoice link).
pub async fn defer(
    client: &impl GenericClient,
    event_id: Uuid,
    next: DateTime<Utc>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE email_deliveries SET next_attempt_at = $2
              WHERE event_id = $1 AND status = 'PENDING'",
            &[&event_id, &next],
        )
        .await?;
    Ok(())
}

/// One email and its delivery state, as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmailDelivery {
    /// The outbox event it is made of.
    pub event_id: Uuid,
    /// The event's type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The Clerk id of the account's owner.
    pub user_id: String,
    /// PENDING, SENT, FAILED or SKIPPED.
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Why a SKIPPED one was not sent: opted_out, account_deleted,
    /// no_address, too_old, announced_with_failure.
    pub skipped_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

fn delivery(row: &Row) -> Result<EmailDelivery, tokio_postgres::Error> {
    Ok(EmailDelivery {
        event_id: row.try_get(0)?,
        kind: row.try_get(1)?,
        user_id: row.try_get(2)?,
        status: row.try_get(3)?,
        attempts: row.try_get(4)?,
        next_attempt_at: row.try_get(5)?,
        last_error: row.try_get(6)?,
        skipped_reason: row.try_get(7)?,
        created_at: row.try_get(8)?,
        sent_at: row.try_get(9)?,
    })
}

/// The deliveries and the people's choices, each call on a connection of
/// its own.
#[derive(Clone)]
pub struct Emails {
    pool: crate::db::Pool,
}

impl Emails {
    pub fn new(pool: crate::db::Pool) -> Emails {
        Emails { pool }
    }

    /// The newest deliveries (an account's in reverse journal order: the
    /// events of one change share their time), optionally of one status
    /// and one Clerk user.
    pub async fn list(
        &self,
        status: Option<&str>,
        clerk_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<EmailDelivery>, DbError> {
        let client = crate::db::client(&self.pool).await?;
        let rows = client
            .query(
                "SELECT d.event_id, d.type, u.clerk_id, d.status, d.attempts, d.next_attempt_at,
                        d.last_error, d.skipped_reason, d.created_at, d.sent_at
                   FROM email_deliveries d JOIN users u ON u.id = d.user_id
                  WHERE ($1::text IS NULL OR d.status = $1)
                    AND ($2::text IS NULL OR u.clerk_id = $2)
                  ORDER BY d.created_at DESC, d.seq DESC, d.ordinal DESC
                  LIMIT $3",
                &[&status, &clerk_id, &limit],
            )
            .await?;
        Ok(rows.iter().map(delivery).collect::<Result<_, _>>()?)
    }

    /// How many emails wait (PENDING) and how many were given up (FAILED).
    pub async fn counts(&self) -> Result<(i64, i64), DbError> {
        let client = crate::db::client(&self.pool).await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM email_deliveries WHERE status = 'PENDING'),
                        (SELECT count(*) FROM email_deliveries WHERE status = 'FAILED')",
                &[],
            )
            .await?;
        Ok((row.try_get(0)?, row.try_get(1)?))
    }

    /// Whether the person wants alert emails (receipts are always sent).
    pub async fn alerts_on(&self, account: AccountId) -> Result<bool, DbError> {
        let client = crate::db::client(&self.pool).await?;
        Ok(client
            .query_one(
                "SELECT alert_emails FROM users WHERE id = $1",
                &[&account.0],
            )
            .await?
            .try_get(0)?)
    }

    /// Records the person's choice; alerts already sent stay sent, those
    /// still pending follow the new choice.
    pub async fn set_alerts(&self, account: AccountId, on: bool) -> Result<(), DbError> {
        let client = crate::db::client(&self.pool).await?;
        client
            .execute(
                "UPDATE users SET alert_emails = $2, updated_at = now() WHERE id = $1",
                &[&account.0, &on],
            )
            .await?;
        Ok(())
    }
}
