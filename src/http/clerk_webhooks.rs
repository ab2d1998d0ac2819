//! `POST /api/webhooks/clerk`: Clerk's user events, signed with Svix (see
//! `crate::clerk` for what each event does).

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_body;
use super::error::{parse_json, ApiError, Code};
use super::state::State;
use super::views::WebhookReceipt;
use crate::accounts::clerk_events::HANDLED;
use crate::accounts::{ClerkEvent, EventError};
use crate::clerk::svix::{self, SvixHeaders};
use crate::webhooks::{self, Delivery, Received, Source, WebhookOutcome};

const SOURCE: Source = Source::Clerk;

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/webhooks/clerk", web::post().to(webhook));
}

fn header<'a>(request: &'a HttpRequest, name: &str) -> Option<&'a str> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
}

/// Clerk's user events, Svix signature checked on the raw body.
#[utoipa::path(post, path = "/api/webhooks/clerk", tag = "webhooks",
    params(
        ("svix-id" = String, Header, description = "Message id"),
        ("svix-timestamp" = String, Header, description = "Unix seconds"),
        ("svix-signature" = String, Header, description = "v1,<HMAC-SHA256 base64> (space-separated list)"),
    ),
    request_body(content = Object, description = "A Clerk event"),
    responses(
        (status = 200, description = "Taken (or already taken)", body = super::views::WebhookReceipt),
        super::error::WebhookErrors,
        (status = 503, description = "UNAVAILABLE (not configured, database unavailable: Svix retries)", body = super::error::ErrorBody)
    ))]
async fn webhook(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings.clerk_webhook;
    let Some(signing_key) = &state.clerk_webhook_key else {
        return Err(ApiError::new(
            Code::Unavailable,
            "Clerk webhooks are not configured (clerk_webhook.signing_secret)",
        ));
    };
    let body = read_body(payload, &state.settings.server).await?;
    let headers = SvixHeaders {
        id: header(&request, "svix-id"),
        timestamp: header(&request, "svix-timestamp"),
        signature: header(&request, "svix-signature"),
    };
    let now = chrono::Utc::now().timestamp();
    if let Err(error) = svix::verify_with(signing_key, headers, &body, settings.tolerance_s, now) {
        webhooks::count(SOURCE, "", HANDLED, "invalid_signature");
        return Err(ApiError::invalid(error.to_string()));
    }
    let event_id = headers.id.unwrap_or_default();
    let event: ClerkEvent = parse_json(&body)?;
    let delivery = Delivery {
        source: SOURCE,
        event_id,
        kind: &event.kind,
    };
    let received = webhooks::counted(delivery, HANDLED, receive(&state, delivery, &event).await)?;
    Ok(HttpResponse::Ok().json(WebhookReceipt::of(&received)))
}

/// Parses the event by type and applies it once: its user-row writes
/// commit with the event id in the inbox's transaction; then its follow-up
/// (the cache, the signup bonus keyed `bonus:signup:<user>`, the actor's
/// auto-recharge) runs, on a redelivery of a recorded id too, so a failure
/// between the commit and the follow-up loses nothing and, each step being
/// idempotent, applies nothing twice.
async fn receive(
    state: &State,
    delivery: Delivery<'_>,
    event: &ClerkEvent,
) -> Result<Received<WebhookOutcome>, ApiError> {
    let parsed = event.parse().map_err(event_failure)?;
    let redelivered = parsed.redelivered();
    let effects = state.clerk_effects.clone();
    let received = state
        .inbox
        .receive(delivery, || async move {
            Ok::<_, ApiError>(parsed.effect(effects).map_err::<ApiError>(ApiError::from))
        })
        .await?;
    Ok(match received {
        Received::Duplicate => {
            redelivered.run(&state.clerk_effects).await?;
            Received::Duplicate
        }
        Received::Applied(follow_up) => {
            Received::Applied(follow_up.run(&state.clerk_effects).await?)
        }
    })
}

fn event_failure(error: EventError) -> ApiError {
    match error {
        EventError::Invalid(message) => ApiError::invalid(message),
        EventError::Ledger(error) => error.into(),
    }
}
