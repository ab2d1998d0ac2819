//! A platform or BYOK chat, from the hold to the settlement.
//!
//! With the user's own key (BYOK) nothing is charged. With the platform's
//! key, a hold is taken before the call (estimated input + `maxTokens` of
//! output), then settled to the cost of the usage the provider reports, or
//! released if the provider failed before any output. The hold, the call
//! and the settlement run in a task of their own, so a client that goes away
//! never leaves a hold half-done.
//!
//! Prompt tokens: counted with the provider's public tokenizer where it has
//! one (OpenAI: the model's tiktoken encoding, as OpenAI frames a chat);
//! elsewhere (Anthropic) bounded by bytes, never under the provider's
//! count: the UTF-8 bytes of every message, plus
//! `chat.message_overhead_tokens` per message and
//! `chat.request_overhead_tokens` once (a BPE token covers at least one
//! byte). The hold prices them at the dearest input class of the model
//! (input, cache read, cache write), since a provider may bill prompt
//! tokens as cache writes.
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
//! came (OpenAI sends it in its last chunk only, when asked with
//! `stream_options.include_usage`), else the prompt's tokens for the input
//! and the text received for the output, counted with the tokenizer or,
//! without one, `ceil(bytes / 3)` (never zero for received text). A client
//! that leaves, or does not take the next event within
//! `chat.stream_write_timeout_ms`, ends the provider call; the stream is
//! settled for what was produced, the prompt included even when no text
//! came yet, once the provider has it: its reported input (Anthropic's
//! `message_start`), or its counted prompt once it answered 200 (OpenAI
//! reports nothing before the end). Free text that is stored with the usage
//! (`conversationId`, `messageId`, `model`) is checked before any hold or
//! provider call: control or invisible formatting characters, or over-long
//! values, get 400.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::estimate::{hold_amount, prompt_tokens, streamed_usage, Prompt, StreamedText};
use super::route::{RouteError, Router};
use super::tokens::{Tokenizer, Tokenizers};
use super::{SettlementSlot, Settlements};
use crate::accounts::StoredKeys;
use crate::config::{ChatSettings, Secret};
use crate::ledger::{AccountId, Engine, HoldId, KeyLimit, LedgerError, UsageCharge, UsageRecord};
use crate::money::Micros;
use crate::pricing::{ModelPrice, Provider, TokenUsage};
use crate::providers::sse::Frame;
use crate::providers::{
    ChatMessage, ChatRequest, ProviderClient, ProviderError, ProviderStream, StreamUsage,
};
use crate::rate_limits::RateLimits;

/// What chats need, built once at startup.
pub struct Chats {
    pub engine: Arc<Engine>,
    pub providers: ProviderClient,
    /// Which provider, model and key serve a chat.
    pub router: Router,
    pub settlements: Arc<Settlements>,
    pub rate_limits: Arc<RateLimits>,
    /// The price table's tokenizers, built at startup.
    pub tokenizers: Tokenizers,
    pub settings: ChatSettings,
}

/// Why a chat was refused or failed.
#[derive(Debug)]
pub enum ChatError {
    /// The request cannot be served as asked (400, the field named).
    Invalid(String),
    /// The balance does not cover the hold.
    InsufficientCredits {
        balance: Micros,
        available: Micros,
        required: Micros,
    },
    /// No provider, model or key can serve the chat as asked.
    Route(RouteError),
    /// Too many chats in flight for the account.
    Refused(crate::rate_limits::Refused),
    Ledger(LedgerError),
    /// The provider failed; how the client sees it depends on whose key.
    Provider {
        error: ProviderError,
        provider: Provider,
        byok: bool,
    },
    /// A failure whose details must not reach the client.
    Internal {
        context: &'static str,
        message: String,
    },
}

impl ChatError {
    fn internal(context: &'static str, error: impl std::fmt::Display) -> ChatError {
        ChatError::Internal {
            context,
            message: error.to_string(),
        }
    }
}

impl From<LedgerError> for ChatError {
    fn from(error: LedgerError) -> ChatError {
        ChatError::Ledger(error)
    }
}

impl From<RouteError> for ChatError {
    fn from(error: RouteError) -> ChatError {
        ChatError::Route(error)
    }
}

impl From<crate::rate_limits::Refused> for ChatError {
    fn from(refused: crate::rate_limits::Refused) -> ChatError {
        ChatError::Refused(refused)
    }
}

/// A chat as the client asked for it, checked, before it is routed.
pub struct ChatOrder {
    pub account: AccountId,
    /// The model asked for; the default (or the own key's provider's) when
    /// `None`.
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    /// The user's own provider keys, sealed, as stored.
    pub stored_keys: Arc<StoredKeys>,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    /// A gateway call (`/v1/*`): its body and key; `None` for `/api/chat`.
    pub gateway: Option<GatewayCall>,
}

/// What a gateway call adds to a chat: the client's body, passed through,
/// what of its prompt the messages do not say, and the key it came with.
#[derive(Debug, Clone)]
pub struct GatewayCall {
    pub body: serde_json::Value,
    /// Prompt tokens counted apart from the messages (images).
    pub extra_prompt_tokens: u64,
    /// The API key and its spend limit (`None`: a Clerk session).
    pub key: Option<KeyLimit>,
}

/// One chat, routed: the provider, key and model that serve it.
struct ChatCall {
    pub account: AccountId,
    pub provider: Provider,
    /// The price of `request.model`, looked up once; `None` on the user's
    /// own key.
    pub price: Option<ModelPrice>,
    pub key: Secret,
    pub request: ChatRequest,
    /// On the user's own key: nothing is held nor charged.
    pub byok: bool,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    pub extra_prompt_tokens: u64,
    pub api_key: Option<KeyLimit>,
}

/// A whole answer, with what it cost when on the platform's key.
pub struct CompletedChat {
    pub content: String,
    pub model: String,
    pub credits: Option<UsageRecord>,
    /// The provider's whole answer, for a gateway call.
    pub body: Option<serde_json::Value>,
}

/// What a stream hands its client, in order: deltas (and keep-alives
/// while the provider is silent), then `Done` or `Failed`.
#[derive(Debug)]
pub enum StreamEvent {
    Delta(String),
    KeepAlive,
    Done {
        model: String,
        credits: Option<UsageRecord>,
        /// A gateway stream's last frames (final usage, end), as sent.
        tail: Vec<Frame>,
    },
    /// A frame of a gateway stream, as the provider sent it.
    Frame(Frame),
    Failed {
        error: ChatError,
        credits: Option<UsageRecord>,
    },
}

impl Chats {
    /// The order routed (`Router::route`) into the call that serves it.
    fn routed(&self, order: ChatOrder) -> Result<ChatCall, ChatError> {
        let route = self
            .router
            .route(order.account, order.model.as_deref(), &order.stored_keys)?;
        let (passthrough, extra_prompt_tokens, api_key) = match order.gateway {
            Some(gateway) => (Some(gateway.body), gateway.extra_prompt_tokens, gateway.key),
            None => (None, 0, None),
        };
        Ok(ChatCall {
            account: order.account,
            provider: route.provider,
            price: route.price,
            key: route.key,
            request: ChatRequest {
                model: route.model,
                messages: order.messages,
                max_tokens: order.max_tokens,
                passthrough,
            },
            byok: route.byok,
            conversation_id: order.conversation_id,
            message_id: order.message_id,
            extra_prompt_tokens,
            api_key,
        })
    }

    fn call(self: &Arc<Self>, chat: ChatCall) -> Call {
        Call {
            chats: self.clone(),
            account: chat.account,
            provider: chat.provider,
            price: chat.price,
            key: chat.key,
            request: chat.request,
            byok: chat.byok,
            billing: None,
            in_flight: None,
            slot: None,
            conversation_id: chat.conversation_id,
            message_id: chat.message_id,
            extra_prompt_tokens: chat.extra_prompt_tokens,
            api_key: chat.api_key,
        }
    }

    /// A whole answer: hold, call, then settle (or release), in a task of
    /// its own so a client that goes away never leaves a hold half-done.
    pub async fn answer(self: &Arc<Self>, order: ChatOrder) -> Result<CompletedChat, ChatError> {
        let call = self.call(self.routed(order)?);
        actix_web::rt::spawn(async move { call.hold().await?.complete().await })
            .await
            .map_err(|e| ChatError::internal("chat task", e))?
    }

    /// Opens the provider's stream in a task of its own, then gives the
    /// events that task forwards. An error status from the provider is an
    /// ordinary error: nothing was streamed yet.
    pub async fn open_stream(
        self: &Arc<Self>,
        order: ChatOrder,
    ) -> Result<mpsc::Receiver<StreamEvent>, ChatError> {
        let chat = self.routed(order)?;
        let (opened_tx, opened_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::channel(self.settings.stream_buffer_events);
        actix_web::rt::spawn(self.call(chat).stream(opened_tx, events_tx));
        opened_rx
            .await
            .map_err(|e| ChatError::internal("chat stream task", e))??;
        Ok(events_rx)
    }
}

/// A platform call's hold.
#[derive(Debug, Clone, Copy)]
struct Billing {
    hold: HoldId,
    prompt: Prompt,
}

async fn reserve(call: &Call, price: &ModelPrice) -> Result<Billing, ChatError> {
    let chats = &call.chats;
    let request = &call.request;
    let tokenizer = chats.tokenizers.for_model(price);
    let mut prompt = count_prompt(request, tokenizer, &chats.settings).await?;
    prompt.tokens = prompt.tokens.saturating_add(call.extra_prompt_tokens);
    let amount = hold_amount(price, prompt.tokens, request.max_tokens).ok_or_else(|| {
        ChatError::Invalid("field `messages`: the conversation is too large".into())
    })?;
    let hold = HoldId::generate();
    let admitted = chats
        .engine
        .admit_for_key(call.account, hold, amount, call.api_key)
        .await;
    match admitted {
        Ok(_) => Ok(Billing { hold, prompt }),
        Err(LedgerError::InsufficientCredits {
            balance,
            available,
            required,
        }) => Err(ChatError::InsufficientCredits {
            balance,
            available,
            required,
        }),
        Err(error) => Err(error.into()),
    }
}

/// Prompts of more bytes than this are counted on the blocking pool rather
/// than on the worker serving other requests: counting takes about 40 µs
/// per KiB of prose, but up to 1 ms per KiB of a run of spaces (debug build).
const INLINE_COUNT_MAX_BYTES: usize = 8 * 1024;

/// The prompt's tokens, counted with the tokenizer if there is one.
async fn count_prompt(
    request: &ChatRequest,
    tokenizer: Option<Tokenizer>,
    settings: &ChatSettings,
) -> Result<Prompt, ChatError> {
    let bytes = request
        .messages
        .iter()
        .fold(0usize, |sum, m| sum.saturating_add(m.content.len()));
    if tokenizer.is_none() || bytes <= INLINE_COUNT_MAX_BYTES {
        return Ok(prompt_tokens(&request.messages, tokenizer, settings));
    }
    let messages = request.messages.clone();
    let settings = settings.clone();
    actix_web::rt::task::spawn_blocking(move || prompt_tokens(&messages, tokenizer, &settings))
        .await
        .map_err(|e| ChatError::internal("prompt count", e))
}

/// One provider call and, for the platform's key, its hold.
struct Call {
    chats: Arc<Chats>,
    account: AccountId,
    provider: Provider,
    /// The model's price; `None` on the user's own key.
    price: Option<ModelPrice>,
    key: Secret,
    request: ChatRequest,
    byok: bool,
    /// Set once the platform call's hold is taken.
    billing: Option<Billing>,
    /// The platform call's place among its account's chats in flight
    /// (`rate_limits.chats_in_flight_per_account`), given back when it ends.
    in_flight: Option<crate::rate_limits::ChatPermit>,
    /// The platform call's place among the pending settlements, given back
    /// once it settled or released (when the call is dropped).
    slot: Option<SettlementSlot>,
    conversation_id: Option<String>,
    message_id: Option<String>,
    /// Prompt tokens counted apart from the messages (a gateway call's images).
    extra_prompt_tokens: u64,
    /// The gateway API key the call came with, and its spend limit.
    api_key: Option<KeyLimit>,
}

impl Call {
    /// Takes the hold of a platform call (a BYOK call has none).
    async fn hold(mut self) -> Result<Call, ChatError> {
        if !self.byok {
            self.in_flight = Some(self.chats.rate_limits.chat(self.account)?);
            self.slot = Some(self.chats.settlements.admit()?);
            let price = self.price.ok_or_else(|| {
                ChatError::internal("chat hold", "a platform chat without a price")
            })?;
            self.billing = Some(reserve(&self, &price).await?);
        }
        Ok(self)
    }

    /// A whole answer: call, then settle (or release), then answer.
    async fn complete(self) -> Result<CompletedChat, ChatError> {
        let started = Instant::now();
        let result = self
            .chats
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
                return Err(self.provider_error(error));
            }
        };
        let credits = match self.billing {
            Some(billing) => Some(self.settle(billing.hold, completion.usage).await?),
            None => None,
        };
        Ok(CompletedChat {
            content: completion.content,
            model: self.request.model.clone(),
            credits,
            body: completion.body,
        })
    }

    fn observe(&self, outcome: &'static str, started: Instant) {
        let provider = self.provider.as_str();
        let model = self.request.model.clone();
        metrics::counter!(crate::telemetry::PROVIDER_CALLS_TOTAL.name,
            "provider" => provider, "model" => model.clone(), "outcome" => outcome)
        .increment(1);
        metrics::histogram!(crate::telemetry::PROVIDER_CALL_DURATION_SECONDS.name,
            "provider" => provider, "model" => model)
        .record(started.elapsed().as_secs_f64());
    }

    /// Removes the hold without charge. A release that fails leaves the
    /// hold to expiry, which releases it the same way.
    async fn release(&self, reason: &'static str) {
        let Some(billing) = self.billing else {
            return;
        };
        match self.chats.engine.release(self.account, billing.hold).await {
            Ok(_) => {
                metrics::counter!(crate::telemetry::HOLDS_RELEASED_TOTAL.name, "reason" => reason)
                    .increment(1)
            }
            Err(error) => tracing::warn!(%error, hold = %billing.hold,
                "a hold could not be released; it will expire"),
        }
    }

    /// Charges the cost of `usage` under the hold, whatever became of the
    /// hold, and returns it once durable (retried while the ledger is
    /// unavailable, for as long as the process lives).
    async fn settle(&self, hold: HoldId, usage: TokenUsage) -> Result<UsageRecord, ChatError> {
        let model = &self.request.model;
        let cost = self
            .price
            .ok_or_else(|| ChatError::internal("chat cost", "a platform chat without a price"))?
            .cost(&usage)
            .map_err(|e| ChatError::internal("chat cost", e))?;
        let charge = UsageCharge {
            model: model.clone(),
            tokens: usage,
            cost,
            conversation_id: self.conversation_id.clone(),
            message_id: self.message_id.clone(),
            api_key: self.api_key.map(|key| key.key),
        };
        let record = self
            .chats
            .settlements
            .settle(&self.chats.engine, self.account, hold, charge)
            .await
            .map_err(|e| ChatError::internal("chat settlement", e))?;
        record_tokens(model, &usage);
        Ok(record)
    }

    fn provider_error(&self, error: ProviderError) -> ChatError {
        ChatError::Provider {
            error,
            provider: self.provider,
            byok: self.byok,
        }
    }
}

fn record_tokens(model: &str, usage: &TokenUsage) {
    for (kind, tokens) in [
        ("input", usage.input_tokens),
        ("output", usage.output_tokens),
        ("cache_read", usage.cache_read_tokens),
        ("cache_write", usage.cache_write_tokens),
    ] {
        metrics::counter!(crate::telemetry::CHAT_TOKENS_TOTAL.name, "model" => model.to_owned(), "kind" => kind)
            .increment(tokens);
    }
}

/// How the upstream reading ended.
enum End {
    Completed,
    Disconnected,
    /// The client did not take the next event within the write timeout.
    TooSlow,
    Broken(ProviderError),
}

impl Call {
    async fn stream(
        self,
        opened: oneshot::Sender<Result<(), ChatError>>,
        events: mpsc::Sender<StreamEvent>,
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
        opened: oneshot::Sender<Result<(), ChatError>>,
        events: mpsc::Sender<StreamEvent>,
    ) {
        let started = Instant::now();
        let upstream = self
            .chats
            .providers
            .stream(self.provider, &self.key, &self.request)
            .await;
        let mut upstream = match upstream {
            Ok(upstream) => upstream,
            Err(error) => {
                self.observe(error.outcome(), started);
                self.release(error.outcome()).await;
                let _ = opened.send(Err(self.provider_error(error)));
                return;
            }
        };
        let chat = &self.chats.settings;
        let pacing = Pacing {
            keep_alive: Duration::from_millis(chat.stream_keep_alive_ms),
            write_timeout: Duration::from_millis(chat.stream_write_timeout_ms),
        };
        let mut text = StreamedText::new(self.tokenizer());
        let end = if opened.send(Ok(())).is_err() {
            // Gone before the answer opened: what the provider already
            // has is charged all the same.
            drain_ready(&mut upstream, &mut text);
            End::Disconnected
        } else {
            pump(&mut upstream, &events, pacing, &mut text).await
        };
        let usage = upstream.usage();
        let tail = upstream.take_tail();
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
        let billed = self.bill_stream(&end, usage, &text).await;
        // Settled or released: the chat's places are given back before the
        // last event, which a client that stopped reading may never take.
        self.slot = None;
        self.in_flight = None;
        let credits = match billed {
            Ok(credits) => credits,
            Err(error) => {
                let failed = StreamEvent::Failed {
                    error,
                    credits: None,
                };
                let _ = deliver(&events, failed, pacing).await;
                return;
            }
        };
        let last = match end {
            End::Completed => StreamEvent::Done {
                model: self.request.model.clone(),
                credits,
                tail,
            },
            End::Broken(error) => StreamEvent::Failed {
                error: self.provider_error(error),
                credits,
            },
            End::Disconnected | End::TooSlow => return,
        };
        let _ = deliver(&events, last, pacing).await;
    }

    /// The tokenizer a platform call's stream is counted with, if its
    /// provider publishes one (a BYOK call is not charged: bytes suffice).
    fn tokenizer(&self) -> Option<Tokenizer> {
        self.billing?;
        self.chats.tokenizers.for_model(self.price.as_ref()?)
    }

    /// Settles a streamed call for what it produced, or releases it when it
    /// produced nothing and did not finish. A client that left before any
    /// text is charged the prompt once the provider has it: the input it
    /// reported, or, where the prompt was counted with the provider's
    /// tokenizer, the count (the stream opened: the provider took it).
    async fn bill_stream(
        &self,
        end: &End,
        usage: StreamUsage,
        text: &StreamedText,
    ) -> Result<Option<UsageRecord>, ChatError> {
        let Some(billing) = self.billing else {
            return Ok(None);
        };
        let prompt_taken = usage.input.is_some() || billing.prompt.counted;
        let nothing_produced = text.is_empty()
            && match end {
                End::Completed => false,
                End::Broken(_) => true,
                End::Disconnected | End::TooSlow => !prompt_taken,
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
        let tokens = streamed_usage(usage, text, billing.prompt);
        Ok(Some(self.settle(billing.hold, tokens).await?))
    }
}

/// How a stream paces its client.
#[derive(Clone, Copy)]
struct Pacing {
    /// A comment is sent after this long without text.
    keep_alive: Duration,
    /// A client that does not take an event within this long is cut.
    write_timeout: Duration,
}

/// Hands `bytes` to the client, or says how the client failed to take it.
async fn deliver(
    events: &mpsc::Sender<StreamEvent>,
    event: StreamEvent,
    pacing: Pacing,
) -> Result<(), End> {
    match tokio::time::timeout(pacing.write_timeout, events.send(event)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Disconnected),
        Err(_) => Err(End::TooSlow),
    }
}

/// Reads what the provider already sent and nobody read yet (its usage
/// counts above all), without waiting: the client is gone, but what the
/// provider produced is charged.
fn drain_ready(upstream: &mut ProviderStream, text: &mut StreamedText) {
    while let Some(Ok(Some(delta))) = upstream.next().now_or_never() {
        text.push(&delta.text);
    }
}

/// Forwards text deltas until the provider finishes, the stream breaks, or
/// the client goes away or stops reading. Returns how it ended; `text` gets
/// the text the provider produced.
async fn pump(
    upstream: &mut ProviderStream,
    events: &mpsc::Sender<StreamEvent>,
    pacing: Pacing,
    text: &mut StreamedText,
) -> End {
    let keep_alive = pacing.keep_alive;
    let mut idle = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = events.closed() => break End::Disconnected,
            next = upstream.next() => next,
            _ = idle.tick() => {
                match deliver(events, StreamEvent::KeepAlive, pacing).await {
                    Ok(()) => continue,
                    Err(end) => break end,
                }
            }
        };
        match next {
            Ok(Some(delta)) => {
                idle.reset();
                text.push(&delta.text);
                let event = match delta.frame {
                    Some(frame) => StreamEvent::Frame(frame),
                    None => StreamEvent::Delta(delta.text),
                };
                if let Err(end) = deliver(events, event, pacing).await {
                    break end;
                }
            }
            Ok(None) => return End::Completed,
            Err(error) => return End::Broken(error),
        }
    };
    drain_ready(upstream, text);
    end
}
