//! What a handler takes from its request before it runs, in the order its
//! parameters name them: who is asking (a signed-in user, their account,
//! or an operator),
//! then the JSON body. The first failure answers: a 401 before a 400, as
//! when each handler checked them itself.

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;
use serde::de::DeserializeOwned;

use super::auth::authenticate_operator;
use super::body::read_body;
use super::error::{parse_json, ApiError};
use super::state::AppState;
use crate::clerk::tokens::ClerkUserId;
use crate::ledger::AccountId;
use crate::operators::OperatorId;

/// The application state of a request (every route is mounted with it).
fn state_of(request: &HttpRequest) -> Result<web::Data<AppState>, ApiError> {
    request
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::internal("request", "the application state is not mounted"))
}

/// The Clerk user of a valid session token (bearer or `__session` cookie).
pub struct SignedIn(pub ClerkUserId);

impl FromRequest for SignedIn {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<SignedIn, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move {
            let state = state_of(&request)?;
            Ok(SignedIn(state.authenticate(&request).await?))
        })
    }
}

/// The account of the signed-in user (created on first sight; a deleted
/// user is refused with 401 `ACCOUNT_DELETED`), for the routes that need
/// only the account.
pub struct Account(pub AccountId);

impl FromRequest for Account {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Account, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move {
            let state = state_of(&request)?;
            let clerk_id = state.authenticate(&request).await?;
            Ok(Account(state.account(&clerk_id).await?))
        })
    }
}

/// An operator, named for the record: the admin bearer token, a console
/// session, or a listed operator's Clerk session (see
/// `auth::authenticate_operator`; nothing configured: the admin routes do
/// not exist, 404).
pub struct Operator(pub OperatorId);

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Operator, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        let request = request.clone();
        Box::pin(async move {
            let state = state_of(&request)?;
            let now = chrono::Utc::now().timestamp();
            let operator =
                authenticate_operator(&state.settings.admin, &state.clerk, &request, now).await?;
            Ok(Operator(operator))
        })
    }
}

/// A JSON object body, read within `server.body_limit_bytes` and
/// `server.client_request_timeout_ms`, parsed with the field at fault named.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned + 'static> FromRequest for JsonBody<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<JsonBody<T>, ApiError>>;

    fn from_request(request: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let state = state_of(request);
        let payload = web::Payload::from_request(request, payload).into_inner();
        Box::pin(async move {
            let state = state?;
            let payload = payload.map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
            let body = read_body(payload, &state.settings.server).await?;
            Ok(JsonBody(parse_json(&body)?))
        })
    }
}
