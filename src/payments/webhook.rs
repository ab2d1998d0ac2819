//! What each Stripe webhook event does: top-ups credit, refunds and
//! disputes debit (or credit back), and the referral bonuses a top-up paid
//! follow it; subscriptions keep `users.plan`.
//!
//! Every effect goes through the engine under an idempotency key derived
//! from Stripe's ids, so a replayed or concurrent delivery cannot apply
//! twice.

use std::sync::Arc;

use crate::stripe::metadata::{MetadataError, PaymentKind, PaymentMetadata};
use deadpool_postgres::Pool;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::PaymentError;
use crate::accounts::users::{self, Plan, PlanChange, PlanSet};
use crate::config::StripeSettings;
use crate::db::{self, DbError};
use crate::ledger::{
    AccountId, ClawbackRequest, Engine, IdempotencyKey, LedgerError, Posting, TransactionType,
};
use crate::money::Micros;
use crate::stripe::events::{
    Charge, CheckoutSession, Dispute, Event, PaymentIntent, StoredText, Subscription,
};
use crate::stripe::StripeApi;
use crate::webhooks::{Effect, WebhookOutcome};

/// The event types creditd handles, as counted.
pub const HANDLED: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "charge.refunded",
    "charge.dispute.created",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "charge.dispute.closed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
];

mod sql {
    pub const TOPUP_ACCOUNT: &str = "SELECT user_id FROM credit_transactions
          WHERE stripe_payment_id = $1 AND type = 'TOP_UP' AND direction = 'CREDIT'
          LIMIT 1";
}

/// What the effects of an event need, built once at startup.
pub struct StripeEffects {
    pub settings: StripeSettings,
    /// The referral bonus a first paid top-up pays.
    pub referral_bonus: crate::referrals::Bonus,
    pub engine: Arc<Engine>,
    pub pool: Pool,
    /// `None` when `stripe.secret_key` is not set.
    pub api: Option<Arc<StripeApi>>,
}

/// The events creditd acts on, read from the envelope by type; any other
/// type is `Unknown`.
#[derive(Debug)]
pub enum StripeEvent {
    Checkout(CheckoutSession),
    Subscription {
        subscription: Subscription,
        deleted: bool,
        created: i64,
    },
    Refund(Charge),
    DisputeFunds(Dispute, Funds),
    DisputeNoted(Dispute),
    /// An auto-recharge's payment: `succeeded` credits, failed ends it.
    Payment {
        intent: PaymentIntent,
        succeeded: bool,
    },
    Unknown,
}

impl StripeEvent {
    /// The event by type, every text that would be stored checked.
    pub fn parse(event: &Event) -> Result<StripeEvent, PaymentError> {
        stored_text(event)?;
        Ok(match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                StripeEvent::Checkout(object(event)?)
            }
            "customer.subscription.created" | "customer.subscription.updated" => {
                StripeEvent::Subscription {
                    subscription: object(event)?,
                    deleted: false,
                    created: event.created,
                }
            }
            "customer.subscription.deleted" => StripeEvent::Subscription {
                subscription: object(event)?,
                deleted: true,
                created: event.created,
            },
            "charge.refunded" => StripeEvent::Refund(object(event)?),
            "charge.dispute.funds_withdrawn" => {
                StripeEvent::DisputeFunds(object(event)?, Funds::Withdrawn)
            }
            "charge.dispute.funds_reinstated" => {
                StripeEvent::DisputeFunds(object(event)?, Funds::Reinstated)
            }
            "charge.dispute.created" | "charge.dispute.closed" => {
                StripeEvent::DisputeNoted(object(event)?)
            }
            "payment_intent.succeeded" => StripeEvent::Payment {
                intent: object(event)?,
                succeeded: true,
            },
            "payment_intent.payment_failed" => StripeEvent::Payment {
                intent: object(event)?,
                succeeded: false,
            },
            _ => StripeEvent::Unknown,
        })
    }

    /// Applies the event: everything but a subscription's plan goes
    /// through the ledger engine (idempotent by the Stripe object's key)
    /// and is done when this returns; the plan is written in the inbox's
    /// transaction, with the event's id.
    pub async fn apply(
        self,
        effects: &StripeEffects,
    ) -> Result<Effect<WebhookOutcome, PaymentError>, PaymentError> {
        let outcome = match self {
            StripeEvent::Checkout(session) => checkout(effects, session).await,
            StripeEvent::Subscription {
                subscription: paid,
                deleted,
                created,
            } => return subscription(&effects.settings, paid, deleted, created),
            StripeEvent::Refund(charge) => {
                refund_stops_auto_recharge(effects, &charge).await?;
                refund(effects, charge).await
            }
            StripeEvent::DisputeFunds(dispute, funds) => {
                dispute_stops_auto_recharge(effects, &dispute).await?;
                dispute_funds(effects, dispute, funds).await
            }
            StripeEvent::DisputeNoted(dispute) => {
                dispute_stops_auto_recharge(effects, &dispute).await?;
                Ok(dispute_noted(dispute))
            }
            StripeEvent::Payment { intent, succeeded } => {
                auto_recharge(effects, intent, succeeded).await
            }
            StripeEvent::Unknown => Ok(WebhookOutcome::Ignored),
        };
        Ok(Effect::Applied(outcome?))
    }
}

fn object<T: DeserializeOwned + StoredText>(event: &Event) -> Result<T, PaymentError> {
    let object: T = serde_json::from_value(event.data.object.clone()).map_err(|error| {
        PaymentError::Invalid(format!(
            "event {} ({}): data.object: {error}",
            event.id, event.kind
        ))
    })?;
    stored_text(&object)?;
    Ok(object)
}

/// Refuses a payload whose stored texts hold a control or invisible
/// formatting character (or are over-long), naming the field.
fn stored_text(payload: &impl StoredText) -> Result<(), PaymentError> {
    for (field, value) in payload.stored_text() {
        if let Some(problem) = value.and_then(crate::ledger::text_problem) {
            return Err(PaymentError::Invalid(format!("field `{field}`: {problem}")));
        }
    }
    Ok(())
}

fn key(text: String) -> Result<IdempotencyKey, PaymentError> {
    IdempotencyKey::parse(text).map_err(|e| PaymentError::Invalid(format!("Stripe id: {e}")))
}

fn cents(amount: i64, field: &str) -> Result<Micros, PaymentError> {
    if amount <= 0 {
        return Err(PaymentError::Invalid(format!("{field}: must be positive")));
    }
    Micros::from_cents(amount).map_err(|_| PaymentError::Invalid(format!("{field}: too large")))
}

/// A currency other than the ledger's is never credited nor debited: the
/// amount would mean something else. Logged as an error for the operators.
fn currency_mismatch(
    settings: &StripeSettings,
    currency: Option<&str>,
    what: &str,
    id: &str,
) -> bool {
    let ledger = settings.currency.as_str();
    let matches = currency.is_some_and(|c| c.eq_ignore_ascii_case(ledger));
    if !matches {
        tracing::error!(%id, currency = ?currency, %ledger, "{what} in a currency other than the ledger's; not applied");
        metrics::counter!(crate::telemetry::TOPUP_CURRENCY_MISMATCH_TOTAL.name, "object" => what.to_owned())
            .increment(1);
    }
    !matches
}

/// Maps an engine answer: a missing account is not Stripe's retry to make.
fn applied(
    result: Result<crate::ledger::Outcome<crate::ledger::TransactionRecord>, LedgerError>,
    what: &str,
) -> Result<WebhookOutcome, PaymentError> {
    match result {
        Ok(outcome) if outcome.replayed => Ok(WebhookOutcome::Replayed),
        Ok(_) => Ok(WebhookOutcome::Applied),
        Err(LedgerError::AccountNotFound(account)) => {
            tracing::error!(
                account = account.0,
                "{what} for an account that does not exist"
            );
            Ok(WebhookOutcome::UnknownAccount)
        }
        Err(error) => Err(error.into()),
    }
}

/// A paid top-up session credits `amount_total` once per session: the key
/// is the session's, so `completed` and `async_payment_succeeded` (and any
/// redelivery) collapse into one credit. Nothing here waits for Stripe's
/// API: the card and the invoice link follow (`super::followup`).
async fn checkout(
    effects: &StripeEffects,
    session: CheckoutSession,
) -> Result<WebhookOutcome, PaymentError> {
    if PaymentKind::of(&session.metadata) != Some(PaymentKind::CreditTopup) {
        return Ok(WebhookOutcome::Ignored);
    }
    if session.payment_status != "paid" {
        return Ok(WebhookOutcome::AwaitingPayment);
    }
    if currency_mismatch(
        &effects.settings,
        session.currency.as_deref(),
        "checkout_session",
        &session.id,
    ) {
        return Ok(WebhookOutcome::CurrencyMismatch);
    }
    let parsed = PaymentMetadata::parse(&session.metadata);
    if let Err(
        error @ MetadataError::Missing("userId") | error @ MetadataError::Invalid("userId"),
    ) = &parsed
    {
        tracing::error!(session = %session.id, %error, "top-up session without a valid metadata.userId");
        return Ok(WebhookOutcome::UnknownAccount);
    }
    let amount_total = session.amount_total.unwrap_or(0);
    let asked = parsed.as_ref().ok().map(|paid| paid.amount_cents);
    if asked != Some(amount_total) {
        // Not what the top-up asked for (a changed price, a discount, a
        // session edited outside creditd): no credit until an operator
        // looks; the event is recorded, so Stripe stops retrying it.
        tracing::error!(session = %session.id, amount_total, asked = ?asked,
            "paid top-up whose amount_total differs from metadata.amountCents; not credited");
        metrics::counter!(crate::telemetry::TOPUP_AMOUNT_MISMATCH_TOTAL.name).increment(1);
        return Ok(WebhookOutcome::AmountMismatch);
    }
    let Ok(paid) = parsed else {
        return Ok(WebhookOutcome::AmountMismatch);
    };
    let account = AccountId(paid.user_id);
    let amount = cents(amount_total, "amount_total")?;
    // The credit waits for no read from Stripe: the card and the invoice
    // link are the top-up's follow-ups (`super::followup`), whose job is
    // the transaction row this credit inserts.
    let metadata = session
        .invoice
        .as_deref()
        .map(|invoice| json!({ "invoiceId": invoice }));
    let posting = Posting {
        key: key(format!("stripe:checkout:{}", session.id))?,
        kind: TransactionType::TopUp,
        amount,
        description: Some(format!("Recharge de {amount}")),
        stripe_session_id: Some(session.id.clone()),
        stripe_payment_id: session.payment_intent.clone(),
        metadata,
        expires_at: None,
    };
    let credited = applied(effects.engine.credit(account, posting).await, "top-up")?;
    if matches!(credited, WebhookOutcome::Applied | WebhookOutcome::Replayed) {
        // A referral is paid after the top-up's credit, and tried again on
        // every redelivery until it is (its credits have keys of their own).
        let topup = crate::referrals::PaidTopup {
            session_id: &session.id,
            payment_intent: session.payment_intent.as_deref(),
        };
        crate::referrals::reward_after_topup(
            &effects.pool,
            &effects.engine,
            effects.referral_bonus,
            account,
            topup,
        )
        .await?;
    }
    Ok(credited)
}

/// An auto-recharge's payment: a success credits the attempt's amount once
/// (key `stripe:payment_intent:<id>`) and ends the attempt; a failure ends
/// it and switches auto-recharge off. Any other PaymentIntent (a top-up's,
/// paid through Checkout) is the Checkout Session's business.
async fn auto_recharge(
    effects: &StripeEffects,
    intent: PaymentIntent,
    succeeded: bool,
) -> Result<WebhookOutcome, PaymentError> {
    if PaymentKind::of(&intent.metadata) != Some(PaymentKind::AutoRecharge) {
        return Ok(WebhookOutcome::Ignored);
    }
    let (account, attempt) = match PaymentMetadata::parse(&intent.metadata) {
        Ok(PaymentMetadata {
            user_id,
            attempt_id: Some(attempt),
            ..
        }) => (AccountId(user_id), attempt),
        Ok(_) => {
            tracing::error!(payment_intent = %intent.id, "auto-recharge payment without metadata.attemptId");
            return Ok(WebhookOutcome::UnknownAccount);
        }
        Err(error) => {
            tracing::error!(payment_intent = %intent.id, %error, "auto-recharge payment without a valid metadata.userId and attemptId");
            return Ok(WebhookOutcome::UnknownAccount);
        }
    };
    let now = chrono::Utc::now();
    if !succeeded {
        let reason = intent
            .last_payment_error
            .and_then(|error| error.code)
            .unwrap_or_else(|| "payment_failed".into());
        let mut client = db::client(&effects.pool).await.map_err(LedgerError::from)?;
        let ended = crate::recharge::store::fail(
            &mut client,
            &effects.engine,
            account,
            attempt,
            &reason,
            now,
        )
        .await?;
        drop(client);
        // A failure that ended nothing (the attempt had succeeded, or
        // failed already) changes nothing, in PostgreSQL nor in memory.
        if !ended {
            return Ok(WebhookOutcome::Replayed);
        }
        effects
            .engine
            .auto_recharge_ended(account, attempt, crate::recharge::AttemptEnd::Failed)
            .await?;
        return Ok(WebhookOutcome::Applied);
    }
    if currency_mismatch(
        &effects.settings,
        intent.currency.as_deref(),
        "payment_intent",
        &intent.id,
    ) {
        return Ok(WebhookOutcome::CurrencyMismatch);
    }
    let amount = cents(intent.amount, "amount")?;
    let posting = Posting {
        key: key(format!("stripe:payment_intent:{}", intent.id))?,
        kind: TransactionType::TopUp,
        amount,
        description: Some(format!("Recharge automatique de {amount}")),
        stripe_session_id: None,
        stripe_payment_id: Some(intent.id.clone()),
        metadata: None,
        // Paid credits never expire.
        expires_at: None,
    };
    let outcome = applied(
        effects
            .engine
            .credit_attempt(account, posting, attempt)
            .await,
        "auto-recharge",
    )?;
    if outcome == WebhookOutcome::UnknownAccount {
        return Ok(outcome);
    }
    let client = db::client(&effects.pool).await.map_err(LedgerError::from)?;
    crate::recharge::store::succeed(&**client, attempt, &intent.id, now).await?;
    drop(client);
    effects
        .engine
        .auto_recharge_ended(account, attempt, crate::recharge::AttemptEnd::Succeeded)
        .await?;
    Ok(outcome)
}

/// A refund of an auto-recharge's payment switches auto-recharge off
/// (reason `refunded`) before the refund is clawed back: the person did
/// not want that charge, and spending on must not start the next one
/// until they turn it on again. Any other refund leaves it alone.
async fn refund_stops_auto_recharge(
    effects: &StripeEffects,
    charge: &Charge,
) -> Result<(), PaymentError> {
    let Some(payment_intent) = charge.payment_intent.as_deref() else {
        return Ok(());
    };
    let attempt = PaymentMetadata::attempt_of(&charge.metadata);
    let client = db::client(&effects.pool).await.map_err(LedgerError::from)?;
    let paid =
        crate::recharge::store::attempt_of_payment(&**client, payment_intent, attempt).await?;
    drop(client);
    let account = paid.map(|(account, _)| account);
    switch_off(effects, account, crate::recharge::OffReason::Refunded).await
}

/// Any event of a dispute (or inquiry) on one of the account's payments,
/// a top-up's or an auto-recharge's, switches auto-recharge off and
/// forgets the saved card (reason `dispute`), before anything else the
/// event does: a disputed card is the mark of a card used without its
/// owner's consent, never to be charged again by itself.
async fn dispute_stops_auto_recharge(
    effects: &StripeEffects,
    dispute: &Dispute,
) -> Result<(), PaymentError> {
    let Some(payment_intent) = dispute.payment_intent.as_deref() else {
        return Ok(());
    };
    let account = match topup_account(&effects.pool, payment_intent).await? {
        Some(account) => Some(account),
        None => {
            let client = db::client(&effects.pool).await.map_err(LedgerError::from)?;
            crate::recharge::store::attempt_of_payment(&**client, payment_intent, None)
                .await?
                .map(|(account, _)| account)
        }
    };
    switch_off(effects, account, crate::recharge::OffReason::Dispute).await
}

/// Switches auto-recharge off for `reason` on the account a payment was
/// found to belong to, if any.
async fn switch_off(
    effects: &StripeEffects,
    account: Option<AccountId>,
    reason: crate::recharge::OffReason,
) -> Result<(), PaymentError> {
    if let Some(account) = account {
        crate::recharge::switch_off(&effects.pool, &effects.engine, account, reason).await?;
    }
    Ok(())
}

/// `users.plan` from the subscription's price while it is live (active,
/// trialing or past due); FREE once it is deleted or no longer live.
///
/// Stripe delivers events out of order: an event older than the one that
/// last set the plan changes nothing, and the deletion of a subscription
/// that is no longer the user's current one leaves the current one alone.
fn subscription(
    settings: &StripeSettings,
    subscription: Subscription,
    deleted: bool,
    event_created: i64,
) -> Result<Effect<WebhookOutcome, PaymentError>, PaymentError> {
    let price = subscription
        .items
        .data
        .first()
        .map(|item| item.price.id.as_str());
    let live = matches!(
        subscription.status.as_str(),
        "active" | "trialing" | "past_due"
    );
    let plan = match price {
        _ if deleted || !live => Plan::Free,
        Some(id) if id == settings.starter_price_id => Plan::Starter,
        Some(id) if id == settings.pro_price_id => Plan::Pro,
        Some(id) if id == settings.team_price_id => Plan::Team,
        other => {
            tracing::warn!(subscription = %subscription.id, price = ?other, "subscription price is not a configured plan; plan set to FREE");
            Plan::Free
        }
    };
    let event_at = chrono::DateTime::from_timestamp(event_created, 0)
        .ok_or_else(|| PaymentError::Invalid("created: not a timestamp".into()))?;
    Ok(Effect::Writes(Box::new(move |tx| {
        Box::pin(async move {
            let change = PlanChange {
                customer_id: &subscription.customer,
                plan,
                current_subscription_id: (!deleted).then_some(subscription.id.as_str()),
                subscription_id: &subscription.id,
                deleted,
                event_at,
            };
            Ok(match users::set_plan(tx, change).await? {
                PlanSet::Applied => WebhookOutcome::Applied,
                PlanSet::Superseded => WebhookOutcome::Superseded,
                PlanSet::UnknownCustomer => {
                    tracing::warn!(customer = %subscription.customer, "subscription of a customer creditd does not know");
                    WebhookOutcome::UnknownAccount
                }
            })
        })
    })))
}

/// The account whose top-up this payment intent paid, if any.
async fn topup_account(
    pool: &Pool,
    payment_intent: &str,
) -> Result<Option<AccountId>, LedgerError> {
    let client = db::client(pool).await.map_err(LedgerError::from)?;
    Ok(client
        .query_opt(sql::TOPUP_ACCOUNT, &[&payment_intent])
        .await
        .map_err(DbError::from)?
        .map(|row| AccountId(row.get(0))))
}

/// Debits the part of a top-up refunded since the last clawback.
///
/// `amount_refunded` is cumulative. The engine computes the part still to
/// claw back inside the account's actor, where every clawback of the charge
/// is serialized and what was already taken (committed or in flight) is
/// known, so any delivery order, concurrency or slow commit debits exactly
/// the refunded total. The debit's key is
/// `stripe:charge:<id>:refunded:<cumulative cents>`: one state of the
/// charge, applied once; a redelivery, or an older event arriving after a
/// newer one, finds nothing left to claw back.
async fn refund(effects: &StripeEffects, charge: Charge) -> Result<WebhookOutcome, PaymentError> {
    let Some(payment_intent) = charge.payment_intent.as_deref() else {
        return Ok(WebhookOutcome::NotATopup);
    };
    if currency_mismatch(
        &effects.settings,
        Some(&charge.currency),
        "charge",
        &charge.id,
    ) {
        return Ok(WebhookOutcome::CurrencyMismatch);
    }
    let Some(account) = topup_account(&effects.pool, payment_intent).await? else {
        if PaymentKind::of(&charge.metadata).is_some() {
            // A top-up whose credit has not landed yet (its checkout or
            // payment event is still being retried): the refund must wait.
            return Err(PaymentError::NotCreditedYet(
                "the top-up this charge paid is not credited yet; retry later",
            ));
        }
        tracing::warn!(charge = %charge.id, "refund of a charge that paid no top-up; ignored");
        return Ok(WebhookOutcome::NotATopup);
    };
    let target = Micros::from_cents(charge.amount_refunded)
        .map_err(|_| PaymentError::Invalid("amount_refunded: too large".into()))?;
    let request = ClawbackRequest {
        object: charge.id.clone(),
        target,
        key: key(format!(
            "stripe:charge:{}:refunded:{}",
            charge.id, charge.amount_refunded
        ))?,
        kind: TransactionType::Refund,
        describe: |amount| format!("Remboursement de {amount}"),
        stripe_payment_id: Some(payment_intent.to_owned()),
        metadata: Some(json!({
            "chargeId": charge.id,
            "amountRefundedCents": charge.amount_refunded,
        })),
    };
    let outcome = match effects.engine.clawback(account, request).await {
        Ok(crate::ledger::Outcome { record: None, .. }) => Ok(WebhookOutcome::NothingToClawBack),
        Ok(crate::ledger::Outcome {
            record: Some(record),
            replayed,
        }) => applied(Ok(crate::ledger::Outcome { record, replayed }), "refund"),
        Err(error) => applied(Err(error), "refund"),
    }?;
    // The referral bonuses this top-up paid follow its money.
    crate::referrals::follow_paying_topup(
        &effects.pool,
        &effects.engine,
        effects.referral_bonus,
        account,
        payment_intent,
    )
    .await?;
    Ok(outcome)
}

/// A dispute's money movement, as Stripe reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Funds {
    /// `charge.dispute.funds_withdrawn`: the disputed amount left the
    /// balance; the credits bought with it are debited.
    Withdrawn,
    /// `charge.dispute.funds_reinstated`: the dispute closed in the
    /// merchant's favour (won) and the funds came back; so do the credits.
    Reinstated,
}

/// `charge.dispute.created` and `charge.dispute.closed` move no credits.
///
/// Stripe withdraws a dispute's funds in a separate step and says so with
/// `charge.dispute.funds_withdrawn`; an inquiry (`warning_needs_response`,
/// `warning_under_review`, closed as `warning_closed`) withdraws nothing
/// and may never become a dispute. Debiting at `created` would charge
/// inquiries and, once `funds_withdrawn` came, risk a second debit. At
/// `closed`, a won dispute is followed by `funds_reinstated` (its funds
/// come back then), a lost one keeps the withdrawal: the funds events
/// alone carry the money.
fn dispute_noted(dispute: Dispute) -> WebhookOutcome {
    if dispute.status.starts_with("warning_") {
        return WebhookOutcome::Inquiry;
    }
    WebhookOutcome::Ignored
}

/// Debits (withdrawn) or credits back (reinstated) the disputed amount,
/// each once per dispute. The withdrawal's key is `stripe:dispute:<id>`
/// (the key disputes were debited under before, so a dispute debited
/// then is not debited again), the reinstatement's
/// `stripe:dispute:<id>:reinstated`. A dispute of a top-up not credited
/// yet answers 503, so Stripe retries it after the credit.
async fn dispute_funds(
    effects: &StripeEffects,
    dispute: Dispute,
    funds: Funds,
) -> Result<WebhookOutcome, PaymentError> {
    let Some(payment_intent) = dispute.payment_intent.as_deref() else {
        return Ok(WebhookOutcome::NotATopup);
    };
    if dispute.status.starts_with("warning_") {
        tracing::warn!(dispute = %dispute.id, status = %dispute.status, "funds event of an inquiry; no credits move");
        return Ok(WebhookOutcome::Inquiry);
    }
    if currency_mismatch(
        &effects.settings,
        Some(&dispute.currency),
        "dispute",
        &dispute.id,
    ) {
        return Ok(WebhookOutcome::CurrencyMismatch);
    }
    let Some(account) = topup_account(&effects.pool, payment_intent).await? else {
        return unknown_dispute_payment(effects, &dispute, payment_intent).await;
    };
    let amount = cents(dispute.amount, "amount")?;
    let (suffix, description) = match funds {
        Funds::Withdrawn => ("", format!("Litige de {amount}")),
        Funds::Reinstated => (":reinstated", format!("Litige gagné, {amount} rendus")),
    };
    let posting = Posting {
        key: key(format!("stripe:dispute:{}{suffix}", dispute.id))?,
        kind: TransactionType::Dispute,
        amount,
        description: Some(description),
        stripe_session_id: None,
        stripe_payment_id: Some(payment_intent.to_owned()),
        metadata: Some(json!({ "chargeId": dispute.charge, "disputeId": dispute.id })),
        expires_at: None,
    };
    let result = match funds {
        Funds::Withdrawn => effects.engine.debit(account, posting).await,
        Funds::Reinstated => effects.engine.credit(account, posting).await,
    };
    let outcome = applied(result, "dispute")?;
    // The referral bonuses this top-up paid follow its money.
    crate::referrals::follow_paying_topup(
        &effects.pool,
        &effects.engine,
        effects.referral_bonus,
        account,
        payment_intent,
    )
    .await?;
    Ok(outcome)
}

/// A dispute of a payment creditd credited nothing for: a top-up whose
/// credit has not landed yet (503: Stripe retries it), or no top-up.
async fn unknown_dispute_payment(
    effects: &StripeEffects,
    dispute: &Dispute,
    payment_intent: &str,
) -> Result<WebhookOutcome, PaymentError> {
    let Some(api) = effects.api.as_deref() else {
        tracing::warn!(dispute = %dispute.id, "dispute of a payment that credited nothing (Stripe API not configured to check it); ignored");
        return Ok(WebhookOutcome::NotATopup);
    };
    if api.is_topup_payment(payment_intent).await? {
        return Err(PaymentError::NotCreditedYet(
            "the top-up this dispute is about is not credited yet; retry later",
        ));
    }
    tracing::warn!(dispute = %dispute.id, "dispute of a charge that paid no top-up; ignored");
    Ok(WebhookOutcome::NotATopup)
}
