//! Spending limits: `GET`/`PUT /api/credits/limits` for the account's owner,
//! `PUT /admin/accounts/{userId}/limits` for an operator (limits and the
//! ceilings the owner cannot raise). Every change goes through the
//! account's actor, which stores it before answering and enforces it on
//! every hold after it.

use actix_web::{web, HttpResponse};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use super::auth::clerk_id_from_operator;
use super::error::ApiError;
use super::extract::{Account, JsonBody, Operator, SignedIn};
use super::state::State;
use crate::ledger::{LimitsChange, SpendLimits, SpendingSnapshot, WindowSpend};
use crate::money::Micros;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/limits", web::get().to(show))
        .route("/api/credits/limits", web::put().to(set))
        .route("/admin/accounts/{userId}/limits", web::get().to(admin_show))
        .route("/admin/accounts/{userId}/limits", web::put().to(admin_set));
}

/// The owner's limits, in micros; `null` (or absent): no limit.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct OwnerLimits {
    daily_micros: Option<i64>,
    monthly_micros: Option<i64>,
}

/// Every limit of an account, in micros; `null` (or absent): none.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct AdminLimits {
    daily_micros: Option<i64>,
    monthly_micros: Option<i64>,
    daily_ceiling_micros: Option<i64>,
    monthly_ceiling_micros: Option<i64>,
    /// Why, for the operators' record (the console asks for it).
    reason: Option<String>,
}

/// One UTC window: the limit that applies (the lower of the owner's and
/// the ceiling), settled spend in it, and when it starts again from zero.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct WindowView {
    limit_micros: Option<i64>,
    spent_micros: i64,
    /// RFC 3339, UTC.
    resets_at: String,
}

/// An account's limits and spend.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct LimitsView {
    /// The owner's own limits.
    daily_micros: Option<i64>,
    monthly_micros: Option<i64>,
    /// Set by an administrator; the owner cannot set a limit above them.
    daily_ceiling_micros: Option<i64>,
    monthly_ceiling_micros: Option<i64>,
    /// Settled platform usage of the current UTC day and month.
    spent_today_micros: i64,
    spent_this_month_micros: i64,
    /// Chats in progress, counted against both windows until they settle.
    held_micros: i64,
    daily: WindowView,
    monthly: WindowView,
}

fn window_view(window: &WindowSpend) -> WindowView {
    WindowView {
        limit_micros: window.limit_micros.map(Micros::get),
        spent_micros: window.spent_micros.get(),
        resets_at: window.resets_at.to_rfc3339_opts(SecondsFormat::Secs, true),
    }
}

fn view(snapshot: &SpendingSnapshot) -> LimitsView {
    let limits = &snapshot.limits;
    LimitsView {
        daily_micros: limits.daily_micros.map(Micros::get),
        monthly_micros: limits.monthly_micros.map(Micros::get),
        daily_ceiling_micros: limits.daily_ceiling_micros.map(Micros::get),
        monthly_ceiling_micros: limits.monthly_ceiling_micros.map(Micros::get),
        spent_today_micros: snapshot.daily.spent_micros.get(),
        spent_this_month_micros: snapshot.monthly.spent_micros.get(),
        held_micros: snapshot.held_micros.get(),
        daily: window_view(&snapshot.daily),
        monthly: window_view(&snapshot.monthly),
    }
}

/// A limit as given: absent or null is none, else at least 0.
fn limit(field: &str, value: Option<i64>) -> Result<Option<Micros>, ApiError> {
    match value {
        None => Ok(None),
        Some(micros) if micros < 0 => Err(ApiError::invalid(format!(
            "field `{field}`: cannot be negative"
        ))),
        Some(micros) => Ok(Some(Micros::new(micros))),
    }
}

/// The account's spending limits and what each UTC window counts.
#[utoipa::path(get, path = "/api/credits/limits", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "Limits, ceilings and spend per window", body = LimitsView),
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
pub(super) async fn show(
    state: State,
    Account(account): Account,
) -> Result<HttpResponse, ApiError> {
    let snapshot = state.engine.spending(account).await?;
    Ok(HttpResponse::Ok().json(view(&snapshot)))
}

/// Sets the account's own daily and monthly limits (null: none). Stored
/// before the answer; every later chat is judged by them.
#[utoipa::path(put, path = "/api/credits/limits", tag = "credits", security(("clerk" = [])),
    request_body = OwnerLimits,
    responses(
        (status = 200, description = "The limits as stored", body = LimitsView),
        super::error::Invalid,
        super::error::SessionAuth,
        (status = 403, description = "FORBIDDEN (cookie-authenticated write from an origin not allowed)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        (status = 409, description = "CONFLICT (a limit above the ceiling an administrator set; the message names the field)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
pub(super) async fn set(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(asked): JsonBody<OwnerLimits>,
) -> Result<HttpResponse, ApiError> {
    let account = state.account(&clerk_id).await?;
    let change = LimitsChange::Owner {
        daily_micros: limit("dailyMicros", asked.daily_micros)?,
        monthly_micros: limit("monthlyMicros", asked.monthly_micros)?,
    };
    let snapshot = state.engine.set_limits(account, change).await?;
    Ok(HttpResponse::Ok().json(view(&snapshot)))
}

/// A user's limits, the ceilings an administrator set and the spend of
/// each window, as the user sees them.
#[utoipa::path(get, path = "/admin/accounts/{userId}/limits", tag = "admin", security(("admin" = [])),
    params(("userId" = String, Path, description = "Clerk user id")),
    responses(
        (status = 200, description = "Limits, ceilings and spend per window", body = LimitsView),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no such user; or no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
pub(super) async fn admin_show(
    state: State,
    _: Operator,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = clerk_id_from_operator(&path)?;
    let account = state.existing_account(&user).await?;
    let snapshot = state.engine.spending(account).await?;
    Ok(HttpResponse::Ok().json(view(&snapshot)))
}

/// Sets a user's limits and the ceilings the user cannot raise (every
/// field; null: none). A ceiling applies at once, whatever the user's own
/// limit: the lower of the two is enforced.
#[utoipa::path(put, path = "/admin/accounts/{userId}/limits", tag = "admin", security(("admin" = [])),
    params(("userId" = String, Path, description = "Clerk user id")),
    request_body = AdminLimits,
    responses(
        (status = 200, description = "The limits as stored", body = LimitsView),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured: the admin routes do not exist)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
pub(super) async fn admin_set(
    state: State,
    Operator(operator): Operator,
    path: web::Path<String>,
    JsonBody(asked): JsonBody<AdminLimits>,
) -> Result<HttpResponse, ApiError> {
    let user = clerk_id_from_operator(&path)?;
    let limits = SpendLimits {
        daily_micros: limit("dailyMicros", asked.daily_micros)?,
        monthly_micros: limit("monthlyMicros", asked.monthly_micros)?,
        daily_ceiling_micros: limit("dailyCeilingMicros", asked.daily_ceiling_micros)?,
        monthly_ceiling_micros: limit("monthlyCeilingMicros", asked.monthly_ceiling_micros)?,
    };
    if let Some(reason) = asked.reason.as_deref().map(str::trim) {
        if reason.is_empty() || reason.len() > 500 {
            return Err(ApiError::invalid("field `reason`: 1 to 500 characters"));
        }
        if let Some(problem) = crate::text::problem(reason) {
            return Err(ApiError::invalid(format!("field `reason`: {problem}")));
        }
    }
    let account = state.any_account(&user).await?;
    let snapshot = state
        .engine
        .set_limits(account, LimitsChange::Admin(limits))
        .await?;
    let reason = asked.reason.as_deref().map(str::trim);
    let action = crate::operators::Action {
        action: "limits",
        user_id: Some(user.as_str()),
        reason,
        detail: serde_json::json!({
            "dailyMicros": asked.daily_micros,
            "monthlyMicros": asked.monthly_micros,
            "dailyCeilingMicros": asked.daily_ceiling_micros,
            "monthlyCeilingMicros": asked.monthly_ceiling_micros,
        }),
    };
    state.operators.record(&operator, action).await?;
    Ok(HttpResponse::Ok().json(view(&snapshot)))
}
