//! A paid top-up's follow-ups: keeping the card it was paid with (the card
//! auto-recharge charges) and reading its invoice link (the history's
//! "Facture"). Both need Stripe's API; neither may hold the credit back, so
//! the webhook credits at once and this worker does them afterwards.
//!
//! - **The job is the top-up's transaction row.** A Checkout top-up is the
//!   only transaction with a `stripe_session_id`; its row, inserted by the
//!   journal writer in the batch transaction that credits it, carries the
//!   job's state (`followup_*` columns, `sql/0011_topup_followups.sql`).
//!   No credit without its job, no job without its credit, and a
//!   redelivered event (the credit's key replayed) makes neither twice.
//! - **Retried with backoff, bounded.** A failed attempt (Stripe's 5xx, an
//!   answer that is not JSON, no answer) is retried after
//!   `stripe.followup_retry_ms_base`, doubled per failure up to
//!   `followup_retry_ms_max`; after `followup_attempts_max` the job is
//!   FAILED. Its last error is stored; the admin account view lists the
//!   account's unfinished follow-ups; `creditd_topup_followups_pending`,
//!   `creditd_topup_followup_failures_total` and
//!   `creditd_topup_followups_failed_total` count them.
//! - **One worker per database**, elected by a PostgreSQL advisory lock on
//!   a connection of its own, checked by a query (`db::singleton`); its effects are
//!   idempotent anyway: the card is set, not added; the invoice link is
//!   merged into the row's metadata; a job is marked done once.
//! - **The newest top-up's card wins.** A job late because Stripe was down
//!   does not replace the card of a newer top-up whose follow-up is done.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::config::StripeSettings;
use crate::db::singleton::{Election, Singleton};
use crate::db::DbError;
use crate::ledger::{AccountId, TransactionRecord};
use crate::stripe::StripeApi;

mod sql {
    /// The open jobs (neither done nor given up) due at $1, oldest due first.
    pub const DUE: &str = "SELECT id, user_id, seq, stripe_payment_id, metadata->>'invoiceId',
            COALESCE(metadata ? 'invoiceUrl', false), followup_attempts
       FROM credit_transactions
      WHERE stripe_session_id IS NOT NULL
        AND followup_done_at IS NULL AND followup_failed_at IS NULL
        AND COALESCE(followup_next_at, created_at) <= $1
      ORDER BY COALESCE(followup_next_at, created_at)
      LIMIT $2";

    pub const OPEN_COUNT: &str = "SELECT count(*) FROM credit_transactions
      WHERE stripe_session_id IS NOT NULL
        AND followup_done_at IS NULL AND followup_failed_at IS NULL";

    /// Whether a newer top-up of the account has finished its follow-up
    /// (its card, if it had one, is the one to keep).
    pub const NEWER_DONE: &str = "SELECT EXISTS (
        SELECT 1 FROM credit_transactions
         WHERE user_id = $1 AND seq > $2
           AND stripe_session_id IS NOT NULL AND followup_done_at IS NOT NULL)";

    /// Whether the account is deleted, or a dispute or its deletion forgot
    /// its card at or after top-up $2 was paid: that top-up's card is not
    /// to be saved again.
    pub const CARD_FORGOTTEN_SINCE: &str = "SELECT u.deleted_at IS NOT NULL
            OR COALESCE(u.card_forgotten_at >= t.created_at, false)
       FROM users u JOIN credit_transactions t ON t.id = $2 AND t.user_id = u.id
      WHERE u.id = $1";

    pub const KEEP_INVOICE: &str = "UPDATE credit_transactions
        SET metadata = COALESCE(metadata, '{}'::jsonb) || $2
      WHERE id = $1";

    pub const DONE: &str = "UPDATE credit_transactions
        SET followup_done_at = $2, followup_attempts = followup_attempts + 1,
            followup_last_error = NULL, followup_next_at = NULL
      WHERE id = $1 AND followup_done_at IS NULL";

    pub const ATTEMPT_FAILED: &str = "UPDATE credit_transactions
        SET followup_attempts = $2, followup_last_error = $3,
            followup_next_at = $4, followup_failed_at = $5
      WHERE id = $1 AND followup_done_at IS NULL";

    pub const OF_ACCOUNT: &str = "SELECT id, stripe_session_id, created_at, followup_attempts,
            followup_next_at, followup_last_error, followup_failed_at
       FROM credit_transactions
      WHERE user_id = $1 AND stripe_session_id IS NOT NULL AND followup_done_at IS NULL
      ORDER BY seq DESC
      LIMIT $2";
}

/// One open follow-up, as the worker takes it.
#[derive(Debug, Clone)]
struct Job {
    transaction: Uuid,
    account: AccountId,
    seq: i64,
    payment_intent: Option<String>,
    invoice: Option<String>,
    /// The invoice step already ran (its answer is in the metadata).
    invoice_kept: bool,
    attempts: i32,
}

/// A top-up's unfinished follow-up, as operators see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FollowUpView {
    /// The top-up's transaction.
    pub transaction_id: Uuid,
    pub stripe_session_id: String,
    /// PENDING (retried) or FAILED (given up after
    /// `stripe.followup_attempts_max`).
    pub status: String,
    pub attempts: i32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When a PENDING follow-up is tried next (null: at once).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The account's top-up follow-ups not done yet (pending or failed), newest
/// first.
pub async fn of_account(
    client: &impl GenericClient,
    account: AccountId,
    limit: i64,
) -> Result<Vec<FollowUpView>, DbError> {
    let rows = client.query(sql::OF_ACCOUNT, &[&account.0, &limit]).await?;
    rows.iter()
        .map(|row| {
            let failed_at: Option<DateTime<Utc>> = row.try_get(6)?;
            Ok(FollowUpView {
                transaction_id: row.try_get(0)?,
                stripe_session_id: row.try_get(1)?,
                created_at: row.try_get(2)?,
                attempts: row.try_get(3)?,
                next_attempt_at: row.try_get(4)?,
                last_error: row.try_get(5)?,
                status: if failed_at.is_some() {
                    "FAILED"
                } else {
                    "PENDING"
                }
                .to_owned(),
                failed_at,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(DbError::from)
}

/// Whether a top-up's row still waits for its invoice link: it names an
/// invoice whose read has not answered yet. A page showing it must not be
/// kept in a cache keyed by the account's version, since the link arrives
/// without a new journal entry.
pub fn awaits_invoice(transaction: &TransactionRecord) -> bool {
    transaction.stripe_session_id.is_some()
        && transaction
            .metadata
            .as_ref()
            .is_some_and(|m| m.get("invoiceId").is_some() && m.get("invoiceUrl").is_none())
}

/// The wait before the attempt after `attempts` failed ones.
pub fn backoff(settings: &StripeSettings, attempts: i32) -> Duration {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
    let delay = settings
        .followup_retry_ms_base
        .saturating_mul(1_u64.checked_shl(shift).unwrap_or(u64::MAX));
    Duration::from_millis(delay.min(settings.followup_retry_ms_max))
}

/// Starts the worker; it runs until the process ends.
pub fn spawn_worker(
    election: Election,
    pool: deadpool_postgres::Pool,
    api: Arc<StripeApi>,
    settings: &StripeSettings,
) -> tokio::task::JoinHandle<()> {
    let worker = Worker {
        election,
        pool,
        api,
        settings: settings.clone(),
    };
    tokio::spawn(worker.run())
}

struct Worker {
    election: Election,
    pool: deadpool_postgres::Pool,
    api: Arc<StripeApi>,
    settings: StripeSettings,
}

impl Worker {
    async fn run(self) {
        self.election
            .run(Singleton::TopUpFollowUps, || self.rounds())
            .await;
    }

    /// Runs rounds of due jobs for as long as it is elected.
    async fn rounds(&self) {
        crate::db::singleton::poll_rounds(
            "top-up follow-up",
            Duration::from_millis(self.settings.followup_poll_interval_ms),
            || self.round(),
        )
        .await;
    }

    /// Runs the due jobs, up to `followup_batch`; returns how many.
    async fn round(&self) -> Result<usize, DbError> {
        let client = crate::db::client(&self.pool).await?;
        let open: i64 = client
            .query_one(sql::OPEN_COUNT, &[])
            .await
            .and_then(|row| row.try_get(0))?;
        metrics::gauge!(crate::telemetry::TOPUP_FOLLOWUPS_PENDING.name).set(open as f64);
        let due = due(
            &**client,
            Utc::now(),
            i64::from(self.settings.followup_batch),
        )
        .await?;
        // No pooled connection is held while Stripe answers (or does not).
        drop(client);
        let taken = due.len();
        for job in due {
            self.follow_up(job).await?;
        }
        Ok(taken)
    }

    /// One attempt at a job: both reads from Stripe, then what they gave
    /// written and the job marked done, or failed.
    async fn follow_up(&self, job: Job) -> Result<(), DbError> {
        let card = match job.payment_intent.as_deref() {
            Some(payment_intent) => self.api.payment_method_of(payment_intent).await,
            None => Ok(None),
        };
        let invoice = match job.invoice.as_deref().filter(|_| !job.invoice_kept) {
            Some(invoice) => Some((invoice, self.api.retrieve_invoice(invoice).await)),
            None => None,
        };
        let client = crate::db::client(&self.pool).await?;
        let mut failures = Vec::new();
        match card {
            Ok(Some(payment_method)) => keep_card(&**client, &job, &payment_method).await?,
            Ok(None) => {}
            Err(error) => failures.push(format!("card: {error}")),
        }
        match invoice {
            Some((invoice, Ok(found))) => keep_invoice(&**client, &job, invoice, found).await?,
            Some((_, Err(error))) => failures.push(format!("invoice: {error}")),
            None => {}
        }
        let now = Utc::now();
        if failures.is_empty() {
            client.execute(sql::DONE, &[&job.transaction, &now]).await?;
            metrics::counter!(crate::telemetry::TOPUP_FOLLOWUPS_DONE_TOTAL.name).increment(1);
            return Ok(());
        }
        self.attempt_failed(&**client, &job, &failures.join("; "), now)
            .await
    }

    async fn attempt_failed(
        &self,
        client: &impl GenericClient,
        job: &Job,
        error: &str,
        now: DateTime<Utc>,
    ) -> Result<(), DbError> {
        let attempts = job.attempts.saturating_add(1);
        let given_up = i64::from(attempts) >= i64::from(self.settings.followup_attempts_max);
        let next = chrono::Duration::from_std(backoff(&self.settings, attempts))
            .ok()
            .and_then(|delay| now.checked_add_signed(delay))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let failed_at = given_up.then_some(now);
        client
            .execute(
                sql::ATTEMPT_FAILED,
                &[&job.transaction, &attempts, &error, &next, &failed_at],
            )
            .await?;
        metrics::counter!(crate::telemetry::TOPUP_FOLLOWUP_FAILURES_TOTAL.name).increment(1);
        if given_up {
            metrics::counter!(crate::telemetry::TOPUP_FOLLOWUPS_FAILED_TOTAL.name).increment(1);
            tracing::error!(transaction = %job.transaction, account = job.account.0, attempts, %error,
                "top-up follow-up given up (card not saved or invoice link not read); FAILED");
        } else {
            tracing::warn!(transaction = %job.transaction, account = job.account.0, attempts, %error,
                "top-up follow-up failed; retried later");
        }
        Ok(())
    }
}

/// Keeps the card the top-up was paid with (Checkout saved it for
/// off-session use), unless a newer top-up's follow-up is done (its card is
/// the one to keep), or a dispute or the account's deletion forgot the
/// card since this top-up was paid (a late follow-up must not bring back a
/// card that is never to be charged again).
async fn keep_card(
    client: &impl GenericClient,
    job: &Job,
    payment_method: &str,
) -> Result<(), DbError> {
    let newer_done: bool = client
        .query_one(sql::NEWER_DONE, &[&job.account.0, &job.seq])
        .await
        .and_then(|row| row.try_get(0))?;
    if newer_done {
        return Ok(());
    }
    let forgotten: bool = client
        .query_one(
            sql::CARD_FORGOTTEN_SINCE,
            &[&job.account.0, &job.transaction],
        )
        .await
        .and_then(|row| row.try_get(0))?;
    if forgotten {
        tracing::info!(account = job.account.0, transaction = %job.transaction,
            "top-up's card not saved: a dispute or the account's deletion forgot it since");
        return Ok(());
    }
    crate::recharge::store::save_card(client, job.account, payment_method).await
}

/// Merges the invoice's hosted page and PDF into the top-up's metadata
/// (where the history reads `invoiceUrl`). An invoice Stripe does not know
/// is logged and kept as having no link.
async fn keep_invoice(
    client: &impl GenericClient,
    job: &Job,
    invoice: &str,
    found: Option<crate::stripe::events::Invoice>,
) -> Result<(), DbError> {
    let link = match found {
        Some(found) => json!({
            "invoiceId": found.id,
            "invoiceUrl": found.hosted_invoice_url,
            "invoicePdf": found.invoice_pdf,
        }),
        None => {
            tracing::error!(%invoice, transaction = %job.transaction,
                "the top-up's invoice is unknown to Stripe; kept without a link");
            json!({ "invoiceUrl": null, "invoicePdf": null })
        }
    };
    client
        .execute(sql::KEEP_INVOICE, &[&job.transaction, &link])
        .await?;
    Ok(())
}

/// The open jobs due at `now`, the longest-waiting first.
async fn due(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Job>, DbError> {
    let rows = client.query(sql::DUE, &[&now, &limit]).await?;
    rows.iter()
        .map(|row| {
            Ok(Job {
                transaction: row.try_get(0)?,
                account: AccountId(row.try_get(1)?),
                seq: row.try_get(2)?,
                payment_intent: row.try_get(3)?,
                invoice: row.try_get(4)?,
                invoice_kept: row.try_get(5)?,
                attempts: row.try_get(6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(DbError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StripeSettings {
        let mut settings = crate::config::Settings::default_file()
            .expect("the default config.toml is valid")
            .stripe;
        settings.followup_retry_ms_base = 1_000;
        settings.followup_retry_ms_max = 60_000;
        settings
    }

    #[test]
    fn retries_double_from_the_base_and_stop_growing_at_the_maximum() {
        let settings = settings();
        let delays: Vec<u64> = [1, 2, 3, 6, 7, 8, 100]
            .into_iter()
            .map(|attempts| backoff(&settings, attempts).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [1_000, 2_000, 4_000, 32_000, 60_000, 60_000, 60_000]
        );
    }

    fn top_up(metadata: Option<serde_json::Value>) -> TransactionRecord {
        TransactionRecord {
            id: Uuid::new_v4(),
            seq: 1,
            kind: crate::ledger::TransactionType::TopUp,
            direction: crate::ledger::Direction::Credit,
            amount_micros: crate::money::Micros::new(10_000_000),
            idempotency_key: crate::ledger::IdempotencyKey::parse("stripe:checkout:cs_1")
                .expect("a key"),
            description: None,
            stripe_session_id: Some("cs_1".into()),
            stripe_payment_id: Some("pi_1".into()),
            metadata,
            balance_before_micros: crate::money::Micros::new(0),
            balance_after_micros: crate::money::Micros::new(10_000_000),
            created_at: Utc::now(),
            paid_by: Vec::new(),
        }
    }

    #[test]
    fn a_top_up_awaits_its_invoice_until_the_read_answered_even_with_no_link() {
        assert!(awaits_invoice(&top_up(Some(json!({"invoiceId": "in_1"})))));
        assert!(!awaits_invoice(&top_up(Some(
            json!({"invoiceId": "in_1", "invoiceUrl": "https://invoice.stripe.com/i/in_1"})
        ))));
        assert!(!awaits_invoice(&top_up(Some(
            json!({"invoiceId": "in_1", "invoiceUrl": null})
        ))));
        assert!(!awaits_invoice(&top_up(None)));
    }
}
