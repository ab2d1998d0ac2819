//! `POST /api/credits/topup`: money in through Stripe, by opening a
//! Checkout Session the user is sent to; the credit itself comes later,
//! from the webhook (`stripe.rs`).

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::error::{ApiError, Code};
use super::extract::{JsonBody, SignedIn};
use super::state::State;
use super::views::TopupSessionView;

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/credits/topup", web::post().to(topup));
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TopupRequest {
    /// Cents.
    amount: i64,
}

/// `5€` for 500 cents, `5.50€` for 550: the seed's limit messages.
fn euros(cents: i64) -> String {
    if cents % 100 == 0 {
        format!("{}€", cents / 100)
    } else {
        format!("{}.{:02}€", cents / 100, (cents % 100).abs())
    }
}

/// Opens a Checkout Session for a top-up of `amount` cents: `{url, sessionId}`.
#[utoipa::path(post, path = "/api/credits/topup", tag = "credits", security(("clerk" = [])),
    request_body = TopupRequest,
    responses(
        (status = 200, description = "The Checkout Session", body = super::views::TopupSessionView),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::BodyErrors,
        super::error::RateLimited,
        (status = 500, description = "INTERNAL (the payment provider refused the request)", body = super::error::ErrorBody),
        (status = 503, description = "UNAVAILABLE (Stripe not configured or unreachable, database unavailable)", body = super::error::ErrorBody)
    ))]
async fn topup(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(TopupRequest { amount }): JsonBody<TopupRequest>,
) -> Result<HttpResponse, ApiError> {
    let limits = &state.settings.stripe;
    if amount < limits.topup_cents_min {
        return Err(ApiError::invalid(format!(
            "Minimum top-up is {}",
            euros(limits.topup_cents_min)
        )));
    }
    if amount > limits.topup_cents_max {
        return Err(ApiError::invalid(format!(
            "Maximum top-up is {}",
            euros(limits.topup_cents_max)
        )));
    }
    let api = state.stripe.as_deref().ok_or_else(|| {
        ApiError::new(
            Code::Unavailable,
            "top-ups are not available: Stripe is not configured (stripe.secret_key)",
        )
    })?;
    let account = state.account(&clerk_id).await?;
    state.rate_limits.topup(account)?;
    let session = state
        .topups
        .open_session(api, account, &clerk_id, amount)
        .await
        .map_err(ApiError::from)?;
    Ok(HttpResponse::Ok().json(TopupSessionView {
        url: session.url,
        session_id: session.id,
    }))
}
