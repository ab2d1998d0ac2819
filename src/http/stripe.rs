//! Money in through Stripe: `POST /api/credits/topup` opens a Checkout
//! Session; `POST /api/webhooks/stripe` hears what Stripe did (see
//! `crate::stripe::webhook` for each event's effect). The event id is
//! recorded only after its effect committed, so a failure (answered 5xx,
//! retried by Stripe) is never taken for done.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::error::{parse_json, ApiError, Code};
use super::{read_body, State};
use crate::stripe::events::Event;
use crate::stripe::webhook::{StripeEvent, HANDLED};
use crate::stripe::{signature, StripeCallError, StripeError};
use crate::webhooks::{self, Delivery, Effect, Received, Source};

const SOURCE: Source = Source::Stripe;

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
    let clerk_id = state.authenticate(&request).await?;
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
    let api = state.stripe.as_deref().ok_or_else(|| {
        ApiError::new(
            Code::Unavailable,
            "top-ups are not available: Stripe is not configured (stripe.secret_key)",
        )
    })?;
    let account = state.account(&clerk_id).await?;
    state.limits.topup(account)?;
    let session = state
        .topups
        .open_session(api, account, &clerk_id, amount)
        .await
        .map_err(stripe_error)?;
    Ok(HttpResponse::Ok().json(json!({ "url": session.url, "sessionId": session.id })))
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

fn stripe_error(error: StripeError) -> ApiError {
    match error {
        StripeError::Invalid(message) => ApiError::invalid(message),
        StripeError::NotCreditedYet(message) => ApiError::new(Code::Unavailable, message),
        StripeError::Call(error) => stripe_failure(error),
        StripeError::Ledger(error) => error.into(),
        StripeError::Db(error) => error.into(),
    }
}

/// Parses the event by type and applies it.
async fn dispatch(
    state: &State,
    event: &Event,
) -> Result<Effect<crate::webhooks::Outcome, ApiError>, ApiError> {
    let parsed = StripeEvent::parse(event).map_err(stripe_error)?;
    let effect = parsed
        .apply(&state.stripe_effects)
        .await
        .map_err(stripe_error)?;
    Ok(effect.map_err(stripe_error))
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
        webhooks::count(SOURCE, "", HANDLED, "invalid_signature");
        return Err(ApiError::invalid(error.to_string()));
    }
    let event: Event = parse_json(&body)?;
    let delivery = Delivery {
        source: SOURCE,
        event_id: &event.id,
        kind: &event.kind,
    };
    let outcome = match state
        .inbox
        .receive(delivery, || dispatch(&state, &event))
        .await
    {
        Ok(Received::Duplicate) => {
            webhooks::count(SOURCE, &event.kind, HANDLED, "duplicate");
            return Ok(HttpResponse::Ok().json(json!({ "received": true, "duplicate": true })));
        }
        Ok(Received::Applied(outcome)) => outcome,
        Err(error) => {
            webhooks::count(SOURCE, &event.kind, HANDLED, "failed");
            tracing::warn!(event = %event.id, kind = %event.kind, %error, "Stripe event not processed");
            return Err(error);
        }
    };
    webhooks::count(SOURCE, &event.kind, HANDLED, outcome.as_str());
    tracing::info!(event = %event.id, kind = %event.kind, outcome = outcome.as_str(), "Stripe event processed");
    Ok(HttpResponse::Ok().json(json!({ "received": true })))
}
