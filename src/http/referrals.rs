//! `GET /api/credits/referral` (the user's code and counts) and
//! `POST /api/credits/referral {code}` (a new user presents a code).

use actix_web::{web, HttpResponse};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, Code};
use super::extract::{Account, JsonBody, SignedIn};
use super::state::State;
use super::views::Referred;
use crate::referrals::{self, Refusal};

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/referral", web::get().to(show))
        .route("/api/credits/referral", web::post().to(redeem));
}

/// A user's referral code and what it brought.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReferralView {
    /// 8 characters, stable, to give to friends.
    code: String,
    /// Users who presented this code.
    referred_count: i64,
    /// Of those, the ones whose first paid top-up paid both bonuses and
    /// was neither refunded nor lost in a dispute.
    rewarded_count: i64,
    /// Promo credit each side gets.
    bonus_micros: i64,
    /// Whether this user presented someone's code.
    referred: bool,
    /// RFC 3339; until when this user may present a code (null once referred).
    redeem_until: Option<String>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CodeBody {
    /// The code a friend gave (case and surrounding spaces do not matter).
    code: String,
}

/// The user's referral code (made on first asking) and its counts.
#[utoipa::path(get, path = "/api/credits/referral", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "The code and its counts", body = ReferralView),
        super::error::SessionAuth,
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn show(
    state: State,
    Account(account): Account,
) -> Result<HttpResponse, ApiError> {
    let summary = state.referrals.summary(account).await?;
    Ok(HttpResponse::Ok().json(ReferralView {
        code: summary.code,
        referred_count: summary.referred_count,
        rewarded_count: summary.rewarded_count,
        bonus_micros: state.referral_bonus.amount.get(),
        referred: summary.referred,
        redeem_until: summary
            .redeem_until
            .map(|at| at.to_rfc3339_opts(SecondsFormat::Secs, true)),
    }))
}

/// Presents a friend's code, once, within 7 days of signing up. Both get
/// the referral bonus after this user's first paid top-up.
#[utoipa::path(post, path = "/api/credits/referral", tag = "credits", security(("clerk" = [])),
    request_body = CodeBody,
    responses(
        (status = 201, description = "Taken: `{referred: true, alreadyApplied: false}`", body = super::views::Referred),
        (status = 200, description = "This code was presented before: `alreadyApplied: true`", body = super::views::Referred),
        (status = 400, description = "INVALID_REQUEST (field `code`: not a code's shape)", body = super::error::ErrorBody),
        super::error::SessionAuth,
        (status = 403, description = "FORBIDDEN (cookie-authenticated write from an origin not allowed)", body = super::error::ErrorBody),
        (status = 404, description = "REFERRAL_CODE_UNKNOWN", body = super::error::ErrorBody),
        super::error::BodyErrors,
        (status = 409, description = "REFERRAL_WINDOW_CLOSED (signed up at Clerk more than 7 days ago), ALREADY_REFERRED (another code was presented, by this account or another of the same mailbox), SELF_REFERRAL (own code, or its owner has the same canonical mailbox)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn redeem(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(asked): JsonBody<CodeBody>,
) -> Result<HttpResponse, ApiError> {
    let account = state.account(&clerk_id).await?;
    if let Some(problem) = crate::text::problem(&asked.code) {
        return Err(ApiError::invalid(format!("field `code`: {problem}")));
    }
    let Some(code) = referrals::normalize(&asked.code) else {
        return Err(ApiError::invalid(format!(
            "field `code`: a referral code is {} letters and digits",
            referrals::CODE_LEN
        )));
    };
    let now = state.engine.clock().now();
    let redeemed = state
        .referrals
        .redeem(account, &code, now)
        .await?
        .map_err(refused)?;
    let body = Referred {
        referred: true,
        already_applied: redeemed.replayed,
    };
    Ok(if redeemed.replayed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}

fn refused(refusal: Refusal) -> ApiError {
    let (code, message) = match refusal {
        Refusal::Unknown => (
            Code::ReferralCodeUnknown,
            "no user has this referral code".to_owned(),
        ),
        Refusal::OwnCode => (
            Code::SelfReferral,
            "this referral code is your own".to_owned(),
        ),
        Refusal::SameEmail => (
            Code::SelfReferral,
            "this referral code belongs to an account with your email address".to_owned(),
        ),
        Refusal::TooLate { closed_at } => (
            Code::ReferralWindowClosed,
            format!(
                "a referral code can be presented within 7 days of signing up; that ended at {}",
                closed_at.to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        ),
        Refusal::AlreadyReferred => (
            Code::AlreadyReferred,
            "you already presented another referral code".to_owned(),
        ),
        Refusal::PersonAlreadyReferred => (
            Code::AlreadyReferred,
            "an account with your email address already presented a referral code".to_owned(),
        ),
    };
    ApiError::new(code, message)
}
