//! Local fake providers speaking Anthropic's and OpenAI's wire formats:
//! whole answers (wiremock), SSE streams (OpenAI's sends its usage chunk
//! only when the request asks with `stream_options.include_usage`, as
//! OpenAI does), and a hand-written one-connection provider for streams
//! that break, stall or outlive their reader, which keeps the request body
//! it got.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use wiremock::{MockServer, Request, Respond, ResponseTemplate};

use super::*;

pub const PLATFORM_ANTHROPIC_KEY: &str = "sk-ant-platform-0123456789abcdef";
pub const PLATFORM_OPENAI_KEY: &str = "sk-platform-0123456789abcdef";

/// Local fake providers and the app pointed at them with platform keys.
pub struct Fakes {
    pub anthropic: MockServer,
    pub openai: MockServer,
}

pub async fn fakes() -> Fakes {
    Fakes {
        anthropic: MockServer::start().await,
        openai: MockServer::start().await,
    }
}

/// The app with both platform keys, talking to `fakes`.
pub async fn app_with(
    fakes: &Fakes,
    adjust: impl FnOnce(&mut creditd::config::Settings),
) -> TestApp {
    let anthropic = fakes.anthropic.uri();
    let openai = fakes.openai.uri();
    spawn_app_with(move |s| {
        s.providers.anthropic_base_url = anthropic;
        s.providers.openai_base_url = openai;
        s.providers.anthropic_api_key = creditd::config::Secret::new(PLATFORM_ANTHROPIC_KEY);
        s.providers.openai_api_key = creditd::config::Secret::new(PLATFORM_OPENAI_KEY);
        adjust(s);
    })
    .await
}

/// Credits `clerk_id` with `amount_micros` through the admin route.
pub async fn fund(app: &TestApp, clerk_id: &str, amount_micros: i64) {
    app.account(clerk_id).await;
    let response = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{clerk_id}/credits"),
        )
        .json(&json!({
            "amountMicros": amount_micros,
            "key": format!("fund-{clerk_id}-{amount_micros}"),
            "reason": "test funds",
        }))
        .send()
        .await
        .expect("fund request");
    assert!(response.status().is_success(), "{}", response.status());
}

/// An Anthropic Messages API answer with the given usage.
pub fn anthropic_message(
    text: &str,
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
) -> Value {
    json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{ "type": "text", "text": text }],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {
            "input_tokens": input,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
            "output_tokens": output,
        },
    })
}

/// An OpenAI chat completion with the given usage (`prompt` includes `cached`).
pub fn openai_completion(text: &str, prompt: u64, completion: u64, cached: u64) -> Value {
    json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1_741_570_283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": text, "refusal": null },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": { "cached_tokens": cached, "audio_tokens": 0 },
            "completion_tokens_details": { "reasoning_tokens": 0 },
        },
        "system_fingerprint": "fp_fc9f1d7035",
    })
}

pub fn anthropic_error(kind: &str, message: &str) -> Value {
    json!({ "type": "error", "error": { "type": kind, "message": message } })
}

pub fn conversation() -> Value {
    json!([
        { "role": "system", "content": "You write apps." },
        { "role": "user", "content": "Build me a todo app." },
    ])
}

pub async fn balance(app: &TestApp, clerk_id: &str) -> Value {
    json_of(app.get_as(clerk_id, "/api/credits").await).await.1
}

pub fn sse(event: Option<&str>, data: &Value) -> String {
    match event {
        Some(name) => format!("event: {name}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

pub fn message_start(input: u64, cache_read: u64, cache_write: u64) -> String {
    sse(
        Some("message_start"),
        &json!({
            "type": "message_start",
            "message": {
                "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": "claude-sonnet-4-5-20250929",
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {
                    "input_tokens": input,
                    "cache_creation_input_tokens": cache_write,
                    "cache_read_input_tokens": cache_read,
                    "output_tokens": 1,
                },
            },
        }),
    )
}

pub fn text_delta(text: &str) -> String {
    sse(
        Some("content_block_delta"),
        &json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": text } }),
    )
}

pub fn ping() -> String {
    sse(Some("ping"), &json!({ "type": "ping" }))
}

/// A whole Anthropic stream, with a ping and two cumulative `message_delta`s.
pub fn anthropic_stream(
    texts: &[&str],
    input: u64,
    output: u64,
    cache_read: u64,
    cache_write: u64,
) -> String {
    let mut body = message_start(input, cache_read, cache_write);
    body += &sse(
        Some("content_block_start"),
        &json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
    );
    body += &ping();
    for text in texts {
        body += &text_delta(text);
    }
    body += &sse(
        Some("content_block_stop"),
        &json!({ "type": "content_block_stop", "index": 0 }),
    );
    for count in [output / 2, output] {
        body += &sse(
            Some("message_delta"),
            &json!({
                "type": "message_delta",
                "delta": { "stop_reason": "end_turn", "stop_sequence": null },
                "usage": { "output_tokens": count },
            }),
        );
    }
    body += &sse(Some("message_stop"), &json!({ "type": "message_stop" }));
    body
}

pub fn openai_chunk(text: &str) -> String {
    sse(
        None,
        &json!({
            "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{ "index": 0, "delta": { "content": text }, "logprobs": null, "finish_reason": null }],
            "usage": null,
        }),
    )
}

/// OpenAI's first chunk: the role, and no text yet.
pub fn openai_role_chunk() -> String {
    sse(
        None,
        &json!({
            "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{ "index": 0, "delta": { "role": "assistant", "content": "", "refusal": null }, "logprobs": null, "finish_reason": null }],
            "usage": null,
        }),
    )
}

/// A whole OpenAI stream; the usage chunk (after the one with the finish
/// reason, with no choices) only when `usage` is given.
pub fn openai_stream_body(texts: &[&str], usage: Option<(u64, u64, u64)>) -> String {
    let mut body = openai_role_chunk();
    for text in texts {
        body += &openai_chunk(text);
    }
    body += &sse(
        None,
        &json!({
            "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_44709d6fcb",
            "choices": [{ "index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop" }],
            "usage": null,
        }),
    );
    if let Some((prompt, completion, cached)) = usage {
        body += &sse(
            None,
            &json!({
                "id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1_694_268_190,
                "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_44709d6fcb",
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "prompt_tokens_details": { "cached_tokens": cached, "audio_tokens": 0 },
                    "completion_tokens_details": { "reasoning_tokens": 0, "audio_tokens": 0 },
                },
            }),
        );
    }
    body + "data: [DONE]\n\n"
}

/// OpenAI's Chat Completions streaming as OpenAI does: the usage chunk
/// only when the request asks for it (`stream_options.include_usage`), and
/// 400 `invalid_request_error` for `stream_options` without `stream`.
pub struct OpenaiStream {
    pub texts: Vec<&'static str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
}

impl Respond for OpenaiStream {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return openai_invalid_request("We could not parse the JSON body of your request.");
        };
        let streamed = body["stream"] == json!(true);
        if !streamed {
            let message = if body.get("stream_options").is_some() {
                "The 'stream_options' parameter is only allowed when 'stream' is enabled."
            } else {
                "This stand-in only streams: set 'stream' to true."
            };
            return openai_invalid_request(message);
        }
        let usage = (body["stream_options"]["include_usage"] == json!(true)).then_some((
            self.prompt_tokens,
            self.completion_tokens,
            self.cached_tokens,
        ));
        sse_response(openai_stream_body(&self.texts, usage))
    }
}

fn openai_invalid_request(message: &str) -> ResponseTemplate {
    ResponseTemplate::new(400).set_body_json(json!({
        "error": { "message": message, "type": "invalid_request_error", "param": "stream_options", "code": null }
    }))
}

pub fn sse_response(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "text/event-stream")
}

/// What the hand-written provider does after its scripted chunks.
#[derive(Clone, Copy)]
pub enum Then {
    /// Closes the connection mid-answer.
    Break,
    /// Keeps streaming text every 50 ms until the reader goes away.
    KeepStreaming,
    /// Writes the filler as fast as the reader takes it, until it goes away
    /// (at most 256 MiB).
    Flood,
    /// Waits for the gate, then writes the filler (the rest of the answer)
    /// and ends the answer; reports a reader that left meanwhile.
    Gated,
}

/// A one-connection fake provider on a local socket: answers 200 with an
/// SSE body written chunk by chunk, then breaks or keeps streaming. Reports
/// whether the reader closed the connection.
pub async fn raw_provider(
    chunks: Vec<String>,
    then: Then,
    filler: String,
) -> (String, oneshot::Receiver<bool>) {
    let (_open, gate) = oneshot::channel();
    gated_provider(chunks, then, filler, gate).await
}

/// `raw_provider`, that also counts the fillers it wrote (each one the
/// socket took: the reader may not have read the last ones).
pub async fn counted_provider(
    chunks: Vec<String>,
    then: Then,
    filler: String,
) -> (String, oneshot::Receiver<bool>, Arc<AtomicUsize>) {
    let (_open, gate) = oneshot::channel();
    let written = Arc::new(AtomicUsize::new(0));
    let (address, closed) =
        provider(chunks, then, filler, gate, written.clone(), Arc::default()).await;
    (address, closed, written)
}

/// `raw_provider`, whose `Then::Gated` waits for `gate`.
pub async fn gated_provider(
    chunks: Vec<String>,
    then: Then,
    filler: String,
    gate: oneshot::Receiver<()>,
) -> (String, oneshot::Receiver<bool>) {
    provider(chunks, then, filler, gate, Arc::default(), Arc::default()).await
}

/// The JSON body of the request a hand-written provider got, once it came.
pub type ReceivedBody = Arc<Mutex<Option<Value>>>;

/// `gated_provider`, that also keeps the request body it got.
pub async fn recorded_provider(
    chunks: Vec<String>,
    then: Then,
    filler: String,
    gate: oneshot::Receiver<()>,
) -> (String, oneshot::Receiver<bool>, ReceivedBody) {
    let received = ReceivedBody::default();
    let (address, closed) =
        provider(chunks, then, filler, gate, Arc::default(), received.clone()).await;
    (address, closed, received)
}

async fn provider(
    chunks: Vec<String>,
    then: Then,
    filler: String,
    gate: oneshot::Receiver<()>,
    written: Arc<AtomicUsize>,
    received: ReceivedBody,
) -> (String, oneshot::Receiver<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = oneshot::channel();
    actix_web::rt::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let body = read_request(&mut socket).await;
        *received.lock().unwrap() = serde_json::from_slice(&body).ok();
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
        socket.write_all(head.as_bytes()).await.unwrap();
        for chunk in chunks {
            socket.write_all(chunk.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let closed = match then {
            Then::Break => false,
            Then::KeepStreaming => {
                let mut closed = false;
                for _ in 0..400 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if socket.write_all(filler.as_bytes()).await.is_err() {
                        closed = true;
                        break;
                    }
                    written.fetch_add(1, Ordering::SeqCst);
                }
                closed
            }
            Then::Flood => {
                let mut closed = false;
                for _ in 0..(256 << 20) / filler.len().max(1) {
                    if socket.write_all(filler.as_bytes()).await.is_err() {
                        closed = true;
                        break;
                    }
                }
                closed
            }
            Then::Gated => {
                let _ = gate.await;
                // A reader that left closed its side: reading ends at once
                // (its request was read whole, it sends nothing more).
                let mut probe = [0u8; 1];
                let read =
                    tokio::time::timeout(Duration::from_millis(100), socket.read(&mut probe)).await;
                matches!(read, Ok(Ok(0) | Err(_)))
                    || socket.write_all(filler.as_bytes()).await.is_err()
            }
        };
        drop(socket);
        let _ = closed_tx.send(closed);
    });
    (address, closed_rx)
}

/// Reads one HTTP/1.1 request (with a `content-length` body) and returns its body.
pub async fn read_request(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the client closed before sending its request");
        request.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&request);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return request[end + 4..end + 4 + length].to_vec();
            }
        }
    }
}

/// The end of an Anthropic answer: the block's end, the output count, the stop.
pub fn anthropic_end(output: u64) -> String {
    sse(
        Some("content_block_stop"),
        &json!({ "type": "content_block_stop", "index": 0 }),
    ) + &sse(
        Some("message_delta"),
        &json!({
            "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null },
            "usage": { "output_tokens": output },
        }),
    ) + &sse(Some("message_stop"), &json!({ "type": "message_stop" }))
}
