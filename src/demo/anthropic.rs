//! The demo's AI provider: Anthropic's Messages API (`POST /v1/messages`,
//! `x-api-key`, JSON or SSE with `"stream": true`) answering with an echo of
//! the last user message, with a token usage counted the way a tokenizer
//! roughly would (a token per 4 bytes), so creditd holds and charges it as
//! it charges a real model.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Shared;

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/v1/messages", web::post().to(messages));
}

#[derive(Deserialize)]
struct MessagesRequest {
    model: String,
    max_tokens: u64,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: Value,
}

impl Message {
    fn text(&self) -> String {
        match &self.content {
            Value::String(text) => text.clone(),
            Value::Array(blocks) => blocks
                .iter()
                .filter_map(|block| block["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        }
    }
}

fn error(status: u16, kind: &str, message: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({ "type": "error", "error": { "type": kind, "message": message } }))
}

/// About one token per 4 bytes, at least one.
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// The echo, cut to fit `max_tokens`.
fn answer(last: &str, max_tokens: u64) -> String {
    let mut text = format!("Écho : {last}");
    let limit = usize::try_from(max_tokens.saturating_mul(4)).unwrap_or(usize::MAX);
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

async fn messages(
    shared: web::Data<Shared>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let key = request
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok());
    if key != Some(shared.anthropic_api_key.as_str()) {
        return error(401, "authentication_error", "invalid x-api-key");
    }
    let request: MessagesRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(400, "invalid_request_error", &e.to_string()),
    };
    if request.messages.is_empty() || request.max_tokens == 0 {
        return error(
            400,
            "invalid_request_error",
            "messages and max_tokens are required",
        );
    }
    let prompt: String = request
        .system
        .iter()
        .cloned()
        .chain(request.messages.iter().map(Message::text))
        .collect::<Vec<_>>()
        .join("\n");
    let input_tokens = tokens(&prompt) + 3 * request.messages.len() as u64;
    let last = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .map(Message::text)
        .unwrap_or_default();
    let text = answer(&last, request.max_tokens);
    let output_tokens = tokens(&text).min(request.max_tokens);
    let id = format!("msg_demo_{}", uuid::Uuid::new_v4().simple());
    if request.stream {
        return HttpResponse::Ok()
            .content_type("text/event-stream")
            .body(stream(
                &id,
                &request.model,
                &text,
                input_tokens,
                output_tokens,
            ));
    }
    HttpResponse::Ok().json(json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": [{ "type": "text", "text": text }],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        },
    }))
}

/// The SSE events of a streamed message, as Anthropic sends them.
fn stream(id: &str, model: &str, text: &str, input_tokens: u64, output_tokens: u64) -> String {
    let mut events = vec![
        (
            "message_start",
            json!({ "type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": { "input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0, "output_tokens": 1 } } }),
        ),
        (
            "content_block_start",
            json!({ "type": "content_block_start", "index": 0,
                    "content_block": { "type": "text", "text": "" } }),
        ),
    ];
    for word in text.split_inclusive(' ') {
        events.push((
            "content_block_delta",
            json!({ "type": "content_block_delta", "index": 0,
                    "delta": { "type": "text_delta", "text": word } }),
        ));
    }
    events.push((
        "content_block_stop",
        json!({ "type": "content_block_stop", "index": 0 }),
    ));
    events.push((
        "message_delta",
        json!({ "type": "message_delta",
                "delta": { "stop_reason": "end_turn", "stop_sequence": null },
                "usage": { "output_tokens": output_tokens } }),
    ));
    events.push(("message_stop", json!({ "type": "message_stop" })));
    events
        .into_iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}
