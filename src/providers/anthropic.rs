//! Anthropic Messages API (`POST /v1/messages`): `system` goes in its own
//! field, usage counts input, output and cache tokens apart.

use serde::Deserialize;
use serde_json::{json, Value};

use super::sse::Frame;
use super::{
    malformed, ChatRequest, Completion, Decoded, InputUsage, ProviderError, Role, StreamErrorKind,
    StreamUsage,
};
use crate::pricing::TokenUsage;

pub(super) fn body(request: &ChatRequest, stream: bool) -> Value {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let messages: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| json!({ "role": m.role.as_str(), "content": m.content }))
        .collect();
    let mut body = json!({
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": messages,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// A gateway body: the client's, with `max_tokens` it must have had.
pub(super) fn passthrough(raw: &Value, request: &ChatRequest, stream: bool) -> Value {
    super::passthrough_body(raw, request, stream, "max_tokens")
}

#[derive(Debug, Default, Deserialize)]
struct Usage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl Usage {
    fn input(&self) -> Option<InputUsage> {
        self.input_tokens.map(|input_tokens| InputUsage {
            input_tokens,
            cache_read_tokens: self.cache_read_input_tokens.unwrap_or(0),
            cache_write_tokens: self.cache_creation_input_tokens.unwrap_or(0),
        })
    }
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    content: Vec<Block>,
    usage: Usage,
}

pub(super) fn completion(body: &[u8]) -> Result<Completion, ProviderError> {
    let message: Message = serde_json::from_slice(body).map_err(|e| malformed("message", e))?;
    let input = message
        .usage
        .input()
        .ok_or_else(|| ProviderError::Malformed("message: usage.input_tokens is missing".into()))?;
    let output_tokens = message.usage.output_tokens.ok_or_else(|| {
        ProviderError::Malformed("message: usage.output_tokens is missing".into())
    })?;
    let content = message
        .content
        .iter()
        .filter(|b| b.kind == "text")
        .filter_map(|b| b.text.as_deref())
        .collect::<String>();
    Ok(Completion {
        content,
        body: None,
        usage: TokenUsage {
            input_tokens: input.input_tokens,
            output_tokens,
            cache_read_tokens: input.cache_read_tokens,
            cache_write_tokens: input.cache_write_tokens,
        },
    })
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockDelta {
        delta: Delta,
    },
    MessageDelta {
        #[serde(default)]
        usage: Usage,
    },
    MessageStop,
    Ping,
    Error {
        error: ErrorBody,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct StartMessage {
    usage: Usage,
}

#[derive(Debug, Deserialize)]
struct Delta {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    /// `input_json_delta`: a piece of a tool call's input.
    #[serde(default)]
    partial_json: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// One SSE frame of a streamed message. `message_delta` carries the
/// cumulative output count: the last one is taken, never added up.
pub(super) fn decode(frame: &Frame, usage: &mut StreamUsage) -> Result<Decoded, ProviderError> {
    let event: Event = serde_json::from_str(&frame.data).map_err(|e| malformed("event", e))?;
    Ok(match event {
        Event::MessageStart { message } => {
            usage.input = message.usage.input();
            usage.output_tokens_so_far = message.usage.output_tokens.unwrap_or(0);
            Decoded::Nothing
        }
        Event::ContentBlockDelta { delta } if delta.kind == "text_delta" => {
            Decoded::Text(delta.text.unwrap_or_default())
        }
        Event::ContentBlockDelta { delta } if delta.kind == "input_json_delta" => {
            Decoded::Arguments(delta.partial_json.unwrap_or_default())
        }
        Event::MessageDelta { usage: delta } => {
            if let Some(input) = delta.input() {
                usage.input = Some(input);
            }
            if let Some(output) = delta.output_tokens {
                usage.output_tokens = Some(output);
            }
            Decoded::Usage
        }
        Event::MessageStop => Decoded::Finished,
        Event::Error { error } => {
            return Err(ProviderError::Stream {
                kind: StreamErrorKind::from_wire(&error.kind),
                message: error.message,
            })
        }
        Event::ContentBlockDelta { .. } | Event::Ping | Event::Other => Decoded::Nothing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::ChatMessage;

    fn frame(data: &str) -> Frame {
        Frame {
            event: None,
            data: data.into(),
        }
    }

    #[test]
    fn system_messages_go_to_the_system_field() {
        let request = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            max_tokens: 100,
            passthrough: None,
            messages: vec![
                ChatMessage {
                    role: Role::System,
                    content: "be brief".into(),
                },
                ChatMessage {
                    role: Role::User,
                    content: "hi".into(),
                },
            ],
        };
        let body = body(&request, false);
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(
            body["messages"],
            json!([{ "role": "user", "content": "hi" }])
        );
        assert!(body.get("stream").is_none());
    }

    #[test]
    fn the_last_message_delta_gives_the_output_tokens() {
        let mut usage = StreamUsage::default();
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":3,"cache_read_input_tokens":7,"output_tokens":1}}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":null},"usage":{"output_tokens":10}}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
            r#"{"type":"message_stop"}"#,
        ];
        let decoded: Vec<Decoded> = events
            .iter()
            .map(|e| decode(&frame(e), &mut usage).unwrap())
            .collect();
        assert_eq!(decoded[2], Decoded::Text("Hi".into()));
        assert_eq!(decoded[5], Decoded::Finished);
        assert_eq!(usage.output_tokens, Some(15));
        assert_eq!(
            usage.input,
            Some(InputUsage {
                input_tokens: 25,
                cache_read_tokens: 7,
                cache_write_tokens: 3
            })
        );
    }

    #[test]
    fn an_error_event_is_a_stream_error() {
        let mut usage = StreamUsage::default();
        let result = decode(
            &frame(
                r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
            ),
            &mut usage,
        );
        assert_eq!(
            result,
            Err(ProviderError::Stream {
                kind: StreamErrorKind::Overloaded,
                message: "Overloaded".into()
            })
        );
    }
}
