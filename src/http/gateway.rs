//! The gateway: `POST /v1/chat/completions` (OpenAI's Chat Completions),
//! `POST /v1/messages` (Anthropic's Messages) and `GET /v1/models`, so that
//! an official SDK pointed at creditd spends the person's credits. A call
//! is metered exactly like `/api/chat` (`crate::metering::chat`: hold,
//! call, settlement); its body is passed through (`crate::metering::gateway`
//! reads what is metered) and the provider's answer comes back as sent,
//! with its cost: `usage.cost` and the `creditd-cost-micros` and
//! `creditd-balance-micros` headers of a whole answer, `usage.cost` in the
//! last usage chunk (OpenAI, when the client asked for it) or
//! `message_delta` (Anthropic) of a stream.
//!
//! Callers: a gateway API key (`cd_…`) in `Authorization: Bearer` (OpenAI
//! SDKs) or `x-api-key` (Anthropic SDKs), looked up on every call; a Clerk
//! session token works too. A model is served by its own format's route
//! only: an OpenAI model on `/v1/messages` (or the reverse) is refused with
//! 400 naming the route to use, rather than translated (a translation
//! cannot be faithful for every content block, tool and option).
//!
//! Errors come in each format's own shape, with the status its SDK
//! expects: out of credits or over a limit is 402 (`insufficient_credits`,
//! `spend_limit_reached`), never 429, which SDKs retry. A stream that fails
//! after its 200 ends with the format's error event (OpenAI: an error
//! chunk, then `[DONE]`; Anthropic: `event: error`).

use std::convert::Infallible;

use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use super::body::read_body;
use super::error::{ApiError, Code, RetryAfter, RETRY_AFTER_S};
use super::state::State;
use crate::clerk::tokens::TokenError;
use crate::ledger::{KeyLimit, LedgerError, UsageRecord};
use crate::metering::gateway::{read, GatewayRequest};
use crate::metering::{
    ChatError, ChatOrder, CompletedChat, GatewayCall, ProviderError, RouteError, StreamEvent,
};
use crate::money::Micros;
use crate::pricing::Provider;
use crate::providers::sse::Frame;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/v1/chat/completions", web::post().to(chat_completions))
        .route("/v1/messages", web::post().to(messages))
        .route("/v1/models", web::get().to(models));
}

/// The ledger currency's ISO code, as `usage.cost` and `/v1/models` name it.
const CURRENCY: &str = "EUR";

/// An error as an SDK of the route's format reads it: OpenAI's
/// `{"error": {"message", "type", "param", "code"}}` or Anthropic's
/// `{"type": "error", "error": {"type", "message"}}`, plus the amounts of
/// a 402; or a provider's own error body, passed on as it came.
#[derive(Debug)]
pub struct GatewayError {
    format: Provider,
    status: StatusCode,
    /// creditd's code, snake case (`insufficient_credits`); OpenAI's `code`.
    code: Option<String>,
    message: String,
    /// The field at fault (OpenAI's `param`).
    param: Option<String>,
    retry_after_s: Option<u64>,
    /// Fields added to the error object (a 402's amounts).
    details: Option<Value>,
    /// The provider's own error body.
    passed_on: Option<Value>,
}

impl GatewayError {
    fn new(format: Provider, status: StatusCode, code: &str, message: String) -> GatewayError {
        GatewayError {
            format,
            status,
            code: Some(code.to_owned()),
            param: field_named(&message),
            message,
            retry_after_s: None,
            details: None,
            passed_on: None,
        }
    }

    /// creditd's own error, in the format's shape.
    fn api(format: Provider, error: ApiError) -> GatewayError {
        let retry_after_s = match error.code.retry_after() {
            RetryAfter::Always => Some(error.retry_after_s.unwrap_or(u64::from(RETRY_AFTER_S))),
            RetryAfter::Never => error.retry_after_s,
        };
        GatewayError {
            retry_after_s,
            details: error.details,
            ..GatewayError::new(
                format,
                error.code.status(),
                &error.code.as_str().to_ascii_lowercase(),
                error.message,
            )
        }
    }

    /// The error `type` an SDK of the format expects for the status.
    fn kind(&self) -> &'static str {
        let status = self.status.as_u16();
        match (self.format, status) {
            (_, 400 | 408 | 409) => "invalid_request_error",
            (_, 401) => "authentication_error",
            (Provider::Anthropic, 402) => "billing_error",
            (Provider::Openai, 402) => "insufficient_quota",
            (_, 403) => "permission_error",
            (_, 404) => "not_found_error",
            (Provider::Anthropic, 413) => "request_too_large",
            (_, 413) => "invalid_request_error",
            (_, 429) => "rate_limit_error",
            (Provider::Anthropic, 503 | 529) => "overloaded_error",
            (Provider::Anthropic, _) => "api_error",
            (Provider::Openai, _) => "server_error",
        }
    }

    /// The error object (OpenAI's `error`, Anthropic's `error`).
    fn object(&self) -> Value {
        let mut object = match self.format {
            Provider::Openai => json!({
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }),
            Provider::Anthropic => json!({ "type": self.kind(), "message": self.message }),
        };
        if let (Some(Value::Object(details)), Some(object)) =
            (&self.details, object.as_object_mut())
        {
            for (name, value) in details {
                object.entry(name.clone()).or_insert_with(|| value.clone());
            }
        }
        object
    }

    /// The whole error body.
    fn body(&self) -> Value {
        if let Some(body) = &self.passed_on {
            return body.clone();
        }
        match self.format {
            Provider::Openai => json!({ "error": self.object() }),
            Provider::Anthropic => json!({ "type": "error", "error": self.object() }),
        }
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{} {}", self.status.as_u16(), self.message)
    }
}

impl ResponseError for GatewayError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after_s {
            response.insert_header(("Retry-After", seconds.to_string()));
        }
        response.json(self.body())
    }
}

/// The field a message names (`field `model`: …`), as OpenAI's `param`.
fn field_named(message: &str) -> Option<String> {
    let rest = message.strip_prefix("field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// Who calls: the account and, for an API key, its spend limit.
struct Caller {
    account: crate::ledger::AccountId,
    key: Option<KeyLimit>,
}

/// The credential of a gateway call: `x-api-key`, else the bearer token,
/// else (a page) the session cookie.
async fn caller(state: &State, request: &HttpRequest) -> Result<Caller, ApiError> {
    let presented = match request.headers().get("x-api-key") {
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| ApiError::unauthorized("malformed x-api-key header"))?
                .trim(),
        ),
        None => request
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim),
    };
    if let Some(key) = presented.filter(|token| crate::api_keys::looks_like_key(token)) {
        let holder = state
            .api_keys
            .authenticate(key, state.engine.clock().now())
            .await?;
        return Ok(Caller {
            account: holder.account,
            key: Some(holder.limit),
        });
    }
    let clerk_id = match request.headers().get("x-api-key").and(presented) {
        Some(token) => state
            .clerk
            .verify(token)
            .await
            .map_err(|error| match error {
                TokenError::Refused(reason) => ApiError::unauthorized(reason),
                TokenError::Unavailable => ApiError::new(Code::Unavailable, error.to_string()),
            })?,
        None => state.authenticate(request).await?,
    };
    Ok(Caller {
        account: state.account(&clerk_id).await?,
        key: None,
    })
}

/// The route to use for a model of the other format, if it is one.
fn other_format(state: &State, format: Provider, model: &str) -> Option<GatewayError> {
    let provider = state.prices.price(model).ok()?.provider;
    if provider == format {
        return None;
    }
    let (name, route) = match provider {
        Provider::Anthropic => (
            "an Anthropic model",
            "POST /v1/messages (Anthropic's Messages format)",
        ),
        Provider::Openai => (
            "an OpenAI model",
            "POST /v1/chat/completions (OpenAI's Chat Completions format)",
        ),
    };
    Some(GatewayError::new(
        format,
        StatusCode::BAD_REQUEST,
        "model_not_served_here",
        format!("field `model`: `{model}` is {name}; send it to {route}"),
    ))
}

/// `POST /v1/chat/completions`: OpenAI's Chat Completions, metered.
#[utoipa::path(post, path = "/v1/chat/completions", operation_id = "createChatCompletion", tag = "gateway",
    security(("apiKey" = []), ("clerk" = [])),
    request_body(content = GatewayBody, description = "An OpenAI Chat Completions request, passed through; creditd reads `model`, `max_completion_tokens`/`max_tokens`, `messages` (for the hold), `stream`, `stream_options.include_usage` and `n`"),
    responses(
        (status = 200, description = "The provider's completion with `usage.cost`, or with `stream: true` its chunks (the usage chunk carrying `usage.cost`), then `[DONE]`", content(
            (GatewayBody = "application/json"),
            (String = "text/event-stream"),
        ),
        headers(
            ("creditd-cost-micros" = i64, description = "What the answer cost (whole answers)"),
            ("creditd-balance-micros" = i64, description = "The balance after it (whole answers on the platform's key)")
        )),
        (status = 400, description = "invalid_request_error (the message and `param` name the field; a model of the other format names the route to use), or the provider's own 400 as it came", body = GatewayErrorBody),
        (status = 401, description = "authentication_error: no, an unknown, revoked or expired key, or a deleted user's", body = GatewayErrorBody),
        (status = 402, description = "insufficient_credits, spend_limit_reached (daily, monthly or the key's limit; Retry-After where a window resets)", body = GatewayErrorBody),
        (status = 408, description = "the body did not arrive within server.client_request_timeout_ms", body = GatewayErrorBody),
        (status = 413, description = "the body is larger than server.body_limit_bytes", body = GatewayErrorBody),
        (status = 429, description = "rate_limit_error (Retry-After)", body = GatewayErrorBody),
        (status = 500, description = "server_error", body = GatewayErrorBody),
        (status = 501, description = "BYOK is not configured", body = GatewayErrorBody),
        (status = 502, description = "the provider answered something unusable", body = GatewayErrorBody),
        (status = 503, description = "the provider or creditd is unavailable (Retry-After)", body = GatewayErrorBody),
        (status = 504, description = "the provider did not answer in time", body = GatewayErrorBody)
    ))]
async fn chat_completions(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    serve(state, request, payload, Provider::Openai).await
}

/// `POST /v1/messages`: Anthropic's Messages, metered.
#[utoipa::path(post, path = "/v1/messages", operation_id = "createMessage", tag = "gateway",
    security(("apiKey" = []), ("clerk" = [])),
    request_body(content = GatewayBody, description = "An Anthropic Messages request, passed through; creditd reads `model`, `max_tokens`, `system` and `messages` (for the hold) and `stream`"),
    responses(
        (status = 200, description = "The provider's message with `usage.cost`, or with `stream: true` its events (`message_delta` carrying `usage.cost`)", content(
            (GatewayBody = "application/json"),
            (String = "text/event-stream"),
        ),
        headers(
            ("creditd-cost-micros" = i64, description = "What the answer cost (whole answers)"),
            ("creditd-balance-micros" = i64, description = "The balance after it (whole answers on the platform's key)")
        )),
        (status = 400, description = "invalid_request_error (the message names the field), or the provider's own 400 as it came", body = GatewayErrorBody),
        (status = 401, description = "authentication_error", body = GatewayErrorBody),
        (status = 402, description = "billing_error: insufficient_credits, spend_limit_reached", body = GatewayErrorBody),
        (status = 408, description = "the body did not arrive within server.client_request_timeout_ms", body = GatewayErrorBody),
        (status = 413, description = "request_too_large: the body is larger than server.body_limit_bytes", body = GatewayErrorBody),
        (status = 429, description = "rate_limit_error (Retry-After)", body = GatewayErrorBody),
        (status = 500, description = "api_error", body = GatewayErrorBody),
        (status = 501, description = "BYOK is not configured", body = GatewayErrorBody),
        (status = 502, description = "api_error: the provider answered something unusable", body = GatewayErrorBody),
        (status = 503, description = "overloaded_error (Retry-After)", body = GatewayErrorBody),
        (status = 504, description = "api_error: the provider did not answer in time", body = GatewayErrorBody),
        (status = 529, description = "overloaded_error: Anthropic is overloaded (Retry-After)", body = GatewayErrorBody)
    ))]
async fn messages(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, GatewayError> {
    serve(state, request, payload, Provider::Anthropic).await
}

/// A body of either format, passed through as a JSON object (the fields
/// creditd reads are named on each route).
pub(super) struct GatewayBody;

impl utoipa::PartialSchema for GatewayBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Object)
            .description(Some("Passed through in the provider's own format"))
            .into()
    }
}

impl utoipa::ToSchema for GatewayBody {}

/// An error in the route's format: OpenAI's `{"error": {…}}` or
/// Anthropic's `{"type": "error", "error": {…}}`.
pub(super) struct GatewayErrorBody;

impl utoipa::PartialSchema for GatewayErrorBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .property("error", ObjectBuilder::new().schema_type(Type::Object))
            .required("error")
            .into()
    }
}

impl utoipa::ToSchema for GatewayErrorBody {}

/// One gateway call in `format`: authenticated first, then read, then
/// metered, whole or streamed.
async fn serve(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
    format: Provider,
) -> Result<HttpResponse, GatewayError> {
    let api = |error: ApiError| GatewayError::api(format, error);
    let chat = |error: ChatError| chat_error(format, error);
    let caller = caller(&state, &request).await.map_err(api)?;
    let bytes = read_body(payload, &state.settings.server)
        .await
        .map_err(api)?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|error| {
        api(ApiError::invalid(format!(
            "request body: malformed JSON: {error}"
        )))
    })?;
    let asked = read(format, body, &state.settings.chat).map_err(chat)?;
    if let Some(refused) = other_format(&state, format, &asked.model) {
        return Err(refused);
    }
    let stored_keys = state.stored_keys(caller.account).await.map_err(api)?;
    let (stream, usage_asked) = (asked.stream, asked.usage_asked);
    let order = order(caller, asked, stored_keys);
    if stream {
        let events = state.chats.open_stream(order).await.map_err(chat)?;
        Ok(stream_response(format, usage_asked, events))
    } else {
        let answer = state.chats.answer(order).await.map_err(chat)?;
        whole(answer).map_err(api)
    }
}

fn order(
    caller: Caller,
    asked: GatewayRequest,
    stored_keys: std::sync::Arc<crate::accounts::StoredKeys>,
) -> ChatOrder {
    ChatOrder {
        account: caller.account,
        model: Some(asked.model),
        messages: asked.messages,
        max_tokens: asked.max_tokens,
        stored_keys,
        conversation_id: None,
        message_id: None,
        gateway: Some(GatewayCall {
            body: asked.body,
            extra_prompt_tokens: asked.extra_prompt_tokens,
            key: caller.key,
        }),
    }
}

/// `usage.cost`: what the answer cost, exactly and formatted, and the
/// balance after it; on the user's own key (BYOK), nothing.
fn cost(credits: Option<&UsageRecord>) -> Value {
    match credits {
        Some(record) => json!({
            "amount_micros": record.cost_micros.get(),
            "currency": CURRENCY,
            "formatted": exact(record.cost_micros),
            "balance_after_micros": record.balance_after_micros.get(),
        }),
        None => json!({
            "amount_micros": 0,
            "currency": CURRENCY,
            "formatted": exact(Micros::ZERO),
            "own_key": true,
        }),
    }
}

/// An amount to the micro, `0.001234€` (the balance's `12.34€` hides
/// what a single call costs).
fn exact(amount: Micros) -> String {
    let sign = if amount.is_negative() { "-" } else { "" };
    let micros = amount.get().unsigned_abs();
    format!("{sign}{}.{:06}€", micros / 1_000_000, micros % 1_000_000)
}

/// A whole answer: the provider's body with `usage.cost`, and the headers.
fn whole(answer: CompletedChat) -> Result<HttpResponse, ApiError> {
    let mut body = answer
        .body
        .ok_or_else(|| ApiError::internal("gateway answer", "a gateway call without its body"))?;
    if !body["usage"].is_object() {
        body["usage"] = json!({});
    }
    body["usage"]["cost"] = cost(answer.credits.as_ref());
    let mut response = HttpResponse::Ok();
    let cost_micros = answer.credits.as_ref().map_or(0, |r| r.cost_micros.get());
    response.insert_header(("creditd-cost-micros", cost_micros.to_string()));
    if let Some(record) = &answer.credits {
        response.insert_header((
            "creditd-balance-micros",
            record.balance_after_micros.get().to_string(),
        ));
    }
    Ok(response.json(body))
}

/// A chat that failed or was refused, as the format's SDK reads it.
fn chat_error(format: Provider, error: ChatError) -> GatewayError {
    let payment = |code: &str, message: String, details: Value, retry: Option<u64>| GatewayError {
        retry_after_s: retry,
        details: Some(details),
        ..GatewayError::new(format, StatusCode::PAYMENT_REQUIRED, code, message)
    };
    match error {
        ChatError::InsufficientCredits {
            balance,
            available,
            required,
        } => payment(
            "insufficient_credits",
            format!(
                "Not enough credits: {} available, {} needed to hold this request. Top up or add your own API key.",
                exact(available),
                exact(required)
            ),
            json!({
                "balance_micros": balance.get(),
                "available_micros": available.get(),
                "required_micros": required.get(),
            }),
            None,
        ),
        ChatError::Ledger(LedgerError::KeyLimitReached {
            key,
            limit,
            spent,
            held,
            required,
        }) => payment(
            "spend_limit_reached",
            format!(
                "The spend limit of this API key ({}) is reached: {} spent and {} held, {} more needed. Make a key with a higher limit.",
                exact(limit),
                exact(spent),
                exact(held),
                exact(required)
            ),
            json!({
                "limit": "api_key",
                "api_key_id": key.0,
                "limit_micros": limit.get(),
                "spent_micros": spent.get(),
                "held_micros": held.get(),
                "required_micros": required.get(),
            }),
            None,
        ),
        ChatError::Ledger(LedgerError::SpendLimitReached {
            window,
            limit,
            spent,
            held,
            required,
            resets_at,
            retry_after_s,
        }) => payment(
            "spend_limit_reached",
            format!(
                "The {} spending limit ({}) is reached: {} spent and {} held, {} more needed; it resets at {}.",
                window.as_str(),
                exact(limit),
                exact(spent),
                exact(held),
                exact(required),
                resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            json!({
                "limit": window.as_str(),
                "limit_micros": limit.get(),
                "spent_micros": spent.get(),
                "held_micros": held.get(),
                "required_micros": required.get(),
                "resets_at": resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }),
            Some(retry_after_s),
        ),
        ChatError::Invalid(message) => GatewayError::api(format, ApiError::invalid(message)),
        ChatError::Route(error) => route_error(format, error),
        ChatError::Refused(refused) => GatewayError::api(format, refused.into()),
        ChatError::Ledger(error) => GatewayError::api(format, error.into()),
        ChatError::Provider { error, byok, .. } => provider_error(format, error, byok),
        ChatError::Internal { context, message } => {
            GatewayError::api(format, ApiError::internal(context, message))
        }
    }
}

fn route_error(format: Provider, error: RouteError) -> GatewayError {
    let api = match error {
        RouteError::UnknownModel { .. } | RouteError::KeyForAnotherProvider { .. } => {
            ApiError::invalid(error.to_string())
        }
        RouteError::NoPlatformKey => ApiError::new(
            Code::NoApiKey,
            "No platform key is configured for this model's provider; add your own API key in settings.",
        ),
        RouteError::ByokNotConfigured => ApiError::new(Code::ByokNotConfigured, error.to_string()),
        RouteError::KeyUnreadable { .. } => ApiError::new(Code::Internal, error.to_string()),
        RouteError::DefaultModel(message) => ApiError::internal("default model", message),
    };
    GatewayError::api(format, api)
}

/// A provider's failure with the status the format's SDK expects: its own
/// refusal (4xx) as it came; busy (429, 529, 5xx) with its status and
/// `Retry-After` (Anthropic's overload stays 529; OpenAI clients get 503);
/// the platform's key refused, a broken answer: 502; no answer: 504.
fn provider_error(format: Provider, error: ProviderError, byok: bool) -> GatewayError {
    let status = |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
    match error {
        ProviderError::Rejected {
            status: code,
            message,
            body,
        } => GatewayError {
            passed_on: body,
            ..GatewayError::new(format, status(code), "provider_refused", message)
        },
        ProviderError::Unavailable {
            status: code,
            retry_after_s,
            message,
        } => {
            let code = match (format, code) {
                (_, 429) | (Provider::Anthropic, 529) => code,
                _ => 503,
            };
            GatewayError {
                retry_after_s: Some(retry_after_s.unwrap_or(u64::from(RETRY_AFTER_S))),
                ..GatewayError::new(format, status(code), "provider_unavailable", message)
            }
        }
        ProviderError::Unauthorized { message, .. } if byok => GatewayError::new(
            format,
            StatusCode::BAD_REQUEST,
            "byok_key_refused",
            format!("The provider refused your own API key ({message}); check or replace it in settings."),
        ),
        ProviderError::Timeout => GatewayError::new(
            format,
            StatusCode::GATEWAY_TIMEOUT,
            "provider_timeout",
            "The provider did not answer in time; retry.".into(),
        ),
        error => {
            tracing::warn!(%error, "gateway provider call failed");
            GatewayError::new(
                format,
                StatusCode::BAD_GATEWAY,
                "provider_error",
                "The call to the provider failed; retry.".into(),
            )
        }
    }
}

/// An SSE comment SDKs ignore, written while the provider is silent.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// One frame as SSE: its event name (Anthropic) and its data lines.
fn sse(event: Option<&str>, data: &str) -> String {
    let mut text = String::new();
    if let Some(event) = event {
        text.push_str("event: ");
        text.push_str(event);
        text.push('\n');
    }
    for line in data.split('\n') {
        text.push_str("data: ");
        text.push_str(line);
        text.push('\n');
    }
    text.push('\n');
    text
}

/// A frame with `usage.cost` added to its JSON (a frame that is not JSON
/// is sent as it came).
fn with_cost(frame: &Frame, credits: Option<&UsageRecord>) -> String {
    match serde_json::from_str::<Value>(&frame.data) {
        Ok(mut data) if data["usage"].is_object() => {
            data["usage"]["cost"] = cost(credits);
            sse(frame.event.as_deref(), &data.to_string())
        }
        _ => sse(frame.event.as_deref(), &frame.data),
    }
}

/// A stream's end: the provider's last frames, the usage with its cost
/// (OpenAI's usage chunk only when the client asked for it).
fn end(
    format: Provider,
    usage_asked: bool,
    tail: &[Frame],
    credits: Option<&UsageRecord>,
) -> Bytes {
    let mut text = String::new();
    for frame in tail {
        let finishing = match format {
            Provider::Openai => frame.data.trim() == "[DONE]",
            Provider::Anthropic => frame.event.as_deref() == Some("message_stop"),
        };
        if finishing {
            text.push_str(&sse(frame.event.as_deref(), &frame.data));
        } else if format == Provider::Anthropic || usage_asked {
            text.push_str(&with_cost(frame, credits));
        }
    }
    Bytes::from(text)
}

/// A failure after the 200, as the format's stream ends on one.
fn failed(format: Provider, error: ChatError) -> Bytes {
    let error = chat_error(format, error);
    let text = match format {
        Provider::Openai => {
            sse(None, &json!({ "error": error.object() }).to_string()) + &sse(None, "[DONE]")
        }
        Provider::Anthropic => sse(Some("error"), &error.body().to_string()),
    };
    Bytes::from(text)
}

/// One stream event as the client reads it.
fn render(format: Provider, usage_asked: bool, event: StreamEvent) -> Bytes {
    match event {
        StreamEvent::Frame(frame) => Bytes::from(sse(frame.event.as_deref(), &frame.data)),
        StreamEvent::KeepAlive => Bytes::from_static(KEEP_ALIVE),
        StreamEvent::Done { tail, credits, .. } => {
            end(format, usage_asked, &tail, credits.as_ref())
        }
        StreamEvent::Failed { error, .. } => failed(format, error),
        // A gateway stream gives frames, never a chat's text deltas.
        StreamEvent::Delta(_) => Bytes::new(),
    }
}

/// The answer of a stream: the frames its task forwards, as they come.
fn stream_response(
    format: Provider,
    usage_asked: bool,
    events: tokio::sync::mpsc::Receiver<StreamEvent>,
) -> HttpResponse {
    let body = futures_util::stream::unfold(events, move |mut events| async move {
        events.recv().await.map(|event| {
            (
                Ok::<_, Infallible>(render(format, usage_asked, event)),
                events,
            )
        })
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

/// `GET /v1/models`: every priced model, OpenAI's list shape, with its
/// prices per token in the ledger currency (OpenRouter's `pricing` names).
#[utoipa::path(get, path = "/v1/models", operation_id = "listModels", tag = "gateway",
    security(("apiKey" = []), ("clerk" = [])),
    responses(
        (status = 200, description = "`{object: \"list\", data: [{id, object: \"model\", created, owned_by, currency, pricing: {prompt, completion, input_cache_read, input_cache_write}}]}`: prices per token, decimal strings", body = GatewayBody),
        (status = 401, description = "authentication_error", body = GatewayErrorBody),
        (status = 503, description = "unavailable (Retry-After)", body = GatewayErrorBody)
    ))]
async fn models(state: State, request: HttpRequest) -> Result<HttpResponse, GatewayError> {
    caller(&state, &request)
        .await
        .map_err(|error| GatewayError::api(Provider::Openai, error))?;
    let data: Vec<Value> = state
        .prices
        .models()
        .map(|(name, price)| {
            json!({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": price.provider.as_str(),
                "currency": CURRENCY,
                "pricing": {
                    "prompt": per_token(price.input_micros_per_million),
                    "completion": per_token(price.output_micros_per_million),
                    "input_cache_read": per_token(price.cache_read_micros_per_million),
                    "input_cache_write": per_token(price.cache_write_micros_per_million),
                },
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "object": "list", "data": data })))
}

/// A price in micros per million tokens as the exact decimal amount of the
/// ledger currency per token (micros per million tokens / 10^12), written
/// without a float: `3150000` → `"0.00000315"`.
fn per_token(micros_per_million: i64) -> String {
    let digits = micros_per_million.unsigned_abs().to_string();
    let scale = 12;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    let fraction = fraction.trim_end_matches('0');
    let sign = if micros_per_million < 0 { "-" } else { "" };
    if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_per_token_are_exact_decimals() {
        assert_eq!(per_token(3_150_000), "0.00000315");
        assert_eq!(per_token(0), "0");
        assert_eq!(per_token(1), "0.000000000001");
        assert_eq!(per_token(2_000_000_000_000), "2");
    }

    #[test]
    fn a_message_naming_a_field_gives_the_param() {
        assert_eq!(
            field_named("field `max_tokens`: required").as_deref(),
            Some("max_tokens")
        );
        assert_eq!(field_named("request body: malformed JSON"), None);
    }
}
