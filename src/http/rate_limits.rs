//! The per-IP rate of the routes that need no user token: webhooks,
//! health, metrics and unknown paths (`rate_limits.unauthenticated_per_ip_per_second`).
//! Routes with a user or admin token are limited per account where it matters.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::ResponseError;

use super::error::ApiError;
use super::state::State;

/// Refuses (429 with `Retry-After`) a request from an address over its
/// rate; passes every other request on. Wraps only the routes that need no
/// token (`http::without_token`), so which routes it limits is declared
/// where they are registered.
pub async fn unauthenticated(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let refused = match (request.app_data::<State>(), request.peer_addr()) {
        (Some(state), Some(peer)) => state.rate_limits.unauthenticated(peer.ip()).err(),
        _ => None,
    };
    if let Some(refused) = refused {
        let response = ApiError::from(refused).error_response();
        return Ok(request.into_response(response).map_into_right_body());
    }
    Ok(next.call(request).await?.map_into_left_body())
}
