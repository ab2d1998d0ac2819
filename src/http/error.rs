//! One error shape for every route: `{"error": CODE, "message": "…"}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use crate::ledger::LedgerError;
use crate::payments::PaymentError;
use crate::stripe::StripeCallError;

/// Seconds a client should wait before retrying when the error gives none.
pub const RETRY_AFTER_S: u32 = 1;

/// Whether a code's response carries a `Retry-After` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Retrying the same request will not help.
    Never,
    /// Always sent: the error's own seconds, else `RETRY_AFTER_S`.
    Always,
}

/// Declares `Code` from one table: each row names the variant, the string
/// clients see (the variant's name in SCREAMING_SNAKE_CASE), the HTTP
/// status and the `Retry-After` rule. The wire string, the status, the
/// header and the OpenAPI enum all read this table.
macro_rules! error_codes {
    ($($variant:ident = $wire:literal, $status:ident, $retry:ident;)+) => {
        /// A stable error code, as documented in README's error table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Code {
            $(
                #[doc = concat!("`", $wire, "`")]
                $variant,
            )+
        }

        impl Code {
            /// Every code, in the table's order (README, `/openapi.json`).
            pub const ALL: &'static [Code] = &[$(Code::$variant),+];

            /// The string clients see in `error`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $wire,)+
                }
            }

            /// The HTTP status every response with this code has.
            pub fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)+
                }
            }

            /// Whether the response carries `Retry-After`.
            pub fn retry_after(self) -> RetryAfter {
                match self {
                    $(Code::$variant => RetryAfter::$retry,)+
                }
            }
        }
    };
}

error_codes! {
    InvalidRequest = "INVALID_REQUEST", BAD_REQUEST, Never;
    NoApiKey = "NO_API_KEY", BAD_REQUEST, Never;
    ByokKeyRefused = "BYOK_KEY_REFUSED", BAD_REQUEST, Never;
    Unauthorized = "UNAUTHORIZED", UNAUTHORIZED, Never;
    AccountDeleted = "ACCOUNT_DELETED", UNAUTHORIZED, Never;
    InsufficientCredits = "INSUFFICIENT_CREDITS", PAYMENT_REQUIRED, Never;
    Forbidden = "FORBIDDEN", FORBIDDEN, Never;
    NotFound = "NOT_FOUND", NOT_FOUND, Never;
    RequestTimeout = "REQUEST_TIMEOUT", REQUEST_TIMEOUT, Never;
    Conflict = "CONFLICT", CONFLICT, Never;
    PayloadTooLarge = "PAYLOAD_TOO_LARGE", PAYLOAD_TOO_LARGE, Never;
    RateLimited = "RATE_LIMITED", TOO_MANY_REQUESTS, Always;
    Internal = "INTERNAL", INTERNAL_SERVER_ERROR, Never;
    ByokNotConfigured = "BYOK_NOT_CONFIGURED", NOT_IMPLEMENTED, Never;
    ProviderError = "PROVIDER_ERROR", BAD_GATEWAY, Never;
    Overloaded = "OVERLOADED", SERVICE_UNAVAILABLE, Always;
    ProviderUnavailable = "PROVIDER_UNAVAILABLE", SERVICE_UNAVAILABLE, Always;
    Unavailable = "UNAVAILABLE", SERVICE_UNAVAILABLE, Always;
    ProviderTimeout = "PROVIDER_TIMEOUT", GATEWAY_TIMEOUT, Never;
    SpendLimitReached = "SPEND_LIMIT_REACHED", PAYMENT_REQUIRED, Always;
    ReferralCodeUnknown = "REFERRAL_CODE_UNKNOWN", NOT_FOUND, Never;
    ReferralWindowClosed = "REFERRAL_WINDOW_CLOSED", CONFLICT, Never;
    AlreadyReferred = "ALREADY_REFERRED", CONFLICT, Never;
    SelfReferral = "SELF_REFERRAL", CONFLICT, Never;
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl utoipa::PartialSchema for Code {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(Code::ALL.iter().map(|code| code.as_str())))
            .into()
    }
}

/// Named `ErrorCode` in the document, as before the table existed.
impl ToSchema for Code {
    fn name() -> std::borrow::Cow<'static, str> {
        std::borrow::Cow::Borrowed("ErrorCode")
    }
}

/// Every error: `{"error": CODE, "message": "…"}`, plus the fields some
/// codes add (`retryAfterSeconds`, the amounts of `INSUFFICIENT_CREDITS`).
// The body every `ApiError` is serialized as, and its OpenAPI schema.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    error: Code,
    /// What the caller can do about it.
    message: String,
    /// RATE_LIMITED, PROVIDER_UNAVAILABLE: seconds before a retry (also in `Retry-After`).
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
    /// The fields some codes add, each documented with its code.
    #[serde(flatten)]
    #[schema(ignore)]
    details: serde_json::Map<String, serde_json::Value>,
}

/// Responses by status, as `#[utoipa::path]` takes them.
type Responses = std::collections::BTreeMap<String, RefOr<utoipa::openapi::response::Response>>;

/// The error rows many routes share, written once and named in each
/// route's `#[utoipa::path]` (`responses(…, BodyErrors, Internal)`); a route
/// whose row says something of its own keeps it inline instead.
fn error_rows(rows: &[(u16, &str)]) -> Responses {
    use utoipa::openapi::content::ContentBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::Ref;
    rows.iter()
        .map(|&(status, description)| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", body)
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}

/// 400: the request does not parse; the message names the field.
pub struct Invalid;

impl utoipa::IntoResponses for Invalid {
    fn responses() -> Responses {
        error_rows(&[(400, "INVALID_REQUEST (the message names the field)")])
    }
}

/// 401 of a user's route: no or a bad Clerk session token.
pub struct SessionAuth;

impl utoipa::IntoResponses for SessionAuth {
    fn responses() -> Responses {
        error_rows(&[(
            401,
            "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED",
        )])
    }
}

/// 401 of an admin route: no or a bad admin token.
pub struct AdminAuth;

impl utoipa::IntoResponses for AdminAuth {
    fn responses() -> Responses {
        error_rows(&[(401, "UNAUTHORIZED (no or bad admin token)")])
    }
}

/// 429 of a route under a rate: retry after the header's seconds.
pub struct RateLimited;

impl utoipa::IntoResponses for RateLimited {
    fn responses() -> Responses {
        error_rows(&[(429, "RATE_LIMITED (Retry-After)")])
    }
}

/// 408 and 413: the route reads a request body.
pub struct BodyErrors;

impl utoipa::IntoResponses for BodyErrors {
    fn responses() -> Responses {
        error_rows(&[
            (408, "REQUEST_TIMEOUT (the body did not arrive in time)"),
            (413, "PAYLOAD_TOO_LARGE"),
        ])
    }
}

/// What a webhook route answers besides its 200 and its 503: a bad
/// signature or payload, a body too slow or too large, too many requests
/// from one address, a bug.
pub struct WebhookErrors;

impl utoipa::IntoResponses for WebhookErrors {
    fn responses() -> Responses {
        error_rows(&[
            (400, "INVALID_REQUEST (bad signature or payload)"),
            (408, "REQUEST_TIMEOUT (the body did not arrive in time)"),
            (413, "PAYLOAD_TOO_LARGE"),
            (429, "RATE_LIMITED (Retry-After)"),
            (500, "INTERNAL"),
        ])
    }
}

/// 500: a bug or a broken invariant, logged with its cause.
pub struct Internal;

impl utoipa::IntoResponses for Internal {
    fn responses() -> Responses {
        error_rows(&[(500, "INTERNAL")])
    }
}

/// 503 of a route that reads the ledger: the database or the account's
/// actor did not answer, or its queue is full.
pub struct LedgerUnavailable;

impl utoipa::IntoResponses for LedgerUnavailable {
    fn responses() -> Responses {
        error_rows(&[(
            503,
            "UNAVAILABLE (database or ledger unavailable; retry), OVERLOADED (Retry-After)",
        )])
    }
}

/// 503 of a route that reads only the database.
pub struct DatabaseUnavailable;

impl utoipa::IntoResponses for DatabaseUnavailable {
    fn responses() -> Responses {
        error_rows(&[(503, "UNAVAILABLE (database unavailable; retry)")])
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    /// Extra fields for the body (e.g. the amounts of INSUFFICIENT_CREDITS).
    pub details: Option<serde_json::Value>,
    /// Seconds before a retry: the `Retry-After` header of the codes whose
    /// rule sends one (`RETRY_AFTER_S` when not given) and, when given,
    /// `retryAfterSeconds` in the body.
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
                })),
                retry_after_s: Some(retry_after_s),
            },
            LedgerError::KeyLimitReached {
                key,
                limit,
                spent,
                held,
                required,
            } => ApiError {
                code: Code::SpendLimitReached,
                message: format!(
                    "the spending limit of {limit} of this API key is reached: {spent} spent and {held} held, {required} more needed; raise it by making a new key"
                ),
                details: Some(serde_json::json!({
                    "limit": "apiKey",
                    "apiKeyId": key.0,
                    "limitMicros": limit.get(),
                    "spentMicros": spent.get(),
                    "heldMicros": held.get(),
                    "requiredMicros": required.get(),
                })),
                retry_after_s: None,
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

impl From<crate::rate_limits::Refused> for ApiError {
    fn from(refused: crate::rate_limits::Refused) -> ApiError {
        let message = match refused.limit {
            crate::rate_limits::Limit::ChatsInFlight => {
                "too many chats in flight for this account; retry when one has finished"
            }
            crate::rate_limits::Limit::Topups => {
                "too many top-ups opened in the last minute; retry later"
            }
            crate::rate_limits::Limit::Unauthenticated => {
                "too many requests from this address; slow down"
            }
        };
        ApiError {
            code: Code::RateLimited,
            message: message.into(),
            details: None,
            retry_after_s: Some(refused.retry_after_s()),
        }
    }
}

/// A balance stream refused: over the account's bound a 429 (the person's
/// own tabs hold the streams; the page falls back to polling), over the
/// instance's or while it drains a 503 (this instance's capacity, not the
/// caller's doing; a retry may reach another instance).
impl From<crate::ledger::WatchRefused> for ApiError {
    fn from(refused: crate::ledger::WatchRefused) -> ApiError {
        use crate::ledger::WatchRefused;
        let (code, message, retry_after_s) = match refused {
            WatchRefused::AccountFull => (
                Code::RateLimited,
                "too many balance streams open for this account; close one or poll GET /api/credits",
                STREAM_RETRY_AFTER_S,
            ),
            WatchRefused::InstanceFull => (
                Code::Unavailable,
                "this server holds as many balance streams as it may; retry later or poll GET /api/credits",
                STREAM_RETRY_AFTER_S,
            ),
            WatchRefused::Closing => (
                Code::Unavailable,
                "this server is shutting down; reconnect",
                u64::from(RETRY_AFTER_S),
            ),
        };
        ApiError {
            code,
            message: message.into(),
            details: None,
            retry_after_s: Some(retry_after_s),
        }
    }
}

/// Retry-After of a refused balance stream: streams end at their own pace.
const STREAM_RETRY_AFTER_S: u64 = 10;

/// Stripe unreachable is a 503 to retry; a refusal is our bug (500),
/// logged with Stripe's message, which the client does not see.
impl From<StripeCallError> for ApiError {
    fn from(error: StripeCallError) -> ApiError {
        match error {
            StripeCallError::Unreachable(message) => {
                tracing::warn!(%message, "Stripe unreachable");
                ApiError::new(
                    Code::Unavailable,
                    "the payment provider is unreachable; retry shortly",
                )
            }
            refused @ StripeCallError::Refused { .. } => {
                tracing::error!(error = %refused, "Stripe refused a request");
                ApiError::new(
                    Code::Internal,
                    "the payment provider refused the request; the operators have been alerted",
                )
            }
        }
    }
}

/// What a Stripe route answers for each failure of `crate::stripe`.
impl From<PaymentError> for ApiError {
    fn from(error: PaymentError) -> ApiError {
        match error {
            PaymentError::Invalid(message) => ApiError::invalid(message),
            PaymentError::NotCreditedYet(message) => ApiError::new(Code::Unavailable, message),
            PaymentError::Call(error) => error.into(),
            PaymentError::Ledger(error) => error.into(),
            PaymentError::Db(error) => error.into(),
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let details = match &self.details {
            Some(serde_json::Value::Object(details)) => details.clone(),
            _ => serde_json::Map::new(),
        };
        let body = ErrorBody {
            error: self.code,
            message: self.message.clone(),
            retry_after_seconds: self.retry_after_s,
            details,
        };
        let mut response = HttpResponse::build(self.status_code());
        if self.code.retry_after() == RetryAfter::Always {
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
    use super::{Code, RetryAfter};

    /// `ProviderError` → `PROVIDER_ERROR`: the Rust name says the wire string.
    fn screaming_snake(name: &str) -> String {
        let mut out = String::new();
        for (index, letter) in name.chars().enumerate() {
            if letter.is_ascii_uppercase() && index > 0 {
                out.push('_');
            }
            out.push(letter.to_ascii_uppercase());
        }
        out
    }

    #[test]
    fn every_code_is_listed_once_and_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        for (index, code) in Code::ALL.iter().enumerate() {
            assert!(!Code::ALL[..index].contains(code), "{code:?} twice");
            let row = format!("| `{}` | {}", code.as_str(), code.status().as_u16());
            assert!(
                readme.contains(&row),
                "README lacks the row of {}",
                code.as_str()
            );
        }
    }

    #[test]
    fn every_wire_code_is_its_rust_name_in_screaming_snake_case() {
        for code in Code::ALL {
            assert_eq!(code.as_str(), screaming_snake(&format!("{code:?}")));
        }
    }

    #[test]
    fn every_503_tells_the_client_when_to_retry() {
        for code in Code::ALL {
            if code.status() == actix_web::http::StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(code.retry_after(), RetryAfter::Always, "{code:?}");
            }
        }
    }
}
