//! Money in through Stripe: `POST /api/credits/topup` opens a Checkout
//! Session; `POST /api/webhooks/stripe` hears what Stripe did and credits
//! (top-ups), debits (refunds, disputes) or keeps `users.plan`.
//!
//! Every effect goes through the engine under an idempotency key derived
//! from Stripe's ids, so a replayed or concurrent delivery cannot apply
//! twice; the event id is recorded only after its effect committed, so a
//! failure (answered 5xx, retried by Stripe) is never taken for done.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::error::{parse_json, ApiError, Code};
use super::{read_body, State};
use crate::ledger::{
    AccountId, ClawbackRequest, IdempotencyKey, LedgerError, Posting, TransactionType,
};
use crate::money::Micros;
use crate::stripe::events::{Charge, CheckoutSession, Dispute, Event, Subscription};
use crate::stripe::signature;
use crate::stripe::StripeCallError;

/// `processed_webhook_events.source` of Stripe's events.
const SOURCE: &str = "stripe";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/topup", web::post().to(topup))
        .route("/api/webhooks/stripe", web::post().to(webhook));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TopupRequest {
    /// Cents.
    amount: i64,
}

/// `5€` for 500 cents, `5.50€` for 550: the seed's limit messages.
fn euros(cents: i64) -> String {
    if cents % 100 == 0 {
        format!("{}€", cents / 100)
    } else {
        format!("{}.{:02}€", cents / 100, (cents % 100).abs())
    }
}

/// Opens a Checkout Session for a top-up of `amount` cents: `{url, sessionId}`.
#[utoipa::path(post, path = "/api/credits/topup", tag = "credits", security(("clerk" = [])),
    request_body = TopupRequest,
    responses(
        (status = 200, description = "The Checkout Session", body = super::openapi::TopupSession),
        (status = 400, description = "INVALID_REQUEST (the message names the field)", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT (the body did not arrive in time)", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 429, description = "RATE_LIMITED (Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL (the payment provider refused the request)", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (Stripe not configured or unreachable, database unavailable)", body = super::openapi::ErrorBody)
    ))]
async fn topup(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let body = read_body(payload, &state.settings.server).await?;
    // serde would read a struct from a JSON array too: only an object is a request.
    if !parse_json::<serde_json::Value>(&body)?.is_object() {
        return Err(ApiError::invalid("request body: expected a JSON object"));
    }
    let TopupRequest { amount } = parse_json(&body)?;
    let limits = &state.settings.stripe;
    if amount < limits.min_topup_cents {
        return Err(ApiError::invalid(format!(
            "Minimum top-up is {}",
            euros(limits.min_topup_cents)
        )));
    }
    if amount > limits.max_topup_cents {
        return Err(ApiError::invalid(format!(
            "Maximum top-up is {}",
            euros(limits.max_topup_cents)
        )));
    }
    let api = state.stripe.as_ref().ok_or_else(|| {
        ApiError::new(
            Code::Unavailable,
            "top-ups are not available: Stripe is not configured (stripe.secret_key)",
        )
    })?;
    let account = state.account(&clerk_id).await?;
    state.limits.topup(account)?;
    let customer = customer_of(&state, api, account, &clerk_id).await?;
    let session = api
        .create_topup_session(account, &customer, amount, chrono::Utc::now().timestamp())
        .await
        .map_err(stripe_failure)?;
    Ok(HttpResponse::Ok().json(json!({ "url": session.url, "sessionId": session.id })))
}

/// The user's Stripe customer, created on the first top-up. Concurrent
/// first top-ups send the same idempotency key, so Stripe creates one
/// customer; the first to store it wins and the others read it back.
async fn customer_of(
    state: &State,
    api: &crate::stripe::StripeApi,
    account: AccountId,
    clerk_id: &str,
) -> Result<String, ApiError> {
    let client = state.client().await?;
    let row = client
        .query_one(
            "SELECT stripe_customer_id, email, name FROM users WHERE id = $1",
            &[&account.0],
        )
        .await
        .map_err(database_failure)?;
    if let Some(customer) = row.get::<_, Option<String>>(0) {
        return Ok(customer);
    }
    let email: Option<String> = row.get(1);
    let name: Option<String> = row.get(2);
    drop(client);
    let created = api
        .create_customer(account, clerk_id, email.as_deref(), name.as_deref())
        .await
        .map_err(stripe_failure)?;
    let client = state.client().await?;
    let updated = client
        .execute(
            "UPDATE users SET stripe_customer_id = $2, updated_at = now()
              WHERE id = $1 AND stripe_customer_id IS NULL",
            &[&account.0, &created],
        )
        .await
        .map_err(database_failure)?;
    if updated == 1 {
        return Ok(created);
    }
    // Another request stored its customer first (a separate statement, so
    // it sees that commit).
    let stored: Option<String> = client
        .query_one(
            "SELECT stripe_customer_id FROM users WHERE id = $1",
            &[&account.0],
        )
        .await
        .map_err(database_failure)?
        .get(0);
    let stored = stored.ok_or_else(|| ApiError::internal("stripe customer", "not stored"))?;
    if stored != created {
        tracing::warn!(account = account.0, %created, %stored, "a second Stripe customer was created; the stored one is kept");
    }
    Ok(stored)
}

fn stripe_failure(error: StripeCallError) -> ApiError {
    match error {
        StripeCallError::Unreachable(message) => {
            tracing::warn!(%message, "Stripe unreachable");
            ApiError::new(
                Code::Unavailable,
                "the payment provider is unreachable; retry shortly",
            )
        }
        refused @ StripeCallError::Refused { .. } => {
            tracing::error!(error = %refused, "Stripe refused a request");
            ApiError::new(
                Code::Internal,
                "the payment provider refused the request; the operators have been alerted",
            )
        }
    }
}

fn database_failure(error: tokio_postgres::Error) -> ApiError {
    tracing::warn!(%error, "database failure");
    ApiError::new(Code::Unavailable, "the database is unavailable; retry")
}

/// What a webhook event did, as counted in `creditd_webhook_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Applied,
    Replayed,
    AwaitingPayment,
    CurrencyMismatch,
    UnknownAccount,
    NotATopup,
    NothingToClawBack,
    Superseded,
    Ignored,
    BonusAlreadyClaimed,
    Inquiry,
    AmountMismatch,
}

impl Outcome {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Replayed => "replayed",
            Outcome::AwaitingPayment => "awaiting_payment",
            Outcome::CurrencyMismatch => "currency_mismatch",
            Outcome::UnknownAccount => "unknown_account",
            Outcome::NotATopup => "not_a_topup",
            Outcome::NothingToClawBack => "nothing_to_claw_back",
            Outcome::Superseded => "superseded",
            Outcome::Ignored => "ignored",
            Outcome::BonusAlreadyClaimed => "bonus_already_claimed",
            Outcome::Inquiry => "inquiry",
            Outcome::AmountMismatch => "amount_mismatch",
        }
    }
}

/// Counts one webhook delivery; event types creditd does not handle are
/// counted as `other` so the label stays bounded.
pub(super) fn count(source: &'static str, kind: &str, handled: &[&'static str], outcome: &str) {
    let kind = handled
        .iter()
        .find(|handled| **handled == kind)
        .copied()
        .unwrap_or("other");
    metrics::counter!("creditd_webhook_events_total",
        "source" => source, "type" => kind, "outcome" => outcome.to_owned())
    .increment(1);
}

const HANDLED: &[&str] = &[
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
];

/// Whether this event id was already handled (its effect committed).
pub(super) async fn already_processed(
    state: &State,
    source: &str,
    event_id: &str,
) -> Result<bool, ApiError> {
    let client = state.client().await?;
    Ok(client
        .query_opt(
            "SELECT 1 FROM processed_webhook_events WHERE source = $1 AND event_id = $2",
            &[&source, &event_id],
        )
        .await
        .map_err(database_failure)?
        .is_some())
}

/// Records an event as handled, after its effect committed. A failure here
/// answers 5xx: the retry finds the effect done by its idempotency key.
pub(super) async fn record_processed(
    state: &State,
    source: &str,
    event_id: &str,
    kind: &str,
) -> Result<(), ApiError> {
    let client = state.client().await?;
    client
        .execute(
            "INSERT INTO processed_webhook_events (source, event_id, event_type)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&source, &event_id, &kind],
        )
        .await
        .map_err(database_failure)?;
    Ok(())
}

/// Stripe's events, `Stripe-Signature` checked on the raw body.
#[utoipa::path(post, path = "/api/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<HMAC-SHA256 hex>")),
    request_body(content = Object, description = "A Stripe event"),
    responses(
        (status = 200, description = "Taken (or already taken)", body = super::openapi::Received),
        (status = 400, description = "INVALID_REQUEST (bad signature or payload)", body = super::openapi::ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT (the body did not arrive in time)", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 429, description = "RATE_LIMITED (Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (not configured, a top-up not credited yet, database unavailable: Stripe retries)", body = super::openapi::ErrorBody)
    ))]
async fn webhook(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings.stripe;
    if settings.webhook_secret.is_empty() {
        return Err(ApiError::new(
            Code::Unavailable,
            "Stripe webhooks are not configured (stripe.webhook_secret)",
        ));
    }
    let body = read_body(payload, &state.settings.server).await?;
    let header = request
        .headers()
        .get("Stripe-Signature")
        .and_then(|value| value.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    if let Err(error) = signature::verify(
        header,
        &body,
        settings.webhook_secret.expose(),
        settings.webhook_tolerance_s,
        now,
    ) {
        count(SOURCE, "", HANDLED, "invalid_signature");
        return Err(ApiError::invalid(error.to_string()));
    }
    let event: Event = parse_json(&body)?;
    if already_processed(&state, SOURCE, &event.id).await? {
        count(SOURCE, &event.kind, HANDLED, "duplicate");
        return Ok(HttpResponse::Ok().json(json!({ "received": true, "duplicate": true })));
    }
    let outcome = match dispatch(&state, &event).await {
        Ok(outcome) => outcome,
        Err(error) => {
            count(SOURCE, &event.kind, HANDLED, "failed");
            tracing::warn!(event = %event.id, kind = %event.kind, %error, "Stripe event not processed");
            return Err(error);
        }
    };
    record_processed(&state, SOURCE, &event.id, &event.kind).await?;
    count(SOURCE, &event.kind, HANDLED, outcome.as_str());
    tracing::info!(event = %event.id, kind = %event.kind, outcome = outcome.as_str(), "Stripe event processed");
    Ok(HttpResponse::Ok().json(json!({ "received": true })))
}

fn object<T: DeserializeOwned>(event: &Event) -> Result<T, ApiError> {
    serde_json::from_value(event.data.object.clone()).map_err(|e| {
        ApiError::invalid(format!(
            "event {} ({}): data.object: {e}",
            event.id, event.kind
        ))
    })
}

async fn dispatch(state: &State, event: &Event) -> Result<Outcome, ApiError> {
    match event.kind.as_str() {
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            checkout(state, object(event)?).await
        }
        "customer.subscription.created" | "customer.subscription.updated" => {
            subscription(state, object(event)?, false, event.created).await
        }
        "customer.subscription.deleted" => {
            subscription(state, object(event)?, true, event.created).await
        }
        "charge.refunded" => refund(state, object(event)?).await,
        "charge.dispute.funds_withdrawn" => {
            dispute_funds(state, object(event)?, Funds::Withdrawn).await
        }
        "charge.dispute.funds_reinstated" => {
            dispute_funds(state, object(event)?, Funds::Reinstated).await
        }
        "charge.dispute.created" | "charge.dispute.closed" => dispute_noted(object(event)?),
        _ => Ok(Outcome::Ignored),
    }
}

fn key(text: String) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(text).map_err(|e| ApiError::invalid(format!("Stripe id: {e}")))
}

fn cents(amount: i64, field: &str) -> Result<Micros, ApiError> {
    if amount <= 0 {
        return Err(ApiError::invalid(format!("{field}: must be positive")));
    }
    Micros::from_cents(amount).map_err(|_| ApiError::invalid(format!("{field}: too large")))
}

/// A currency other than the ledger's is never credited nor debited: the
/// amount would mean something else. Logged as an error for the operators.
fn currency_mismatch(state: &State, currency: Option<&str>, what: &str, id: &str) -> bool {
    let ledger = state.settings.stripe.currency.as_str();
    let matches = currency.is_some_and(|c| c.eq_ignore_ascii_case(ledger));
    if !matches {
        tracing::error!(%id, currency = ?currency, %ledger, "{what} in a currency other than the ledger's; not applied");
        metrics::counter!("creditd_topup_currency_mismatch_total", "object" => what.to_owned())
            .increment(1);
    }
    !matches
}

/// Maps an engine answer: a missing account is not Stripe's retry to make.
fn applied(
    result: Result<crate::ledger::Outcome<crate::ledger::TransactionRecord>, LedgerError>,
    what: &str,
) -> Result<Outcome, ApiError> {
    match result {
        Ok(outcome) if outcome.replayed => Ok(Outcome::Replayed),
        Ok(_) => Ok(Outcome::Applied),
        Err(LedgerError::AccountNotFound(account)) => {
            tracing::error!(
                account = account.0,
                "{what} for an account that does not exist"
            );
            Ok(Outcome::UnknownAccount)
        }
        Err(error) => Err(error.into()),
    }
}

/// A paid top-up session credits `amount_total` once per session: the key
/// is the session's, so `completed` and `async_payment_succeeded` (and any
/// redelivery) collapse into one credit.
async fn checkout(state: &State, session: CheckoutSession) -> Result<Outcome, ApiError> {
    if session.metadata.get("type").map(String::as_str) != Some("credit_topup") {
        return Ok(Outcome::Ignored);
    }
    if session.payment_status != "paid" {
        return Ok(Outcome::AwaitingPayment);
    }
    if currency_mismatch(
        state,
        session.currency.as_deref(),
        "checkout_session",
        &session.id,
    ) {
        return Ok(Outcome::CurrencyMismatch);
    }
    let Some(account) = session
        .metadata
        .get("userId")
        .and_then(|id| id.parse::<i64>().ok())
        .map(AccountId)
    else {
        tracing::error!(session = %session.id, "top-up session without a valid metadata.userId");
        return Ok(Outcome::UnknownAccount);
    };
    let amount_total = session.amount_total.unwrap_or(0);
    let asked = session
        .metadata
        .get("amountCents")
        .and_then(|cents| cents.parse::<i64>().ok());
    if asked != Some(amount_total) {
        // Not what the top-up asked for (a changed price, a discount, a
        // session edited outside creditd): no credit until an operator
        // looks; the event is recorded, so Stripe stops retrying it.
        tracing::error!(session = %session.id, amount_total, asked = ?asked,
            "paid top-up whose amount_total differs from metadata.amountCents; not credited");
        metrics::counter!("creditd_topup_amount_mismatch_total").increment(1);
        return Ok(Outcome::AmountMismatch);
    }
    let amount = cents(amount_total, "amount_total")?;
    let posting = Posting {
        key: key(format!("stripe:checkout:{}", session.id))?,
        kind: TransactionType::TopUp,
        amount,
        description: Some(format!("Recharge de {amount}")),
        stripe_session_id: Some(session.id.clone()),
        stripe_payment_id: session.payment_intent.clone(),
        metadata: None,
    };
    let credited = applied(state.engine.credit(account, posting).await, "top-up")?;
    if matches!(credited, Outcome::Applied | Outcome::Replayed) {
        // A referral is paid after the top-up's credit, and again tried
        // on every redelivery until it is (its credits have their own keys).
        crate::referrals::reward_after_topup(
            &state.pool,
            &state.engine,
            &state.settings.credits,
            account,
            session.customer.as_deref(),
        )
        .await?;
    }
    Ok(credited)
}

/// `users.plan` from the subscription's price while it is live (active,
/// trialing or past due); FREE once it is deleted or no longer live.
///
/// Stripe delivers events out of order: an event older than the one that
/// last set the plan changes nothing, and the deletion of a subscription
/// that is no longer the user's current one leaves the current one alone.
async fn subscription(
    state: &State,
    subscription: Subscription,
    deleted: bool,
    event_created: i64,
) -> Result<Outcome, ApiError> {
    let settings = &state.settings.stripe;
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
        _ if deleted || !live => "FREE",
        Some(id) if id == settings.starter_price_id => "STARTER",
        Some(id) if id == settings.pro_price_id => "PRO",
        Some(id) if id == settings.team_price_id => "TEAM",
        other => {
            tracing::warn!(subscription = %subscription.id, price = ?other, "subscription price is not a configured plan; plan set to FREE");
            "FREE"
        }
    };
    let subscription_id = (!deleted).then_some(subscription.id.as_str());
    let event_at = chrono::DateTime::from_timestamp(event_created, 0)
        .ok_or_else(|| ApiError::invalid("created: not a timestamp"))?;
    let client = state.client().await?;
    let updated = client
        .execute(
            "UPDATE users SET plan = $2, stripe_subscription_id = $3,
                    stripe_subscription_event_at = $4, updated_at = now()
              WHERE stripe_customer_id = $1
                AND (stripe_subscription_event_at IS NULL OR stripe_subscription_event_at <= $4)
                AND ($5 = false OR stripe_subscription_id IS NULL OR stripe_subscription_id = $6)",
            &[
                &subscription.customer,
                &plan,
                &subscription_id,
                &event_at,
                &deleted,
                &subscription.id,
            ],
        )
        .await
        .map_err(database_failure)?;
    if updated == 1 {
        return Ok(Outcome::Applied);
    }
    let known = client
        .query_opt(
            "SELECT 1 FROM users WHERE stripe_customer_id = $1",
            &[&subscription.customer],
        )
        .await
        .map_err(database_failure)?
        .is_some();
    if known {
        return Ok(Outcome::Superseded);
    }
    tracing::warn!(customer = %subscription.customer, "subscription of a customer creditd does not know");
    Ok(Outcome::UnknownAccount)
}

/// The account whose top-up this payment intent paid, if any.
async fn topup_account(state: &State, payment_intent: &str) -> Result<Option<AccountId>, ApiError> {
    let client = state.client().await?;
    Ok(client
        .query_opt(
            "SELECT user_id FROM credit_transactions
              WHERE stripe_payment_id = $1 AND type = 'TOP_UP' AND direction = 'CREDIT'
              LIMIT 1",
            &[&payment_intent],
        )
        .await
        .map_err(database_failure)?
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
async fn refund(state: &State, charge: Charge) -> Result<Outcome, ApiError> {
    let Some(payment_intent) = charge.payment_intent.as_deref() else {
        return Ok(Outcome::NotATopup);
    };
    if currency_mismatch(state, Some(&charge.currency), "charge", &charge.id) {
        return Ok(Outcome::CurrencyMismatch);
    }
    let Some(account) = topup_account(state, payment_intent).await? else {
        if charge.metadata.get("type").map(String::as_str) == Some("credit_topup") {
            // A top-up whose credit has not landed yet (its checkout event
            // is still being retried): the refund must wait for it.
            return Err(ApiError::new(
                Code::Unavailable,
                "the top-up this charge paid is not credited yet; retry later",
            ));
        }
        tracing::warn!(charge = %charge.id, "refund of a charge that paid no top-up; ignored");
        return Ok(Outcome::NotATopup);
    };
    let target = Micros::from_cents(charge.amount_refunded)
        .map_err(|_| ApiError::invalid("amount_refunded: too large"))?;
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
    match state.engine.clawback(account, request).await {
        Ok(crate::ledger::Outcome { record: None, .. }) => Ok(Outcome::NothingToClawBack),
        Ok(crate::ledger::Outcome {
            record: Some(record),
            replayed,
        }) => applied(Ok(crate::ledger::Outcome { record, replayed }), "refund"),
        Err(error) => applied(Err(error), "refund"),
    }
}

/// A dispute's money movement, as Stripe reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Funds {
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
fn dispute_noted(dispute: Dispute) -> Result<Outcome, ApiError> {
    if dispute.status.starts_with("warning_") {
        return Ok(Outcome::Inquiry);
    }
    Ok(Outcome::Ignored)
}

/// Debits (withdrawn) or credits back (reinstated) the disputed amount,
/// each once per dispute. The withdrawal's key is `stripe:dispute:<id>`
/// (the key disputes were debited under before, so a dispute debited
/// then is not debited again), the reinstatement's
/// `stripe:dispute:<id>:reinstated`. A dispute of a top-up not credited
/// yet answers 503, so Stripe retries it after the credit.
async fn dispute_funds(state: &State, dispute: Dispute, funds: Funds) -> Result<Outcome, ApiError> {
    let Some(payment_intent) = dispute.payment_intent.as_deref() else {
        return Ok(Outcome::NotATopup);
    };
    if dispute.status.starts_with("warning_") {
        tracing::warn!(dispute = %dispute.id, status = %dispute.status, "funds event of an inquiry; no credits move");
        return Ok(Outcome::Inquiry);
    }
    if currency_mismatch(state, Some(&dispute.currency), "dispute", &dispute.id) {
        return Ok(Outcome::CurrencyMismatch);
    }
    let Some(account) = topup_account(state, payment_intent).await? else {
        return unknown_dispute_payment(state, &dispute, payment_intent).await;
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
    };
    let result = match funds {
        Funds::Withdrawn => state.engine.debit(account, posting).await,
        Funds::Reinstated => state.engine.credit(account, posting).await,
    };
    applied(result, "dispute")
}

/// A dispute of a payment creditd credited nothing for: a top-up whose
/// credit has not landed yet (503: Stripe retries it), or no top-up.
async fn unknown_dispute_payment(
    state: &State,
    dispute: &Dispute,
    payment_intent: &str,
) -> Result<Outcome, ApiError> {
    let Some(api) = state.stripe.as_ref() else {
        tracing::warn!(dispute = %dispute.id, "dispute of a payment that credited nothing (Stripe API not configured to check it); ignored");
        return Ok(Outcome::NotATopup);
    };
    if api
        .is_topup_payment(payment_intent)
        .await
        .map_err(stripe_failure)?
    {
        return Err(ApiError::new(
            Code::Unavailable,
            "the top-up this dispute is about is not credited yet; retry later",
        ));
    }
    tracing::warn!(dispute = %dispute.id, "dispute of a charge that paid no top-up; ignored");
    Ok(Outcome::NotATopup)
}
