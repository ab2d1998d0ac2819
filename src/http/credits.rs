//! End-user routes: `/api/credits…`, authenticated by Clerk session token.
//! No route takes a user id from the client: the token's `sub` names it.

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::error::ApiError;
use super::views::{Page, TransactionView, UsageView};
use super::State;
use crate::ledger::{store, IdempotencyKey, Posting, TransactionType};
use crate::money::{Micros, MICROS_PER_CENT};

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits", web::get().to(overview))
        .route("/api/credits/transactions", web::get().to(transactions))
        .route("/api/credits/usages", web::get().to(usages))
        .route("/api/credits/claim-bonus", web::post().to(claim_bonus));
}

/// Balance, holds, the 10 newest transactions and usages.
async fn overview(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let snapshot = state.engine.balance(account).await?;
    let client = state.client().await?;
    let (transactions, usages, byok) = tokio::try_join!(
        store::transactions_page(&**client, account, None, 10),
        store::usages_page(&**client, account, None, 10),
        async {
            client
                .query_one(
                    "SELECT openai_key_encrypted IS NOT NULL OR anthropic_key_encrypted IS NOT NULL
                       FROM users WHERE id = $1",
                    &[&account.0],
                )
                .await
                .map(|row| row.get::<_, bool>(0))
                .map_err(store::unavailable)
        }
    )?;
    let low = Micros::new(state.settings.credits.low_balance_cents * MICROS_PER_CENT);
    Ok(HttpResponse::Ok().json(json!({
        "balance": snapshot.balance_micros.floor_cents(),
        "balanceMicros": snapshot.balance_micros.get(),
        "heldMicros": snapshot.held_micros.get(),
        "availableMicros": snapshot.available_micros.get(),
        "balanceFormatted": snapshot.balance_micros.to_string(),
        "isLow": snapshot.balance_micros < low,
        "hasByok": byok,
        "transactions": transactions.iter().map(TransactionView::from).collect::<Vec<_>>(),
        "usages": usages.iter().map(UsageView::from).collect::<Vec<_>>(),
    })))
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

/// The idempotency key of a user's signup bonus: one per user, ever,
/// whichever path (this route, the Clerk webhook) grants it first.
pub fn signup_bonus_key(account: crate::ledger::AccountId) -> Result<IdempotencyKey, ApiError> {
    IdempotencyKey::parse(format!("bonus:signup:{}", account.0))
        .map_err(|e| ApiError::internal("signup bonus key", e))
}

/// The signup bonus: 201 the first time, 200 with the same transaction after.
async fn claim_bonus(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let amount = Micros::from_cents(state.settings.credits.signup_bonus_cents)
        .map_err(|_| ApiError::internal("signup bonus", "credits.signup_bonus_cents overflows"))?;
    let outcome = state
        .engine
        .credit(
            account,
            Posting {
                key: signup_bonus_key(account)?,
                kind: TransactionType::SignupBonus,
                amount,
                description: Some(format!("Bonus de bienvenue {amount}")),
                stripe_session_id: None,
                stripe_payment_id: None,
                metadata: None,
            },
        )
        .await?;
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
