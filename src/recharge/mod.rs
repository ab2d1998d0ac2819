//! Auto-recharge: when a change takes an account's available balance under
//! its user's threshold, the card a top-up saved is charged the user's
//! amount, off session, and the payment credits the account.
//!
//! - The decision is the account actor's (`RechargeState::observe`), the one
//!   place that sees every change in order: it records the attempt as an
//!   `auto_recharge.requested` event whose id is the attempt's, in the same
//!   journal batch as the change. One attempt in flight at most, none
//!   before the last one ended, and never past
//!   `credits.auto_recharge_monthly_max_cents` in a calendar month (UTC):
//!   the actor counts what this month's attempts asked (all but failed ones).
//! - The payment worker (`spawn_worker`) creates the off-session
//!   PaymentIntent of each recorded attempt, the attempt's id as Stripe's
//!   idempotency key, so a retried call never charges twice.
//! - Only `payment_intent.succeeded` credits (key
//!   `stripe:payment_intent:<id>`, once); a refused card, a bank asking for
//!   authentication or `payment_intent.payment_failed` ends the attempt and
//!   switches auto-recharge off with the reason. Either way the attempt
//!   ends, and a later crossing may start another while it is enabled.

pub mod store;
mod worker;

use chrono::{DateTime, Datelike, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::ledger::outbox::{EventType, OutgoingEvent};
use crate::money::{Micros, MICROS_PER_CENT};

pub use worker::spawn_worker;

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

impl RechargeState {
    /// The attempt a move of the available balance from `before` to
    /// `available` starts, if any: a fall under the threshold, with nothing
    /// in flight and room under the monthly cap.
    pub fn observe(
        &mut self,
        monthly_max_cents: i64,
        before: Micros,
        available: Micros,
        now: DateTime<Utc>,
    ) -> Option<OutgoingEvent> {
        let config = self.config?;
        if self.in_flight.is_some() || available >= before || available >= config.threshold {
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

    /// The attempt ended. A failed one gives its amount back to the month
    /// and switches auto-recharge off.
    pub fn ended(&mut self, attempt: Uuid, succeeded: bool) {
        if let Some(flight) = self.in_flight {
            if flight.attempt == attempt {
                self.in_flight = None;
                if !succeeded && flight.month == self.month {
                    self.month_cents = self.month_cents.saturating_sub(flight.amount_cents);
                }
            }
        }
        if !succeeded {
            self.config = None;
        }
    }
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

    #[test]
    fn a_fall_under_the_threshold_starts_one_attempt_and_not_another_while_it_is_in_flight() {
        let mut state = enabled();
        let now = Utc::now();
        assert!(state.observe(10_000, eur(600), eur(550), now).is_none());
        let first = state.observe(10_000, eur(550), eur(450), now);
        assert!(first.is_some());
        assert!(state.observe(10_000, eur(450), eur(300), now).is_none());
        let attempt = first.map(|e| e.id).unwrap_or_default();
        state.ended(attempt, true);
        assert!(state.observe(10_000, eur(300), eur(200), now).is_some());
        assert_eq!(state.month_cents, 4_000);
    }

    #[test]
    fn the_monthly_cap_refuses_the_attempt_that_would_pass_it() {
        let mut state = enabled();
        let now = Utc::now();
        let mut started = 0;
        for _ in 0..10 {
            if let Some(event) = state.observe(5_000, eur(600), eur(400), now) {
                started += 1;
                state.ended(event.id, true);
            }
        }
        assert_eq!(started, 2);
        assert_eq!(state.month_cents, 4_000);
    }

    #[test]
    fn a_failed_attempt_switches_off_and_gives_its_amount_back_to_the_month() {
        let mut state = enabled();
        let now = Utc::now();
        let event = state.observe(10_000, eur(600), eur(400), now);
        state.ended(event.map(|e| e.id).unwrap_or_default(), false);
        assert_eq!(state.month_cents, 0);
        assert!(state.config.is_none());
        assert!(state.in_flight.is_none());
    }
}
