//! The payment worker: creates the off-session PaymentIntent of each
//! recorded attempt once it checked the attempt may still be paid, ends
//! the attempt when Stripe refuses it, and looks up on Stripe, instead of
//! calling again, an attempt whose idempotency key Stripe may forget.
//! It runs on one instance at a time (`db::singleton`), so one attempt is
//! never sent by two instances at once.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::store::{self, Due, Next, Rules};
use super::{AttemptEnd, CancelReason};
use crate::db::singleton::{Election, Singleton};
use crate::db::DbError;
use crate::ledger::{Engine, LedgerError};
use crate::stripe::client::OffSessionPayment;
use crate::stripe::StripeApi;

/// Attempts taken per round.
const ROUND: i64 = 50;

/// The longest wait between two tries of one attempt (Stripe failing).
const RETRY_MAX: Duration = Duration::from_secs(600);

/// How the worker runs, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSettings {
    /// How often it looks for attempts to pay
    /// (`credits.auto_recharge_poll_interval_ms`).
    pub interval: Duration,
    /// `credits.auto_recharge_monthly_cents_max`.
    pub monthly_max_cents: i64,
    /// `recharge.attempt_timeout_s`: at most 24 h, the least Stripe keeps
    /// an idempotency key.
    pub attempt_timeout: Duration,
    /// The Stripe call's own timeout (`stripe.timeout_ms`): a call must
    /// end before the attempt's timeout, so it starts that much earlier.
    pub call_timeout: Duration,
}

impl WorkerSettings {
    /// The check's rules for an attempt tried `tries` times before.
    fn rules(&self, tries: u32) -> Rules {
        let window = self.attempt_timeout.saturating_sub(self.call_timeout);
        let backoff = self
            .interval
            .saturating_mul(1 << tries.min(16))
            .min(RETRY_MAX);
        Rules {
            monthly_max_cents: self.monthly_max_cents,
            send_window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::zero()),
            retry_in: chrono::Duration::from_std(backoff).unwrap_or(chrono::Duration::zero()),
        }
    }
}

/// Starts the worker; it runs until the process ends, paying attempts
/// while this instance holds the auto-recharge lock (`db::singleton`): two
/// instances never pay at once.
pub fn spawn_worker(
    election: Election,
    pool: deadpool_postgres::Pool,
    engine: Arc<Engine>,
    api: Arc<StripeApi>,
    settings: WorkerSettings,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let rounds = || async {
            loop {
                if let Err(error) = round(&pool, &engine, &api, &settings).await {
                    tracing::warn!(%error, "auto-recharge round failed; retrying");
                }
                tokio::time::sleep(settings.interval).await;
            }
        };
        election.run(Singleton::AutoRecharge, rounds).await;
    })
}

async fn round(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    api: &StripeApi,
    settings: &WorkerSettings,
) -> Result<(), LedgerError> {
    let due = {
        let client = pool.get().await.map_err(DbError::from)?;
        store::due(&**client, Utc::now(), ROUND).await?
    };
    for due in due {
        if let Err(error) = pay(pool, engine, api, settings, &due).await {
            tracing::warn!(attempt = %due.attempt, account = due.account.0, %error,
                "auto-recharge payment not made; tried again later");
        }
    }
    Ok(())
}

/// Checks the attempt, then does what the check allows.
async fn pay(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    api: &StripeApi,
    settings: &WorkerSettings,
    due: &Due,
) -> Result<(), LedgerError> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    let rules = settings.rules(due.tries);
    match store::next_step(&mut client, engine, due, rules, Utc::now()).await? {
        Next::Send {
            customer,
            payment_method,
        } => {
            let payment = api
                .create_off_session_payment(
                    due.account.0,
                    due.attempt,
                    &customer,
                    &payment_method,
                    due.amount_cents,
                )
                .await
                .map_err(|error| LedgerError::Unavailable(error.to_string()))?;
            settle(&mut client, engine, due, payment).await
        }
        Next::LookUp => look_up(&mut client, engine, api, due).await,
        Next::Canceled(reason) => canceled(engine, due, reason).await,
        Next::NoCard => end_failed(&mut client, engine, due, "no_saved_card").await,
        Next::Nothing => Ok(()),
    }
}

/// What Stripe said of the attempt's payment: kept until its webhook
/// credits it, or the attempt ended as failed.
async fn settle(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    due: &Due,
    payment: OffSessionPayment,
) -> Result<(), LedgerError> {
    match payment {
        OffSessionPayment::Submitted { payment_intent } => {
            store::submitted(&***client, due.attempt, &payment_intent).await?;
            metrics::counter!(crate::telemetry::AUTO_RECHARGES_SUBMITTED_TOTAL.name).increment(1);
            Ok(())
        }
        OffSessionPayment::Refused { code } => end_failed(client, engine, due, &code).await,
    }
}

/// An attempt past its send window: Stripe may have forgotten its
/// idempotency key, so it is never sent again. Stripe made its
/// PaymentIntent (a call whose answer was lost): adopted. Stripe has none:
/// it never charged, and is canceled.
async fn look_up(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    api: &StripeApi,
    due: &Due,
) -> Result<(), LedgerError> {
    let found = api
        .find_attempt_payment(due.attempt)
        .await
        .map_err(|error| LedgerError::Unavailable(error.to_string()))?;
    let outcome = if found.is_some() {
        "found"
    } else {
        "not_found"
    };
    metrics::counter!(crate::telemetry::AUTO_RECHARGES_LOOKED_UP_TOTAL.name, "outcome" => outcome)
        .increment(1);
    match found {
        Some(payment) => {
            tracing::info!(attempt = %due.attempt, account = due.account.0,
                "auto-recharge past its timeout found on Stripe; adopted");
            settle(client, engine, due, payment).await
        }
        None => {
            if store::cancel_not_found(client, engine, due, Utc::now()).await? {
                canceled(engine, due, CancelReason::TimedOut).await?;
            }
            Ok(())
        }
    }
}

async fn canceled(engine: &Engine, due: &Due, reason: CancelReason) -> Result<(), LedgerError> {
    tracing::info!(attempt = %due.attempt, account = due.account.0, reason = reason.as_str(),
        "auto-recharge attempt canceled before paying");
    metrics::counter!(crate::telemetry::AUTO_RECHARGES_CANCELED_TOTAL.name, "reason" => reason.as_str())
        .increment(1);
    engine
        .auto_recharge_ended(due.account, due.attempt, AttemptEnd::Canceled)
        .await
}

async fn end_failed(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    due: &Due,
    reason: &str,
) -> Result<(), LedgerError> {
    if !store::fail(client, engine, due.account, due.attempt, reason, Utc::now()).await? {
        return Ok(());
    }
    tracing::info!(attempt = %due.attempt, account = due.account.0, %reason,
        "auto-recharge refused; switched off");
    metrics::counter!(crate::telemetry::AUTO_RECHARGES_FAILED_TOTAL.name).increment(1);
    engine
        .auto_recharge_ended(due.account, due.attempt, AttemptEnd::Failed)
        .await
}
