//! Reading a request body within the server's size and time bounds, for
//! the routes that take one.

use std::time::Duration;

use actix_web::web;
use futures_util::StreamExt;

use super::error::{ApiError, Code};

/// Reads a request body up to `server.body_limit_bytes`, within
/// `server.client_request_timeout_ms`: a client that sends its body too
/// slowly gets 408 instead of holding the request open.
pub async fn read_body(
    mut payload: web::Payload,
    server: &crate::config::ServerSettings,
) -> Result<web::BytesMut, ApiError> {
    let limit = server.body_limit_bytes;
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("request body: {e}")))?;
            if body.len() + chunk.len() > limit {
                return Err(ApiError::new(
                    Code::PayloadTooLarge,
                    format!("request body: larger than {limit} bytes"),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let deadline = Duration::from_millis(server.client_request_timeout_ms);
    tokio::time::timeout(deadline, read).await.map_err(|_| {
        metrics::counter!(crate::telemetry::REQUEST_BODY_TIMEOUTS_TOTAL.name).increment(1);
        ApiError::new(
            Code::RequestTimeout,
            format!(
                "request body: not received within {} ms",
                server.client_request_timeout_ms
            ),
        )
    })?
}
