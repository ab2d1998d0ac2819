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
//!   `credits.auto_recharge_monthly_max_cents` in a calendar month (UTC):
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

use chrono::{DateTime, Datelike, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::outbox::{EventType, OutgoingEvent};
use crate::ledger::{AccountId, Direction, Engine, LedgerError, Record, TransactionType};
use crate::money::{Micros, MICROS_PER_CENT};

pub use worker::{spawn_worker, WorkerSettings};

/// The key, in a credit's metadata, naming the attempt it paid.
pub const ATTEMPT_METADATA_KEY: &str = "autoRechargeAttemptId";

/// `metadata.type` of an auto-recharge's PaymentIntent.
pub const PAYMENT_TYPE: &str = "auto_recharge";

/// An enabled auto-recharge, with a saved card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RechargeConfig {
    /// An attempt starts when the available balance falls under this.
    pub threshold: Micros,
    pub amount_cents: i64,
}

/// The attempt in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    pub attempt: Uuid,
    pub amount_cents: i64,
    pub month: (i32, u32),
}

/// What an account's actor knows of its auto-recharge (loaded with the
/// account, see `store::load_state`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RechargeState {
    /// `None`: off, or no saved card.
    pub config: Option<RechargeConfig>,
    pub in_flight: Option<InFlight>,
    /// The calendar month (UTC) `month_cents` counts.
    pub month: (i32, u32),
    /// What this month's attempts asked, failed ones excepted.
    pub month_cents: i64,
}

pub fn month_of(at: DateTime<Utc>) -> (i32, u32) {
    (at.year(), at.month())
}

/// How an attempt ended, as the account's actor learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Its payment was credited.
    Succeeded,
    /// Stripe refused it; PostgreSQL switched auto-recharge off with it.
    Failed,
    /// The worker gave it up before paying (see `CancelReason`): nothing
    /// was charged, auto-recharge stays as PostgreSQL has it.
    Canceled,
}

/// Whether the change `record` made is spending, the only kind of change
/// that may start an attempt: a chat's usage that cost something, or the
/// expiry of what a grant had left. Money taken back (a refund, a
/// dispute, an operator's debit, a clawback) is no reason to charge the
/// card again, and credits and holds spend nothing.
pub(crate) fn may_start_attempt(record: &Record) -> bool {
    match record {
        Record::Settled { usage, .. } => usage.cost_micros.is_positive(),
        Record::Transaction(t) => {
            t.kind == TransactionType::Expired && t.direction == Direction::Debit
        }
        Record::HoldPlaced(_) | Record::Released(_) => false,
    }
}

impl RechargeState {
    /// The attempt the change `record` starts, if any: spending that
    /// leaves the available balance under the threshold, with nothing in
    /// flight and room under the monthly cap.
    pub(crate) fn observe(
        &mut self,
        record: &Record,
        monthly_max_cents: i64,
        available: Micros,
        now: DateTime<Utc>,
    ) -> Option<OutgoingEvent> {
        let config = self.config?;
        if self.in_flight.is_some() || available >= config.threshold || !may_start_attempt(record) {
            return None;
        }
        let month = month_of(now);
        if month != self.month {
            self.month = month;
            self.month_cents = 0;
        }
        let total = self.month_cents.checked_add(config.amount_cents)?;
        if total > monthly_max_cents {
            metrics::counter!("creditd_auto_recharges_capped_total").increment(1);
            return None;
        }
        self.month_cents = total;
        let attempt = Uuid::new_v4();
        self.in_flight = Some(InFlight {
            attempt,
            amount_cents: config.amount_cents,
            month,
        });
        Some(OutgoingEvent {
            id: attempt,
            kind: EventType::AutoRechargeRequested,
            data: json!({
                "attemptId": attempt,
                "amountCents": config.amount_cents,
                "thresholdCents": config.threshold.get() / MICROS_PER_CENT,
                "availableMicros": available.get(),
            }),
            created_at: now,
        })
    }

    /// The attempt ended. One that did not succeed gives its amount back
    /// to the month; a failed one switched auto-recharge off (PostgreSQL
    /// did, and says so only when the failure ended the attempt).
    pub fn ended(&mut self, attempt: Uuid, end: AttemptEnd) {
        if let Some(flight) = self.in_flight {
            if flight.attempt == attempt {
                self.in_flight = None;
                if end != AttemptEnd::Succeeded && flight.month == self.month {
                    self.month_cents = self.month_cents.saturating_sub(flight.amount_cents);
                }
            }
        }
        if end == AttemptEnd::Failed {
            self.config = None;
        }
    }
}

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
}

impl OffReason {
    pub const ALL: [OffReason; 3] = [
        OffReason::Dispute,
        OffReason::Refunded,
        OffReason::AccountDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OffReason::Dispute => "dispute",
            OffReason::Refunded => "refunded",
            OffReason::AccountDeleted => "account_deleted",
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
    /// `credits.auto_recharge_monthly_max_cents`.
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
    if switched {
        tracing::info!(
            account = account.0,
            reason = reason.as_str(),
            "auto-recharge switched off"
        );
    }
    engine.set_auto_recharge(account, None).await
}

/// The attempt a credit paid, from its metadata.
pub fn attempt_of(metadata: Option<&serde_json::Value>) -> Option<Uuid> {
    metadata?
        .get(ATTEMPT_METADATA_KEY)?
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{
        HoldId, HoldRecord, HoldStatus, IdempotencyKey, ReleaseRecord, TransactionRecord,
        UsageRecord,
    };

    fn eur(cents: i64) -> Micros {
        Micros::new(cents * MICROS_PER_CENT)
    }

    fn enabled() -> RechargeState {
        RechargeState {
            config: Some(RechargeConfig {
                threshold: eur(500),
                amount_cents: 2_000,
            }),
            ..RechargeState::default()
        }
    }

    fn usage(cost: Micros) -> Record {
        Record::Settled {
            usage: UsageRecord {
                id: Uuid::new_v4(),
                seq: 1,
                hold_id: HoldId(Uuid::new_v4()),
                model: "claude-sonnet-4-5".into(),
                input_tokens: 10,
                output_tokens: 10,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
                cost_micros: cost,
                held_micros: cost,
                conversation_id: None,
                message_id: None,
                balance_before_micros: eur(600),
                balance_after_micros: eur(600),
                created_at: Utc::now(),
                paid_by: Vec::new(),
            },
            late: false,
        }
    }

    fn transaction(kind: TransactionType, direction: Direction) -> Record {
        Record::Transaction(TransactionRecord {
            id: Uuid::new_v4(),
            seq: 1,
            kind,
            direction,
            amount_micros: eur(100),
            idempotency_key: IdempotencyKey::parse("test:key").unwrap(),
            description: None,
            stripe_session_id: None,
            stripe_payment_id: None,
            metadata: None,
            balance_before_micros: eur(600),
            balance_after_micros: eur(500),
            created_at: Utc::now(),
            paid_by: Vec::new(),
        })
    }

    fn hold() -> HoldRecord {
        HoldRecord {
            id: HoldId(Uuid::new_v4()),
            seq: 1,
            amount_micros: eur(100),
            created_at: Utc::now(),
            expires_at: Utc::now(),
        }
    }

    /// A chat's usage: the spending that starts attempts in these tests.
    fn spent() -> Record {
        usage(eur(100))
    }

    #[test]
    fn a_fall_under_the_threshold_starts_one_attempt_and_not_another_while_it_is_in_flight() {
        let mut state = enabled();
        let now = Utc::now();
        assert!(state.observe(&spent(), 10_000, eur(550), now).is_none());
        let first = state.observe(&spent(), 10_000, eur(450), now);
        assert!(first.is_some());
        assert!(state.observe(&spent(), 10_000, eur(300), now).is_none());
        let attempt = first.map(|e| e.id).unwrap_or_default();
        state.ended(attempt, AttemptEnd::Succeeded);
        assert!(state.observe(&spent(), 10_000, eur(200), now).is_some());
        assert_eq!(state.month_cents, 4_000);
    }

    #[test]
    fn only_a_usage_that_cost_something_or_a_grant_expiry_may_start_an_attempt() {
        use TransactionType::*;
        assert!(may_start_attempt(&usage(eur(1))));
        assert!(may_start_attempt(&transaction(Expired, Direction::Debit)));
        assert!(!may_start_attempt(&usage(Micros::ZERO)));
        for kind in [Refund, Dispute, Adjustment, SignupBonus, TopUp, PromoBonus] {
            assert!(
                !may_start_attempt(&transaction(kind, Direction::Debit)),
                "a {kind:?} debit"
            );
        }
        for kind in [TopUp, Dispute, PromoBonus, Adjustment] {
            assert!(
                !may_start_attempt(&transaction(kind, Direction::Credit)),
                "a {kind:?} credit"
            );
        }
        assert!(!may_start_attempt(&Record::HoldPlaced(hold())));
        let released = ReleaseRecord {
            hold_id: HoldId(Uuid::new_v4()),
            seq: 1,
            status: HoldStatus::Released,
            amount_micros: eur(100),
            finished_at: Utc::now(),
        };
        assert!(!may_start_attempt(&Record::Released(released)));
    }

    #[test]
    fn a_refund_a_dispute_or_an_operator_debit_under_the_threshold_starts_nothing_and_the_next_usage_does(
    ) {
        let mut state = enabled();
        let now = Utc::now();
        for kind in [
            TransactionType::Refund,
            TransactionType::Dispute,
            TransactionType::Adjustment,
        ] {
            let taken_back = transaction(kind, Direction::Debit);
            assert!(state.observe(&taken_back, 10_000, eur(100), now).is_none());
        }
        assert!(state.in_flight.is_none());
        assert_eq!(state.month_cents, 0);
        assert!(state.observe(&spent(), 10_000, eur(90), now).is_some());
    }

    #[test]
    fn a_hold_taking_the_balance_under_the_threshold_waits_for_its_usage() {
        let mut state = enabled();
        let now = Utc::now();
        assert!(state
            .observe(&Record::HoldPlaced(hold()), 10_000, eur(400), now)
            .is_none());
        assert!(state.observe(&spent(), 10_000, eur(450), now).is_some());
    }

    #[test]
    fn the_monthly_cap_refuses_the_attempt_that_would_pass_it() {
        let mut state = enabled();
        let now = Utc::now();
        let mut started = 0;
        for _ in 0..10 {
            if let Some(event) = state.observe(&spent(), 5_000, eur(400), now) {
                started += 1;
                state.ended(event.id, AttemptEnd::Succeeded);
            }
        }
        assert_eq!(started, 2);
        assert_eq!(state.month_cents, 4_000);
    }

    #[test]
    fn a_failed_attempt_switches_off_and_gives_its_amount_back_to_the_month() {
        let mut state = enabled();
        let now = Utc::now();
        let event = state.observe(&spent(), 10_000, eur(400), now);
        state.ended(event.map(|e| e.id).unwrap_or_default(), AttemptEnd::Failed);
        assert_eq!(state.month_cents, 0);
        assert!(state.config.is_none());
        assert!(state.in_flight.is_none());
    }

    #[test]
    fn a_canceled_attempt_gives_its_amount_back_and_leaves_auto_recharge_as_it_was() {
        let mut state = enabled();
        let now = Utc::now();
        let event = state.observe(&spent(), 10_000, eur(400), now);
        state.ended(
            event.map(|e| e.id).unwrap_or_default(),
            AttemptEnd::Canceled,
        );
        assert_eq!(state.month_cents, 0);
        assert!(state.config.is_some());
        assert!(state.in_flight.is_none());
        assert!(state.observe(&spent(), 10_000, eur(300), now).is_some());
    }
}
