//! OpenAI Chat Completions (`POST /v1/chat/completions`). `prompt_tokens`
//! includes the cached ones (`prompt_tokens_details.cached_tokens`), which
//! are priced apart: input = prompt − cached. Streams ask for
//! `stream_options.include_usage` (every one: without it OpenAI streams no
//! usage at all): the last chunk has the usage and no choices. A stream cut
//! before that chunk is counted with OpenAI's tokenizer (`crate::metering`).

use serde::Deserialize;
use serde_json::{json, Value};

use super::sse::Frame;
use super::{
    malformed, ChatRequest, Completion, Decoded, InputUsage, ProviderError, StreamErrorKind,
    StreamUsage,
};
use crate::pricing::TokenUsage;

pub(super) fn body(request: &ChatRequest, stream: bool) -> Value {
    let messages: Vec<Value> = request
        .messages
        .iter()
        .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_completion_tokens": request.max_tokens,
        "messages": messages,
    });
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

/// A gateway body: the client's, streams asking for their usage (the
/// gateway drops the usage chunk when the client did not ask for it).
pub(super) fn passthrough(raw: &Value, request: &ChatRequest, stream: bool) -> Value {
    let mut body = super::passthrough_body(raw, request, stream, "max_completion_tokens");
    if stream {
        body["stream_options"]["include_usage"] = json!(true);
    }
    body
}

#[derive(Debug, Deserialize)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl Usage {
    fn tokens(&self) -> Result<TokenUsage, ProviderError> {
        let cached = self
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0);
        let input_tokens = self.prompt_tokens.checked_sub(cached).ok_or_else(|| {
            ProviderError::Malformed("usage: more cached tokens than prompt tokens".into())
        })?;
        Ok(TokenUsage {
            input_tokens,
            output_tokens: self.completion_tokens,
            cache_read_tokens: cached,
            cache_write_tokens: 0,
        })
    }
}

#[derive(Debug, Deserialize)]
struct Completed {
    choices: Vec<Choice>,
    usage: Usage,
}

#[derive(Debug, Deserialize)]
struct Choice {
    message: ChoiceMessage,
}

#[derive(Debug, Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<String>,
}

pub(super) fn completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let completed: Completed =
        serde_json::from_slice(body).map_err(|e| malformed("chat completion", e))?;
    let content = completed
        .choices
        .first()
        .and_then(|c| c.message.content.clone())
        .unwrap_or_default();
    Ok(Completion {
        content,
        usage: completed.usage.tokens()?,
        body: None,
    })
}

#[derive(Debug, Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<ChunkChoice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Debug, Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    delta: Option<ChunkDelta>,
}

#[derive(Debug, Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<ToolCallDelta>,
}

#[derive(Debug, Deserialize)]
struct ToolCallDelta {
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: String,
}

/// One SSE frame: a `chat.completion.chunk`, an `error`, or `[DONE]`.
pub(super) fn decode(frame: &Frame, usage: &mut StreamUsage) -> Result<Decoded, ProviderError> {
    if frame.data.trim() == "[DONE]" {
        return Ok(Decoded::Finished);
    }
    let chunk: Chunk = serde_json::from_str(&frame.data).map_err(|e| malformed("chunk", e))?;
    if let Some(error) = chunk.error {
        return Err(ProviderError::Stream {
            kind: StreamErrorKind::from_wire(error.kind.as_deref().unwrap_or("error")),
            message: error.message,
        });
    }
    if let Some(reported) = &chunk.usage {
        let tokens = reported.tokens()?;
        usage.input = Some(InputUsage {
            input_tokens: tokens.input_tokens,
            cache_read_tokens: tokens.cache_read_tokens,
            cache_write_tokens: 0,
        });
        usage.output_tokens = Some(tokens.output_tokens);
        if chunk.choices.is_empty() {
            return Ok(Decoded::Usage);
        }
    }
    let deltas = || chunk.choices.iter().filter_map(|c| c.delta.as_ref());
    let text: String = deltas().filter_map(|d| d.content.as_deref()).collect();
    let arguments: String = deltas()
        .flat_map(|d| d.tool_calls.iter())
        .filter_map(|call| call.function.as_ref())
        .flat_map(|f| [f.name.as_deref(), f.arguments.as_deref()])
        .flatten()
        .collect();
    if text.is_empty() && !arguments.is_empty() {
        return Ok(Decoded::Arguments(arguments));
    }
    Ok(Decoded::Text(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(data: &str) -> Frame {
        Frame {
            event: None,
            data: data.into(),
        }
    }

    #[test]
    fn cached_prompt_tokens_are_split_from_input() {
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3000,"completion_tokens":500,"total_tokens":3500,"prompt_tokens_details":{"cached_tokens":2000}}}"#;
        let completion = completion(body).unwrap();
        assert_eq!(completion.content, "Hello");
        assert_eq!(
            completion.usage,
            TokenUsage {
                input_tokens: 1000,
                output_tokens: 500,
                cache_read_tokens: 2000,
                cache_write_tokens: 0
            }
        );
    }

    #[test]
    fn the_usage_only_last_chunk_and_done_end_the_stream() {
        let mut usage = StreamUsage::default();
        let text = decode(
            &frame(r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#),
            &mut usage,
        )
        .unwrap();
        assert_eq!(text, Decoded::Text("Hi".into()));
        decode(
            &frame(r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":0}}}"#),
            &mut usage,
        )
        .unwrap();
        assert_eq!(usage.output_tokens, Some(3));
        assert_eq!(usage.input.map(|i| i.input_tokens), Some(12));
        assert_eq!(decode(&frame("[DONE]"), &mut usage), Ok(Decoded::Finished));
    }

    #[test]
    fn streams_ask_for_usage_and_whole_answers_do_not() {
        let request = ChatRequest {
            model: "gpt-4o".into(),
            max_tokens: 5,
            messages: vec![],
            passthrough: None,
        };
        assert_eq!(
            body(&request, true)["stream_options"],
            json!({ "include_usage": true })
        );
        // OpenAI refuses `stream_options` without `stream` (400).
        let whole = body(&request, false);
        assert!(whole.get("stream_options").is_none() && whole.get("stream").is_none());
    }
}
