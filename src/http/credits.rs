//! End-user routes: `/api/credits…`, authenticated by Clerk session token.
//! No route takes a user id from the client: the token's `sub` names it.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::error::{ApiError, Code};
use super::views::{GrantView, Page, TransactionView, UsageView};
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
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)", body = super::openapi::ErrorBody)
    ))]
async fn overview(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
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
        (status = 200, description = "A page of transactions", body = super::openapi::TransactionsPage),
        (status = 400, description = "INVALID_REQUEST (the message names the field)", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)", body = super::openapi::ErrorBody)
    ))]
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

/// Every usage (chat charge), newest first, by opaque cursor.
#[utoipa::path(get, path = "/api/credits/usages", tag = "credits", security(("clerk" = [])),
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Items per page (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of usages", body = super::openapi::UsagesPage),
        (status = 400, description = "INVALID_REQUEST (the message names the field)", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)", body = super::openapi::ErrorBody)
    ))]
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

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct DailyUsageView {
    date: chrono::NaiveDate,
    cost_micros: i64,
    chats: i64,
    input_tokens: i64,
    output_tokens: i64,
}

/// Spend per UTC day over the last `days` days, oldest first, today last.
#[utoipa::path(get, path = "/api/credits/usage/daily", tag = "credits", security(("clerk" = [])),
    params(("days" = Option<u32>, Query, minimum = 1, maximum = 90, description = "Days to report (default 30)")),
    responses(
        (status = 200, description = "Spend per day", body = super::openapi::DailyUsage),
        (status = 400, description = "INVALID_REQUEST (the message names the field)", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)", body = super::openapi::ErrorBody)
    ))]
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

/// The idempotency key of an account's signup bonus: one per account,
/// ever, whichever path (this route, the Clerk webhook) grants it first.
fn signup_bonus_key(account: AccountId) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(format!("bonus:signup:{}", account.0))
        .map_err(|e| ApiError::internal("signup bonus key", e))
}

/// How the signup bonus knows a person by email: the address trimmed and
/// lowercased, as SHA-256 hex (no address is stored in a key or a claim).
pub(super) fn email_hash(email: &str) -> Option<String> {
    use sha2::Digest;
    let normalized = email.trim().to_lowercase();
    if normalized.is_empty() {
        return None;
    }
    let digest = sha2::Sha256::digest(normalized.as_bytes());
    Some(digest.iter().map(|b| format!("{b:02x}")).collect())
}

/// What asking for the signup bonus gave. Built once per request and
/// consumed at once: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Bonus {
    /// Credited now, or earlier to this account (`replayed`).
    Granted(crate::ledger::Outcome<crate::ledger::TransactionRecord>),
    /// Another account of the same person (same email) has it.
    TakenByAnotherAccount,
}

/// The signup bonus, once per person, whichever path asks first (this
/// route or Clerk's `user.created`).
///
/// A user whose verified email is known is a person by that email: the
/// account first claims it in `signup_bonus_claims` (one row per email,
/// naming the account, in its own committed statement), then is credited
/// under its account's key. A second account of the same email (a
/// re-signup, any letter case) finds the claim naming another account and
/// gets nothing. A crash between the claim and the credit loses nothing:
/// the claim names this account, so its retry passes the claim again and
/// the deterministic key credits once. A user without an email is credited
/// under its account's key alone, as before.
pub(super) async fn grant_signup_bonus(
    state: &State,
    account: AccountId,
) -> Result<Bonus, ApiError> {
    let amount = Micros::from_cents(state.settings.credits.signup_bonus_cents)
        .map_err(|_| ApiError::internal("signup bonus", "credits.signup_bonus_cents overflows"))?;
    if !claim_email(state, account).await? {
        reverse_second_bonus(state, account).await?;
        return Ok(Bonus::TakenByAnotherAccount);
    }
    let posting = Posting {
        key: signup_bonus_key(account)?,
        kind: TransactionType::SignupBonus,
        amount,
        description: Some(format!("Bonus de bienvenue {amount}")),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: None,
        expires_at: signup_bonus_expiry(state)?,
    };
    Ok(Bonus::Granted(state.engine.credit(account, posting).await?))
}

/// When a signup bonus granted now expires (`credits.signup_bonus_expiry_days`;
/// 0: never).
fn signup_bonus_expiry(state: &State) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    let days = state.settings.credits.signup_bonus_expiry_days;
    if days == 0 {
        return Ok(None);
    }
    let now = state.engine.clock().now();
    chrono::Duration::try_days(i64::from(days))
        .and_then(|span| now.checked_add_signed(span))
        .map(Some)
        .ok_or_else(|| {
            ApiError::internal(
                "signup bonus",
                "credits.signup_bonus_expiry_days is out of range",
            )
        })
}

/// Takes back a bonus this account received by its Clerk id before its
/// email was known (a re-signup that asked for the bonus before Clerk's
/// `user.created` came), once the email shows that another account of the
/// same person had it. Once, under `bonus:signup:<account>:duplicate`; the
/// balance may go below zero, as for a refund.
async fn reverse_second_bonus(state: &State, account: AccountId) -> Result<(), ApiError> {
    let key = signup_bonus_key(account)?;
    let granted: Option<i64> = {
        let client = state.client().await?;
        client
            .query_opt(
                "SELECT amount_micros FROM credit_transactions
                  WHERE user_id = $1 AND idempotency_key = $2",
                &[&account.0, &key.as_str()],
            )
            .await
            .map_err(store::unavailable)?
            .map(|row| row.get(0))
    };
    let Some(amount) = granted.map(Micros::new) else {
        return Ok(());
    };
    tracing::warn!(
        account = account.0,
        "signup bonus of an email another account had: taken back"
    );
    let posting = Posting {
        key: IdempotencyKey::parse(format!("{}:duplicate", key.as_str()))
            .map_err(|e| ApiError::internal("signup bonus key", e))?,
        kind: TransactionType::Adjustment,
        amount,
        description: Some(format!(
            "Bonus de bienvenue déjà reçu avec cette adresse e-mail (-{amount})"
        )),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: Some(json!({ "reason": "duplicate_signup_bonus" })),
        expires_at: None,
    };
    state.engine.debit(account, posting).await?;
    Ok(())
}

/// Claims the account's email for its signup bonus: true when the claim
/// names this account (made now or before), or the account has no email.
/// Concurrent claims of one email wait on each other's row: one wins.
async fn claim_email(state: &State, account: AccountId) -> Result<bool, ApiError> {
    let client = state.client().await?;
    let hash: Option<String> = client
        .query_opt("SELECT email_hash FROM users WHERE id = $1", &[&account.0])
        .await
        .map_err(store::unavailable)?
        .and_then(|row| row.get(0));
    let Some(hash) = hash else {
        return Ok(true);
    };
    let owner: i64 = client
        .query_one(
            "INSERT INTO signup_bonus_claims (email_hash, user_id) VALUES ($1, $2)
             ON CONFLICT (email_hash) DO UPDATE SET email_hash = EXCLUDED.email_hash
             RETURNING user_id",
            &[&hash, &account.0],
        )
        .await
        .map_err(store::unavailable)?
        .get(0);
    Ok(owner == account.0)
}

/// The signup bonus: 201 the first time, 200 with the same transaction
/// after; 409 when another account of the same email had it.
#[utoipa::path(post, path = "/api/credits/claim-bonus", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 201, description = "The signup bonus, credited now", body = super::openapi::ClaimedBonus, links(
            ("BalanceAfterBonus" = (operation_id = "overview", description = "The balance with the bonus")),
            ("HistoryAfterBonus" = (operation_id = "transactions", description = "The bonus in the history"))
        )),
        (status = 200, description = "The signup bonus, credited before", body = super::openapi::ClaimedBonus),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 409, description = "CONFLICT (another account of this email had the bonus)", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 503, description = "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)", body = super::openapi::ErrorBody)
    ))]
async fn claim_bonus(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let outcome = match grant_signup_bonus(&state, account).await? {
        Bonus::Granted(outcome) => outcome,
        Bonus::TakenByAnotherAccount => {
            return Err(ApiError::new(
                Code::Conflict,
                "the signup bonus was already granted to an account with this email address",
            ))
        }
    };
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
