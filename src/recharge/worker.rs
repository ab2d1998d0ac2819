//! The payment worker: creates the off-session PaymentIntent of each
//! recorded attempt, and ends the attempt when Stripe refuses it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::store;
use crate::ledger::store::unavailable;
use crate::ledger::{AccountId, Engine, LedgerError};
use crate::stripe::client::OffSessionPayment;
use crate::stripe::StripeApi;

/// Attempts taken per round.
const ROUND: i64 = 50;

/// Starts the worker; it runs until the process ends.
pub fn spawn_worker(
    pool: deadpool_postgres::Pool,
    engine: Arc<Engine>,
    api: Arc<StripeApi>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(error) = round(&pool, &engine, &api).await {
                tracing::warn!(%error, "auto-recharge round failed; retrying");
            }
            tokio::time::sleep(interval).await;
        }
    })
}

struct Due {
    attempt: Uuid,
    account: AccountId,
    amount_cents: i64,
    created_at: DateTime<Utc>,
    customer: Option<String>,
    payment_method: Option<String>,
}

/// Every recorded attempt without its PaymentIntent yet.
async fn due(pool: &deadpool_postgres::Pool) -> Result<Vec<Due>, LedgerError> {
    let client = pool.get().await.map_err(unavailable)?;
    let rows = client
        .query(
            "SELECT e.id, e.user_id, (e.data->>'amountCents')::int8, e.created_at,
                    u.stripe_customer_id, u.stripe_payment_method_id
               FROM outgoing_events e
               JOIN users u ON u.id = e.user_id
               LEFT JOIN auto_recharge_attempts a ON a.id = e.id
              WHERE e.type = 'auto_recharge.requested'
                AND (a.id IS NULL OR (a.status = 'PENDING' AND a.payment_intent_id IS NULL))
              ORDER BY e.created_at
              LIMIT $1",
            &[&ROUND],
        )
        .await
        .map_err(unavailable)?;
    rows.iter()
        .map(|row| {
            Ok(Due {
                attempt: row.try_get(0).map_err(unavailable)?,
                account: AccountId(row.try_get(1).map_err(unavailable)?),
                amount_cents: row.try_get(2).map_err(unavailable)?,
                created_at: row.try_get(3).map_err(unavailable)?,
                customer: row.try_get(4).map_err(unavailable)?,
                payment_method: row.try_get(5).map_err(unavailable)?,
            })
        })
        .collect()
}

async fn round(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    api: &StripeApi,
) -> Result<(), LedgerError> {
    for due in due(pool).await? {
        if let Err(error) = pay(pool, engine, api, &due).await {
            tracing::warn!(attempt = %due.attempt, account = due.account.0, %error,
                "auto-recharge payment not made; retried next round");
        }
    }
    Ok(())
}

async fn pay(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    api: &StripeApi,
    due: &Due,
) -> Result<(), LedgerError> {
    let mut client = pool.get().await.map_err(unavailable)?;
    let taken = client
        .execute(
            "INSERT INTO auto_recharge_attempts (id, user_id, amount_cents, created_at)
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            &[
                &due.attempt,
                &due.account.0,
                &due.amount_cents,
                &due.created_at,
            ],
        )
        .await
        .map_err(unavailable)?;
    if taken == 0 {
        let exists = client
            .query_opt(
                "SELECT 1 FROM auto_recharge_attempts WHERE id = $1",
                &[&due.attempt],
            )
            .await
            .map_err(unavailable)?;
        if exists.is_none() {
            return Err(LedgerError::Internal(format!(
                "account {} has another auto-recharge attempt pending",
                due.account.0
            )));
        }
    }
    let (Some(customer), Some(payment_method)) = (&due.customer, &due.payment_method) else {
        return end_failed(&mut client, engine, due, "no_saved_card").await;
    };
    let payment = api
        .create_off_session_payment(
            due.account,
            due.attempt,
            customer,
            payment_method,
            due.amount_cents,
        )
        .await
        .map_err(|error| LedgerError::Unavailable(error.to_string()))?;
    match payment {
        OffSessionPayment::Submitted { payment_intent } => {
            client
                .execute(
                    "UPDATE auto_recharge_attempts SET payment_intent_id = $2
                      WHERE id = $1 AND status = 'PENDING'",
                    &[&due.attempt, &payment_intent],
                )
                .await
                .map_err(unavailable)?;
            metrics::counter!("creditd_auto_recharges_submitted_total").increment(1);
            Ok(())
        }
        OffSessionPayment::Refused { code } => end_failed(&mut client, engine, due, &code).await,
    }
}

async fn end_failed(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    due: &Due,
    reason: &str,
) -> Result<(), LedgerError> {
    tracing::info!(attempt = %due.attempt, account = due.account.0, %reason,
        "auto-recharge refused; switched off");
    metrics::counter!("creditd_auto_recharges_failed_total").increment(1);
    store::fail(client, engine, due.account, due.attempt, reason, Utc::now()).await?;
    engine
        .auto_recharge_ended(due.account, due.attempt, false)
        .await
}
