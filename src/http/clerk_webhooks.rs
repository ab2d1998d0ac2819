//! `POST /api/webhooks/clerk`: Clerk's user events, signed with Svix.
//! `user.created` creates the user (or brings a deleted one back) and
//! grants the signup bonus (once per person: see `credits::grant_signup_bonus`,
//! shared with `claim-bonus`); `user.updated` keeps email and name;
//! `user.deleted` marks the user deleted (401 `ACCOUNT_DELETED` from then
//! on) and keeps the ledger.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::error::{parse_json, ApiError, Code};
use super::stripe::{already_processed, count, record_processed, Outcome};
use super::{read_body, State};
use crate::ledger::AccountId;
use crate::svix::{self, SvixHeaders};

/// `processed_webhook_events.source` of Clerk's events.
const SOURCE: &str = "clerk";
const HANDLED: &[&str] = &["user.created", "user.updated", "user.deleted"];

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/webhooks/clerk", web::post().to(webhook));
}

#[derive(Debug, Deserialize)]
struct ClerkEvent {
    #[serde(rename = "type")]
    kind: String,
    data: serde_json::Value,
}

#[derive(Debug, Deserialize)]
struct ClerkUser {
    id: String,
    #[serde(default)]
    email_addresses: Vec<EmailAddress>,
    #[serde(default)]
    primary_email_address_id: Option<String>,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct EmailAddress {
    id: String,
    email_address: String,
    #[serde(default)]
    verification: Option<Verification>,
}

#[derive(Debug, Deserialize)]
struct Verification {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DeletedUser {
    id: String,
}

/// A stored text of a Clerk event, checked: no control characters, not
/// over-long; else 400 naming the field.
fn check_field(field: &str, value: &str) -> Result<(), ApiError> {
    crate::ledger::check_text(field, value).map_err(|_| {
        ApiError::invalid(format!(
            "field `data.{field}`: must not contain control characters and be at most {} bytes",
            crate::ledger::TEXT_MAX_BYTES
        ))
    })
}

impl ClerkUser {
    /// Every text of the user that is stored, checked before anything is.
    fn check(&self) -> Result<(), ApiError> {
        check_field("id", &self.id)?;
        for address in &self.email_addresses {
            check_field("email_addresses.email_address", &address.email_address)?;
        }
        for (field, value) in [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("image_url", &self.image_url),
        ] {
            if let Some(value) = value {
                check_field(field, value)?;
            }
        }
        Ok(())
    }

    fn primary_email(&self) -> Option<&str> {
        let primary = self.primary_email_address_id.as_deref()?;
        self.email_addresses
            .iter()
            .find(|address| address.id == primary)
            .map(|address| address.email_address.as_str())
    }

    /// The primary email as the signup bonus knows a person by: verified
    /// (an address Clerk reports as not verified names nobody yet),
    /// trimmed and lowercased, then hashed so no address sits in a key.
    fn bonus_email_hash(&self) -> Option<String> {
        let primary = self.primary_email_address_id.as_deref()?;
        let address = self
            .email_addresses
            .iter()
            .find(|address| address.id == primary)?;
        let verified = address
            .verification
            .as_ref()
            .and_then(|v| v.status.as_deref())
            .is_none_or(|status| status == "verified");
        verified
            .then(|| super::credits::email_hash(&address.email_address))
            .flatten()
    }

    fn name(&self) -> Option<String> {
        let parts: Vec<&str> = [&self.first_name, &self.last_name]
            .into_iter()
            .flatten()
            .map(|part| part.trim())
            .filter(|part| !part.is_empty())
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
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
        (status = 200, description = "Taken (or already taken)", body = super::openapi::Received),
        (status = 400, description = "INVALID_REQUEST (bad signature or payload)", body = super::openapi::ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT (the body did not arrive in time)", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 429, description = "RATE_LIMITED (Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (not configured, database unavailable: Svix retries)", body = super::openapi::ErrorBody)
    ))]
async fn webhook(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let settings = &state.settings.clerk_webhook;
    if settings.signing_secret.is_empty() {
        return Err(ApiError::new(
            Code::Unavailable,
            "Clerk webhooks are not configured (clerk_webhook.signing_secret)",
        ));
    }
    let body = read_body(payload, &state.settings.server).await?;
    let headers = SvixHeaders {
        id: header(&request, "svix-id"),
        timestamp: header(&request, "svix-timestamp"),
        signature: header(&request, "svix-signature"),
    };
    let now = chrono::Utc::now().timestamp();
    match svix::verify(
        settings.signing_secret.expose(),
        headers,
        &body,
        settings.tolerance_s,
        now,
    ) {
        Ok(()) => {}
        Err(svix::SvixError::BadSecret) => {
            return Err(ApiError::internal(
                "clerk webhook",
                "clerk_webhook.signing_secret is not whsec_ followed by base64",
            ))
        }
        Err(error) => {
            count(SOURCE, "", HANDLED, "invalid_signature");
            return Err(ApiError::invalid(error.to_string()));
        }
    }
    let event_id = headers.id.unwrap_or_default();
    let event: ClerkEvent = parse_json(&body)?;
    if already_processed(&state, SOURCE, event_id).await? {
        count(SOURCE, &event.kind, HANDLED, "duplicate");
        return Ok(HttpResponse::Ok().json(json!({ "received": true, "duplicate": true })));
    }
    let outcome = match dispatch(&state, &event).await {
        Ok(outcome) => outcome,
        Err(error) => {
            count(SOURCE, &event.kind, HANDLED, "failed");
            tracing::warn!(event = %event_id, kind = %event.kind, %error, "Clerk event not processed");
            return Err(error);
        }
    };
    record_processed(&state, SOURCE, event_id, &event.kind).await?;
    count(SOURCE, &event.kind, HANDLED, outcome.as_str());
    Ok(HttpResponse::Ok().json(json!({ "received": true })))
}

fn data<T: DeserializeOwned>(event: &ClerkEvent) -> Result<T, ApiError> {
    serde_json::from_value(event.data.clone())
        .map_err(|e| ApiError::invalid(format!("{} event: data: {e}", event.kind)))
}

async fn dispatch(state: &State, event: &ClerkEvent) -> Result<Outcome, ApiError> {
    match event.kind.as_str() {
        "user.created" => {
            let user: ClerkUser = data(event)?;
            user.check()?;
            let account = upsert_user(state, &user, true).await?;
            grant_signup_bonus(state, account).await
        }
        "user.updated" => {
            let user: ClerkUser = data(event)?;
            user.check()?;
            upsert_user(state, &user, false).await?;
            Ok(Outcome::Applied)
        }
        "user.deleted" => {
            let user: DeletedUser = data(event)?;
            check_field("id", &user.id)?;
            delete_user(state, &user).await
        }
        _ => Ok(Outcome::Ignored),
    }
}

/// Creates the user, or brings email, name and picture up to date;
/// `created` (Clerk's `user.created`) also brings a deleted user back.
async fn upsert_user(
    state: &State,
    user: &ClerkUser,
    created: bool,
) -> Result<AccountId, ApiError> {
    let email = user.primary_email();
    let email_hash = user.bonus_email_hash();
    let name = user.name();
    let _turn = state.user_turn(&user.id).await;
    let client = state.client().await?;
    let row = client
        .query_one(
            "INSERT INTO users (clerk_id, email, name, image_url, email_hash)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (clerk_id) DO UPDATE
                SET email = EXCLUDED.email, name = EXCLUDED.name,
                    image_url = EXCLUDED.image_url, email_hash = EXCLUDED.email_hash,
                    deleted_at = CASE WHEN $6 THEN NULL ELSE users.deleted_at END,
                    updated_at = now()
             RETURNING id, deleted_at IS NOT NULL",
            &[
                &user.id,
                &email,
                &name,
                &user.image_url,
                &email_hash,
                &created,
            ],
        )
        .await
        .map_err(|e| ApiError::internal("clerk user upsert", e))?;
    let account = AccountId(row.get(0));
    state.user_deletion_changed(&user.id, account, row.get(1));
    client
        .execute(
            "INSERT INTO credit_balances (user_id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&account.0],
        )
        .await
        .map_err(|e| ApiError::internal("clerk user balance row", e))?;
    Ok(account)
}

/// The signup bonus, as `claim-bonus` grants it: once per person.
async fn grant_signup_bonus(state: &State, account: AccountId) -> Result<Outcome, ApiError> {
    Ok(
        match super::credits::grant_signup_bonus(state, account).await? {
            super::credits::Bonus::Granted(outcome) if outcome.replayed => Outcome::Replayed,
            super::credits::Bonus::Granted(_) => Outcome::Applied,
            super::credits::Bonus::TakenByAnotherAccount => Outcome::BonusAlreadyClaimed,
        },
    )
}

/// Marks the user deleted; the ledger stays. The email is released so the
/// address can sign up again as a new user.
/// From now on the user's tokens get 401 `ACCOUNT_DELETED` (the cache
/// learns it under the user's turn, so no lookup in flight can undo it).
async fn delete_user(state: &State, user: &DeletedUser) -> Result<Outcome, ApiError> {
    let _turn = state.user_turn(&user.id).await;
    let client = state.client().await?;
    let updated = client
        .query_opt(
            "UPDATE users SET deleted_at = now(), email = NULL, updated_at = now()
              WHERE clerk_id = $1 AND deleted_at IS NULL
             RETURNING id",
            &[&user.id],
        )
        .await
        .map_err(|e| ApiError::internal("clerk user delete", e))?;
    Ok(match updated {
        Some(row) => {
            state.user_deletion_changed(&user.id, AccountId(row.get(0)), true);
            Outcome::Applied
        }
        None => Outcome::Ignored,
    })
}
