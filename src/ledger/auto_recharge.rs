//! Auto-recharge as the engine sees it: the pure rule of when a change
//! starts an attempt (`RechargeState::observe`), how an attempt's end moves
//! the month's count, and the account's auto-recharge state loaded with
//! the account. The actor is the one place that sees every change of an
//! account in order, so the decision is made here, beside the spending
//! limits (`spend.rs`); the payment itself (the worker, Stripe, the
//! attempts' table) is the recharge feature's (`src/recharge`).

use chrono::{DateTime, Datelike, TimeZone, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::store::database_error;
use super::types::*;
use crate::money::{Micros, MICROS_PER_CENT};

/// The key, in a credit's metadata, naming the attempt it paid.
pub const ATTEMPT_METADATA_KEY: &str = "autoRechargeAttemptId";

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
            metrics::counter!(crate::telemetry::AUTO_RECHARGES_CAPPED_TOTAL.name).increment(1);
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
            data: EventData::AutoRechargeRequested(AutoRechargeRequestedData {
                attempt_id: attempt,
                amount_cents: config.amount_cents,
                threshold_cents: config.threshold.get() / MICROS_PER_CENT,
                available_micros: available.get(),
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

/// Names, in a credit's metadata, the attempt it pays (stored as
/// `{"autoRechargeAttemptId": "<uuid>"}`, beside any other key).
pub fn mark_attempt(metadata: &mut Option<serde_json::Value>, attempt: Uuid) {
    let id = serde_json::Value::String(attempt.to_string());
    match metadata {
        Some(serde_json::Value::Object(fields)) => {
            fields.insert(ATTEMPT_METADATA_KEY.to_owned(), id);
        }
        _ => *metadata = Some(serde_json::json!({ ATTEMPT_METADATA_KEY: id })),
    }
}

/// The attempt a credit paid, from its metadata.
pub fn attempt_of(metadata: Option<&serde_json::Value>) -> Option<Uuid> {
    metadata?
        .get(ATTEMPT_METADATA_KEY)?
        .as_str()
        .and_then(|id| Uuid::parse_str(id).ok())
}

/// The first instant of `at`'s calendar month (UTC).
pub fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(at.year(), at.month(), 1, 0, 0, 0)
        .single()
        .unwrap_or(at)
}

/// An account's auto-recharge as its actor keeps it: its settings (enabled
/// only with a saved card), its attempt in flight (recorded, not ended) and
/// what this month's attempts asked, failed ones excepted.
pub async fn load_state(
    client: &impl GenericClient,
    account: AccountId,
    now: DateTime<Utc>,
) -> Result<RechargeState, LedgerError> {
    let row = client
        .query_opt(
            "SELECT s.enabled AND u.stripe_payment_method_id IS NOT NULL,
                    s.threshold_cents, s.amount_cents
               FROM auto_recharge_settings s JOIN users u ON u.id = s.user_id
              WHERE s.user_id = $1",
            &[&account.0],
        )
        .await
        .map_err(database_error)?;
    let mut state = RechargeState {
        month: month_of(now),
        ..RechargeState::default()
    };
    if let Some(row) = row {
        let enabled: bool = row.try_get(0).map_err(database_error)?;
        let threshold: i64 = row.try_get(1).map_err(database_error)?;
        let amount_cents: i64 = row.try_get(2).map_err(database_error)?;
        if enabled {
            state.config = Some(RechargeConfig {
                threshold: Micros::from_cents(threshold)
                    .map_err(|_| LedgerError::Internal("threshold_cents out of range".into()))?,
                amount_cents,
            });
        }
    }
    let start = month_start(now);
    let rows = client
        .query(
            "SELECT e.id, (e.data->>'amountCents')::int8, e.created_at,
                    COALESCE(a.status, 'PENDING')
               FROM outgoing_events e
               LEFT JOIN auto_recharge_attempts a ON a.id = e.id
              WHERE e.user_id = $1 AND e.type = 'auto_recharge.requested'
                AND (e.created_at >= $2 OR a.status IS NULL OR a.status = 'PENDING')",
            &[&account.0, &start],
        )
        .await
        .map_err(database_error)?;
    for row in rows {
        let id: Uuid = row.try_get(0).map_err(database_error)?;
        let amount_cents: i64 = row.try_get(1).map_err(database_error)?;
        let created_at: DateTime<Utc> = row.try_get(2).map_err(database_error)?;
        let status: String = row.try_get(3).map_err(database_error)?;
        // Failed and canceled attempts charged nothing.
        if created_at >= start && status != "FAILED" && status != "CANCELED" {
            state.month_cents = state.month_cents.saturating_add(amount_cents);
        }
        if status == "PENDING" {
            state.in_flight = Some(InFlight {
                attempt: id,
                amount_cents,
                month: month_of(created_at),
            });
        }
    }
    Ok(state)
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
                api_key_id: None,
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
            api_key_id: None,
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

    #[test]
    fn the_attempt_a_credit_pays_is_stored_under_the_key_stripe_credits_always_had() {
        let attempt = Uuid::new_v4();
        let mut metadata = None;
        mark_attempt(&mut metadata, attempt);
        assert_eq!(
            metadata.as_ref().map(serde_json::Value::to_string),
            Some(format!(r#"{{"autoRechargeAttemptId":"{attempt}"}}"#))
        );
        assert_eq!(attempt_of(metadata.as_ref()), Some(attempt));
        let mut other = Some(serde_json::json!({ "note": "kept" }));
        mark_attempt(&mut other, attempt);
        assert_eq!(attempt_of(other.as_ref()), Some(attempt));
        assert_eq!(
            other.as_ref().and_then(|m| m.get("note")),
            Some(&serde_json::json!("kept"))
        );
    }
}
