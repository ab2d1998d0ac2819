//! End-user routes: `/api/credits…`, authenticated by Clerk session token.
//! No route takes a user id from the client: the token's `sub` names it.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::value::RawValue;

use super::error::{ApiError, Code};
use super::state::State;
use super::views::{
    ClaimedBonus, DailyUsageList, DailyUsageView, GrantView, History, Page, TransactionView,
    TransactionsPage, UsageView, UsagesPage,
};
use crate::accounts::SignupBonusClaim;
use crate::ledger::AccountId;
use crate::metering;
use crate::money::{Micros, MICROS_PER_CENT};
use crate::payments::followup;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits", web::get().to(overview))
        .route("/api/credits/transactions", web::get().to(transactions))
        .route("/api/credits/usages", web::get().to(usages))
        .route("/api/credits/usage/daily", web::get().to(usage_daily))
        .route("/api/credits/claim-bonus", web::post().to(claim_bonus));
}

/// Entries shown on the balance page.
const OVERVIEW_ENTRIES: i64 = 10;

/// The balance page's history: from the cache when the account has not
/// moved since, else from PostgreSQL (cached when PostgreSQL has caught up
/// with the actor's version, so a speculative state is never cached).
async fn history(
    state: &State,
    account: AccountId,
    version: i64,
) -> Result<Arc<History>, ApiError> {
    if let Some(history) = state
        .cached_history(account)
        .await
        .filter(|cached| cached.version == version)
    {
        return Ok(history);
    }
    let (read, keys) = tokio::try_join!(
        async {
            Ok::<_, ApiError>(
                state
                    .history
                    .latest_at_version(account, OVERVIEW_ENTRIES)
                    .await?,
            )
        },
        async { Ok::<_, ApiError>(state.provider_keys.load(account).await?) },
    )?;
    let (durable_version, has_byok) = (read.version, keys.any());
    let (transactions, usages) = (read.transactions, read.usages);
    let rendered = |value: Result<Box<RawValue>, serde_json::Error>| {
        value.map_err(|e| ApiError::internal("balance page history", e))
    };
    // A top-up still waiting for its invoice link is not cached: the link
    // arrives (from the follow-up worker) without moving the version.
    let awaits_invoice = transactions.iter().any(followup::awaits_invoice);
    let transactions: Vec<TransactionView> =
        transactions.iter().map(TransactionView::from).collect();
    let usages: Vec<UsageView> = usages.iter().map(UsageView::from).collect();
    let history = Arc::new(History {
        version,
        has_byok,
        transactions: rendered(serde_json::value::to_raw_value(&transactions))?,
        usages: rendered(serde_json::value::to_raw_value(&usages))?,
    });
    if durable_version == version && !awaits_invoice {
        state.cache_history(account, history.clone()).await;
    }
    Ok(history)
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct Overview<'a> {
    /// Integer cents, as the seed's front end reads it.
    balance: i64,
    balance_micros: i64,
    held_micros: i64,
    available_micros: i64,
    balance_formatted: String,
    is_low: bool,
    has_byok: bool,
    #[schema(value_type = Vec<TransactionView>)]
    transactions: &'a RawValue,
    #[schema(value_type = Vec<UsageView>)]
    usages: &'a RawValue,
    /// What the balance is made of: the grants with money left, in spend
    /// order (promo before paid, then earliest expiry, then oldest).
    grants: Vec<GrantView>,
}

/// Balance, holds, the 10 newest transactions and usages.
#[utoipa::path(get, path = "/api/credits", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "The balance page", body = Overview),
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn overview(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let full = state.engine.balance(account).await?;
    let snapshot = full.summary();
    let history = history(&state, account, snapshot.version).await?;
    let low = Micros::new(state.settings.credits.low_balance_cents * MICROS_PER_CENT);
    Ok(HttpResponse::Ok().json(Overview {
        balance: snapshot.balance_micros.floor_cents(),
        balance_micros: snapshot.balance_micros.get(),
        held_micros: snapshot.held_micros.get(),
        available_micros: snapshot.available_micros.get(),
        balance_formatted: snapshot.balance_micros.to_string(),
        is_low: snapshot.balance_micros < low,
        has_byok: history.has_byok,
        transactions: &history.transactions,
        usages: &history.usages,
        grants: full.grants.iter().map(GrantView::from).collect(),
    }))
}

/// Every transaction, newest first, by opaque cursor.
#[utoipa::path(get, path = "/api/credits/transactions", tag = "credits", security(("clerk" = [])),
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Items per page (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of transactions", body = super::views::TransactionsPage),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn transactions(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let items = state
        .history
        .transactions(account, page.before_seq, page.limit)
        .await?;
    let next = page.next_cursor(items.len(), items.last().map(|t| t.seq));
    Ok(HttpResponse::Ok().json(TransactionsPage {
        items: items.iter().map(TransactionView::from).collect(),
        next_cursor: next,
    }))
}

/// Every usage (chat charge), newest first, by opaque cursor.
#[utoipa::path(get, path = "/api/credits/usages", tag = "credits", security(("clerk" = [])),
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Items per page (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of usages", body = super::views::UsagesPage),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn usages(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let items = state
        .history
        .usages(account, page.before_seq, page.limit)
        .await?;
    let next = page.next_cursor(items.len(), items.last().map(|u| u.seq));
    Ok(HttpResponse::Ok().json(UsagesPage {
        items: items.iter().map(UsageView::from).collect(),
        next_cursor: next,
    }))
}

/// `?days=1..=90` (default 30) of `GET /api/credits/usage/daily`; anything
/// else is refused by name.
fn parse_days(query: &str) -> Result<u32, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| ApiError::invalid(format!("query string: {e}")))?
        .into_inner();
    let mut days = DEFAULT_CHART_DAYS;
    for (name, value) in pairs {
        if name != "days" {
            return Err(ApiError::invalid(format!(
                "field `{name}`: unknown query parameter (expected days)"
            )));
        }
        days = value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=metering::MAX_DAYS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "field `days`: must be an integer from 1 to {}",
                    metering::MAX_DAYS
                ))
            })?;
    }
    Ok(days)
}

/// Days of the usage chart when the request names none.
const DEFAULT_CHART_DAYS: u32 = 30;

/// Spend per UTC day over the last `days` days, oldest first, today last.
#[utoipa::path(get, path = "/api/credits/usage/daily", tag = "credits", security(("clerk" = [])),
    params(("days" = Option<u32>, Query, minimum = 1, maximum = 90, description = "Days to report (default 30)")),
    responses(
        (status = 200, description = "Spend per day", body = super::views::DailyUsageList),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn usage_daily(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let days = parse_days(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let report = state
        .usage_reports
        .daily(account, days, chrono::Utc::now())
        .await?;
    let days: Vec<DailyUsageView> = report
        .into_iter()
        .map(|day| DailyUsageView {
            date: day.date,
            cost_micros: day.cost_micros,
            chats: day.chats,
            input_tokens: day.input_tokens,
            output_tokens: day.output_tokens,
        })
        .collect();
    Ok(HttpResponse::Ok().json(DailyUsageList { days }))
}

/// The signup bonus, once per person (see `accounts::bonus`).
async fn grant_signup_bonus(
    state: &State,
    account: AccountId,
) -> Result<SignupBonusClaim, ApiError> {
    Ok(state.signup_bonuses.grant(account).await?)
}

/// The signup bonus: 201 the first time, 200 with the same transaction
/// after; 409 when another account of the same email had it.
#[utoipa::path(post, path = "/api/credits/claim-bonus", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 201, description = "The signup bonus, credited now", body = super::views::ClaimedBonus, links(
            ("BalanceAfterBonus" = (operation_id = "overview", description = "The balance with the bonus")),
            ("HistoryAfterBonus" = (operation_id = "transactions", description = "The bonus in the history"))
        )),
        (status = 200, description = "The signup bonus, credited before", body = super::views::ClaimedBonus),
        super::error::SessionAuth,
        (status = 409, description = "CONFLICT (another account of this email had the bonus)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn claim_bonus(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let outcome = match grant_signup_bonus(&state, account).await? {
        SignupBonusClaim::Granted(outcome) => outcome,
        SignupBonusClaim::TakenByAnotherAccount => {
            return Err(ApiError::new(
                Code::Conflict,
                "the signup bonus was already granted to an account with this email address",
            ))
        }
    };
    let body = ClaimedBonus {
        transaction: TransactionView::from(&outcome.record),
        already_claimed: outcome.replayed,
    };
    Ok(if outcome.replayed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}
