//! Auto-recharge's SQL: the user's settings, the saved card, the attempts,
//! and the events they cause outside the journal.

use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use super::{month_start, CancelReason, OffReason};
use crate::db::DbError;
use crate::ledger::cluster::{notify_settings_changed, InstanceId};
use crate::ledger::{
    AccountId, AutoRechargeCanceledData, AutoRechargeDisabledData, AutoRechargeFailedData, Engine,
    EventData, EventType, LedgerError, OutgoingEvent,
};

/// The user's settings as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRechargeSettings {
    pub enabled: bool,
    pub threshold_cents: i64,
    pub amount_cents: i64,
    pub disabled_reason: Option<String>,
}

/// The user's settings, if ever saved.
pub async fn settings(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Option<AutoRechargeSettings>, DbError> {
    let row = client
        .query_opt(
            "SELECT enabled, threshold_cents, amount_cents, disabled_reason
               FROM auto_recharge_settings WHERE user_id = $1",
            &[&account.0],
        )
        .await?;
    row.map(|row| {
        Ok(AutoRechargeSettings {
            enabled: row.try_get(0)?,
            threshold_cents: row.try_get(1)?,
            amount_cents: row.try_get(2)?,
            disabled_reason: row.try_get(3)?,
        })
    })
    .transpose()
}

/// Saves the user's settings (saving clears a previous `disabled_reason`)
/// and tells the other instances, in the same transaction, to drop their
/// copy of the account (`cluster::notify_settings_changed`).
pub async fn save_settings(
    client: &mut deadpool_postgres::Object,
    instance: &InstanceId,
    account: AccountId,
    settings: &AutoRechargeSettings,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    tx.execute(
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
    .map_err(DbError::from)?;
    // Other instances' copies still hold the old settings.
    notify_settings_changed(&*tx, instance, account).await?;
    Ok(tx.commit().await.map_err(DbError::from)?)
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
        .map_err(DbError::from)?;
    match row {
        Some(row) => Ok(row.try_get(0).map_err(DbError::from)?),
        None => Err(LedgerError::AccountNotFound(account)),
    }
}

/// Keeps the card a top-up was paid with.
pub async fn save_card(
    client: &impl GenericClient,
    account: AccountId,
    payment_method: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE users SET stripe_payment_method_id = $2 WHERE id = $1",
            &[&account.0, &payment_method],
        )
        .await?;
    Ok(())
}

/// What this month's succeeded auto-recharges credited, in cents.
pub async fn month_total_cents(
    client: &impl GenericClient,
    account: AccountId,
    now: DateTime<Utc>,
) -> Result<i64, DbError> {
    let row = client
        .query_one(
            "SELECT COALESCE(SUM(amount_cents), 0)::int8 FROM auto_recharge_attempts
              WHERE user_id = $1 AND status = 'SUCCEEDED' AND created_at >= $2",
            &[&account.0, &month_start(now)],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Marks an attempt paid (once; `false` when it had already succeeded).
/// A payment Stripe reports succeeded is the last word on its attempt:
/// one creditd had failed or canceled (a call whose answer was lost, an
/// event out of order) did charge the card, and this month counts it.
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
              WHERE id = $1 AND status <> 'SUCCEEDED'",
            &[&attempt, &payment_intent, &now],
        )
        .await
        .map_err(DbError::from)?;
    Ok(updated == 1)
}

/// Ends an attempt as failed, once: switches auto-recharge off with
/// `reason` and records `auto_recharge.failed` and `auto_recharge.disabled`
/// in the outbox, in one transaction. `false` when it had already ended
/// (a failure after a success changes nothing).
pub async fn fail(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    account: AccountId,
    attempt: Uuid,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    let ended = tx
        .query_opt(
            "UPDATE auto_recharge_attempts
                SET status = 'FAILED', failure_reason = $3, ended_at = $4
              WHERE id = $1 AND user_id = $2 AND status = 'PENDING'
             RETURNING amount_cents",
            &[&attempt, &account.0, &reason, &now],
        )
        .await
        .map_err(DbError::from)?;
    let Some(ended) = ended else {
        return Ok(false);
    };
    let amount_cents: i64 = ended.try_get(0).map_err(DbError::from)?;
    tx.execute(
        "UPDATE auto_recharge_settings SET enabled = false, disabled_reason = $2, updated_at = $3
          WHERE user_id = $1",
        &[&account.0, &reason, &now],
    )
    .await
    .map_err(DbError::from)?;
    let events = [
        (
            EventType::AutoRechargeFailed,
            EventData::AutoRechargeFailed(AutoRechargeFailedData {
                attempt_id: attempt,
                amount_cents,
                reason: reason.to_owned(),
            }),
        ),
        (
            EventType::AutoRechargeDisabled,
            EventData::AutoRechargeDisabled(AutoRechargeDisabledData {
                attempt_id: Some(attempt),
                reason: reason.to_owned(),
            }),
        ),
    ];
    insert_events(engine, &tx, account, &events, now).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(true)
}

/// Records events that no journal entry carries (auto-recharge's failures,
/// cancellations and switch-offs), in the caller's transaction, in their
/// place in the account's order (`Engine::record_events`: after the changes
/// the account applied so far). Every such event of auto-recharge is
/// inserted here, and only here.
pub async fn insert_events(
    engine: &Engine,
    tx: &tokio_postgres::Transaction<'_>,
    account: AccountId,
    events: &[(EventType, EventData)],
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let events: Vec<OutgoingEvent> = events
        .iter()
        .map(|(kind, data)| OutgoingEvent {
            id: Uuid::new_v4(),
            kind: *kind,
            data: data.clone(),
            created_at: now,
        })
        .collect();
    engine.record_events(tx, account, &events).await
}

/// Switches auto-recharge off for `reason`, forgetting the saved card when
/// the reason says so, and records `auto_recharge.disabled` when it was
/// on; in one transaction. `true` when it was on.
pub async fn switch_off(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    account: AccountId,
    reason: OffReason,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    let was_on = switch_off_on(&tx, engine, account, reason, now).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(was_on)
}

/// [`switch_off`]'s writes on the caller's transaction, for a change of
/// the same `users` row that commits with it (Clerk's `user.deleted` and
/// its event id): on a connection of its own it would wait for that
/// transaction's row lock. `true` when it was on.
pub async fn switch_off_on(
    tx: &tokio_postgres::Transaction<'_>,
    engine: &Engine,
    account: AccountId,
    reason: OffReason,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let was_on = tx
        .query_opt(
            "SELECT enabled FROM auto_recharge_settings WHERE user_id = $1 FOR UPDATE",
            &[&account.0],
        )
        .await
        .map_err(DbError::from)?
        .map(|row| row.try_get::<_, bool>(0))
        .transpose()
        .map_err(DbError::from)?
        .unwrap_or(false);
    // A reason that forgets the card also names why auto-recharge cannot
    // be on, even when its owner had already switched it off.
    if was_on || reason.forgets_card() {
        tx.execute(
            "UPDATE auto_recharge_settings SET enabled = false, disabled_reason = $2, updated_at = $3
              WHERE user_id = $1",
            &[&account.0, &reason.as_str(), &now],
        )
        .await
        .map_err(DbError::from)?;
    }
    if reason.forgets_card() {
        tx.execute(
            "UPDATE users SET stripe_payment_method_id = NULL, card_forgotten_at = $2
              WHERE id = $1",
            &[&account.0, &now],
        )
        .await
        .map_err(DbError::from)?;
    }
    if was_on {
        let event = (
            EventType::AutoRechargeDisabled,
            EventData::AutoRechargeDisabled(AutoRechargeDisabledData {
                attempt_id: None,
                reason: reason.as_str().to_owned(),
            }),
        );
        insert_events(engine, tx, account, &[event], now).await?;
    }
    Ok(was_on)
}

/// The account and attempt of an auto-recharge's payment: by its
/// PaymentIntent, or by the attempt id its metadata names (a payment whose
/// creation answer was lost has no PaymentIntent recorded).
pub async fn attempt_of_payment(
    client: &impl GenericClient,
    payment_intent: &str,
    attempt: Option<Uuid>,
) -> Result<Option<(AccountId, Uuid)>, LedgerError> {
    let row = client
        .query_opt(
            "SELECT user_id, id FROM auto_recharge_attempts
              WHERE payment_intent_id = $1 OR id = $2
              LIMIT 1",
            &[&payment_intent, &attempt],
        )
        .await
        .map_err(DbError::from)?;
    row.map(|row| {
        Ok((
            AccountId(row.try_get(0).map_err(DbError::from)?),
            row.try_get(1).map_err(DbError::from)?,
        ))
    })
    .transpose()
}

/// A recorded attempt the worker is about to pay.
#[derive(Debug, Clone)]
pub struct Due {
    pub attempt: Uuid,
    pub account: AccountId,
    pub amount_cents: i64,
    /// When the account's actor recorded it: Stripe cannot have seen its
    /// idempotency key before.
    pub created_at: DateTime<Utc>,
    /// Calls (or look-ups) made for it so far.
    pub tries: u32,
}

/// Every recorded attempt without its PaymentIntent yet, due for a try,
/// oldest first, at most `limit`.
pub async fn due(
    client: &impl GenericClient,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Due>, LedgerError> {
    let rows = client
        .query(
            "SELECT e.id, e.user_id, (e.data->>'amountCents')::int8, e.created_at,
                    COALESCE(a.tries, 0)
               FROM outgoing_events e
               LEFT JOIN auto_recharge_attempts a ON a.id = e.id
              WHERE e.type = 'auto_recharge.requested'
                AND (a.id IS NULL OR (a.status = 'PENDING' AND a.payment_intent_id IS NULL
                                      AND (a.next_try_at IS NULL OR a.next_try_at <= $1)))
              ORDER BY e.created_at
              LIMIT $2",
            &[&now, &limit],
        )
        .await
        .map_err(DbError::from)?;
    rows.iter()
        .map(|row| {
            Ok(Due {
                attempt: row.try_get(0).map_err(DbError::from)?,
                account: AccountId(row.try_get(1).map_err(DbError::from)?),
                amount_cents: row.try_get(2).map_err(DbError::from)?,
                created_at: row.try_get(3).map_err(DbError::from)?,
                tries: u32::try_from(row.try_get::<_, i32>(4).map_err(DbError::from)?).unwrap_or(0),
            })
        })
        .collect()
}

/// What the worker may do with an attempt, decided in the transaction that
/// marks it as tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Call Stripe with this customer and card.
    Send {
        customer: String,
        payment_method: String,
    },
    /// Past its send window: look it up on Stripe, never send it again.
    LookUp,
    /// Canceled (committed, with its event): nothing to send.
    Canceled(CancelReason),
    /// Auto-recharge is on but the user has no saved card (or customer).
    NoCard,
    /// Already ended (or another attempt of the account is pending).
    Nothing,
}

/// What the worker's check needs besides the attempt.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub monthly_max_cents: i64,
    /// No call may start at or after `created_at + this`.
    pub send_window: chrono::Duration,
    /// When a failed try is tried again: `now + this`.
    pub retry_in: chrono::Duration,
}

/// The attempt and its account as the check reads them, locked.
struct Checked {
    status: String,
    card: Option<String>,
    deleted: bool,
    enabled: bool,
    customer: Option<String>,
    user_card: Option<String>,
}

/// Takes the attempt (its row made on first sight, keeping the card saved
/// then), re-reads what may forbid paying it and decides, in one
/// transaction: a cancellation is committed with its event; a send or a
/// look-up is committed with the time of the next try.
pub async fn next_step(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    due: &Due,
    rules: Rules,
    now: DateTime<Utc>,
) -> Result<Next, LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    tx.execute(
        "INSERT INTO auto_recharge_attempts (id, user_id, amount_cents, created_at, payment_method_id)
         SELECT $1, $2, $3, $4, u.stripe_payment_method_id FROM users u WHERE u.id = $2
         ON CONFLICT DO NOTHING",
        &[&due.attempt, &due.account.0, &due.amount_cents, &due.created_at],
    )
    .await
    .map_err(DbError::from)?;
    let Some(checked) = check(&*tx, due.attempt).await? else {
        tracing::warn!(attempt = %due.attempt, account = due.account.0,
            "auto-recharge attempt not taken: another attempt of the account is pending");
        return Ok(Next::Nothing);
    };
    if checked.status != "PENDING" {
        return Ok(Next::Nothing);
    }
    let next = decide(&*tx, due, &checked, rules, now).await?;
    match next {
        Next::Canceled(reason) => cancel(engine, &tx, due, reason, now).await?,
        Next::Send { .. } | Next::LookUp => {
            tx.execute(
                "UPDATE auto_recharge_attempts
                    SET tries = tries + 1, next_try_at = $2,
                        payment_method_id = COALESCE(payment_method_id, $3)
                  WHERE id = $1",
                &[&due.attempt, &(now + rules.retry_in), &checked.user_card],
            )
            .await
            .map_err(DbError::from)?;
        }
        Next::NoCard | Next::Nothing => {}
    }
    tx.commit().await.map_err(DbError::from)?;
    Ok(next)
}

async fn check(tx: &impl GenericClient, attempt: Uuid) -> Result<Option<Checked>, LedgerError> {
    let row = tx
        .query_opt(
            "SELECT a.status, a.payment_method_id, u.deleted_at IS NOT NULL,
                    COALESCE(s.enabled, false), u.stripe_customer_id, u.stripe_payment_method_id
               FROM auto_recharge_attempts a
               JOIN users u ON u.id = a.user_id
               LEFT JOIN auto_recharge_settings s ON s.user_id = a.user_id
              WHERE a.id = $1
                FOR UPDATE OF a",
            &[&attempt],
        )
        .await
        .map_err(DbError::from)?;
    row.map(|row| {
        Ok(Checked {
            status: row.try_get(0).map_err(DbError::from)?,
            card: row.try_get(1).map_err(DbError::from)?,
            deleted: row.try_get(2).map_err(DbError::from)?,
            enabled: row.try_get(3).map_err(DbError::from)?,
            customer: row.try_get(4).map_err(DbError::from)?,
            user_card: row.try_get(5).map_err(DbError::from)?,
        })
    })
    .transpose()
}

/// The rules, in the order they are checked: deleted, switched off, no
/// card, another card, the month's cap, then the send window.
async fn decide(
    tx: &impl GenericClient,
    due: &Due,
    checked: &Checked,
    rules: Rules,
    now: DateTime<Utc>,
) -> Result<Next, LedgerError> {
    if checked.deleted {
        return Ok(Next::Canceled(CancelReason::AccountDeleted));
    }
    if !checked.enabled {
        return Ok(Next::Canceled(CancelReason::Disabled));
    }
    let (Some(customer), Some(user_card)) = (&checked.customer, &checked.user_card) else {
        return Ok(Next::NoCard);
    };
    // An attempt taken before cards were kept with attempts has none: it
    // takes the card saved now.
    if checked.card.as_ref().is_some_and(|card| card != user_card) {
        return Ok(Next::Canceled(CancelReason::CardChanged));
    }
    let succeeded: i64 = tx
        .query_one(
            "SELECT COALESCE(SUM(amount_cents), 0)::int8 FROM auto_recharge_attempts
              WHERE user_id = $1 AND status = 'SUCCEEDED' AND created_at >= $2 AND id <> $3",
            &[&due.account.0, &month_start(now), &due.attempt],
        )
        .await
        .map_err(DbError::from)?
        .try_get(0)
        .map_err(DbError::from)?;
    if succeeded.saturating_add(due.amount_cents) > rules.monthly_max_cents {
        return Ok(Next::Canceled(CancelReason::MonthlyCap));
    }
    if now >= due.created_at + rules.send_window {
        return Ok(Next::LookUp);
    }
    Ok(Next::Send {
        customer: customer.clone(),
        payment_method: user_card.clone(),
    })
}

/// Ends a pending attempt as canceled, with `auto_recharge.canceled`.
async fn cancel(
    engine: &Engine,
    tx: &tokio_postgres::Transaction<'_>,
    due: &Due,
    reason: CancelReason,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    tx.execute(
        "UPDATE auto_recharge_attempts
            SET status = 'CANCELED', cancel_reason = $2, ended_at = $3
          WHERE id = $1 AND status = 'PENDING'",
        &[&due.attempt, &reason.as_str(), &now],
    )
    .await
    .map_err(DbError::from)?;
    let event = (
        EventType::AutoRechargeCanceled,
        EventData::AutoRechargeCanceled(AutoRechargeCanceledData {
            attempt_id: due.attempt,
            amount_cents: due.amount_cents,
            reason: reason.as_str(),
        }),
    );
    insert_events(engine, tx, due.account, &[event], now).await
}

/// Cancels a pending attempt that was looked up on Stripe and not found;
/// `false` when it had ended meanwhile.
pub async fn cancel_not_found(
    client: &mut deadpool_postgres::Object,
    engine: &Engine,
    due: &Due,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    let Some(checked) = check(&*tx, due.attempt).await? else {
        return Ok(false);
    };
    if checked.status != "PENDING" {
        return Ok(false);
    }
    cancel(engine, &tx, due, CancelReason::TimedOut, now).await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(true)
}

/// Keeps the PaymentIntent Stripe created for a pending attempt: its
/// webhooks end it.
pub async fn submitted(
    client: &impl GenericClient,
    attempt: Uuid,
    payment_intent: &str,
) -> Result<(), LedgerError> {
    client
        .execute(
            "UPDATE auto_recharge_attempts SET payment_intent_id = $2
              WHERE id = $1 AND status = 'PENDING'",
            &[&attempt, &payment_intent],
        )
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// The user's auto-recharge as its page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsPage {
    /// `None` until the user saved settings once.
    pub settings: Option<AutoRechargeSettings>,
    pub has_card: bool,
    /// Auto-recharged this calendar month (UTC), in cents.
    pub month_total_cents: i64,
}

/// Whether settings were saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    Saved,
    /// Enabling needs a card saved by a top-up: nothing was written.
    NeedsCard,
}

/// The users' auto-recharge settings, read and written on connections of
/// their own (the edge holds no pool).
#[derive(Clone)]
pub struct AutoRecharges {
    pool: crate::db::Pool,
    engine: std::sync::Arc<Engine>,
}

impl AutoRecharges {
    pub fn new(pool: crate::db::Pool, engine: std::sync::Arc<Engine>) -> AutoRecharges {
        AutoRecharges { pool, engine }
    }

    /// The user's settings, whether a card is saved, this month's total.
    pub async fn page(
        &self,
        account: AccountId,
        now: DateTime<Utc>,
    ) -> Result<SettingsPage, LedgerError> {
        let client = crate::db::client(&self.pool).await?;
        Ok(SettingsPage {
            settings: settings(&**client, account).await?,
            has_card: has_card(&**client, account).await?,
            month_total_cents: month_total_cents(&**client, account, now).await?,
        })
    }

    /// Saves the user's settings; enabling without a saved card writes
    /// nothing (`NeedsCard`). The account's actor learns them from the
    /// caller (`Engine::set_auto_recharge`).
    pub async fn save(
        &self,
        account: AccountId,
        settings: &AutoRechargeSettings,
        now: DateTime<Utc>,
    ) -> Result<Saved, LedgerError> {
        let mut client = crate::db::client(&self.pool).await?;
        if settings.enabled && !has_card(&**client, account).await? {
            return Ok(Saved::NeedsCard);
        }
        save_settings(&mut client, self.engine.instance(), account, settings, now).await?;
        Ok(Saved::Saved)
    }

    /// Switches the account's auto-recharge off on the caller's
    /// transaction (see [`switch_off_on`]): `true` when it was on. The
    /// account's actor learns it from [`AutoRecharges::switched_off`] once
    /// the transaction committed.
    pub async fn switch_off_on(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        account: AccountId,
        reason: OffReason,
    ) -> Result<bool, LedgerError> {
        switch_off_on(tx, &self.engine, account, reason, Utc::now()).await
    }

    /// Switches the account's auto-recharge off for `reason` (its event
    /// with it, if it was on), then tells the account's actor; whether it
    /// was on.
    pub async fn switch_off(
        &self,
        account: AccountId,
        reason: OffReason,
    ) -> Result<bool, LedgerError> {
        let mut client = crate::db::client(&self.pool).await?;
        let was_on = switch_off(&mut client, &self.engine, account, reason, Utc::now()).await?;
        super::switched_off(&self.engine, account, reason, was_on).await?;
        Ok(was_on)
    }

    /// Tells the account's actor that its auto-recharge is off, after
    /// [`AutoRecharges::switch_off_on`] committed (see
    /// `recharge::switched_off`).
    pub async fn switched_off(
        &self,
        account: AccountId,
        reason: OffReason,
        was_on: bool,
    ) -> Result<(), LedgerError> {
        super::switched_off(&self.engine, account, reason, was_on).await
    }
}
