//! Auto-recharge's SQL: the user's settings, the saved card, the attempts.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{month_of, InFlight, RechargeConfig, RechargeState};
use crate::ledger::outbox::{EventType, OutgoingEvent};
use crate::ledger::store::unavailable;
use crate::ledger::{AccountId, Engine, LedgerError};
use crate::money::Micros;

/// The user's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: bool,
    pub threshold_cents: i64,
    pub amount_cents: i64,
    pub disabled_reason: Option<String>,
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
        .map_err(unavailable)?;
    let mut state = RechargeState {
        month: month_of(now),
        ..RechargeState::default()
    };
    if let Some(row) = row {
        let enabled: bool = row.try_get(0).map_err(unavailable)?;
        let threshold: i64 = row.try_get(1).map_err(unavailable)?;
        let amount_cents: i64 = row.try_get(2).map_err(unavailable)?;
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
        .map_err(unavailable)?;
    for row in rows {
        let id: Uuid = row.try_get(0).map_err(unavailable)?;
        let amount_cents: i64 = row.try_get(1).map_err(unavailable)?;
        let created_at: DateTime<Utc> = row.try_get(2).map_err(unavailable)?;
        let status: String = row.try_get(3).map_err(unavailable)?;
        if created_at >= start && status != "FAILED" {
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

/// The user's settings, if ever saved.
pub async fn settings(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Option<Settings>, LedgerError> {
    let row = client
        .query_opt(
            "SELECT enabled, threshold_cents, amount_cents, disabled_reason
               FROM auto_recharge_settings WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .map_err(unavailable)?;
    row.map(|row| {
        Ok(Settings {
            enabled: row.try_get(0).map_err(unavailable)?,
            threshold_cents: row.try_get(1).map_err(unavailable)?,
            amount_cents: row.try_get(2).map_err(unavailable)?,
            disabled_reason: row.try_get(3).map_err(unavailable)?,
        })
    })
    .transpose()
}

/// Saves the user's settings; saving clears a previous `disabled_reason`.
pub async fn save_settings(
    client: &impl GenericClient,
    account: AccountId,
    settings: &Settings,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    client
        .execute(
            "INSERT INTO auto_recharge_settings
                    (user_id, enabled, threshold_cents, amount_cents, disabled_reason, updated_at)
             VALUES ($1, $2, $3, $4, NULL, $5)
             ON CONFLICT (user_id) DO UPDATE
                SET enabled = $2, threshold_cents = $3, amount_cents = $4,
                    disabled_reason = NULL, updated_at = $5",
            &[
                &account.0,
                &settings.enabled,
                &settings.threshold_cents,
                &settings.amount_cents,
                &now,
            ],
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Whether the user has a saved card.
pub async fn has_card(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<bool, LedgerError> {
    let row = client
        .query_opt(
            "SELECT stripe_payment_method_id IS NOT NULL FROM users WHERE id = $1",
            &[&account.0],
        )
        .await
        .map_err(unavailable)?;
    match row {
        Some(row) => row.try_get(0).map_err(unavailable),
        None => Err(LedgerError::AccountNotFound(account)),
    }
}

/// Keeps the card a top-up was paid with.
pub async fn save_card(
    client: &impl GenericClient,
    account: AccountId,
    payment_method: &str,
) -> Result<(), LedgerError> {
    client
        .execute(
            "UPDATE users SET stripe_payment_method_id = $2 WHERE id = $1",
            &[&account.0, &payment_method],
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// What this month's succeeded auto-recharges credited, in cents.
pub async fn month_total_cents(
    client: &impl GenericClient,
    account: AccountId,
    now: DateTime<Utc>,
) -> Result<i64, LedgerError> {
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(amount_cents), 0)::int8 FROM auto_recharge_attempts
              WHERE user_id = $1 AND status = 'SUCCEEDED' AND created_at >= $2",
            &[&account.0, &month_start(now)],
        )
        .await
        .map_err(unavailable)?;
    row.try_get(0).map_err(unavailable)
}

/// Marks an attempt paid (once; `false` when it had already ended).
pub async fn succeed(
    client: &impl GenericClient,
    attempt: Uuid,
    payment_intent: &str,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let updated = client
        .execute(
            "UPDATE auto_recharge_attempts
                SET status = 'SUCCEEDED', payment_intent_id = $2, ended_at = $3
              WHERE id = $1 AND status = 'PENDING'",
            &[&attempt, &payment_intent, &now],
        )
        .await
        .map_err(unavailable)?;
    Ok(updated == 1)
}

/// Ends an attempt as failed, once: switches auto-recharge off with
/// `reason` and records `auto_recharge.failed` and `auto_recharge.disabled`
/// in the outbox, in one transaction, after the account's changes applied
/// so far (`Engine::record_events`). `false` when it had already ended.
pub async fn fail(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    account: AccountId,
    attempt: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let tx = client.transaction().await.map_err(unavailable)?;
    let ended = tx
        .query_opt(
            "UPDATE auto_recharge_attempts
                SET status = 'FAILED', failure_reason = $3, ended_at = $4
              WHERE id = $1 AND user_id = $2 AND status = 'PENDING'
             RETURNING amount_cents",
            &[&attempt, &account.0, &reason, &now],
        )
        .await
        .map_err(unavailable)?;
    let Some(ended) = ended else {
        return Ok(false);
    };
    let amount_cents: i64 = ended.try_get(0).map_err(unavailable)?;
    tx.execute(
        "UPDATE auto_recharge_settings SET enabled = false, disabled_reason = $2, updated_at = $3
          WHERE user_id = $1",
        &[&account.0, &reason, &now],
    )
    .await
    .map_err(unavailable)?;
    let event = |kind, data| OutgoingEvent {
        id: Uuid::new_v4(),
        kind,
        data,
        created_at: now,
    };
    let events = [
        event(
            EventType::AutoRechargeFailed,
            serde_json::json!({"attemptId": attempt, "amountCents": amount_cents, "reason": reason}),
        ),
        event(
            EventType::AutoRechargeDisabled,
            serde_json::json!({"attemptId": attempt, "reason": reason}),
        ),
    ];
    engine.record_events(&tx, account, &events).await?;
    tx.commit().await.map_err(unavailable)?;
    Ok(true)
}
