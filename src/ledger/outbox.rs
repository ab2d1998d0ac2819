//! Outgoing events as the engine produces them. An account's actor decides,
//! from the change it just applied, which events that change causes (a
//! top-up, a refund, a balance crossing its low threshold) and hands them to
//! the journal writer with the change's entry: they commit in the same
//! transaction (`outgoing_events`), and a sender (`src/events`) delivers
//! them afterwards.
//!
//! Some events have no journal entry of their own (a hold refused by a
//! spending limit changes nothing; an auto-recharge that failed is recorded
//! by its own transaction). They take their place in the account's order
//! through `Engine::record_events`: once no change the account applied
//! before them is still in flight, they are written after the events of
//! the account's last committed change (`insert_following_committed`).
//!
//! Low-balance alerts fire once per crossing. The actor keeps whether
//! `balance.low` and `balance.depleted` were sent since the last
//! `balance.recovered`; that state is not stored anywhere else: it is
//! derived on load from the account's last alert events, which commit with
//! the changes that caused them, so a restart neither repeats nor loses an
//! alert.

use chrono::{DateTime, Utc};
use tokio_postgres::types::Json;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::store::database_error;
use super::types::*;
use crate::money::Micros;

/// The low-balance thresholds, in micros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlertThresholds {
    /// `balance.low` once the available balance goes under this.
    pub low: Micros,
    /// Re-armed (`balance.recovered`) at `low + rearm` or above.
    pub rearm: Micros,
    /// The most auto-recharges may take from a card in a calendar month (UTC).
    pub recharge_monthly_max_cents: i64,
}

impl Default for AlertThresholds {
    /// The design's numbers: low under 2 EUR, re-armed at 3 EUR.
    fn default() -> Self {
        AlertThresholds {
            low: Micros::new(2_000_000),
            rearm: Micros::new(1_000_000),
            recharge_monthly_max_cents: 20_000,
        }
    }
}

impl AlertThresholds {
    fn recovered_at(&self) -> i64 {
        self.low.get().saturating_add(self.rearm.get())
    }
}

/// Which alerts were sent since the last `balance.recovered` (none: armed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertState {
    pub low_sent: bool,
    pub depleted_sent: bool,
}

impl AlertState {
    /// The alerts a move of the available balance from `before` to
    /// `available` causes, in the order they happen. Only a fall sends
    /// `balance.low` or `balance.depleted` (a credit that leaves the balance
    /// low is no news); only a rise sends `balance.recovered`.
    pub fn observe(
        &mut self,
        thresholds: &AlertThresholds,
        before: Micros,
        available: Micros,
    ) -> Vec<EventType> {
        let mut fired = Vec::new();
        let falling = available < before;
        if falling && !self.low_sent && available < thresholds.low {
            self.low_sent = true;
            fired.push(EventType::BalanceLow);
        }
        if falling && !self.depleted_sent && !available.is_positive() {
            self.depleted_sent = true;
            fired.push(EventType::BalanceDepleted);
        }
        if available > before
            && (self.low_sent || self.depleted_sent)
            && available.get() >= thresholds.recovered_at()
        {
            *self = AlertState::default();
            fired.push(EventType::BalanceRecovered);
        }
        fired
    }
}

/// The events one applied change causes: what its record says (a top-up
/// credited, a refund debited) and what its move of the available balance
/// crosses.
pub(crate) fn events_of(
    record: &Record,
    alerts: &mut AlertState,
    thresholds: &AlertThresholds,
    balance: Micros,
    available_before: Micros,
    available: Micros,
    now: DateTime<Utc>,
) -> Vec<OutgoingEvent> {
    let mut events = Vec::new();
    let mut push = |kind: EventType, data: EventData| {
        events.push(OutgoingEvent {
            id: row_id(),
            kind,
            data,
            created_at: now,
        })
    };
    if let Record::Transaction(t) = record {
        let attempt = super::auto_recharge::attempt_of(t.metadata.as_ref());
        match (t.kind, t.direction, attempt) {
            (TransactionType::TopUp, Direction::Credit, Some(attempt_id)) => push(
                EventType::AutoRechargeSucceeded,
                EventData::AutoRechargeSucceeded(AutoRechargeSucceededData {
                    attempt_id,
                    transaction_id: t.id,
                    amount_micros: t.amount_micros.get(),
                    balance_micros: t.balance_after_micros.get(),
                    stripe_payment_id: t.stripe_payment_id.clone(),
                }),
            ),
            (TransactionType::TopUp, Direction::Credit, None) => push(
                EventType::TopupSucceeded,
                EventData::TopupSucceeded(TopupSucceededData {
                    transaction_id: t.id,
                    amount_micros: t.amount_micros.get(),
                    balance_micros: t.balance_after_micros.get(),
                    stripe_session_id: t.stripe_session_id.clone(),
                    stripe_payment_id: t.stripe_payment_id.clone(),
                }),
            ),
            (TransactionType::Refund, Direction::Debit, _) => push(
                EventType::TopupRefunded,
                EventData::TopupRefunded(TopupRefundedData {
                    transaction_id: t.id,
                    amount_micros: t.amount_micros.get(),
                    balance_micros: t.balance_after_micros.get(),
                    stripe_payment_id: t.stripe_payment_id.clone(),
                }),
            ),
            _ => {}
        }
    }
    if available != available_before {
        for kind in alerts.observe(thresholds, available_before, available) {
            push(
                kind,
                EventData::Balance(BalanceAlertData {
                    available_micros: available.get(),
                    balance_micros: balance.get(),
                    threshold_micros: thresholds.low.get(),
                }),
            );
        }
    }
    events
}

/// The alert state of an account, derived from its last alert events: after
/// the last `balance.recovered` there is at most one `balance.low` and one
/// `balance.depleted`, so the last three say everything.
pub async fn load_alert_state(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<AlertState, LedgerError> {
    let rows = client
        .query(
            "SELECT type FROM outgoing_events
              WHERE user_id = $1
                AND type IN ('balance.low', 'balance.depleted', 'balance.recovered')
              ORDER BY seq DESC, ordinal DESC
              LIMIT 3",
            &[&account.0],
        )
        .await
        .map_err(database_error)?;
    let mut state = AlertState::default();
    for row in rows {
        let kind: String = row.try_get(0).map_err(database_error)?;
        match EventType::parse(&kind) {
            Some(EventType::BalanceLow) => state.low_sent = true,
            Some(EventType::BalanceDepleted) => state.depleted_sent = true,
            _ => break,
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(cents: i64) -> Micros {
        Micros::new(cents * 10_000)
    }

    #[test]
    fn a_walk_down_and_back_up_fires_each_alert_once_per_crossing() {
        let thresholds = AlertThresholds::default();
        let mut state = AlertState::default();
        let mut fired = Vec::new();
        let mut before = eur(0);
        for cents in [
            500, 250, 199, 150, 250, 299, 150, 0, -20, 100, 299, 300, 250, 199,
        ] {
            fired.extend(state.observe(&thresholds, before, eur(cents)));
            before = eur(cents);
        }
        assert_eq!(
            fired,
            vec![
                EventType::BalanceLow,
                EventType::BalanceDepleted,
                EventType::BalanceRecovered,
                EventType::BalanceLow,
            ]
        );
    }

    #[test]
    fn a_drop_straight_to_zero_fires_low_then_depleted_in_that_order() {
        let mut state = AlertState::default();
        let fired = state.observe(&AlertThresholds::default(), eur(300), Micros::ZERO);
        assert_eq!(
            fired,
            vec![EventType::BalanceLow, EventType::BalanceDepleted]
        );
    }

    #[test]
    fn a_credit_that_leaves_a_new_account_under_the_threshold_sends_nothing() {
        let mut state = AlertState::default();
        let thresholds = AlertThresholds::default();
        assert!(state.observe(&thresholds, eur(0), eur(100)).is_empty());
        assert_eq!(
            state.observe(&thresholds, eur(100), eur(90)),
            vec![EventType::BalanceLow]
        );
    }
}

/// The id of `spend_limit.reached` for `account`'s `window` ending at
/// `resets_at`: the same for every refusal in that window, so the event is
/// recorded once however many holds are refused, by however many instances.
pub fn limit_event_id(account: AccountId, window: LimitWindow, resets_at: DateTime<Utc>) -> Uuid {
    use sha2::Digest;
    let name = format!(
        "spend_limit.reached:{}:{}:{}",
        account.0,
        window.as_str(),
        resets_at.timestamp_micros()
    );
    let digest = sha2::Sha256::digest(name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(bytes)
}

/// `spend_limit.reached` for a hold refused by `refusal`'s window.
pub fn limit_reached_event(
    account: AccountId,
    refusal: LimitRefusal,
    now: DateTime<Utc>,
) -> OutgoingEvent {
    OutgoingEvent {
        id: limit_event_id(account, refusal.window, refusal.resets_at),
        kind: EventType::SpendLimitReached,
        data: EventData::SpendLimitReached(SpendLimitReachedData {
            limit: refusal.window.as_str(),
            limit_micros: refusal.limit.get(),
            spent_micros: refusal.spent.get(),
            resets_at: refusal.resets_at,
        }),
        created_at: now,
    }
}

/// Where events without a change of their own start among the events of
/// the change they follow: past any ordinal the journal gives one change.
const FOLLOWING_ORDINAL: i32 = 1000;

/// Locks the account's user row against other writers of events without a
/// change of their own (the journal's inserts only share it), and reads the
/// version of its last committed change.
const LOCK_ACCOUNT_VERSION: &str = "
    SELECT b.version FROM users u JOIN credit_balances b ON b.user_id = u.id
     WHERE u.id = $1
       FOR NO KEY UPDATE OF u";

/// Inserts events after every event of the change at seq $2, in the order
/// given; one already recorded (same id) is skipped.
const INSERT_FOLLOWING: &str = "
    INSERT INTO outgoing_events (id, user_id, seq, ordinal, type, data, created_at,
           pending_since, next_attempt_at)
    SELECT e.id, $1, $2,
           ((SELECT COALESCE(max(o.ordinal), $3 - 1) FROM outgoing_events o
              WHERE o.user_id = $1 AND o.seq = $2 AND o.ordinal >= $3) + e.n)::int4,
           e.type, e.data, e.created_at, e.created_at, e.created_at
      FROM unnest($4::uuid[], $5::text[], $6::jsonb[], $7::timestamptz[])
           WITH ORDINALITY AS e(id, type, data, created_at, n)
    ON CONFLICT (id) DO NOTHING";

/// Writes, in `tx`, events that have no journal entry of their own, after
/// every event of the account's last committed change. The caller makes
/// sure no earlier change of the account is still in flight (see
/// `Engine::record_events`), and commits `tx` with the events' cause.
pub(crate) async fn insert_following_committed(
    tx: &tokio_postgres::Transaction<'_>,
    account: AccountId,
    events: &[OutgoingEvent],
) -> Result<(), LedgerError> {
    let version: i64 = tx
        .query_opt(LOCK_ACCOUNT_VERSION, &[&account.0])
        .await
        .map_err(database_error)?
        .ok_or(LedgerError::AccountNotFound(account))?
        .try_get(0)
        .map_err(database_error)?;
    let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let data: Vec<Json<&EventData>> = events.iter().map(|e| Json(&e.data)).collect();
    let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.created_at).collect();
    tx.execute(
        INSERT_FOLLOWING,
        &[
            &account.0,
            &version,
            &FOLLOWING_ORDINAL,
            &ids,
            &kinds,
            &data,
            &times,
        ],
    )
    .await
    .map_err(database_error)?;
    Ok(())
}

/// What a spending-limit refusal says about its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LimitRefusal {
    pub window: LimitWindow,
    pub limit: Micros,
    pub spent: Micros,
    pub resets_at: DateTime<Utc>,
}
