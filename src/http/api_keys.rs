//! `/api/credits/api-keys`: a person's keys for the gateway (`/v1/*`):
//! made (the secret shown once), listed with what each spent, revoked.
//! Only a Clerk session manages keys; a key itself opens `/v1/*` only.
//! (The user's own provider keys, BYOK, are `/api/settings/api-keys`.)

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{ApiError, Code};
use super::extract::{Account, JsonBody};
use super::state::State;
use super::views::{ApiKeyView, ApiKeysView, CreatedApiKeyView};
use crate::api_keys::{ApiKeyError, NewKey, NAME_MAX_BYTES};
use crate::money::Micros;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/api-keys", web::get().to(list))
        .route("/api/credits/api-keys", web::post().to(create))
        .route("/api/credits/api-keys/{id}", web::delete().to(revoke));
}

/// A key to make: its name, an optional spend limit in euros (a decimal
/// number or string, at most 6 decimals) and an optional expiry.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct NewKeyBody {
    name: String,
    /// Euros, e.g. `25` or `"12.50"`; absent or null: no limit.
    #[schema(value_type = Option<String>)]
    spend_limit_eur: Option<Box<RawValue>>,
    /// RFC 3339, in the future; absent or null: never.
    expires_at: Option<DateTime<Utc>>,
}

impl NewKeyBody {
    fn parse(self, now: DateTime<Utc>) -> Result<NewKey, ApiError> {
        let name = self.name.trim().to_owned();
        if name.is_empty() || name.len() > NAME_MAX_BYTES {
            return Err(ApiError::invalid(format!(
                "field `name`: must be 1 to {NAME_MAX_BYTES} bytes long"
            )));
        }
        if let Some(problem) = crate::text::problem(&name) {
            return Err(ApiError::invalid(format!("field `name`: {problem}")));
        }
        let spend_limit = match self.spend_limit_eur {
            Some(raw) if raw.get() != "null" => Some(euros(raw.get())?),
            _ => None,
        };
        if self.expires_at.is_some_and(|at| at <= now) {
            return Err(ApiError::invalid(
                "field `expiresAt`: must be in the future",
            ));
        }
        Ok(NewKey {
            name,
            spend_limit,
            expires_at: self.expires_at,
        })
    }
}

/// A positive amount of euros, read exactly from the JSON text (a number
/// or a string holding one), never through a float.
fn euros(text: &str) -> Result<Micros, ApiError> {
    let text = text.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    match Micros::parse_decimal(text) {
        Ok(amount) if amount.is_positive() => Ok(amount),
        Ok(_) => Err(ApiError::invalid(
            "field `spendLimitEur`: must be greater than 0",
        )),
        Err(problem) => Err(ApiError::invalid(format!(
            "field `spendLimitEur`: not an amount of euros ({problem})"
        ))),
    }
}

impl From<ApiKeyError> for ApiError {
    fn from(error: ApiKeyError) -> ApiError {
        match error {
            ApiKeyError::TooMany => ApiError::new(Code::Conflict, error.to_string()),
            ApiKeyError::NotFound => ApiError::not_found(error.to_string()),
            ApiKeyError::Refused(reason) => ApiError::unauthorized(reason),
            ApiKeyError::Db(error) => error.into(),
        }
    }
}

/// Makes a key; the answer is the only place its secret ever appears.
#[utoipa::path(post, path = "/api/credits/api-keys", operation_id = "createApiKey", tag = "api-keys", security(("clerk" = [])),
    request_body = NewKeyBody,
    responses(
        (status = 201, description = "The key, with its secret `key` (shown once)", body = super::views::CreatedApiKeyView),
        super::error::Invalid,
        super::error::SessionAuth,
        (status = 409, description = "CONFLICT (50 live keys already)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        super::error::LedgerUnavailable
    ))]
async fn create(
    state: State,
    Account(account): Account,
    JsonBody(asked): JsonBody<NewKeyBody>,
) -> Result<HttpResponse, ApiError> {
    let new = asked.parse(state.engine.clock().now())?;
    let created = state.api_keys.create(account, new).await?;
    Ok(HttpResponse::Created().json(CreatedApiKeyView {
        key: created.secret,
        api_key: ApiKeyView::from(&created.key),
    }))
}

/// The account's live keys, newest first, with what each spent.
#[utoipa::path(get, path = "/api/credits/api-keys", operation_id = "listApiKeys", tag = "api-keys", security(("clerk" = [])),
    responses(
        (status = 200, description = "The keys (never their secret)", body = super::views::ApiKeysView),
        super::error::SessionAuth,
        super::error::LedgerUnavailable
    ))]
async fn list(state: State, Account(account): Account) -> Result<HttpResponse, ApiError> {
    let keys = state.api_keys.list(account).await?;
    Ok(HttpResponse::Ok().json(ApiKeysView {
        keys: keys.iter().map(ApiKeyView::from).collect(),
    }))
}

/// Revokes a key: the next call with it answers 401.
#[utoipa::path(delete, path = "/api/credits/api-keys/{id}", operation_id = "revokeApiKey", tag = "api-keys", security(("clerk" = [])),
    params(("id" = String, Path, description = "The key's id")),
    responses(
        (status = 204, description = "Revoked"),
        super::error::Invalid,
        super::error::SessionAuth,
        (status = 404, description = "NOT_FOUND (no such live key of the account)", body = super::error::ErrorBody),
        super::error::LedgerUnavailable
    ))]
async fn revoke(
    state: State,
    Account(account): Account,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid("field `id`: not an API key id"))?;
    state.api_keys.revoke(account, id).await?;
    Ok(HttpResponse::NoContent().finish())
}
