//! `GET`/`PUT /api/credits/email-preferences`: whether the person gets
//! alert emails (low balance, depleted, auto-recharge failed or switched
//! off). Receipts are always sent. See `crate::email`.

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{Account, JsonBody};
use super::state::State;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits/email-preferences", web::get().to(show))
        .route("/api/credits/email-preferences", web::put().to(save));
}

/// The person's email choices.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct EmailPreferences {
    /// Alert emails on (the default) or off; receipts are always sent.
    alert_emails: bool,
}

/// The person's email choices.
#[utoipa::path(get, path = "/api/credits/email-preferences", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "Whether alert emails are on", body = EmailPreferences),
        super::error::SessionAuth,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn show(
    state: State,
    Account(account): Account,
) -> Result<HttpResponse, ApiError> {
    let alert_emails = state.emails.alerts_on(account).await?;
    Ok(HttpResponse::Ok().json(EmailPreferences { alert_emails }))
}

/// Switches alert emails on or off; alerts still waiting to be sent
/// follow the new choice.
#[utoipa::path(put, path = "/api/credits/email-preferences", tag = "credits", security(("clerk" = [])),
    request_body = EmailPreferences,
    responses(
        (status = 200, description = "The saved choice, as GET shows it", body = EmailPreferences),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::DatabaseUnavailable
    ))]
pub(super) async fn save(
    state: State,
    Account(account): Account,
    JsonBody(EmailPreferences { alert_emails }): JsonBody<EmailPreferences>,
) -> Result<HttpResponse, ApiError> {
    state.emails.set_alerts(account, alert_emails).await?;
    Ok(HttpResponse::Ok().json(EmailPreferences { alert_emails }))
}
