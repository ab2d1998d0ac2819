//! `POST /api/chat`: a conversation sent to Anthropic or OpenAI (see
//! `crate::metering::chat` for the hold, the call and the settlement).
//! Here: the request checked (free text stored with the usage, such as
//! `conversationId`, `messageId` and `model`, is checked before any hold
//! or provider call: control or invisible formatting characters, or
//! over-long values, get 400), the provider, model and key chosen (BYOK
//! first), and the answer rendered as JSON or as Server-Sent Events.

use std::convert::Infallible;

use actix_web::web::Bytes;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, Code};
use super::extract::{JsonBody, SignedIn};
use super::state::State;
use super::views::{ChatAnswer, ChatCredits};
use crate::config::ChatSettings;
use crate::ledger::{text_problem, UsageRecord};
use crate::metering::{
    ChatError, ChatMessage, ChatOrder, ProviderError, Role, RouteError, StreamEvent,
};
use crate::pricing::Provider;

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/chat", web::post().to(chat));
}

/// Longest `conversationId` / `messageId`.
const REFERENCE_MAX_LEN: usize = 200;
/// The seed's answers, kept word for word.
const NO_API_KEY: &str =
    "No API key configured. Please add your OpenAI or Anthropic API key in settings.";
const NOT_ENOUGH_CREDITS: &str = "Not enough credits. Please top up or add your own API key.";

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ChatBody {
    messages: Vec<MessageBody>,
    model: Option<String>,
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    conversation_id: Option<String>,
    message_id: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct MessageBody {
    role: Role,
    content: String,
}

/// A chat request, checked.
struct Chat {
    messages: Vec<ChatMessage>,
    model: Option<String>,
    max_tokens: u32,
    stream: bool,
    conversation_id: Option<String>,
    message_id: Option<String>,
}

impl Chat {
    fn parse(body: ChatBody, settings: &ChatSettings) -> Result<Chat, ApiError> {
        if body.messages.is_empty() {
            return Err(ApiError::invalid(
                "field `messages`: give at least one message",
            ));
        }
        for (i, message) in body.messages.iter().enumerate() {
            if message.content.trim().is_empty() {
                return Err(ApiError::invalid(format!(
                    "field `messages[{i}].content`: must not be empty"
                )));
            }
        }
        if body.messages.iter().all(|m| m.role == Role::System) {
            return Err(ApiError::invalid(
                "field `messages`: give at least one user or assistant message",
            ));
        }
        let max_tokens = body.max_tokens.unwrap_or(settings.max_tokens_default);
        if max_tokens == 0 || max_tokens > settings.max_tokens_limit {
            return Err(ApiError::invalid(format!(
                "field `maxTokens`: must be from 1 to {}",
                settings.max_tokens_limit
            )));
        }
        for (field, value) in [
            ("conversationId", &body.conversation_id),
            ("messageId", &body.message_id),
        ] {
            let Some(value) = value else { continue };
            if value.is_empty() || value.len() > REFERENCE_MAX_LEN {
                return Err(ApiError::invalid(format!(
                    "field `{field}`: must be 1 to {REFERENCE_MAX_LEN} bytes long"
                )));
            }
            stored_text(field, value)?;
        }
        if let Some(model) = &body.model {
            stored_text("model", model)?;
        }
        Ok(Chat {
            messages: body
                .messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
            model: body.model,
            max_tokens,
            stream: body.stream,
            conversation_id: body.conversation_id,
            message_id: body.message_id,
        })
    }
}

/// A text stored with the usage, refused by the ledger's own rule with the
/// field named.
fn stored_text(field: &str, value: &str) -> Result<(), ApiError> {
    match text_problem(value) {
        Some(problem) => Err(ApiError::invalid(format!("field `{field}`: {problem}"))),
        None => Ok(()),
    }
}

/// A chat: on the user's own key (not charged) or the platform's (held,
/// then charged per token). With `stream: true`, Server-Sent Events.
#[utoipa::path(post, path = "/api/chat", tag = "chat", security(("clerk" = [])),
    request_body = ChatBody,
    responses(
        (status = 200, description = "The answer (JSON), or with `stream: true` an event stream (`delta`, then `done` or `error`)", content(
            (super::views::ChatAnswer = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "INVALID_REQUEST (the message names the field), NO_API_KEY, BYOK_KEY_REFUSED", body = super::error::ErrorBody),
        super::error::SessionAuth,
        (status = 402, description = "INSUFFICIENT_CREDITS (with balance, estimatedCost in cents and their micros), SPEND_LIMIT_REACHED (limit, limitMicros, spentMicros, heldMicros, requiredMicros, resetsAt; Retry-After)", body = super::error::ErrorBody),
        super::error::BodyErrors,
        (status = 429, description = "RATE_LIMITED (too many chats in flight; Retry-After)", body = super::error::ErrorBody),
        super::error::Internal,
        (status = 501, description = "BYOK_NOT_CONFIGURED", body = super::error::ErrorBody),
        (status = 502, description = "PROVIDER_ERROR", body = super::error::ErrorBody),
        (status = 503, description = "PROVIDER_UNAVAILABLE (Retry-After), OVERLOADED, UNAVAILABLE", body = super::error::ErrorBody),
        (status = 504, description = "PROVIDER_TIMEOUT", body = super::error::ErrorBody)
    ))]
async fn chat(
    state: State,
    SignedIn(clerk_id): SignedIn,
    JsonBody(asked): JsonBody<ChatBody>,
) -> Result<HttpResponse, ApiError> {
    let chat = Chat::parse(asked, &state.settings.chat)?;
    let account = state.account(&clerk_id).await?;
    let order = ChatOrder {
        account,
        model: chat.model,
        messages: chat.messages,
        max_tokens: chat.max_tokens,
        stored_keys: state.stored_keys(account).await?,
        conversation_id: chat.conversation_id,
        message_id: chat.message_id,
        gateway: None,
    };
    if chat.stream {
        let events = state.chats.open_stream(order).await?;
        Ok(stream_response(events))
    } else {
        let answer = state.chats.answer(order).await?;
        Ok(HttpResponse::Ok().json(ChatAnswer {
            content: answer.content,
            model: answer.model,
            credits: answer.credits.as_ref().map(ChatCredits::from),
        }))
    }
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> ApiError {
        match error {
            ChatError::Invalid(message) => ApiError::invalid(message),
            ChatError::InsufficientCredits {
                balance,
                available,
                required,
            } => ApiError {
                code: Code::InsufficientCredits,
                message: NOT_ENOUGH_CREDITS.into(),
                details: Some(json!({
                    "balance": balance.floor_cents(),
                    "balanceMicros": balance.get(),
                    "availableMicros": available.get(),
                    "estimatedCost": required.ceil_cents(),
                    "estimatedCostMicros": required.get(),
                })),
                retry_after_s: None,
            },
            ChatError::Route(error) => route_error(error),
            ChatError::Refused(refused) => refused.into(),
            ChatError::Ledger(error) => error.into(),
            ChatError::Provider {
                error,
                provider,
                byok,
            } => provider_api_error(&error, provider, byok),
            ChatError::Internal { context, message } => ApiError::internal(context, message),
        }
    }
}

/// A chat that cannot be routed, as the client sees it.
fn route_error(error: RouteError) -> ApiError {
    match error {
        RouteError::UnknownModel { .. } | RouteError::KeyForAnotherProvider { .. } => {
            ApiError::invalid(error.to_string())
        }
        RouteError::NoPlatformKey => ApiError::new(Code::NoApiKey, NO_API_KEY),
        RouteError::ByokNotConfigured => ApiError::new(Code::ByokNotConfigured, error.to_string()),
        RouteError::KeyUnreadable { .. } => ApiError::new(Code::Internal, error.to_string()),
        RouteError::DefaultModel(message) => ApiError::internal("default model", message),
    }
}

/// A provider failure as the client sees it.
fn provider_api_error(error: &ProviderError, provider: Provider, byok: bool) -> ApiError {
    let name = match provider {
        Provider::Anthropic => "Anthropic",
        Provider::Openai => "OpenAI",
    };
    let busy = |retry_after_s: Option<u64>| ApiError {
        code: Code::ProviderUnavailable,
        message: format!("{name} is overloaded or unavailable; retry in a moment."),
        details: None,
        retry_after_s,
    };
    match error {
        ProviderError::Unavailable { retry_after_s, .. } => busy(*retry_after_s),
        ProviderError::Stream { kind, .. } if kind.is_busy() => busy(None),
        ProviderError::Unauthorized { .. } if byok => ApiError::new(
            Code::ByokKeyRefused,
            format!("{name} refused your API key; check or replace it in settings."),
        ),
        ProviderError::Unauthorized { .. } => {
            tracing::error!(
                provider = provider.as_str(),
                "the platform's API key was refused"
            );
            ApiError::new(
                Code::ProviderError,
                format!("{name} refused the request; the platform's key is being looked at."),
            )
        }
        ProviderError::Timeout => ApiError::new(
            Code::ProviderTimeout,
            format!("{name} did not answer in time; retry."),
        ),
        ProviderError::Rejected { message, .. } => ApiError::new(
            Code::ProviderError,
            format!("{name} refused the request: {message}"),
        ),
        ProviderError::Transport(_)
        | ProviderError::Malformed(_)
        | ProviderError::Stream { .. } => {
            tracing::warn!(%error, provider = provider.as_str(), "provider call failed");
            ApiError::new(
                Code::ProviderError,
                format!("The call to {name} failed; retry."),
            )
        }
    }
}

/// One Server-Sent Event for the client.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn error_event(error: &ApiError, credits: Option<&UsageRecord>) -> Bytes {
    let mut data = json!({ "error": error.code.as_str(), "message": error.message });
    if let Some(record) = credits {
        data["credits"] = json!(ChatCredits::from(record));
    }
    event("error", &data)
}

/// An SSE comment the client ignores; written while the provider is silent
/// so that proxies keep the connection open and a departed client is noticed.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// One stream event as the client reads it.
fn render(stream_event: StreamEvent) -> Bytes {
    match stream_event {
        StreamEvent::Delta(text) => event("delta", &json!({ "text": text })),
        StreamEvent::KeepAlive => Bytes::from_static(KEEP_ALIVE),
        // Only a gateway call streams frames (`crate::http::gateway`).
        StreamEvent::Frame(_) => Bytes::new(),
        StreamEvent::Done { model, credits, .. } => {
            let mut data = json!({ "model": model });
            if let Some(record) = &credits {
                data["credits"] = json!(ChatCredits::from(record));
            }
            event("done", &data)
        }
        StreamEvent::Failed { error, credits } => error_event(&error.into(), credits.as_ref()),
    }
}

/// The answer of a stream: the events its task forwards, as they come.
fn stream_response(events: tokio::sync::mpsc::Receiver<StreamEvent>) -> HttpResponse {
    let body = futures_util::stream::unfold(events, |mut events| async move {
        events
            .recv()
            .await
            .map(|stream_event| (Ok::<_, Infallible>(render(stream_event)), events))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
