//! The messages an account's actor is sent, each with who sends it and when.
//! A money operation is answered as soon as it applied, with a `Pending`
//! its sender waits on until the entry is durable (`Directory::call_durable`).

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::{Answer, Pending};
use crate::ledger::auto_recharge::{AttemptEnd, RechargeConfig};
use crate::ledger::types::*;
use crate::money::Micros;

/// Credits an account (bonus, top-up, promo, adjustment), idempotent by key.
/// Sent from `Engine::credit` to the account's actor when a signup bonus is
/// granted, a paid top-up or a won dispute is heard from Stripe, or an
/// operator grants credits (admin route, `creditd grant`); sent from
/// `Engine::credit_attempt` when an auto-recharge's payment succeeded.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<TransactionRecord>, LedgerError>")]
pub struct Credit {
    pub posting: Posting,
    /// The auto-recharge attempt this credit pays, if any: written into
    /// the transaction's metadata, where the actor (and a reload) finds
    /// which attempt it ends.
    pub attempt: Option<uuid::Uuid>,
}

/// Debits an account (refund, dispute, adjustment); may leave it in debt.
/// Sent from `Engine::debit` to the account's actor when a dispute's funds
/// are withdrawn, a second signup bonus of one person is taken back, or an
/// operator debits the account (admin route, `creditd grant` negative).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<TransactionRecord>, LedgerError>")]
pub struct Debit {
    pub posting: Posting,
}

/// Holds `amount` if available, idempotent by hold id. Sent from
/// `Engine::admit` / `Engine::reserve` to the account's actor when a
/// platform chat is about to call its provider (or a caller reserves).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<HoldRecord>, LedgerError>")]
pub struct Reserve {
    pub hold_id: HoldId,
    pub amount: Micros,
    /// The gateway API key the hold is made with, and its spend limit.
    pub key: Option<KeyLimit>,
    pub answer: Answer,
}

/// Debits what a Stripe charge refunded beyond what was already clawed back
/// for it. Sent from `Engine::clawback` to the account's actor when Stripe's
/// `charge.refunded` event arrives; the actor serializes it with every
/// other clawback of the charge.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<Option<TransactionRecord>>, LedgerError>")]
pub struct Clawback {
    pub request: ClawbackRequest,
}

/// Ends a hold and posts the real cost as a usage. Sent from
/// `Engine::settle` to the account's actor when a platform chat's provider
/// call delivered (retried by `metering::Settlements` until it posts).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<UsageRecord>, LedgerError>")]
pub struct Settle {
    pub hold_id: HoldId,
    pub charge: UsageCharge,
}

/// Ends a hold without charge. Sent from `Engine::release` to the
/// account's actor when a platform chat's provider call failed before any
/// output, or a stream ended having produced nothing.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Pending<ReleaseRecord>, LedgerError>")]
pub struct Release {
    pub hold_id: HoldId,
}

/// Expires every hold due at `now`. Sent from `Engine::expire_holds` to
/// the account's actor when a caller (tests, benchmarks) wants expiry now;
/// the actor's own timer does the same when a hold falls due.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<ReleaseRecord>, LedgerError>")]
pub struct ExpireHolds {
    pub now: DateTime<Utc>,
}

/// Expires every grant due at `now` (also done by the actor's own timer
/// and before every operation): the debits it journaled. Sent from
/// `Engine::expire_grants` (tests moving a manual clock).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TransactionRecord>, LedgerError>")]
pub struct ExpireGrants {
    pub now: DateTime<Utc>,
}

/// Stops an actor whose copy became stale (its `stale_below` moved past
/// its committed version). Sent from `Directory::evict` when another
/// instance wrote the account (or the listener that would have said so
/// was lost); carries no money.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Evict;

/// The account as its actor sees it. Sent from `Engine::balance` to the
/// account's actor when a read must see every operation applied so far (a
/// chat refused for its balance, the balance page and its grants, the admin
/// account view, `creditd balance`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<BalanceSnapshot, LedgerError>")]
pub struct GetBalance;

/// Sets the account's auto-recharge (`None`: off). Sent from
/// `Engine::set_auto_recharge` when the user saves the settings.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct SetAutoRecharge {
    pub config: Option<RechargeConfig>,
}

/// An auto-recharge attempt ended. Sent from `Engine::auto_recharge_ended`
/// when its payment succeeded (after its credit), failed (after the
/// failure switched auto-recharge off in PostgreSQL) or the payment worker
/// canceled it before paying.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct AutoRechargeEnded {
    pub attempt: uuid::Uuid,
    pub end: AttemptEnd,
}

/// Answers once every change the actor applied before this message is
/// committed or failed: none of them is still in flight. Sent from
/// `Engine::record_events` before an event without a journal entry of its
/// own is recorded, so that it takes its place after those changes.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct AwaitApplied;

/// Changes the account's spending limits; answered once they are stored,
/// and applied to every hold the actor judges after this message. Sent
/// from `Engine::set_limits` to the account's actor when its owner
/// (`PUT /api/credits/limits`) or an operator (`PUT
/// /admin/accounts/{userId}/limits`) changes them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<SpendingSnapshot, LedgerError>")]
pub struct SetLimits {
    pub change: LimitsChange,
}

/// The account's spending limits and what its windows count. Sent from
/// `Engine::spending` to the account's actor when `GET /api/credits/limits`
/// or a test reads them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<SpendingSnapshot, LedgerError>")]
pub struct GetSpending;
