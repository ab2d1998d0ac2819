//! End-user routes: `/api/credits…`, authenticated by Clerk session token.
//! No route takes a user id from the client: the token's `sub` names it.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::error::ApiError;
use super::views::{Page, TransactionView, UsageView};
use super::State;
use crate::ledger::{store, AccountId, IdempotencyKey, Posting, TransactionType};
use crate::metering;
use crate::money::{Micros, MICROS_PER_CENT};

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

/// What the balance page reads from PostgreSQL for one account, kept while
/// the account's version stays the same: the page is polled far more often
/// than the account changes, and the version moves with every entry.
pub struct History {
    version: i64,
    has_byok: bool,
    /// Serialized once: the page is read far more often than it changes.
    transactions: Box<RawValue>,
    usages: Box<RawValue>,
}

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
        .filter(|h| h.version == version)
    {
        return Ok(history);
    }
    let client = state.client().await?;
    // The version is read first: every entry up to it is then visible to
    // the page queries that follow on the same connection.
    let (head, transactions, usages) = tokio::try_join!(
        async {
            client
                .query_one(
                    "SELECT b.version, u.openai_key_encrypted IS NOT NULL
                                       OR u.anthropic_key_encrypted IS NOT NULL
                       FROM credit_balances b JOIN users u ON u.id = b.user_id
                      WHERE b.user_id = $1",
                    &[&account.0],
                )
                .await
                .map(|row| (row.get::<_, i64>(0), row.get::<_, bool>(1)))
                .map_err(store::unavailable)
        },
        store::transactions_page(&**client, account, None, OVERVIEW_ENTRIES),
        store::usages_page(&**client, account, None, OVERVIEW_ENTRIES),
    )?;
    let (durable_version, has_byok) = head;
    let rendered = |value: Result<Box<RawValue>, serde_json::Error>| {
        value.map_err(|e| ApiError::internal("balance page history", e))
    };
    let transactions: Vec<TransactionView> =
        transactions.iter().map(TransactionView::from).collect();
    let usages: Vec<UsageView> = usages.iter().map(UsageView::from).collect();
    let history = Arc::new(History {
        version,
        has_byok,
        transactions: rendered(serde_json::value::to_raw_value(&transactions))?,
        usages: rendered(serde_json::value::to_raw_value(&usages))?,
    });
    if durable_version == version {
        state.cache_history(account, history.clone());
    }
    Ok(history)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Overview<'a> {
    /// Integer cents, as the seed's front end reads it.
    balance: i64,
    balance_micros: i64,
    held_micros: i64,
    available_micros: i64,
    balance_formatted: String,
    is_low: bool,
    has_byok: bool,
    transactions: &'a RawValue,
    usages: &'a RawValue,
}

/// Balance, holds, the 10 newest transactions and usages.
async fn overview(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let snapshot = state.engine.balance_summary(account).await?;
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
    }))
}

async fn transactions(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let client = state.client().await?;
    let items = store::transactions_page(&**client, account, page.before_seq, page.limit).await?;
    let next = page.next_cursor(items.len(), items.last().map(|t| t.seq));
    Ok(HttpResponse::Ok().json(json!({
        "items": items.iter().map(TransactionView::from).collect::<Vec<_>>(),
        "nextCursor": next,
    })))
}

async fn usages(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let client = state.client().await?;
    let items = store::usages_page(&**client, account, page.before_seq, page.limit).await?;
    let next = page.next_cursor(items.len(), items.last().map(|u| u.seq));
    Ok(HttpResponse::Ok().json(json!({
        "items": items.iter().map(UsageView::from).collect::<Vec<_>>(),
        "nextCursor": next,
    })))
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

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DailyUsageView {
    date: chrono::NaiveDate,
    cost_micros: i64,
    chats: i64,
    input_tokens: i64,
    output_tokens: i64,
}

/// Spend per UTC day over the last `days` days, oldest first, today last.
async fn usage_daily(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let days = parse_days(request.query_string())?;
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let client = state.client().await?;
    let report = metering::daily_usage(&**client, account, days, chrono::Utc::now()).await?;
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
    Ok(HttpResponse::Ok().json(json!({ "days": days })))
}

/// The idempotency key of a user's signup bonus: one per user, ever,
/// whichever path (this route, the Clerk webhook) grants it first.
fn signup_bonus_key(account: AccountId) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(format!("bonus:signup:{}", account.0))
        .map_err(|e| ApiError::internal("signup bonus key", e))
}

/// The signup bonus, once per user ever, whichever path asks first (this
/// route or Clerk's `user.created`): one key, one credit.
pub(super) async fn grant_signup_bonus(
    state: &State,
    account: AccountId,
) -> Result<crate::ledger::Outcome<crate::ledger::TransactionRecord>, ApiError> {
    let amount = Micros::from_cents(state.settings.credits.signup_bonus_cents)
        .map_err(|_| ApiError::internal("signup bonus", "credits.signup_bonus_cents overflows"))?;
    let posting = Posting {
        key: signup_bonus_key(account)?,
        kind: TransactionType::SignupBonus,
        amount,
        description: Some(format!("Bonus de bienvenue {amount}")),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: None,
    };
    Ok(state.engine.credit(account, posting).await?)
}

/// The signup bonus: 201 the first time, 200 with the same transaction after.
async fn claim_bonus(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let outcome = grant_signup_bonus(&state, account).await?;
    let body = json!({
        "transaction": TransactionView::from(&outcome.record),
        "alreadyClaimed": outcome.replayed,
    });
    Ok(if outcome.replayed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}
