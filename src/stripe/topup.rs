//! A top-up: the user's Stripe customer (created on the first top-up) and
//! the Checkout Session that pays it.

use deadpool_postgres::Pool;

use super::{StripeApi, StripeError, TopupSession};
use crate::accounts::users;
use crate::db;
use crate::ledger::{AccountId, LedgerError};

/// Opens a Checkout Session for a top-up of `amount_cents`.
pub async fn open_session(
    api: &StripeApi,
    pool: &Pool,
    account: AccountId,
    clerk_id: &str,
    amount_cents: i64,
) -> Result<TopupSession, StripeError> {
    let customer = customer_of(api, pool, account, clerk_id).await?;
    Ok(api
        .create_topup_session(
            account,
            &customer,
            amount_cents,
            chrono::Utc::now().timestamp(),
        )
        .await?)
}

/// The user's Stripe customer, created on the first top-up. Concurrent
/// first top-ups send the same idempotency key, so Stripe creates one
/// customer; the first to store it wins and the others read it back.
async fn customer_of(
    api: &StripeApi,
    pool: &Pool,
    account: AccountId,
    clerk_id: &str,
) -> Result<String, StripeError> {
    let client = db::client(pool).await.map_err(LedgerError::from)?;
    let fields = users::customer_fields(&**client, account).await?;
    if let Some(customer) = fields.customer_id {
        return Ok(customer);
    }
    drop(client);
    let created = api
        .create_customer(
            account,
            clerk_id,
            fields.email.as_deref(),
            fields.name.as_deref(),
        )
        .await?;
    let client = db::client(pool).await.map_err(LedgerError::from)?;
    if users::store_customer(&**client, account, &created).await? {
        return Ok(created);
    }
    // Another request stored its customer first (a separate statement, so
    // it sees that commit).
    let stored = users::stored_customer(&**client, account)
        .await?
        .ok_or_else(|| LedgerError::Internal("stripe customer: not stored".into()))?;
    if stored != created {
        tracing::warn!(account = account.0, %created, %stored, "a second Stripe customer was created; the stored one is kept");
    }
    Ok(stored)
}
