//! Auto-recharge: when spending takes an account's available balance under
//! its user's threshold, the card a top-up saved is charged the user's
//! amount, off session, and the payment credits the account.
//!
//! - The decision is the account actor's (`RechargeState::observe`), the one
//!   place that sees every change in order. Only spending may start an
//!   attempt: a chat's usage or a grant's expiry that leaves the available
//!   balance under the threshold. Refunds, disputes, operators' debits and
//!   clawbacks never do (`may_start_attempt`): money taken back is no reason
//!   to charge the card again. The attempt is recorded as an
//!   `auto_recharge.requested` event whose id is the attempt's, in the same
//!   journal batch as the usage. One attempt in flight at most, none before
//!   the last one ended, and never past
//!   `credits.auto_recharge_monthly_cents_max` in a calendar month (UTC):
//!   the actor counts what this month's attempts asked (all but failed and
//!   canceled ones).
//! - The payment worker (`spawn_worker`) asks before it pays: right before
//!   each call to Stripe it re-reads, in the transaction that marks the
//!   attempt as sent, that auto-recharge is still on, the account not
//!   deleted, the card the one the attempt was recorded with and the
//!   month's cap not passed; otherwise the attempt is canceled
//!   (`auto_recharge.canceled`). The attempt's id is Stripe's idempotency
//!   key, so a retried call never charges twice, and the calls stop before
//!   Stripe forgets the key (`recharge.attempt_timeout_s`, at most 24 h
//!   after the attempt was recorded): past it the attempt is looked up on
//!   Stripe by its metadata, adopted if found, canceled if not, never
//!   created again.
//! - Only `payment_intent.succeeded` credits (key
//!   `stripe:payment_intent:<id>`, once); a refused card, a bank asking for
//!   authentication or `payment_intent.payment_failed` ends the attempt and
//!   switches auto-recharge off with the reason. An attempt that succeeded
//!   stays succeeded: a late failure event changes nothing.
//! - Some events switch auto-recharge off on their own (`switch_off`): a
//!   dispute of any of the account's payments and the account's deletion
//!   (the saved card is forgotten too), a refund of an auto-recharge's
//!   payment (until the person turns it on again).

pub mod store;
mod worker;

use chrono::Utc;

use crate::ledger::{AccountId, Engine, LedgerError};

pub use worker::{spawn_worker, WorkerSettings};

pub use crate::ledger::auto_recharge::{
    attempt_of, month_of, month_start, AttemptEnd, InFlight, RechargeConfig, RechargeState,
    ATTEMPT_METADATA_KEY,
};

/// Why creditd switched auto-recharge off on its own, as
/// `disabled_reason` keeps it (beside Stripe's codes for a refused card).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffReason {
    /// A dispute (or an inquiry) was opened on one of the account's
    /// payments: the mark of a card used without its owner's consent.
    Dispute,
    /// An auto-recharge's payment was refunded: the person did not want it.
    Refunded,
    /// The Clerk user was deleted.
    AccountDeleted,
    /// An operator switched it off (the console or the admin API), with a
    /// reason recorded beside their name.
    Operator,
}

impl OffReason {
    pub const ALL: [OffReason; 4] = [
        OffReason::Dispute,
        OffReason::Refunded,
        OffReason::AccountDeleted,
        OffReason::Operator,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OffReason::Dispute => "dispute",
            OffReason::Refunded => "refunded",
            OffReason::AccountDeleted => "account_deleted",
            OffReason::Operator => "operator",
        }
    }

    /// Whether the saved card is forgotten too: a disputed card is not to
    /// be charged again, a deleted account's card is no longer its own.
    pub fn forgets_card(self) -> bool {
        matches!(self, OffReason::Dispute | OffReason::AccountDeleted)
    }
}

/// Why the worker canceled an attempt instead of paying it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Auto-recharge was switched off since the attempt was recorded.
    Disabled,
    /// The Clerk user was deleted.
    AccountDeleted,
    /// The saved card is not the one the attempt was recorded with.
    CardChanged,
    /// This month's succeeded auto-recharges and this one would pass
    /// `credits.auto_recharge_monthly_cents_max`.
    MonthlyCap,
    /// Not confirmed within `recharge.attempt_timeout_s`, and Stripe has no
    /// PaymentIntent of it: it never charged, and is not sent again once
    /// Stripe may have forgotten its idempotency key.
    TimedOut,
}

impl CancelReason {
    pub const ALL: [CancelReason; 5] = [
        CancelReason::Disabled,
        CancelReason::AccountDeleted,
        CancelReason::CardChanged,
        CancelReason::MonthlyCap,
        CancelReason::TimedOut,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CancelReason::Disabled => "disabled",
            CancelReason::AccountDeleted => "account_deleted",
            CancelReason::CardChanged => "card_changed",
            CancelReason::MonthlyCap => "monthly_cap",
            CancelReason::TimedOut => "timed_out",
        }
    }
}

/// Switches the account's auto-recharge off for `reason` (and forgets the
/// saved card when the reason says so), in PostgreSQL first, then in the
/// account's actor. An attempt already recorded is canceled by the worker,
/// which re-reads all this before it pays. Idempotent: a redelivered event
/// switches off what is already off.
pub async fn switch_off(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    account: AccountId,
    reason: OffReason,
) -> Result<(), LedgerError> {
    let mut client = crate::db::client(pool).await?;
    let switched = store::switch_off(&mut client, engine, account, reason, Utc::now()).await?;
    drop(client);
    switched_off(engine, account, reason, switched).await
}

/// What follows a committed switch-off (`was_on`: it was on until then):
/// the account's actor learns it. Idempotent, so a caller whose
/// switch-off committed with other writes runs it again on a redelivery.
pub async fn switched_off(
    engine: &Engine,
    account: AccountId,
    reason: OffReason,
    was_on: bool,
) -> Result<(), LedgerError> {
    if was_on {
        tracing::info!(
            account = account.0,
            reason = reason.as_str(),
            "auto-recharge switched off"
        );
    }
    engine.set_auto_recharge(account, None).await
}
