//! The signup bonus: once per person, whichever path asks first (the
//! `claim-bonus` route or Clerk's `user.created`).

use std::sync::Arc;

use deadpool_postgres::Pool;
use serde_json::json;

use super::users;
use crate::db::{self, DbError};
use crate::ledger::{AccountId, Engine, IdempotencyKey, LedgerError, Posting, TransactionType};
use crate::money::Micros;

mod sql {
    pub const CLAIM_EMAIL: &str =
        "INSERT INTO signup_bonus_claims (email_hash, user_id) VALUES ($1, $2)
         ON CONFLICT (email_hash) DO UPDATE SET email_hash = EXCLUDED.email_hash
         RETURNING user_id";
    pub const GRANTED_AMOUNT: &str = "SELECT amount_micros FROM credit_transactions
          WHERE user_id = $1 AND idempotency_key = $2";
}

/// The longest a signup bonus may last: a century (0 says "never").
const MAX_EXPIRY_DAYS: u32 = 36_500;

/// The signup bonus as configured: its amount and how long it can be
/// spent (`credits.signup_bonus_cents`, `credits.signup_bonus_expiry_days`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignupBonus {
    pub amount: Micros,
    /// `None`: it never expires.
    pub lifetime: Option<chrono::Duration>,
}

impl SignupBonus {
    /// From the settings, or why they cannot make one.
    pub fn new(cents: i64, expiry_days: u32) -> Result<SignupBonus, String> {
        let amount = Micros::from_cents(cents)
            .map_err(|_| "configuration key `credits.signup_bonus_cents`: too large".to_owned())?;
        let lifetime = match expiry_days {
            0 => None,
            days if days > MAX_EXPIRY_DAYS => {
                return Err(format!(
                    "configuration key `credits.signup_bonus_expiry_days`: at most {MAX_EXPIRY_DAYS} (0: never)"
                ))
            }
            days => Some(chrono::Duration::days(i64::from(days))),
        };
        Ok(SignupBonus { amount, lifetime })
    }
}

/// What asking for the signup bonus gave. Built once per request and
/// consumed at once: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum SignupBonusClaim {
    /// Credited now, or earlier to this account (`replayed`).
    Granted(crate::ledger::Outcome<crate::ledger::TransactionRecord>),
    /// Another account of the same person (same email) has it.
    TakenByAnotherAccount,
}

/// The idempotency key of an account's signup bonus: one per account,
/// ever, whichever path grants it first.
fn signup_bonus_key(account: AccountId) -> Result<IdempotencyKey, LedgerError> {
    IdempotencyKey::parse(format!("bonus:signup:{}", account.0))
        .map_err(|e| LedgerError::Internal(format!("signup bonus key: {e}")))
}

/// How the "once per person" rules know a person by email: the canonical
/// mailbox (see `mailbox::canonical_mailbox`: case, `+tag` and Gmail's dots
/// do not make another person), as SHA-256 hex (no address is stored in a
/// key or a claim).
pub fn email_hash(email: &str) -> Option<String> {
    use sha2::Digest;
    let canonical = super::mailbox::canonical_mailbox(email)?;
    let digest = sha2::Sha256::digest(canonical.as_bytes());
    Some(digest.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The signup bonus (expiring after its lifetime, if any), once per person.
///
/// A user whose verified email is known is a person by that email: the
/// account first claims it in `signup_bonus_claims` (one row per email,
/// naming the account, in its own committed statement), then is credited
/// under its account's key. A second account of the same mailbox (a
/// re-signup, any letter case, a `+tag`, Gmail's dots) finds the claim
/// naming another account and gets nothing. A crash between the claim and the credit loses nothing:
/// the claim names this account, so its retry passes the claim again and
/// the deterministic key credits once. A user without an email is credited
/// under its account's key alone, as before.
pub async fn grant_signup_bonus(
    engine: &Engine,
    pool: &Pool,
    bonus: SignupBonus,
    account: AccountId,
) -> Result<SignupBonusClaim, LedgerError> {
    let amount = bonus.amount;
    let expires_at = match bonus.lifetime {
        None => None,
        Some(lifetime) => Some(
            engine
                .clock()
                .now()
                .checked_add_signed(lifetime)
                .ok_or_else(|| {
                    LedgerError::InvalidRequest(
                        "credits.signup_bonus_expiry_days: the expiry is out of range".into(),
                    )
                })?,
        ),
    };
    if !claim_email(pool, account).await? {
        reverse_second_bonus(engine, pool, account).await?;
        return Ok(SignupBonusClaim::TakenByAnotherAccount);
    }
    let posting = Posting {
        key: signup_bonus_key(account)?,
        kind: TransactionType::SignupBonus,
        amount,
        description: Some(format!("Bonus de bienvenue {amount}")),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: None,
        expires_at,
    };
    Ok(SignupBonusClaim::Granted(
        engine.credit(account, posting).await?,
    ))
}

/// Takes back a bonus this account received by its Clerk id before its
/// email was known (a re-signup that asked for the bonus before Clerk's
/// `user.created` came), once the email shows that another account of the
/// same person had it. Once, under `bonus:signup:<account>:duplicate`; the
/// balance may go below zero, as for a refund.
async fn reverse_second_bonus(
    engine: &Engine,
    pool: &Pool,
    account: AccountId,
) -> Result<(), LedgerError> {
    let key = signup_bonus_key(account)?;
    let granted: Option<i64> = {
        let client = db::client(pool).await?;
        client
            .query_opt(sql::GRANTED_AMOUNT, &[&account.0, &key.as_str()])
            .await
            .map_err(DbError::from)?
            .map(|row| row.get(0))
    };
    let Some(amount) = granted.map(Micros::new) else {
        return Ok(());
    };
    tracing::warn!(
        account = account.0,
        "signup bonus of an email another account had: taken back"
    );
    let posting = Posting {
        key: IdempotencyKey::parse(format!("{}:duplicate", key.as_str()))
            .map_err(|e| LedgerError::Internal(format!("signup bonus key: {e}")))?,
        kind: TransactionType::Adjustment,
        amount,
        description: Some(format!(
            "Bonus de bienvenue déjà reçu avec cette adresse e-mail (-{amount})"
        )),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: Some(json!({ "reason": "duplicate_signup_bonus" })),
        expires_at: None,
    };
    engine.debit(account, posting).await?;
    Ok(())
}

/// Claims the account's email for its signup bonus: true when the claim
/// names this account (made now or before), or the account has no email.
/// Concurrent claims of one email wait on each other's row: one wins.
async fn claim_email(pool: &Pool, account: AccountId) -> Result<bool, DbError> {
    let client = db::client(pool).await?;
    let Some(hash) = users::email_hash(&**client, account).await? else {
        return Ok(true);
    };
    let owner: i64 = client
        .query_one(sql::CLAIM_EMAIL, &[&hash, &account.0])
        .await?
        .get(0);
    Ok(owner == account.0)
}

/// The signup bonus as the edge and Clerk's events ask for it: the
/// configured amount and lifetime, granted through the engine by
/// [`grant_signup_bonus`].
#[derive(Clone)]
pub struct SignupBonuses {
    engine: Arc<Engine>,
    pool: Pool,
    bonus: SignupBonus,
}

impl SignupBonuses {
    pub fn new(engine: Arc<Engine>, pool: Pool, bonus: SignupBonus) -> SignupBonuses {
        SignupBonuses {
            engine,
            pool,
            bonus,
        }
    }

    /// Grants the account its signup bonus, once per person.
    pub async fn grant(&self, account: AccountId) -> Result<SignupBonusClaim, LedgerError> {
        grant_signup_bonus(&self.engine, &self.pool, self.bonus, account).await
    }
}
