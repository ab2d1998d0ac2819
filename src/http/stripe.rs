//! `POST /api/webhooks/stripe` hears what Stripe did (see
//! `crate::payments::webhook` for each event's effect). The event id is
//! recorded only after its effect committed, so a failure (answered 5xx,
//! retried by Stripe) is never taken for done.

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_body;
use super::error::{parse_json, ApiError, Code};
use super::state::State;
use super::views::WebhookReceipt;
use crate::payments::webhook::{StripeEvent, HANDLED};
use crate::stripe::events::Event;
use crate::stripe::signature;
use crate::webhooks::{self, Delivery, Effect, Source};

const SOURCE: Source = Source::Stripe;

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/webhooks/stripe", web::post().to(webhook));
}

/// Parses the event by type and applies it.
async fn dispatch(
    state: &State,
    event: &Event,
) -> Result<Effect<crate::webhooks::WebhookOutcome, ApiError>, ApiError> {
    let parsed = StripeEvent::parse(event).map_err(ApiError::from)?;
    let effect = parsed
        .apply(&state.stripe_effects)
        .await
        .map_err(ApiError::from)?;
    Ok(effect.map_err(ApiError::from))
}

/// Stripe's events, `Stripe-Signature` checked on the raw body.
#[utoipa::path(post, path = "/api/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "t=<unix seconds>,v1=<HMAC-SHA256 hex>")),
    request_body(content = Object, description = "A Stripe event"),
    responses(
        (status = 200, description = "Taken (or already taken)", body = super::views::WebhookReceipt),
        super::error::WebhookErrors,
        (status = 503, description = "UNAVAILABLE (not configured, a top-up not credited yet, database unavailable: Stripe retries)", body = super::error::ErrorBody)
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
    let received = state
        .inbox
        .receive(delivery, || dispatch(&state, &event))
        .await;
    let received = webhooks::counted(delivery, HANDLED, received)?;
    Ok(HttpResponse::Ok().json(WebhookReceipt::of(&received)))
}
