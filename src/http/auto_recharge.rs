//! `GET`/`PUT /api/credits/auto-recharge`: the user's auto-recharge (see
//! `crate::recharge`). Enabling needs a card saved by a top-up.

use actix_web::{web, HttpResponse};
use chrono::Utc;
use serde::Deserialize;

use super::error::{ApiError, Code};
use super::extract::{Account, JsonBody, SignedIn};
use super::state::State;
use super::views::{AutoRechargeBounds, AutoRechargeView};
use crate::ledger::AccountId;
use crate::money::Micros;
use crate::recharge::store::{AutoRechargeSettings, Saved};
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

async fn view(state: &State, account: AccountId) -> Result<AutoRechargeView, ApiError> {
    let page = state.auto_recharges.page(account, Utc::now()).await?;
    let settings = page.settings;
    let credits = &state.settings.credits;
    Ok(AutoRechargeView {
        enabled: settings.as_ref().is_some_and(|s| s.enabled),
        threshold_cents: settings.as_ref().map(|s| s.threshold_cents),
        amount_cents: settings.as_ref().map(|s| s.amount_cents),
        disabled_reason: settings.as_ref().and_then(|s| s.disabled_reason.clone()),
        has_saved_card: page.has_card,
        month_total_cents: page.month_total_cents,
        monthly_max_cents: credits.auto_recharge_monthly_cents_max,
        limits: AutoRechargeBounds {
            min_amount_cents: credits.auto_recharge_amount_cents_min,
            max_amount_cents: credits.auto_recharge_amount_cents_max,
            min_threshold_cents: credits.auto_recharge_threshold_cents_min,
            max_threshold_cents: credits.auto_recharge_threshold_cents_max,
        },
    })
}

/// The user's auto-recharge: settings, `disabledReason` when creditd
/// switched it off, this month's auto-recharged total.
#[utoipa::path(get, path = "/api/credits/auto-recharge", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "The settings and this month's total (cents)", body = super::views::AutoRechargeView),
        super::error::SessionAuth,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn show(
    state: State,
    Account(account): Account,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(view(&state, account).await?))
}

/// Saves the user's auto-recharge.
#[utoipa::path(put, path = "/api/credits/auto-recharge", tag = "credits", security(("clerk" = [])),
    request_body = AutoRechargeRequest,
    responses(
        (status = 200, description = "The saved settings, as GET shows them", body = super::views::AutoRechargeView),
        super::error::Invalid,
        super::error::SessionAuth,
        (status = 409, description = "CONFLICT (enabling needs a card saved by a top-up)", body = super::error::ErrorBody),
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn save(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(AutoRechargeRequest {
        enabled,
        threshold_cents,
        amount_cents,
    }): JsonBody<AutoRechargeRequest>,
) -> Result<HttpResponse, ApiError> {
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
        credits.auto_recharge_threshold_cents_min,
        credits.auto_recharge_threshold_cents_max,
    )?;
    within(
        "amountCents",
        amount_cents,
        credits.auto_recharge_amount_cents_min,
        credits.auto_recharge_amount_cents_max,
    )?;
    let threshold = Micros::from_cents(threshold_cents)
        .map_err(|_| ApiError::invalid("thresholdCents: out of range"))?;
    let account = state.account(&clerk_id).await?;
    let settings = AutoRechargeSettings {
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
