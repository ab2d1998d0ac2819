//! What the gateway (`/v1/chat/completions`, `/v1/messages`) reads of a
//! request it passes through: the model, the output bound, whether it
//! streams, and the prompt for the hold's estimate. Everything else
//! (content blocks, tools, images, `temperature`, `stop`, `metadata`…)
//! goes to the provider as the client wrote it; only what is metered or
//! stored is checked here.
//!
//! The estimate reads each message's text as the provider's tokenizer
//! would (a string content as it is, text parts by their text); every
//! other part (tool calls, tool results, documents) and the `tools` are
//! counted as their JSON, which is never fewer tokens than what the
//! provider makes of them; each image as [`IMAGE_TOKENS`].

use serde_json::Value;

use super::chat::ChatError;
use crate::config::ChatSettings;
use crate::pricing::Provider;
use crate::providers::{ChatMessage, Role};

/// Prompt tokens held for one image: the most either provider bills for
/// an image of any size (OpenAI gpt-4o's largest tiling, 8 tiles, is
/// 1,445; Anthropic's largest image, about 1.15 megapixels, about 1,600).
/// A model that counts images otherwise may overrun its hold; its
/// settlement charges the reported usage all the same.
pub const IMAGE_TOKENS: u64 = 1_600;

/// Longest model name accepted (it is stored with the usage).
const MODEL_MAX_BYTES: usize = 200;

/// A gateway request, read: what the hold and the routing need.
#[derive(Debug, Clone)]
pub struct GatewayRequest {
    pub model: String,
    pub max_tokens: u32,
    pub stream: bool,
    /// OpenAI: the client asked for the usage chunk of a stream
    /// (`stream_options.include_usage`); creditd always asks the provider.
    pub usage_asked: bool,
    /// The conversation as the estimate counts it.
    pub messages: Vec<ChatMessage>,
    /// Prompt tokens counted apart from the messages (images).
    pub extra_prompt_tokens: u64,
    /// The body, passed through.
    pub body: Value,
}

fn invalid(message: impl Into<String>) -> ChatError {
    ChatError::Invalid(message.into())
}

/// Reads a request body in `format` (the provider whose wire format the
/// route speaks).
pub fn read(
    format: Provider,
    body: Value,
    settings: &ChatSettings,
) -> Result<GatewayRequest, ChatError> {
    if !body.is_object() {
        return Err(invalid("the request body must be a JSON object"));
    }
    let model = model(&body)?;
    let max_tokens = max_tokens(format, &body, settings)?;
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(invalid("field `stream`: must be true or false")),
    };
    if format == Provider::Openai && body.get("n").is_some_and(|n| n != 1 && !n.is_null()) {
        return Err(invalid(
            "field `n`: only 1 choice per request is served (each would need its own hold)",
        ));
    }
    let usage_asked = body["stream_options"]["include_usage"] == Value::Bool(true);
    let (messages, images) = prompt(&body)?;
    Ok(GatewayRequest {
        model,
        max_tokens,
        stream,
        usage_asked,
        messages,
        extra_prompt_tokens: images.saturating_mul(IMAGE_TOKENS),
        body,
    })
}

fn model(body: &Value) -> Result<String, ChatError> {
    let model = match body.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        _ => return Err(invalid("field `model`: required, a model name")),
    };
    if model.len() > MODEL_MAX_BYTES {
        return Err(invalid(format!(
            "field `model`: at most {MODEL_MAX_BYTES} bytes"
        )));
    }
    if let Some(problem) = crate::text::problem(model) {
        return Err(invalid(format!("field `model`: {problem}")));
    }
    Ok(model.clone())
}

/// The output bound: Anthropic's required `max_tokens`; OpenAI's
/// `max_completion_tokens` or `max_tokens`, else `chat.max_tokens_default`
/// (which the provider is then sent, so the hold bounds the cost).
fn max_tokens(format: Provider, body: &Value, settings: &ChatSettings) -> Result<u32, ChatError> {
    let fields: &[&str] = match format {
        Provider::Anthropic => &["max_tokens"],
        Provider::Openai => &["max_completion_tokens", "max_tokens"],
    };
    let given = fields
        .iter()
        .find_map(|name| body.get(*name).filter(|v| !v.is_null()).map(|v| (*name, v)));
    let (field, value) = match given {
        Some(given) => given,
        None if format == Provider::Anthropic => {
            return Err(invalid("field `max_tokens`: required"))
        }
        None => return Ok(settings.max_tokens_default),
    };
    match value.as_u64() {
        Some(tokens) if tokens >= 1 && tokens <= u64::from(settings.max_tokens_limit) => {
            u32::try_from(tokens).map_err(|_| invalid(format!("field `{field}`: too large")))
        }
        _ => Err(invalid(format!(
            "field `{field}`: must be a whole number from 1 to {}",
            settings.max_tokens_limit
        ))),
    }
}

/// The conversation as counted, and the number of images in it.
fn prompt(body: &Value) -> Result<(Vec<ChatMessage>, u64), ChatError> {
    let Some(list) = body.get("messages").and_then(Value::as_array) else {
        return Err(invalid("field `messages`: required, an array"));
    };
    if list.is_empty() {
        return Err(invalid("field `messages`: give at least one message"));
    }
    let mut images = 0u64;
    let mut messages = Vec::with_capacity(list.len() + 2);
    if let Some(system) = body.get("system").filter(|s| !s.is_null()) {
        messages.push(ChatMessage {
            role: Role::System,
            content: text_of(system, &mut images),
        });
    }
    for (i, message) in list.iter().enumerate() {
        let Some(object) = message.as_object() else {
            return Err(invalid(format!("field `messages[{i}]`: must be an object")));
        };
        let role = match object.get("role").and_then(Value::as_str) {
            Some("assistant") => Role::Assistant,
            Some("system" | "developer") => Role::System,
            Some(_) => Role::User,
            None => return Err(invalid(format!("field `messages[{i}].role`: required"))),
        };
        let mut content = object
            .get("content")
            .map(|c| text_of(c, &mut images))
            .unwrap_or_default();
        for (name, value) in object {
            if !matches!(name.as_str(), "role" | "content") {
                content.push_str(&value.to_string());
            }
        }
        messages.push(ChatMessage { role, content });
    }
    if let Some(tools) = body.get("tools").filter(|t| !t.is_null()) {
        messages.push(ChatMessage {
            role: Role::System,
            content: tools.to_string(),
        });
    }
    Ok((messages, images))
}

/// A content as the tokenizer reads it: a string as is; text parts by
/// their text; images counted apart; any other part as its JSON.
fn text_of(content: &Value, images: &mut u64) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts.iter().map(|part| part_text(part, images)).collect(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn part_text(part: &Value, images: &mut u64) -> String {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => part
            .get("text")
            .and_then(Value::as_str)
            .map_or_else(|| part.to_string(), str::to_owned),
        Some("image" | "image_url") => {
            *images = images.saturating_add(1);
            String::new()
        }
        Some("tool_result") => {
            let mut text = part
                .get("tool_use_id")
                .map(Value::to_string)
                .unwrap_or_default();
            if let Some(content) = part.get("content") {
                text.push_str(&text_of(content, images));
            }
            text
        }
        _ => part.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> ChatSettings {
        ChatSettings {
            max_tokens_default: 4096,
            max_tokens_limit: 64_000,
            message_overhead_tokens: 8,
            request_overhead_tokens: 16,
            pending_settlements_max: 10,
            stream_buffer_events: 16,
            stream_keep_alive_ms: 15_000,
            stream_write_timeout_ms: 30_000,
        }
    }

    #[test]
    fn text_is_read_as_text_and_images_are_counted_apart() {
        let body = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "system": [{ "type": "text", "text": "Be brief." }],
            "messages": [{ "role": "user", "content": [
                { "type": "text", "text": "What is this?" },
                { "type": "image", "source": { "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=" } },
            ]}],
        });
        let read = read(Provider::Anthropic, body, &settings()).unwrap();
        assert_eq!(read.messages[0].content, "Be brief.");
        assert_eq!(read.messages[1].content, "What is this?");
        assert_eq!(read.extra_prompt_tokens, IMAGE_TOKENS);
        assert_eq!(read.max_tokens, 100);
    }

    #[test]
    fn an_anthropic_request_must_bound_its_output_and_openai_gets_the_default() {
        let body = json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }] });
        assert!(matches!(
            read(Provider::Anthropic, body.clone(), &settings()),
            Err(ChatError::Invalid(message)) if message.contains("max_tokens")
        ));
        let read = read(Provider::Openai, body, &settings()).unwrap();
        assert_eq!(read.max_tokens, settings().max_tokens_default);
        assert!(!read.stream && !read.usage_asked);
    }
}
