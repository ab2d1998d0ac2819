//! The AI providers behind `/api/chat` and the gateway: Anthropic's
//! Messages API and OpenAI's Chat Completions, over one `reqwest` client
//! with connect and total timeouts and configurable base URLs; plain and
//! streamed answers, with the token usage each provider reports, cache
//! tokens included. A gateway call passes the client's own body through
//! ([`ChatRequest::passthrough`]) and gets the provider's answer back as
//! sent: the whole body, or every stream frame.

mod anthropic;
mod openai;
pub mod sse;

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::{ProviderSettings, Secret};
use crate::pricing::{Provider, TokenUsage};
use sse::SseParser;

/// Who wrote a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// One call, as both providers take it.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub model: String,
    /// The conversation (for a gateway call: as read for the estimate only).
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    /// A gateway call: the client's own body (a JSON object in the
    /// provider's format), sent as is but for `model`, `stream`, the output
    /// bound when it had none, and OpenAI's `stream_options.include_usage`.
    pub passthrough: Option<Value>,
}

/// A finished (non-streamed) answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub content: String,
    pub usage: TokenUsage,
    /// The provider's whole body, for a gateway call.
    pub body: Option<Value>,
}

/// Every way a provider call fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// 429, 529 or 5xx: the provider is busy or failing; retry later.
    #[error("the provider is unavailable (HTTP {status}): {message}")]
    Unavailable {
        status: u16,
        retry_after_s: Option<u64>,
        message: String,
    },
    /// 401 or 403: the key was refused.
    #[error("the provider refused the API key (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// Any other 4xx: the provider refused the request itself; `body` is
    /// its error body as sent, when it was JSON (the gateway passes it on).
    #[error("the provider refused the request (HTTP {status}): {message}")]
    Rejected {
        status: u16,
        message: String,
        body: Option<Value>,
    },
    /// No answer within the configured timeouts.
    #[error("the provider did not answer in time")]
    Timeout,
    /// The connection failed or broke.
    #[error("the connection to the provider failed: {0}")]
    Transport(String),
    /// An answer that does not follow the provider's format.
    #[error("the provider's answer is malformed: {0}")]
    Malformed(String),
    /// An `error` event in the middle of a streamed answer.
    #[error("the provider's stream reported an error ({kind}): {message}")]
    Stream {
        kind: StreamErrorKind,
        message: String,
    },
}

/// The type of an `error` event in a stream, as the providers name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamErrorKind {
    /// `overloaded_error`: the provider is busy.
    Overloaded,
    /// `rate_limit_error`.
    RateLimited,
    /// `api_error`: the provider failed internally.
    ApiError,
    /// `server_error`.
    ServerError,
    /// Any other type, kept as sent.
    Other(String),
}

impl StreamErrorKind {
    pub fn from_wire(kind: &str) -> StreamErrorKind {
        match kind {
            "overloaded_error" => StreamErrorKind::Overloaded,
            "rate_limit_error" => StreamErrorKind::RateLimited,
            "api_error" => StreamErrorKind::ApiError,
            "server_error" => StreamErrorKind::ServerError,
            other => StreamErrorKind::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            StreamErrorKind::Overloaded => "overloaded_error",
            StreamErrorKind::RateLimited => "rate_limit_error",
            StreamErrorKind::ApiError => "api_error",
            StreamErrorKind::ServerError => "server_error",
            StreamErrorKind::Other(kind) => kind,
        }
    }

    /// The provider is busy or failing on its side: worth a retry later.
    pub fn is_busy(&self) -> bool {
        !matches!(self, StreamErrorKind::Other(_))
    }
}

impl std::fmt::Display for StreamErrorKind {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl ProviderError {
    /// A stable label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::Unauthorized { .. } => "unauthorized",
            ProviderError::Rejected { .. } => "rejected",
            ProviderError::Timeout => "timeout",
            ProviderError::Transport(_) => "transport",
            ProviderError::Malformed(_) => "malformed",
            ProviderError::Stream { .. } => "stream_error",
        }
    }

    fn from_reqwest(error: reqwest::Error) -> ProviderError {
        if error.is_timeout() {
            ProviderError::Timeout
        } else {
            ProviderError::Transport(without_url(error))
        }
    }
}

/// reqwest errors name the URL (the base URL may be private); keep the causes only.
fn without_url(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Usage gathered from a stream so far. `None`: the provider has not said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamUsage {
    /// Input and cache tokens (Anthropic: `message_start`; OpenAI: the last chunk).
    pub input: Option<InputUsage>,
    /// Final output tokens (Anthropic: the last `message_delta`; OpenAI: the last chunk).
    pub output_tokens: Option<u64>,
    /// A provisional output count (Anthropic's `message_start`), never final.
    pub output_tokens_so_far: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InputUsage {
    pub input_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// What a stream decoder makes of one SSE frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decoded {
    Text(String),
    /// A tool call's arguments: output the client reads, never text of a
    /// chat (counted for a gateway stream cut short).
    Arguments(String),
    /// The frame with the final usage (OpenAI's usage chunk, Anthropic's
    /// `message_delta`): a gateway stream gives it with the stream's end,
    /// once its cost is known.
    Usage,
    Nothing,
    Finished,
}

/// What a stream gives next: text, and for a gateway call the frame as
/// the provider sent it (`text` is then what of it is counted as output:
/// text and tool call arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    pub text: String,
    pub frame: Option<sse::Frame>,
}

#[derive(Debug)]
enum Decoder {
    Anthropic,
    Openai,
}

/// A streamed answer being read: text deltas in order, usage on the side.
/// Dropping it closes the connection to the provider.
pub struct ProviderStream {
    response: reqwest::Response,
    parser: SseParser,
    decoder: Decoder,
    pending: std::collections::VecDeque<Delta>,
    usage: StreamUsage,
    finished: bool,
    /// An error met after text still pending: reported once that text is out.
    failed: Option<ProviderError>,
    /// A gateway call: every frame is given, the last ones kept in `tail`.
    passthrough: bool,
    /// The frames of a gateway stream's end (final usage, `[DONE]` or
    /// `message_stop`), kept until its cost is known.
    tail: Vec<sse::Frame>,
}

impl ProviderStream {
    /// The next delta; `None` once the provider finished the answer.
    pub async fn next(&mut self) -> Result<Option<Delta>, ProviderError> {
        loop {
            if let Some(delta) = self.pending.pop_front() {
                return Ok(Some(delta));
            }
            if let Some(error) = self.failed.take() {
                return Err(error);
            }
            if self.finished {
                return Ok(None);
            }
            let chunk = self
                .response
                .chunk()
                .await
                .map_err(ProviderError::from_reqwest)?;
            let Some(chunk) = chunk else {
                return Err(ProviderError::Transport(
                    "the stream ended before the provider finished the answer".into(),
                ));
            };
            let frames = self
                .parser
                .push(&chunk)
                .map_err(|e| ProviderError::Malformed(e.to_string()))?;
            for frame in frames {
                if self.finished || self.failed.is_some() {
                    break;
                }
                let decoded = match self.decoder {
                    Decoder::Anthropic => anthropic::decode(&frame, &mut self.usage),
                    Decoder::Openai => openai::decode(&frame, &mut self.usage),
                };
                match decoded {
                    Ok(decoded) => self.take(decoded, frame),
                    Err(error) => {
                        self.failed = Some(error);
                        break;
                    }
                }
            }
        }
    }

    /// Queues what a decoded frame gives: its text for a chat; for a
    /// gateway call the frame itself, or keeps it for the end.
    fn take(&mut self, decoded: Decoded, frame: sse::Frame) {
        let (text, tail) = match decoded {
            Decoded::Text(text) => (text, false),
            Decoded::Arguments(text) if self.passthrough => (text, false),
            Decoded::Arguments(_) | Decoded::Nothing => (String::new(), false),
            Decoded::Usage => (String::new(), true),
            Decoded::Finished => {
                self.finished = true;
                (String::new(), true)
            }
        };
        match (self.passthrough, tail) {
            (true, true) => self.tail.push(frame),
            (true, false) => self.pending.push_back(Delta {
                text,
                frame: Some(frame),
            }),
            (false, _) if !text.is_empty() => self.pending.push_back(Delta { text, frame: None }),
            (false, _) => {}
        }
    }

    pub fn usage(&self) -> StreamUsage {
        self.usage
    }

    /// The frames of a gateway stream's end, kept until its cost is known.
    pub fn take_tail(&mut self) -> Vec<sse::Frame> {
        std::mem::take(&mut self.tail)
    }
}

/// The typed client of both providers.
#[derive(Clone)]
pub struct ProviderClient {
    http: reqwest::Client,
    settings: ProviderSettings,
}

impl ProviderClient {
    pub fn new(settings: &ProviderSettings) -> anyhow::Result<ProviderClient> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.total_timeout_ms))
            .build()?;
        Ok(ProviderClient {
            http,
            settings: settings.clone(),
        })
    }

    /// The platform's key for `provider`, if one is configured.
    pub fn platform_key(&self, provider: Provider) -> Option<&Secret> {
        let key = match provider {
            Provider::Anthropic => &self.settings.anthropic_api_key,
            Provider::Openai => &self.settings.openai_api_key,
        };
        (!key.is_empty()).then_some(key)
    }

    /// The model used with a user's own key of `provider`.
    pub fn byok_model(&self, provider: Provider) -> &str {
        match provider {
            Provider::Anthropic => &self.settings.anthropic_byok_model,
            Provider::Openai => &self.settings.openai_byok_model,
        }
    }

    fn request(
        &self,
        provider: Provider,
        key: &Secret,
        request: &ChatRequest,
        stream: bool,
    ) -> reqwest::RequestBuilder {
        match provider {
            Provider::Anthropic => {
                let url = format!(
                    "{}/v1/messages",
                    self.settings.anthropic_base_url.trim_end_matches('/')
                );
                let body = match &request.passthrough {
                    Some(raw) => anthropic::passthrough(raw, request, stream),
                    None => anthropic::body(request, stream),
                };
                self.http
                    .post(url)
                    .header("x-api-key", key.expose())
                    .header("anthropic-version", &self.settings.anthropic_version)
                    .json(&body)
            }
            Provider::Openai => {
                let url = format!(
                    "{}/v1/chat/completions",
                    self.settings.openai_base_url.trim_end_matches('/')
                );
                let body = match &request.passthrough {
                    Some(raw) => openai::passthrough(raw, request, stream),
                    None => openai::body(request, stream),
                };
                self.http.post(url).bearer_auth(key.expose()).json(&body)
            }
        }
    }

    /// One whole answer.
    pub async fn complete(
        &self,
        provider: Provider,
        key: &Secret,
        request: &ChatRequest,
    ) -> Result<Completion, ProviderError> {
        let response = self
            .request(provider, key, request, false)
            .send()
            .await
            .map_err(ProviderError::from_reqwest)?;
        let response = check_status(response).await?;
        let body = response
            .bytes()
            .await
            .map_err(ProviderError::from_reqwest)?;
        let mut completion = match provider {
            Provider::Anthropic => anthropic::completion(&body),
            Provider::Openai => openai::completion(&body),
        }?;
        if request.passthrough.is_some() {
            let whole = serde_json::from_slice(&body).map_err(|e| malformed("answer", e))?;
            completion.body = Some(whole);
        }
        Ok(completion)
    }

    /// Opens a streamed answer; an error status is an error here, before any text.
    pub async fn stream(
        &self,
        provider: Provider,
        key: &Secret,
        request: &ChatRequest,
    ) -> Result<ProviderStream, ProviderError> {
        let response = self
            .request(provider, key, request, true)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(ProviderError::from_reqwest)?;
        let response = check_status(response).await?;
        Ok(ProviderStream {
            response,
            parser: SseParser::default(),
            decoder: match provider {
                Provider::Anthropic => Decoder::Anthropic,
                Provider::Openai => Decoder::Openai,
            },
            pending: Default::default(),
            usage: StreamUsage::default(),
            finished: false,
            failed: None,
            passthrough: request.passthrough.is_some(),
            tail: Vec::new(),
        })
    }
}

/// Most bytes of an error body read to find its message.
const ERROR_BODY_MAX_BYTES: usize = 16 * 1024;

/// A 2xx response as is; any other status as its typed error, with the
/// message both providers put at `error.message`.
async fn check_status(mut response: reqwest::Response) -> Result<reqwest::Response, ProviderError> {
    let status = response.status().as_u16();
    if response.status().is_success() {
        return Ok(response);
    }
    let retry_after_s = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_MAX_BYTES {
            break;
        }
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {status} without an error message"));
    Err(match status {
        401 | 403 => ProviderError::Unauthorized { status, message },
        429 | 529 | 500..=599 => ProviderError::Unavailable {
            status,
            retry_after_s,
            message,
        },
        _ => ProviderError::Rejected {
            status,
            message,
            body: serde_json::from_slice(&body).ok(),
        },
    })
}

/// A gateway body with `model` and `stream` set, and an output bound
/// (`field`, the format's own) when the client gave none, so the hold
/// bounds the cost.
fn passthrough_body(raw: &Value, request: &ChatRequest, stream: bool, field: &str) -> Value {
    let mut body = raw.clone();
    body["model"] = json!(request.model);
    if stream {
        body["stream"] = json!(true);
    } else if let Some(object) = body.as_object_mut() {
        object.remove("stream");
    }
    let bounded = ["max_tokens", "max_completion_tokens"]
        .iter()
        .any(|name| body.get(*name).is_some_and(|v| !v.is_null()));
    if !bounded {
        body[field] = json!(request.max_tokens);
    }
    body
}

fn malformed(what: &str, error: serde_json::Error) -> ProviderError {
    ProviderError::Malformed(format!("{what}: {error}"))
}
