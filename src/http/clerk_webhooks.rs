//! `POST /api/webhooks/clerk`: Clerk's user events, signed with Svix (see
//! `crate::clerk` for what each event does).

use actix_web::{web, HttpRequest, HttpResponse};

use super::body::read_body;
use super::error::{parse_json, ApiError, Code};
use super::state::State;
use super::views::Received;
use crate::clerk::svix::{self, SvixHeaders};
use crate::clerk::users::{ClerkEffects, HANDLED};
use crate::clerk::{ClerkEvent, EventError};
use crate::webhooks::{self, Source, WebhookOutcome};

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
        (status = 200, description = "Taken (or already taken)", body = super::views::Received),
        (status = 400, description = "INVALID_REQUEST (bad signature or payload)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        super::error::RateLimited,
        super::error::Internal,
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
    let client = state.client().await?;
    let processed = webhooks::already_processed(&**client, SOURCE, event_id).await;
    drop(client);
    if processed? {
        webhooks::count(SOURCE, &event.kind, HANDLED, "duplicate");
        return Ok(HttpResponse::Ok().json(Received::duplicate()));
    }
    let outcome = match dispatch(&state, &event).await {
        Ok(outcome) => outcome,
        Err(error) => {
            webhooks::count(SOURCE, &event.kind, HANDLED, "failed");
            tracing::warn!(event = %event_id, kind = %event.kind, %error, "Clerk event not processed");
            return Err(error);
        }
    };
    let client = state.client().await?;
    webhooks::record_processed(&**client, SOURCE, event_id, &event.kind).await?;
    webhooks::count(SOURCE, &event.kind, HANDLED, outcome.as_str());
    Ok(HttpResponse::Ok().json(Received::taken()))
}

/// Parses the event by type and applies it.
async fn dispatch(state: &State, event: &ClerkEvent) -> Result<WebhookOutcome, ApiError> {
    let parsed = event.parse().map_err(event_failure)?;
    let effects = ClerkEffects {
        users: &state.users,
        engine: &state.engine,
        pool: &state.pool,
        signup_bonus: state.signup_bonus,
    };
    Ok(parsed.apply(effects).await?)
}

fn event_failure(error: EventError) -> ApiError {
    match error {
        EventError::Invalid(message) => ApiError::invalid(message),
        EventError::Ledger(error) => error.into(),
    }
}
