//! `GET`/`PUT /api/credits/auto-recharge`: the user's auto-recharge (see
//! `crate::recharge`). Enabling needs a card saved by a top-up.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::error::{parse_json, ApiError, Code};
use super::{read_body, State};
use crate::ledger::AccountId;
use crate::money::Micros;
use crate::recharge::store::{Saved, Settings};
use crate::recharge::RechargeConfig;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/auto-recharge", web::get().to(show))
        .route("/api/credits/auto-recharge", web::put().to(save));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct AutoRechargeRequest {
    enabled: bool,
    /// Cents: a recharge starts when spending takes the available balance
    /// under this (money taken back, a refund or a dispute, never does).
    threshold_cents: i64,
    /// Cents charged to the saved card each time.
    amount_cents: i64,
}

async fn view(state: &State, account: AccountId) -> Result<serde_json::Value, ApiError> {
    let page = state.auto_recharges.page(account, Utc::now()).await?;
    let settings = page.settings;
    let credits = &state.settings.credits;
    Ok(json!({
        "enabled": settings.as_ref().is_some_and(|s| s.enabled),
        "thresholdCents": settings.as_ref().map(|s| s.threshold_cents),
        "amountCents": settings.as_ref().map(|s| s.amount_cents),
        "disabledReason": settings.as_ref().and_then(|s| s.disabled_reason.clone()),
        "hasSavedCard": page.has_card,
        "monthTotalCents": page.month_total_cents,
        "monthlyMaxCents": credits.auto_recharge_monthly_max_cents,
        "limits": {
            "minAmountCents": credits.auto_recharge_min_amount_cents,
            "maxAmountCents": credits.auto_recharge_max_amount_cents,
            "minThresholdCents": credits.auto_recharge_min_threshold_cents,
            "maxThresholdCents": credits.auto_recharge_max_threshold_cents,
        },
    }))
}

/// The user's auto-recharge: settings, `disabledReason` when creditd
/// switched it off, this month's auto-recharged total.
#[utoipa::path(get, path = "/api/credits/auto-recharge", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "The settings and this month's total (cents)"),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database unavailable)", body = super::openapi::ErrorBody)
    ))]
pub(super) async fn show(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    Ok(HttpResponse::Ok().json(view(&state, account).await?))
}

/// Saves the user's auto-recharge.
#[utoipa::path(put, path = "/api/credits/auto-recharge", tag = "credits", security(("clerk" = [])),
    request_body = AutoRechargeRequest,
    responses(
        (status = 200, description = "The saved settings, as GET shows them"),
        (status = 400, description = "INVALID_REQUEST (the message names the field)", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 409, description = "CONFLICT (enabling needs a card saved by a top-up)", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database unavailable)", body = super::openapi::ErrorBody)
    ))]
pub(super) async fn save(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let body = read_body(payload, &state.settings.server).await?;
    if !parse_json::<serde_json::Value>(&body)?.is_object() {
        return Err(ApiError::invalid("request body: expected a JSON object"));
    }
    let AutoRechargeRequest {
        enabled,
        threshold_cents,
        amount_cents,
    } = parse_json(&body)?;
    let credits = &state.settings.credits;
    let within = |field: &str, value: i64, min: i64, max: i64| {
        if value < min || value > max {
            Err(ApiError::invalid(format!(
                "{field}: must be between {min} and {max}"
            )))
        } else {
            Ok(())
        }
    };
    within(
        "thresholdCents",
        threshold_cents,
        credits.auto_recharge_min_threshold_cents,
        credits.auto_recharge_max_threshold_cents,
    )?;
    within(
        "amountCents",
        amount_cents,
        credits.auto_recharge_min_amount_cents,
        credits.auto_recharge_max_amount_cents,
    )?;
    let threshold = Micros::from_cents(threshold_cents)
        .map_err(|_| ApiError::invalid("thresholdCents: out of range"))?;
    let account = state.account(&clerk_id).await?;
    let settings = Settings {
        enabled,
        threshold_cents,
        amount_cents,
        disabled_reason: None,
    };
    if state
        .auto_recharges
        .save(account, &settings, Utc::now())
        .await?
        == Saved::NeedsCard
    {
        return Err(ApiError::new(
            Code::Conflict,
            "auto-recharge needs a saved card: make a top-up first, its card is kept for auto-recharges",
        ));
    }
    let config = enabled.then_some(RechargeConfig {
        threshold,
        amount_cents,
    });
    state.engine.set_auto_recharge(account, config).await?;
    Ok(HttpResponse::Ok().json(view(&state, account).await?))
}
