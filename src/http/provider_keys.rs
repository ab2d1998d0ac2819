//! `/api/settings/api-keys`: a user's own provider keys (BYOK). Stored
//! sealed (see `crate::accounts::cipher`), never returned whole, never logged: reads show
//! only whether each key is set and its last 4 characters.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{JsonBody, SignedIn};
use super::state::State;
use super::views::{SavedKey, SavedKeys};
use crate::ledger::AccountId;
use crate::pricing::Provider;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/settings/api-keys", web::get().to(list))
        .route("/api/settings/api-keys", web::put().to(save))
        .route(
            "/api/settings/api-keys/{provider}",
            web::delete().to(remove),
        );
}

/// Shortest and longest key accepted.
const KEY_MIN_LEN: usize = 20;
const KEY_MAX_LEN: usize = 512;

/// Which provider keys the user saved (last 4 characters only).
#[utoipa::path(get, path = "/api/settings/api-keys", tag = "settings", security(("clerk" = [])),
    responses(
        (status = 200, description = "The saved keys", body = super::views::SavedKeys),
        super::error::SessionAuth,
        (status = 500, description = "INTERNAL (a stored key does not open under byok.encryption_key)", body = super::error::ErrorBody),
        (status = 501, description = "BYOK_NOT_CONFIGURED", body = super::error::ErrorBody),
        super::error::LedgerUnavailable
    ))]
async fn list(state: State, SignedIn(clerk_id): SignedIn) -> Result<HttpResponse, ApiError> {
    state.cipher()?;
    let account = state.account(&clerk_id).await?;
    Ok(HttpResponse::Ok().json(summary(&state, account).await?))
}

async fn summary(state: &State, account: AccountId) -> Result<SavedKeys, ApiError> {
    let stored = state.stored_keys(account).await?;
    let saved = |provider: Provider| -> Result<SavedKey, ApiError> {
        let last4 = match stored.get(provider) {
            Some(sealed) => {
                let key = state.open_key(account, provider, sealed)?;
                let chars: Vec<char> = key.expose().chars().collect();
                Some(
                    chars[chars.len().saturating_sub(4)..]
                        .iter()
                        .collect::<String>(),
                )
            }
            None => None,
        };
        Ok(SavedKey {
            set: last4.is_some(),
            last4,
        })
    };
    Ok(SavedKeys {
        anthropic: saved(Provider::Anthropic)?,
        openai: saved(Provider::Openai)?,
        has_byok: stored.any(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct SaveKeys {
    anthropic_key: Option<String>,
    openai_key: Option<String>,
}

/// Checks a key's shape; the message names the field, never the key.
fn check_key(field: &str, provider: Provider, key: &str) -> Result<(), ApiError> {
    let prefix = match provider {
        Provider::Anthropic => "sk-ant-",
        Provider::Openai => "sk-",
    };
    let fail = |why: &str| Err(ApiError::invalid(format!("field `{field}`: {why}")));
    if !(KEY_MIN_LEN..=KEY_MAX_LEN).contains(&key.len()) {
        return fail(&format!(
            "must be {KEY_MIN_LEN} to {KEY_MAX_LEN} characters long"
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return fail("may contain only letters, digits, `-` and `_`");
    }
    if !key.starts_with(prefix) {
        return fail(&format!("must start with `{prefix}`"));
    }
    if provider == Provider::Openai && key.starts_with("sk-ant-") {
        return fail("this is an Anthropic key; send it as `anthropicKey`");
    }
    Ok(())
}

/// Saves the user's own provider keys (sealed with AES-256-GCM).
#[utoipa::path(put, path = "/api/settings/api-keys", tag = "settings", security(("clerk" = [])),
    request_body = SaveKeys,
    responses(
        (status = 200, description = "The saved keys after", body = super::views::SavedKeys, links(
            ("SavedKeysList" = (operation_id = "list", description = "The keys just saved")),
            ("RemoveSavedOpenaiKey" = (operation_id = "remove", parameters(("provider" = "openai")), description = "Delete the OpenAI key"))
        )),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::BodyErrors,
        super::error::Internal,
        (status = 501, description = "BYOK_NOT_CONFIGURED", body = super::error::ErrorBody),
        super::error::LedgerUnavailable
    ))]
async fn save(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(keys): JsonBody<SaveKeys>,
) -> Result<HttpResponse, ApiError> {
    let cipher = state.cipher()?;
    if keys.anthropic_key.is_none() && keys.openai_key.is_none() {
        return Err(ApiError::invalid(
            "request body: give `anthropicKey`, `openaiKey` or both",
        ));
    }
    let account = state.account(&clerk_id).await?;
    let mut sealed = [None, None];
    for (slot, field, provider, key) in [
        (0, "anthropicKey", Provider::Anthropic, &keys.anthropic_key),
        (1, "openaiKey", Provider::Openai, &keys.openai_key),
    ] {
        if let Some(key) = key {
            check_key(field, provider, key)?;
            sealed[slot] = Some(
                cipher
                    .seal(account, provider, key)
                    .map_err(|e| ApiError::internal("seal a BYOK key", e))?,
            );
        }
    }
    let [anthropic, openai] = sealed;
    state.provider_keys.save(account, anthropic, openai).await?;
    state.user_keys_changed(account).await;
    Ok(HttpResponse::Ok().json(summary(&state, account).await?))
}

/// Deletes one saved provider key.
#[utoipa::path(delete, path = "/api/settings/api-keys/{provider}", tag = "settings", security(("clerk" = [])),
    params(("provider" = Provider, Path, description = "`anthropic` or `openai`")),
    responses(
        (status = 200, description = "The saved keys after", body = super::views::SavedKeys),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        (status = 501, description = "BYOK_NOT_CONFIGURED", body = super::error::ErrorBody),
        super::error::LedgerUnavailable
    ))]
async fn remove(
    state: State,
    SignedIn(clerk_id): SignedIn,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.cipher()?;
    let provider = match path.as_str() {
        "anthropic" => Provider::Anthropic,
        "openai" => Provider::Openai,
        _ => {
            return Err(ApiError::invalid(
                "field `provider`: must be `anthropic` or `openai`",
            ))
        }
    };
    let account = state.account(&clerk_id).await?;
    state.provider_keys.remove(account, provider).await?;
    state.user_keys_changed(account).await;
    Ok(HttpResponse::Ok().json(summary(&state, account).await?))
}
