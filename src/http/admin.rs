//! Operator routes under `/admin`, behind `Authorization: Bearer <admin.token>`,
//! a console session or a listed operator's Clerk session (`auth`). Users
//! are named by their Clerk id, as operators see them in Clerk. Every change
//! is recorded with the operator who made it (`crate::operators`).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::clerk_id_from_operator;
use super::error::ApiError;
use super::extract::{JsonBody, Operator};
use super::state::State;
use super::views::{
    Adjusted, AdminAccount, EventList, GrantView, HoldView, TransactionView, UsageView,
};
use crate::accounts::ClerkUserId;
use crate::ledger::{IdempotencyKey, Posting, TransactionType};
use crate::money::Micros;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/admin/accounts/{userId}/credits", web::post().to(adjust))
        .route("/admin/accounts", web::get().to(search))
        .route("/admin/accounts/{userId}", web::get().to(account))
        .route(
            "/admin/accounts/{userId}/auto-recharge/off",
            web::post().to(auto_recharge_off),
        )
        .route("/admin/platform", web::get().to(platform))
        .route("/admin/actions", web::get().to(actions))
        .route("/admin/reconcile", web::get().to(run_reconcile))
        .route("/admin/events", web::get().to(list_events))
        .route("/admin/emails", web::get().to(list_emails))
        .route(
            "/admin/events/{eventId}/redeliver",
            web::post().to(redeliver_event),
        );
}

/// What an admin credit or debit is recorded as: any other value is
/// refused by serde with a 400 naming the field `type`.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum AdjustmentType {
    Adjustment,
    /// A promotional credit: positive amounts only.
    PromoBonus,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct Adjustment {
    amount_micros: i64,
    key: String,
    reason: String,
    /// ADJUSTMENT when absent.
    #[serde(rename = "type")]
    kind: Option<AdjustmentType>,
    /// When the credit's grant expires (credits of type ADJUSTMENT or
    /// PROMO_BONUS only; RFC 3339, in the future). None: never.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Credits (positive amount) or debits (negative) a user, idempotent by key.
#[utoipa::path(post, path = "/admin/accounts/{userId}/credits", tag = "admin", security(("admin" = [])),
    params(("userId" = String, Path, description = "Clerk user id")),
    request_body = Adjustment,
    responses(
        (status = 201, description = "Applied now", body = super::views::Adjusted, links(
            ("AdjustedAccount" = (operation_id = "account", parameters(("userId" = "$request.path.userId")), description = "The account just adjusted"))
        )),
        (status = 200, description = "Applied before under this key", body = super::views::Adjusted),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no such user; or no admin token configured: the admin routes do not exist)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        (status = 409, description = "CONFLICT (same key, different content)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn adjust(
    state: State,
    Operator(operator): Operator,
    path: web::Path<String>,
    JsonBody(adjustment): JsonBody<Adjustment>,
) -> Result<HttpResponse, ApiError> {
    let user = clerk_id_from_operator(&path)?;
    if adjustment.amount_micros == 0 {
        return Err(ApiError::invalid("field `amountMicros`: must not be zero"));
    }
    let key = IdempotencyKey::parse(format!("admin:{}", adjustment.key))
        .map_err(|e| ApiError::invalid(format!("field `key`: {e}")))?;
    let reason = adjustment.reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(ApiError::invalid("field `reason`: 1 to 500 characters"));
    }
    if let Some(problem) = crate::text::problem(reason) {
        return Err(ApiError::invalid(format!("field `reason`: {problem}")));
    }
    let kind = match adjustment.kind {
        None | Some(AdjustmentType::Adjustment) => TransactionType::Adjustment,
        Some(AdjustmentType::PromoBonus) if adjustment.amount_micros > 0 => {
            TransactionType::PromoBonus
        }
        Some(AdjustmentType::PromoBonus) => {
            return Err(ApiError::invalid(
                "field `type`: PROMO_BONUS needs a positive amountMicros",
            ))
        }
    };
    let amount = adjustment
        .amount_micros
        .checked_abs()
        .map(Micros::new)
        .ok_or_else(|| ApiError::invalid("field `amountMicros`: out of range"))?;
    if adjustment.expires_at.is_some() && adjustment.amount_micros < 0 {
        return Err(ApiError::invalid(
            "field `expiresAt`: only a credit (positive amountMicros) can expire",
        ));
    }
    let account = state.any_account(&user).await?;
    let posting = Posting {
        key,
        kind,
        amount,
        description: Some(reason.to_owned()),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: Some(json!({ "source": "admin", "operator": operator.as_str() })),
        expires_at: adjustment.expires_at,
    };
    let outcome = if adjustment.amount_micros > 0 {
        state.engine.credit(account, posting).await?
    } else {
        state.engine.debit(account, posting).await?
    };
    let action = crate::operators::Action {
        action: if adjustment.amount_micros > 0 {
            "credit"
        } else {
            "debit"
        },
        user_id: Some(user.as_str()),
        reason: Some(reason),
        detail: json!({
            "amountMicros": adjustment.amount_micros,
            "key": adjustment.key,
            "transactionId": outcome.record.id,
            "replayed": outcome.replayed,
        }),
    };
    state.operators.record(&operator, action).await?;
    let snapshot = state.engine.balance(account).await?;
    let body = Adjusted {
        transaction: TransactionView::from(&outcome.record),
        replayed: outcome.replayed,
        balance_micros: snapshot.balance_micros.get(),
        held_micros: snapshot.held_micros.get(),
        available_micros: snapshot.available_micros.get(),
    };
    Ok(if outcome.replayed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}

/// An account's balance, holds, plan and recent entries (deleted users
/// too), and its top-ups' unfinished follow-ups (card, invoice link).
#[utoipa::path(get, path = "/admin/accounts/{userId}", tag = "admin", security(("admin" = [])),
    params(("userId" = String, Path, description = "Clerk user id")),
    responses(
        (status = 200, description = "The account", body = super::views::AdminAccount),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no such user; or no admin token configured: the admin routes do not exist)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn account(
    state: State,
    _: Operator,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = clerk_id_from_operator(&path)?;
    let account = state.existing_account(&user).await?;
    let snapshot = state.engine.balance(account).await?;
    let ((transactions, usages), plan, follow_ups, keys, recharge) = tokio::try_join!(
        async { Ok::<_, ApiError>(state.history.latest(account, 20).await?) },
        async { Ok::<_, ApiError>(state.users.plan(account).await?) },
        async { Ok::<_, ApiError>(state.topups.follow_ups(account, 20).await?) },
        async { Ok::<_, ApiError>(state.provider_keys.load(account).await?) },
        async {
            Ok::<_, ApiError>(
                state
                    .auto_recharges
                    .page(account, chrono::Utc::now())
                    .await?,
            )
        },
    )?;
    Ok(HttpResponse::Ok().json(AdminAccount {
        balance_micros: snapshot.balance_micros.get(),
        held_micros: snapshot.held_micros.get(),
        available_micros: snapshot.available_micros.get(),
        user_id: user.as_str().to_owned(),
        account_id: account.0,
        version: snapshot.version,
        plan,
        holds: snapshot.holds.iter().map(HoldView::from).collect(),
        grants: snapshot.grants.iter().map(GrantView::from).collect(),
        transactions: transactions.iter().map(TransactionView::from).collect(),
        usages: usages.iter().map(UsageView::from).collect(),
        follow_ups,
        has_byok: keys.any(),
        auto_recharge: recharge
            .settings
            .map(|settings| super::views::AdminAutoRecharge {
                enabled: settings.enabled,
                threshold_cents: settings.threshold_cents,
                amount_cents: settings.amount_cents,
                disabled_reason: settings.disabled_reason,
            }),
        has_saved_card: recharge.has_card,
    }))
}

/// Checks every ledger invariant against PostgreSQL.
#[utoipa::path(get, path = "/admin/reconcile", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "The reconcile report (`clean`, `problems`)", body = Object),
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn run_reconcile(state: State, _: Operator) -> Result<HttpResponse, ApiError> {
    let report = state.history.reconcile().await?;
    Ok(HttpResponse::Ok().json(report))
}

/// The query of `GET /admin/events`.
#[derive(Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct EventFilter {
    /// PENDING, DELIVERED or FAILED.
    status: Option<String>,
    /// Only this user's events (Clerk id).
    #[param(rename = "userId", value_type = Option<String>)]
    user_id: Option<ClerkUserId>,
    /// 1 to 500 (default 100).
    limit: Option<i64>,
}

impl EventFilter {
    /// Every parameter checked by name; anything unknown is refused.
    fn parse(query: &str) -> Result<EventFilter, ApiError> {
        EventFilter::parse_with(query, &["PENDING", "DELIVERED", "FAILED"])
    }

    /// As `parse`, `status` one of `statuses`.
    fn parse_with(query: &str, statuses: &[&str]) -> Result<EventFilter, ApiError> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
            .map_err(|e| ApiError::invalid(format!("query string: {e}")))?
            .into_inner();
        let mut filter = EventFilter::default();
        for (name, value) in pairs {
            match name.as_str() {
                "status" if statuses.contains(&value.as_str()) => filter.status = Some(value),
                "status" => {
                    return Err(ApiError::invalid(format!(
                        "field `status`: one of {}",
                        statuses.join(", ")
                    )))
                }
                "userId" => filter.user_id = Some(clerk_id_from_operator(&value)?),
                "limit" => {
                    filter.limit = Some(
                        value
                            .parse::<i64>()
                            .ok()
                            .filter(|n| (1..=500).contains(n))
                            .ok_or_else(|| {
                                ApiError::invalid("field `limit`: an integer from 1 to 500")
                            })?,
                    )
                }
                _ => {
                    return Err(ApiError::invalid(format!(
                        "field `{name}`: unknown query parameter (expected status, userId, limit)"
                    )))
                }
            }
        }
        Ok(filter)
    }
}

/// The outbox's events, newest first, with their delivery state.
#[utoipa::path(get, path = "/admin/events", tag = "admin", security(("admin" = [])),
    params(EventFilter),
    responses(
        (status = 200, description = "The events (`events`)", body = super::views::EventList),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn list_events(
    state: State,
    _: Operator,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let filter = EventFilter::parse(request.query_string())?;
    let events = state
        .events
        .list(
            filter.status.as_deref(),
            filter.user_id.as_ref(),
            filter.limit.unwrap_or(100),
        )
        .await?;
    Ok(HttpResponse::Ok().json(EventList { events }))
}

/// The alert and receipt emails, newest first, with their delivery state
/// (filters as `GET /admin/events`; status PENDING, SENT, FAILED, SKIPPED).
#[utoipa::path(get, path = "/admin/emails", tag = "admin", security(("admin" = [])),
    params(EventFilter),
    responses(
        (status = 200, description = "The emails (`emails`)", body = super::views::EmailList),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn list_emails(
    state: State,
    _: Operator,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let filter = EventFilter::parse_with(
        request.query_string(),
        &["PENDING", "SENT", "FAILED", "SKIPPED"],
    )?;
    let emails = state
        .emails
        .list(
            filter.status.as_deref(),
            filter.user_id.as_ref().map(ClerkUserId::as_str),
            filter.limit.unwrap_or(100),
        )
        .await?;
    Ok(HttpResponse::Ok().json(super::views::EmailList { emails }))
}

/// Puts an event back in the queue: it is sent again, in its account's order.
#[utoipa::path(post, path = "/admin/events/{eventId}/redeliver", tag = "admin", security(("admin" = [])),
    params(("eventId" = String, Path, description = "The event's id (a UUID)")),
    responses(
        (status = 200, description = "The event, PENDING again", body = crate::events::store::EventDelivery),
        (status = 400, description = "INVALID_REQUEST (eventId is not a UUID)", body = super::error::ErrorBody),
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no such event; or no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn redeliver_event(
    state: State,
    Operator(operator): Operator,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = uuid::Uuid::parse_str(path.trim())
        .map_err(|_| ApiError::invalid("field `eventId`: not a UUID"))?;
    let Some(event) = state.events.redeliver(id, chrono::Utc::now()).await? else {
        return Err(ApiError::not_found(format!("no event with id `{id}`")));
    };
    let action = crate::operators::Action {
        action: "redeliver",
        user_id: Some(&event.user_id),
        reason: None,
        detail: json!({ "eventId": id, "type": event.kind }),
    };
    state.operators.record(&operator, action).await?;
    Ok(HttpResponse::Ok().json(event))
}

/// Why an operator acts, for the record.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct OperatorReason {
    /// 1 to 500 characters.
    reason: String,
}

/// The reason of an operator's action, checked.
fn checked_reason(reason: &str) -> Result<&str, ApiError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > 500 {
        return Err(ApiError::invalid("field `reason`: 1 to 500 characters"));
    }
    if let Some(problem) = crate::text::problem(reason) {
        return Err(ApiError::invalid(format!("field `reason`: {problem}")));
    }
    Ok(reason)
}

/// Switches a user's auto-recharge off (`disabledReason` `operator`, an
/// `auto_recharge.disabled` event if it was on); the person can turn it on
/// again. Idempotent: already off, nothing changes.
#[utoipa::path(post, path = "/admin/accounts/{userId}/auto-recharge/off", tag = "admin", security(("admin" = [])),
    params(("userId" = String, Path, description = "Clerk user id")),
    request_body = OperatorReason,
    responses(
        (status = 200, description = "Off (`wasOn`: whether this switched it off)", body = super::views::SwitchedOff),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no such user; or no admin token configured)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn auto_recharge_off(
    state: State,
    Operator(operator): Operator,
    path: web::Path<String>,
    JsonBody(asked): JsonBody<OperatorReason>,
) -> Result<HttpResponse, ApiError> {
    let user = clerk_id_from_operator(&path)?;
    let reason = checked_reason(&asked.reason)?;
    let account = state.existing_account(&user).await?;
    let was_on = state
        .auto_recharges
        .switch_off(account, crate::recharge::OffReason::Operator)
        .await?;
    let action = crate::operators::Action {
        action: "auto_recharge_off",
        user_id: Some(user.as_str()),
        reason: Some(reason),
        detail: json!({ "wasOn": was_on }),
    };
    state.operators.record(&operator, action).await?;
    Ok(HttpResponse::Ok().json(super::views::SwitchedOff { was_on }))
}

/// The query of `GET /admin/accounts`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct AccountSearch {
    /// A Clerk user id, an email address or a Stripe customer id.
    query: String,
}

/// Finds accounts by Clerk id, email or Stripe customer (deleted ones too).
#[utoipa::path(get, path = "/admin/accounts", tag = "admin", security(("admin" = [])),
    params(AccountSearch),
    responses(
        (status = 200, description = "The users found (`users`, at most 20)", body = super::views::FoundUsers),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn search(state: State, _: Operator, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let asked = web::Query::<AccountSearch>::from_query(request.query_string())
        .map_err(|e| ApiError::invalid(format!("query string: {e} (expected query)")))?;
    let text = asked.query.trim();
    if text.is_empty() || text.len() > 320 || crate::text::refused_in(text).is_some() {
        return Err(ApiError::invalid(
            "field `query`: a Clerk user id, an email or a Stripe customer id (1 to 320 characters)",
        ));
    }
    let users = state.users.search(text).await?;
    Ok(HttpResponse::Ok().json(super::views::FoundUsers { users }))
}

/// What the engine and the queues look like now, on this instance and in
/// the database: what an operator checks first.
#[utoipa::path(get, path = "/admin/platform", tag = "admin", security(("admin" = [])),
    responses(
        (status = 200, description = "The platform's state", body = super::views::PlatformView),
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn platform(state: State, _: Operator) -> Result<HttpResponse, ApiError> {
    let stats = state.engine.stats();
    let since = state.engine.clock().now() - chrono::Duration::hours(1);
    let ((events_pending, events_failed), (emails_pending, emails_failed), last_hour) = tokio::try_join!(
        async { Ok::<_, ApiError>(state.events.counts().await?) },
        async { Ok::<_, ApiError>(state.emails.counts().await?) },
        async { Ok::<_, ApiError>(state.history.activity_since(since).await?) },
    )?;
    Ok(HttpResponse::Ok().json(super::views::PlatformView {
        database_up: state.health.database_up(),
        journal_queue_depth: stats.journal_queue_depth,
        journal_stalled: state.engine.writer().is_stalled(),
        resident_accounts: stats.resident_actors,
        pending_settlements: state.settlements.in_flight(),
        events_pending,
        events_failed,
        emails_pending,
        emails_failed,
        last_hour: last_hour.into(),
    }))
}

/// The query of `GET /admin/actions`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct ActionFilter {
    /// Only the actions on this account (Clerk id).
    user_id: Option<String>,
}

/// What operators did, newest first (the last 100).
#[utoipa::path(get, path = "/admin/actions", tag = "admin", security(("admin" = [])),
    params(ActionFilter),
    responses(
        (status = 200, description = "The actions (`actions`)", body = super::views::OperatorActions),
        super::error::Invalid,
        super::error::AdminAuth,
        (status = 404, description = "NOT_FOUND (no admin token configured)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
async fn actions(
    state: State,
    _: Operator,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let asked = web::Query::<ActionFilter>::from_query(request.query_string())
        .map_err(|e| ApiError::invalid(format!("query string: {e} (expected userId)")))?;
    let user = asked
        .user_id
        .as_deref()
        .map(clerk_id_from_operator)
        .transpose()?;
    let actions = state
        .operators
        .recent(user.as_ref().map(ClerkUserId::as_str), 100)
        .await?;
    Ok(HttpResponse::Ok().json(super::views::OperatorActions { actions }))
}
