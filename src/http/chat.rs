//! `POST /api/chat`: a conversation sent to Anthropic or OpenAI.
//!
//! With the user's own key (BYOK) nothing is charged. With the platform's
//! key, a hold is taken before the call (estimated input + `maxTokens` of
//! output), then settled to the cost of the usage the provider reports, or
//! released if the provider failed before any output. The hold, the call
//! and the settlement run in a task of their own, so a client that goes away
//! never leaves a hold half-done.
//!
//! Input estimate (never under the provider's count): the UTF-8 bytes of
//! every message, plus `chat.message_overhead_tokens` per message and
//! `chat.request_overhead_tokens` once. A BPE token covers at least one
//! byte, so bytes ≥ tokens. The hold prices it at the dearest input class
//! of the model (input, cache read, cache write), since a provider may bill
//! prompt tokens as cache writes.
//!
//! The hold is admission control, not the record of the charge: the
//! provider call starts as soon as the account's actor applied the hold,
//! without waiting for its commit, and the answer waits for one commit, the
//! settlement's. A settlement always posts (see `crate::metering`): whether
//! the hold is still active, expired, released or was lost, the delivered
//! usage is charged once under the hold id, retried for as long as the
//! process lives when the ledger is unavailable. A non-streamed answer is
//! returned once its settlement is durable; a stream's `done` event carries
//! the durable credits.
//!
//! Streams settle for what was produced: the provider's usage where it
//! came, else the input estimate for the input and `ceil(bytes / 3)` of the
//! text received for the output (never zero for received text). A client
//! that leaves, or does not take the next event within
//! `chat.stream_write_timeout_ms`, ends the provider call; the stream is
//! settled for what was produced, the provider's reported input included
//! even when no text came yet. Free text that is stored with the usage
//! (`conversationId`, `messageId`, `model`) is checked before any hold or
//! provider call: control characters or over-long values get 400.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use futures_util::FutureExt;

use super::error::{parse_json, ApiError, Code};
use super::settings::{open_key, stored_keys};
use super::{read_body, State};
use crate::config::{ChatSettings, Secret};
use crate::ledger::{text_problem, AccountId, HoldId, LedgerError, UsageCharge, UsageRecord};
use crate::metering::SettlementSlot;
use crate::money::Micros;
use crate::pricing::{ModelPrice, Provider, TokenUsage};
use crate::providers::{
    ChatMessage, ChatRequest, InputUsage, ProviderError, ProviderStream, Role, StreamUsage,
};

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/api/chat", web::post().to(chat));
}

/// Longest `conversationId` / `messageId`.
const REFERENCE_MAX_LEN: usize = 200;
/// Bytes of streamed text counted as one output token when the provider's
/// count never came.
const STREAMED_BYTES_PER_TOKEN: u64 = 3;
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
        let max_tokens = body.max_tokens.unwrap_or(settings.default_max_tokens);
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

/// Input tokens of `messages`, never fewer than the provider will count.
pub fn estimate_input_tokens(messages: &[ChatMessage], settings: &ChatSettings) -> u64 {
    messages
        .iter()
        .fold(settings.request_overhead_tokens, |sum, m| {
            sum.saturating_add(m.content.len() as u64)
                .saturating_add(settings.message_overhead_tokens)
        })
}

/// The hold of a call: the input estimate at the dearest input price plus
/// `max_tokens` at the output price.
pub fn hold_amount(price: &ModelPrice, input_tokens: u64, max_tokens: u32) -> Option<Micros> {
    let dearest = price
        .input_micros_per_million
        .max(price.cache_read_micros_per_million)
        .max(price.cache_write_micros_per_million);
    let priced = ModelPrice {
        input_micros_per_million: dearest,
        ..*price
    };
    priced
        .cost(&TokenUsage {
            input_tokens,
            output_tokens: u64::from(max_tokens),
            ..TokenUsage::default()
        })
        .ok()
}

/// A chat: on the user's own key (not charged) or the platform's (held,
/// then charged per token). With `stream: true`, Server-Sent Events.
#[utoipa::path(post, path = "/api/chat", tag = "chat", security(("clerk" = [])),
    request_body = ChatBody,
    responses(
        (status = 200, description = "The answer (JSON), or with `stream: true` an event stream (`delta`, then `done` or `error`)", content(
            (super::openapi::ChatAnswer = "application/json"),
            (String = "text/event-stream"),
        )),
        (status = 400, description = "INVALID_REQUEST (the message names the field), NO_API_KEY, BYOK_KEY_REFUSED", body = super::openapi::ErrorBody),
        (status = 401, description = "UNAUTHORIZED (no or bad session token), ACCOUNT_DELETED", body = super::openapi::ErrorBody),
        (status = 402, description = "INSUFFICIENT_CREDITS (with balance, estimatedCost in cents and their micros), SPEND_LIMIT_REACHED (limit, limitMicros, spentMicros, heldMicros, requiredMicros, resetsAt; Retry-After)", body = super::openapi::ErrorBody),
        (status = 408, description = "REQUEST_TIMEOUT (the body did not arrive in time)", body = super::openapi::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::openapi::ErrorBody),
        (status = 429, description = "RATE_LIMITED (too many chats in flight; Retry-After)", body = super::openapi::ErrorBody),
        (status = 500, description = "INTERNAL", body = super::openapi::ErrorBody),
        (status = 501, description = "BYOK_NOT_CONFIGURED", body = super::openapi::ErrorBody),
        (status = 502, description = "PROVIDER_ERROR", body = super::openapi::ErrorBody),
        (status = 503, description = "PROVIDER_UNAVAILABLE (Retry-After), OVERLOADED, UNAVAILABLE", body = super::openapi::ErrorBody),
        (status = 504, description = "PROVIDER_TIMEOUT", body = super::openapi::ErrorBody)
    ))]
async fn chat(
    state: State,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.clerk.authenticate(&request).await?;
    let body = read_body(payload, &state.settings.server).await?;
    let chat = Chat::parse(parse_json(&body)?, &state.settings.chat)?;
    let account = state.account(&clerk_id).await?;
    let route = route(&state, account, &chat).await?;
    let request = ChatRequest {
        model: route.model,
        messages: chat.messages,
        max_tokens: chat.max_tokens,
    };
    let call = Call {
        state: state.clone(),
        account,
        provider: route.provider,
        key: route.key,
        request,
        byok: route.byok,
        billing: None,
        in_flight: None,
        slot: None,
        conversation_id: chat.conversation_id,
        message_id: chat.message_id,
    };
    if chat.stream {
        stream_answer(call).await
    } else {
        actix_web::rt::spawn(async move { call.hold().await?.complete().await })
            .await
            .map_err(|e| ApiError::internal("chat task", e))?
    }
}

/// Which provider, model and key serve a chat.
struct Route {
    provider: Provider,
    model: String,
    key: Secret,
    byok: bool,
}

/// BYOK first (the named model's provider, else Anthropic, else OpenAI),
/// otherwise the platform key of the model's provider.
async fn route(state: &State, account: AccountId, chat: &Chat) -> Result<Route, ApiError> {
    let named = match &chat.model {
        Some(model) => Some(state.prices.price(model).map_err(|_| {
            let known: Vec<&str> = state.prices.models().map(|(name, _)| name).collect();
            ApiError::invalid(format!(
                "field `model`: unknown model `{model}` (known: {})",
                known.join(", ")
            ))
        })?),
        None => None,
    };
    let stored = stored_keys(state, account).await?;
    if stored.any() {
        let provider = match named {
            Some(price) if stored.get(price.provider).is_none() => {
                return Err(ApiError::invalid(format!(
                    "field `model`: `{}` is served by {}, and your saved API key is for another \
                     provider; omit `model` or add your {} key in settings",
                    chat.model.as_deref().unwrap_or_default(),
                    price.provider.as_str(),
                    price.provider.as_str()
                )))
            }
            Some(price) => price.provider,
            None if stored.anthropic.is_some() => Provider::Anthropic,
            None => Provider::Openai,
        };
        let sealed = stored.get(provider).unwrap_or_default();
        let key = open_key(state, account, provider, sealed)?;
        let model = chat
            .model
            .clone()
            .unwrap_or_else(|| state.providers.byok_model(provider).to_owned());
        return Ok(Route {
            provider,
            model,
            key,
            byok: true,
        });
    }
    let model = chat
        .model
        .clone()
        .unwrap_or_else(|| state.prices.default_model().to_owned());
    let provider = state
        .prices
        .price(&model)
        .map_err(|e| ApiError::internal("default model", e))?
        .provider;
    let key = state
        .providers
        .platform_key(provider)
        .cloned()
        .ok_or_else(|| ApiError::new(Code::NoApiKey, NO_API_KEY))?;
    Ok(Route {
        provider,
        model,
        key,
        byok: false,
    })
}

/// A platform call's hold.
#[derive(Debug, Clone, Copy)]
struct Billing {
    hold: HoldId,
    input_estimate: u64,
}

async fn reserve(
    state: &State,
    account: AccountId,
    request: &ChatRequest,
) -> Result<Billing, ApiError> {
    let price = state
        .prices
        .price(&request.model)
        .map_err(|e| ApiError::invalid(format!("field `model`: {e}")))?;
    let input_estimate = estimate_input_tokens(&request.messages, &state.settings.chat);
    let amount = hold_amount(price, input_estimate, request.max_tokens)
        .ok_or_else(|| ApiError::invalid("field `messages`: the conversation is too large"))?;
    let hold = HoldId::generate();
    match state.engine.admit(account, hold, amount).await {
        Ok(_) => Ok(Billing {
            hold,
            input_estimate,
        }),
        Err(LedgerError::InsufficientCredits {
            available,
            required,
        }) => {
            let snapshot = state.engine.balance(account).await?;
            Err(ApiError {
                code: Code::InsufficientCredits,
                message: NOT_ENOUGH_CREDITS.into(),
                details: Some(json!({
                    "balance": snapshot.balance_micros.floor_cents(),
                    "balanceMicros": snapshot.balance_micros.get(),
                    "availableMicros": available.get(),
                    "estimatedCost": required.ceil_cents(),
                    "estimatedCostMicros": required.get(),
                })),
            })
        }
        Err(error) => Err(error.into()),
    }
}

/// One provider call and, for the platform's key, its hold.
struct Call {
    state: State,
    account: AccountId,
    provider: Provider,
    key: Secret,
    request: ChatRequest,
    byok: bool,
    /// Set once the platform call's hold is taken.
    billing: Option<Billing>,
    /// The platform call's place among its account's chats in flight
    /// (`limits.chats_in_flight_per_account`), given back when it ends.
    in_flight: Option<crate::limits::ChatPermit>,
    /// The platform call's place among the pending settlements, given back
    /// once it settled or released (when the call is dropped).
    slot: Option<SettlementSlot>,
    conversation_id: Option<String>,
    message_id: Option<String>,
}

impl Call {
    /// Takes the hold of a platform call (a BYOK call has none).
    async fn hold(mut self) -> Result<Call, ApiError> {
        if !self.byok {
            self.in_flight = Some(self.state.limits.chat(self.account)?);
            self.slot = Some(self.state.settlements.admit()?);
            self.billing = Some(reserve(&self.state, self.account, &self.request).await?);
        }
        Ok(self)
    }

    /// A whole answer: call, then settle (or release), then answer.
    async fn complete(self) -> Result<HttpResponse, ApiError> {
        let started = Instant::now();
        let result = self
            .state
            .providers
            .complete(self.provider, &self.key, &self.request)
            .await;
        let outcome = result
            .as_ref()
            .map_or_else(ProviderError::outcome, |_| "ok");
        self.observe(outcome, started);
        let completion = match result {
            Ok(completion) => completion,
            Err(error) => {
                self.release(error.outcome()).await;
                return Err(self.provider_error(&error));
            }
        };
        let credits = match self.billing {
            Some(billing) => Some(credits_view(
                &self.settle(billing.hold, completion.usage).await?,
            )),
            None => None,
        };
        let mut body = json!({ "content": completion.content, "model": self.request.model });
        if let Some(credits) = credits {
            body["credits"] = credits;
        }
        Ok(HttpResponse::Ok().json(body))
    }

    fn observe(&self, outcome: &'static str, started: Instant) {
        let provider = self.provider.as_str();
        let model = self.request.model.clone();
        metrics::counter!("creditd_provider_calls_total",
            "provider" => provider, "model" => model.clone(), "outcome" => outcome)
        .increment(1);
        metrics::histogram!("creditd_provider_call_duration_seconds",
            "provider" => provider, "model" => model)
        .record(started.elapsed().as_secs_f64());
    }

    /// Removes the hold without charge. A release that fails leaves the
    /// hold to expiry, which releases it the same way.
    async fn release(&self, reason: &'static str) {
        let Some(billing) = self.billing else {
            return;
        };
        match self.state.engine.release(self.account, billing.hold).await {
            Ok(_) => {
                metrics::counter!("creditd_holds_released_total", "reason" => reason).increment(1)
            }
            Err(error) => tracing::warn!(%error, hold = %billing.hold,
                "a hold could not be released; it will expire"),
        }
    }

    /// Charges the cost of `usage` under the hold, whatever became of the
    /// hold, and returns it once durable (retried while the ledger is
    /// unavailable, for as long as the process lives).
    async fn settle(&self, hold: HoldId, usage: TokenUsage) -> Result<UsageRecord, ApiError> {
        let model = &self.request.model;
        let cost = self
            .state
            .prices
            .cost(model, &usage)
            .map_err(|e| ApiError::internal("chat cost", e))?;
        let charge = UsageCharge {
            model: model.clone(),
            tokens: usage,
            cost,
            conversation_id: self.conversation_id.clone(),
            message_id: self.message_id.clone(),
        };
        let record = self
            .state
            .settlements
            .settle(&self.state.engine, self.account, hold, charge)
            .await
            .map_err(|e| ApiError::internal("chat settlement", e))?;
        record_tokens(model, &usage);
        Ok(record)
    }

    fn provider_error(&self, error: &ProviderError) -> ApiError {
        provider_api_error(error, self.provider, self.byok)
    }
}

fn record_tokens(model: &str, usage: &TokenUsage) {
    for (kind, tokens) in [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("cache_write", usage.cache_write_tokens),
    ] {
        metrics::counter!("creditd_chat_tokens_total", "model" => model.to_owned(), "kind" => kind)
            .increment(tokens);
    }
}

fn credits_view(record: &UsageRecord) -> Value {
    json!({
        "used": record.cost_micros.ceil_cents(),
        "usedMicros": record.cost_micros.get(),
        "balance": record.balance_after_micros.floor_cents(),
        "balanceMicros": record.balance_after_micros.get(),
        "inputTokens": record.input_tokens,
        "outputTokens": record.output_tokens,
        "cacheReadTokens": record.cache_read_tokens,
        "cacheWriteTokens": record.cache_write_tokens,
    })
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
        details: retry_after_s.map(|s| json!({ "retryAfterSeconds": s })),
    };
    match error {
        ProviderError::Unavailable { retry_after_s, .. } => busy(*retry_after_s),
        ProviderError::Stream { kind, .. }
            if matches!(
                kind.as_str(),
                "overloaded_error" | "rate_limit_error" | "api_error" | "server_error"
            ) =>
        {
            busy(None)
        }
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
                Code::ProviderFailed,
                format!("{name} refused the request; the platform's key is being looked at."),
            )
        }
        ProviderError::Timeout => ApiError::new(
            Code::ProviderTimeout,
            format!("{name} did not answer in time; retry."),
        ),
        ProviderError::Rejected { message, .. } => ApiError::new(
            Code::ProviderFailed,
            format!("{name} refused the request: {message}"),
        ),
        ProviderError::Transport(_)
        | ProviderError::Malformed(_)
        | ProviderError::Stream { .. } => {
            tracing::warn!(%error, provider = provider.as_str(), "provider call failed");
            ApiError::new(
                Code::ProviderFailed,
                format!("The call to {name} failed; retry."),
            )
        }
    }
}

/// One Server-Sent Event for the client.
fn event(name: &str, data: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

fn error_event(error: &ApiError, credits: Option<Value>) -> Bytes {
    let mut data = json!({ "error": error.code.as_str(), "message": error.message });
    if let Some(credits) = credits {
        data["credits"] = credits;
    }
    event("error", &data)
}

/// How the upstream reading ended.
enum End {
    Completed,
    Disconnected,
    /// The client did not take the next event within the write timeout.
    TooSlow,
    Broken(ProviderError),
}

/// Opens the provider's stream in a task of its own, then answers with the
/// events that task forwards. An error status from the provider is an
/// ordinary JSON error: nothing was streamed yet.
async fn stream_answer(call: Call) -> Result<HttpResponse, ApiError> {
    let (opened_tx, opened_rx) = oneshot::channel();
    let (events_tx, events_rx) = mpsc::channel(call.state.settings.chat.stream_buffer_events);
    actix_web::rt::spawn(call.stream(opened_tx, events_tx));
    opened_rx
        .await
        .map_err(|e| ApiError::internal("chat stream task", e))??;
    let body = futures_util::stream::unfold(events_rx, |mut events| async move {
        events
            .recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(bytes), events))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

impl Call {
    async fn stream(
        self,
        opened: oneshot::Sender<Result<(), ApiError>>,
        events: mpsc::Sender<Bytes>,
    ) {
        match self.hold().await {
            Ok(call) => call.stream_held(opened, events).await,
            Err(error) => {
                let _ = opened.send(Err(error));
            }
        }
    }

    async fn stream_held(
        mut self,
        opened: oneshot::Sender<Result<(), ApiError>>,
        events: mpsc::Sender<Bytes>,
    ) {
        let started = Instant::now();
        let upstream = self
            .state
            .providers
            .stream(self.provider, &self.key, &self.request)
            .await;
        let mut upstream = match upstream {
            Ok(upstream) => upstream,
            Err(error) => {
                self.observe(error.outcome(), started);
                self.release(error.outcome()).await;
                let _ = opened.send(Err(self.provider_error(&error)));
                return;
            }
        };
        let chat = &self.state.settings.chat;
        let pacing = Pacing {
            keep_alive: Duration::from_millis(chat.stream_keep_alive_ms),
            write_timeout: Duration::from_millis(chat.stream_write_timeout_ms),
        };
        let (end, text_bytes) = if opened.send(Ok(())).is_err() {
            // Gone before the answer opened: what the provider already
            // reported is charged all the same.
            let mut text_bytes = 0;
            drain_ready(&mut upstream, &mut text_bytes);
            (End::Disconnected, text_bytes)
        } else {
            pump(&mut upstream, &events, pacing).await
        };
        let usage = upstream.usage();
        drop(upstream);
        self.observe(
            match &end {
                End::Completed => "ok",
                End::Disconnected => "client_disconnected",
                End::TooSlow => "client_too_slow",
                End::Broken(error) => error.outcome(),
            },
            started,
        );
        let billed = self.bill_stream(&end, usage, text_bytes).await;
        // Settled or released: the chat's places are given back before the
        // last event, which a client that stopped reading may never take.
        self.slot = None;
        self.in_flight = None;
        let credits = match billed {
            Ok(credits) => credits,
            Err(error) => {
                let _ = deliver(&events, error_event(&error, None), pacing).await;
                return;
            }
        };
        let last = match end {
            End::Completed => {
                let mut data = json!({ "model": self.request.model });
                if let Some(credits) = credits {
                    data["credits"] = credits;
                }
                event("done", &data)
            }
            End::Broken(error) => error_event(&self.provider_error(&error), credits),
            End::Disconnected | End::TooSlow => return,
        };
        let _ = deliver(&events, last, pacing).await;
    }

    /// Settles a streamed call for what it produced, or releases it when it
    /// produced nothing and did not finish. A client that left before any
    /// text is charged the input the provider reported, if it did.
    async fn bill_stream(
        &self,
        end: &End,
        usage: StreamUsage,
        text_bytes: u64,
    ) -> Result<Option<Value>, ApiError> {
        let Some(billing) = self.billing else {
            return Ok(None);
        };
        let nothing_produced = text_bytes == 0
            && match end {
                End::Completed => false,
                End::Broken(_) => true,
                End::Disconnected | End::TooSlow => usage.input.is_none(),
            };
        if nothing_produced {
            let reason = match end {
                End::Broken(error) => error.outcome(),
                End::TooSlow => "client_too_slow",
                _ => "client_disconnected",
            };
            self.release(reason).await;
            return Ok(None);
        }
        let tokens = streamed_usage(usage, text_bytes, billing.input_estimate);
        let record = self.settle(billing.hold, tokens).await?;
        Ok(Some(credits_view(&record)))
    }
}

/// An SSE comment the client ignores; written while the provider is silent
/// so that proxies keep the connection open and a departed client is noticed.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// How a stream paces its client.
#[derive(Clone, Copy)]
struct Pacing {
    /// A comment is sent after this long without text.
    keep_alive: Duration,
    /// A client that does not take an event within this long is cut.
    write_timeout: Duration,
}

/// Hands `bytes` to the client, or says how the client failed to take it.
async fn deliver(events: &mpsc::Sender<Bytes>, bytes: Bytes, pacing: Pacing) -> Result<(), End> {
    match tokio::time::timeout(pacing.write_timeout, events.send(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Disconnected),
        Err(_) => Err(End::TooSlow),
    }
}

/// Reads what the provider already sent and nobody read yet (its usage
/// counts above all), without waiting: the client is gone, but what the
/// provider produced is charged.
fn drain_ready(upstream: &mut ProviderStream, text_bytes: &mut u64) {
    while let Some(Ok(Some(text))) = upstream.next().now_or_never() {
        *text_bytes = text_bytes.saturating_add(text.len() as u64);
    }
}

/// Forwards text deltas until the provider finishes, the stream breaks, or
/// the client goes away or stops reading. Returns how it ended and the bytes
/// of text the provider produced.
async fn pump(
    upstream: &mut ProviderStream,
    events: &mpsc::Sender<Bytes>,
    pacing: Pacing,
) -> (End, u64) {
    let mut text_bytes = 0u64;
    let keep_alive = pacing.keep_alive;
    let mut idle = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = events.closed() => break End::Disconnected,
            next = upstream.next() => next,
            _ = idle.tick() => {
                match deliver(events, Bytes::from_static(KEEP_ALIVE), pacing).await {
                    Ok(()) => continue,
                    Err(end) => break end,
                }
            }
        };
        match next {
            Ok(Some(text)) => {
                idle.reset();
                text_bytes = text_bytes.saturating_add(text.len() as u64);
                if let Err(end) =
                    deliver(events, event("delta", &json!({ "text": text })), pacing).await
                {
                    break end;
                }
            }
            Ok(None) => return (End::Completed, text_bytes),
            Err(error) => return (End::Broken(error), text_bytes),
        }
    };
    drain_ready(upstream, &mut text_bytes);
    (end, text_bytes)
}

/// The tokens a stream is charged for: the provider's counts where they
/// came; otherwise the input estimate, and `ceil(bytes / 3)` of the text
/// received for the output (at least one token for any text).
pub fn streamed_usage(usage: StreamUsage, text_bytes: u64, input_estimate: u64) -> TokenUsage {
    let input = usage.input.unwrap_or(InputUsage {
        input_tokens: input_estimate,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
    });
    let received = u64::from(text_bytes > 0);
    let output_tokens = match usage.output_tokens {
        Some(reported) => reported.max(received),
        None => text_bytes
            .div_ceil(STREAMED_BYTES_PER_TOKEN)
            .max(usage.output_tokens_so_far),
    };
    TokenUsage {
        input_tokens: input.input_tokens,
        output_tokens,
        cache_read_tokens: input.cache_read_tokens,
        cache_write_tokens: input.cache_write_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ChatSettings {
        crate::config::Settings::default_file().unwrap().chat
    }

    #[test]
    fn the_input_estimate_counts_bytes_and_overheads() {
        let messages = vec![
            ChatMessage {
                role: Role::System,
                content: "abc".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "é€".into(),
            },
        ];
        // 16 + (3 + 8) + (5 + 8)
        assert_eq!(estimate_input_tokens(&messages, &settings()), 40);
    }

    #[test]
    fn streamed_text_without_a_count_is_charged_by_its_bytes() {
        let usage = streamed_usage(StreamUsage::default(), 10, 100);
        assert_eq!(usage.output_tokens, 4);
        assert_eq!(usage.input_tokens, 100);
        assert_eq!(
            streamed_usage(StreamUsage::default(), 1, 0).output_tokens,
            1
        );
        let reported = StreamUsage {
            output_tokens: Some(0),
            ..StreamUsage::default()
        };
        assert_eq!(streamed_usage(reported, 2, 0).output_tokens, 1);
    }
}
