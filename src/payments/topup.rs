//! A top-up: the user's Stripe customer (created on the first top-up) and
//! the Checkout Session that pays it.

use deadpool_postgres::Pool;

use super::PaymentError;
use crate::accounts::{users, ClerkUserId};
use crate::db;
use crate::ledger::{AccountId, LedgerError};
use crate::stripe::{StripeApi, TopupSession};

/// A Stripe customer id (`cus_…`): the one stored for an account, or the
/// one Stripe just created for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerId(String);

impl CustomerId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Opens a Checkout Session for a top-up of `amount_cents`.
pub async fn open_session(
    api: &StripeApi,
    pool: &Pool,
    account: AccountId,
    clerk_id: &ClerkUserId,
    amount_cents: i64,
) -> Result<TopupSession, PaymentError> {
    let customer = customer_of(api, pool, account, clerk_id).await?;
    Ok(api
        .create_topup_session(
            account.0,
            customer.as_str(),
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
    clerk_id: &ClerkUserId,
) -> Result<CustomerId, PaymentError> {
    let client = db::client(pool).await?;
    let fields = users::customer_fields(&**client, account).await?;
    if let Some(customer) = fields.customer_id {
        return Ok(CustomerId(customer));
    }
    drop(client);
    let created = api
        .create_customer(
            account.0,
            clerk_id.as_str(),
            fields.email.as_deref(),
            fields.name.as_deref(),
        )
        .await?;
    let client = db::client(pool).await?;
    if users::store_customer(&**client, account, &created).await? {
        return Ok(CustomerId(created));
    }
    // Another request stored its customer first (a separate statement, so
    // it sees that commit).
    let stored = users::stored_customer(&**client, account)
        .await?
        .ok_or_else(|| LedgerError::Internal("stripe customer: not stored".into()))?;
    if stored != created {
        tracing::warn!(account = account.0, %created, %stored, "a second Stripe customer was created; the stored one is kept");
    }
    Ok(CustomerId(stored))
}

/// Top-ups as the edge asks for them: a Checkout Session to pay one, and
/// the follow-ups of those paid (card saved, invoice link read).
#[derive(Clone)]
pub struct TopUps {
    pool: Pool,
}

impl TopUps {
    pub fn new(pool: Pool) -> TopUps {
        TopUps { pool }
    }

    /// Opens a Checkout Session for a top-up of `amount_cents` (see
    /// [`open_session`]).
    pub async fn open_session(
        &self,
        api: &StripeApi,
        account: AccountId,
        clerk_id: &ClerkUserId,
        amount_cents: i64,
    ) -> Result<TopupSession, PaymentError> {
        open_session(api, &self.pool, account, clerk_id, amount_cents).await
    }

    /// The account's follow-ups not done yet, newest first.
    pub async fn follow_ups(
        &self,
        account: AccountId,
        limit: i64,
    ) -> Result<Vec<super::followup::FollowUpView>, db::DbError> {
        super::followup::of_account(&**db::client(&self.pool).await?, account, limit).await
    }
}
