//! One error shape for every route: `{"error": CODE, "message": "…"}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::de::DeserializeOwned;

use crate::ledger::LedgerError;

/// Seconds a client should wait before retrying after OVERLOADED.
pub const RETRY_AFTER_S: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Unauthorized,
    AccountDeleted,
    RateLimited,
    Forbidden,
    InvalidRequest,
    NotFound,
    Conflict,
    InsufficientCredits,
    SpendLimitReached,
    ReferralCodeUnknown,
    ReferralWindowClosed,
    AlreadyReferred,
    SelfReferral,
    PayloadTooLarge,
    RequestTimeout,
    Overloaded,
    Unavailable,
    Internal,
    NoApiKey,
    ByokKeyRefused,
    ByokNotConfigured,
    ProviderUnavailable,
    ProviderTimeout,
    ProviderFailed,
}

impl Code {
    /// Every code, as documented (README, `/openapi.json`).
    pub const ALL: [Code; 24] = [
        Code::InvalidRequest,
        Code::NoApiKey,
        Code::ByokKeyRefused,
        Code::Unauthorized,
        Code::AccountDeleted,
        Code::InsufficientCredits,
        Code::Forbidden,
        Code::NotFound,
        Code::RequestTimeout,
        Code::Conflict,
        Code::PayloadTooLarge,
        Code::RateLimited,
        Code::Internal,
        Code::ByokNotConfigured,
        Code::ProviderFailed,
        Code::Overloaded,
        Code::ProviderUnavailable,
        Code::Unavailable,
        Code::ProviderTimeout,
        Code::SpendLimitReached,
        Code::ReferralCodeUnknown,
        Code::ReferralWindowClosed,
        Code::AlreadyReferred,
        Code::SelfReferral,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::Unauthorized => "UNAUTHORIZED",
            Code::AccountDeleted => "ACCOUNT_DELETED",
            Code::RateLimited => "RATE_LIMITED",
            Code::Forbidden => "FORBIDDEN",
            Code::InvalidRequest => "INVALID_REQUEST",
            Code::NotFound => "NOT_FOUND",
            Code::Conflict => "CONFLICT",
            Code::InsufficientCredits => "INSUFFICIENT_CREDITS",
            Code::SpendLimitReached => "SPEND_LIMIT_REACHED",
            Code::ReferralCodeUnknown => "REFERRAL_CODE_UNKNOWN",
            Code::ReferralWindowClosed => "REFERRAL_WINDOW_CLOSED",
            Code::AlreadyReferred => "ALREADY_REFERRED",
            Code::SelfReferral => "SELF_REFERRAL",
            Code::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Code::RequestTimeout => "REQUEST_TIMEOUT",
            Code::Overloaded => "OVERLOADED",
            Code::Unavailable => "UNAVAILABLE",
            Code::Internal => "INTERNAL",
            Code::NoApiKey => "NO_API_KEY",
            Code::ByokKeyRefused => "BYOK_KEY_REFUSED",
            Code::ByokNotConfigured => "BYOK_NOT_CONFIGURED",
            Code::ProviderUnavailable => "PROVIDER_UNAVAILABLE",
            Code::ProviderTimeout => "PROVIDER_TIMEOUT",
            Code::ProviderFailed => "PROVIDER_ERROR",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::Unauthorized | Code::AccountDeleted => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::Conflict => StatusCode::CONFLICT,
            Code::InsufficientCredits | Code::SpendLimitReached => StatusCode::PAYMENT_REQUIRED,
            Code::ReferralCodeUnknown => StatusCode::NOT_FOUND,
            Code::ReferralWindowClosed | Code::AlreadyReferred | Code::SelfReferral => {
                StatusCode::CONFLICT
            }
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::Overloaded | Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::NoApiKey | Code::ByokKeyRefused => StatusCode::BAD_REQUEST,
            Code::ByokNotConfigured => StatusCode::NOT_IMPLEMENTED,
            Code::ProviderUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::ProviderTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::ProviderFailed => StatusCode::BAD_GATEWAY,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Extra fields for the body (e.g. the amounts of INSUFFICIENT_CREDITS).
    pub details: Option<serde_json::Value>,
    /// Seconds for the `Retry-After` header of RATE_LIMITED,
    /// PROVIDER_UNAVAILABLE and SPEND_LIMIT_REACHED (`RETRY_AFTER_S` when
    /// not given).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            details: None,
            retry_after_s: None,
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::InvalidRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Unauthorized, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::NotFound, message)
    }

    /// A failure whose details must not reach the client: logged here.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "{context}");
        ApiError::new(Code::Internal, "internal error")
    }
}

impl From<LedgerError> for ApiError {
    fn from(error: LedgerError) -> ApiError {
        match error {
            LedgerError::InvalidRequest(message) => ApiError::invalid(message),
            LedgerError::AccountNotFound(_) => ApiError::not_found("account not found"),
            LedgerError::HoldNotFound(hold) => {
                ApiError::not_found(format!("hold {hold} not found"))
            }
            LedgerError::Conflict(message) => ApiError::new(Code::Conflict, message),
            LedgerError::InsufficientCredits {
                available,
                required,
                ..
            } => ApiError {
                code: Code::InsufficientCredits,
                message: format!(
                    "insufficient credits: {available} available, {required} required"
                ),
                details: Some(serde_json::json!({
                    "availableMicros": available.get(),
                    "requiredMicros": required.get(),
                })),
                retry_after_s: None,
            },
            LedgerError::SpendLimitReached {
                window,
                limit,
                spent,
                held,
                required,
                resets_at,
                retry_after_s,
            } => ApiError {
                code: Code::SpendLimitReached,
                message: format!(
                    "the {} spending limit of {limit} is reached: {spent} spent and {held} held in this window, {required} more needed; it resets at {}",
                    window.as_str(),
                    resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                ),
                details: Some(serde_json::json!({
                    "limit": window.as_str(),
                    "limitMicros": limit.get(),
                    "spentMicros": spent.get(),
                    "heldMicros": held.get(),
                    "requiredMicros": required.get(),
                    "resetsAt": resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    "retryAfterSeconds": retry_after_s,
                })),
                retry_after_s: Some(retry_after_s),
            },
            LedgerError::Overloaded => ApiError::new(
                Code::Overloaded,
                "too many operations in flight for this account; retry shortly",
            ),
            LedgerError::Unavailable(message) => {
                tracing::warn!(%message, "ledger unavailable");
                ApiError::retry_later("the ledger is temporarily unavailable; retry")
            }
            LedgerError::Reset => {
                ApiError::retry_later("the ledger is temporarily unavailable; retry")
            }
            LedgerError::Internal(message) => ApiError::internal("ledger invariant", message),
        }
    }
}

impl From<crate::accounts::AccountError> for ApiError {
    fn from(error: crate::accounts::AccountError) -> ApiError {
        match error {
            deleted @ crate::accounts::AccountError::Deleted => {
                ApiError::new(Code::AccountDeleted, deleted.to_string())
            }
            crate::accounts::AccountError::Db(error) => error.into(),
        }
    }
}

impl From<crate::limits::Refused> for ApiError {
    fn from(refused: crate::limits::Refused) -> ApiError {
        let message = match refused.limit {
            crate::limits::Limit::ChatsInFlight => {
                "too many chats in flight for this account; retry when one has finished"
            }
            crate::limits::Limit::Topups => {
                "too many top-ups opened in the last minute; retry later"
            }
            crate::limits::Limit::Unauthenticated => {
                "too many requests from this address; slow down"
            }
        };
        ApiError {
            code: Code::RateLimited,
            message: message.into(),
            details: Some(serde_json::json!({ "retryAfterSeconds": refused.retry_after_s() })),
            retry_after_s: Some(refused.retry_after_s()),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = serde_json::json!({
            "error": self.code.as_str(),
            "message": self.message,
        });
        if let (Some(serde_json::Value::Object(extra)), Some(object)) =
            (&self.details, body.as_object_mut())
        {
            for (key, value) in extra {
                object.insert(key.clone(), value.clone());
            }
        }
        let mut response = HttpResponse::build(self.status_code());
        if self.code == Code::Overloaded {
            response.insert_header(("Retry-After", RETRY_AFTER_S.to_string()));
        }
        if matches!(
            self.code,
            Code::ProviderUnavailable | Code::RateLimited | Code::SpendLimitReached
        ) || self.retry_after_s.is_some()
        {
            let seconds = self.retry_after_s.unwrap_or(u64::from(RETRY_AFTER_S));
            response.insert_header(("Retry-After", seconds.to_string()));
        }
        response.json(body)
    }
}

/// Parses a JSON body, naming the field at fault in the error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde also reads a struct from an array of its fields: only objects pass.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::invalid("request body: expected a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::invalid(format!("request body: malformed JSON: {inner}"))
        } else if path == "." {
            ApiError::invalid(format!("request body: {inner}"))
        } else {
            ApiError::invalid(format!("field `{path}`: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::invalid(format!("request body: malformed JSON: {e}")))?;
    Ok(value)
}

impl ApiError {
    /// 503 `UNAVAILABLE` for a failure that goes away: with `Retry-After`.
    pub fn retry_later(message: impl Into<String>) -> ApiError {
        ApiError {
            code: Code::Unavailable,
            message: message.into(),
            details: None,
            retry_after_s: Some(u64::from(RETRY_AFTER_S)),
        }
    }
}

/// A database failure on a request path: out of reach is 503 with
/// `Retry-After`; a constraint the caller did not map to a conflict, or a
/// failed query, is a bug: 500, no retry. The cause chain goes to the log,
/// never to the client.
impl From<crate::db::DbError> for ApiError {
    fn from(error: crate::db::DbError) -> ApiError {
        if error.is_unavailable() {
            tracing::warn!(error = %error.chain(), "database unavailable");
            return ApiError::retry_later("the database is temporarily unavailable; retry");
        }
        ApiError::internal("database", error.chain())
    }
}

/// Every 404 the router gives, in the common shape.
pub async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no such route"))
}

impl From<crate::metering::UsageError> for ApiError {
    fn from(error: crate::metering::UsageError) -> ApiError {
        match error {
            crate::metering::UsageError::InvalidRange(message) => ApiError::invalid(message),
            crate::metering::UsageError::Db(error) => error.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Code;

    /// Fails to compile when a code is added without being considered here.
    fn listed(code: Code) -> bool {
        match code {
            Code::Unauthorized
            | Code::AccountDeleted
            | Code::Forbidden
            | Code::RateLimited
            | Code::InvalidRequest
            | Code::NotFound
            | Code::Conflict
            | Code::InsufficientCredits
            | Code::SpendLimitReached
            | Code::ReferralCodeUnknown
            | Code::ReferralWindowClosed
            | Code::AlreadyReferred
            | Code::SelfReferral
            | Code::PayloadTooLarge
            | Code::RequestTimeout
            | Code::Overloaded
            | Code::Unavailable
            | Code::Internal
            | Code::NoApiKey
            | Code::ByokKeyRefused
            | Code::ByokNotConfigured
            | Code::ProviderUnavailable
            | Code::ProviderTimeout
            | Code::ProviderFailed => Code::ALL.contains(&code),
        }
    }

    #[test]
    fn every_code_is_listed_once_and_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        for (index, code) in Code::ALL.iter().enumerate() {
            assert!(listed(*code));
            assert!(!Code::ALL[..index].contains(code), "{code:?} twice");
            let row = format!("| `{}` | {}", code.as_str(), code.status().as_u16());
            assert!(
                readme.contains(&row),
                "README lacks the row of {}",
                code.as_str()
            );
        }
    }
}
