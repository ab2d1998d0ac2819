//! `POST /api/chat` with `stream: true`: text deltas as Server-Sent Events,
//! a final event with the credits, settlement for what was produced when the
//! provider breaks or the client leaves. OpenAI streams are metered with
//! OpenAI's tokenizer where its usage never came: expected counts here come
//! from tiktoken-rs's own implementation of the OpenAI cookbook's rule.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tiktoken_rs::ChatCompletionRequestMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

/// The client's events, as `(event, data)`.
async fn events_of(response: reqwest::Response) -> Vec<(String, Value)> {
    let text = response.text().await.expect("stream body");
    text.split("\n\n")
        .filter(|frame| !frame.trim().is_empty())
        .map(|frame| {
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(value).expect("JSON data");
                }
            }
            (name, data)
        })
        .collect()
}

fn streamed_text(events: &[(String, Value)]) -> String {
    events
        .iter()
        .filter(|(name, _)| name == "delta")
        .map(|(_, data)| data["text"].as_str().unwrap())
        .collect()
}

async fn stream_chat(app: &TestApp, clerk_id: &str, body: Value) -> reqwest::Response {
    app.post_as(clerk_id, "/api/chat", &body).await
}

#[actix::test]
async fn an_anthropic_stream_forwards_deltas_and_ends_with_the_exact_credits() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(body_partial_json(json!({ "stream": true })))
        .respond_with(sse_response(anthropic_stream(
            &["Hello", ", ", "world"],
            50,
            30,
            100,
            20,
        )))
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_s", 10_000_000).await;

    let response = stream_chat(
        &app,
        "user_s",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events_of(response).await;

    assert_eq!(streamed_text(&events), "Hello, world");
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    // 50 × 2_916_667 + 30 × 14_583_334 + 100 × 291_667 + 20 × 3_645_834
    // = 685_416_750 → 686 micros; output is the last message_delta (30), not 15 + 30
    assert_eq!(last["credits"]["usedMicros"], 686);
    assert_eq!(last["credits"]["outputTokens"], 30);
    assert_eq!(last["credits"]["cacheReadTokens"], 100);
    assert_eq!(last["credits"]["cacheWriteTokens"], 20);
    assert_eq!(last["credits"]["balanceMicros"], 10_000_000 - 686);
    assert_eq!(balance(&app, "user_s").await["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_openai_stream_is_settled_with_the_usage_of_its_last_chunk() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(OpenaiStream {
            texts: vec!["Bon", "jour"],
            prompt_tokens: 300,
            completion_tokens: 40,
            cached_tokens: 100,
        })
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_o", 10_000_000).await;

    let events = events_of(
        stream_chat(
            &app,
            "user_o",
            json!({ "stream": true, "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(streamed_text(&events), "Bonjour");
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "done", "{events:?}");
    // 200 × 2_430_556 + 40 × 9_722_223 + 100 × 1_215_278 = 996_527_920 → 997
    assert_eq!(last["credits"]["usedMicros"], 997);
    assert_eq!(last["credits"]["inputTokens"], 200);
    assert_eq!(last["credits"]["outputTokens"], 40);
    assert_eq!(last["credits"]["cacheReadTokens"], 100);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_streamed_request_to_openai_asks_for_the_usage_chunk() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(OpenaiStream {
            texts: vec!["Bon", "jour"],
            prompt_tokens: 20,
            completion_tokens: 2,
            cached_tokens: 0,
        })
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_asks", 10_000_000).await;

    let events = events_of(
        stream_chat(
            &app,
            "user_asks",
            json!({ "stream": true, "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(events.last().unwrap().0, "done", "{events:?}");
    let requests = fakes.openai.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    let sent: Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(sent["stream"], true, "{sent}");
    assert_eq!(
        sent["stream_options"],
        json!({ "include_usage": true }),
        "{sent}"
    );
    app.db.reconcile_is_clean().await;
}

/// gpt-4o's prices in micros per million tokens: 2.50 and 10.00 USD, plus
/// 5%, at 1.08 USD per EUR, rounded up.
const GPT_4O_INPUT: i64 = 2_430_556;
const GPT_4O_OUTPUT: i64 = 9_722_223;

/// gpt-4o's list price of `input` and `output` tokens, in micros (rounded up).
fn gpt_4o_cost(input: u64, output: u64) -> i64 {
    (input as i64 * GPT_4O_INPUT + output as i64 * GPT_4O_OUTPUT + 999_999) / 1_000_000
}

/// A conversation of about 12,000 gpt-4o tokens (some 45 KB of text).
fn long_conversation() -> Value {
    let text: String = (0..570)
        .map(|i| {
            format!("Line {i}: the app keeps todo items with a title, a due date and a done flag. ")
        })
        .collect();
    json!([
        { "role": "system", "content": "You write apps." },
        { "role": "user", "content": text },
    ])
}

/// OpenAI's count of a chat's prompt tokens for gpt-4o, by the OpenAI
/// cookbook's rule as tiktoken-rs implements it.
fn openai_prompt_tokens(messages: &Value) -> u64 {
    let messages: Vec<ChatCompletionRequestMessage> = messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatCompletionRequestMessage {
            role: m["role"].as_str().unwrap().into(),
            content: Some(m["content"].as_str().unwrap().into()),
            ..Default::default()
        })
        .collect();
    tiktoken_rs::num_tokens_from_messages("gpt-4o", &messages).unwrap() as u64
}

/// `charged` is within 10% of `list`.
fn assert_within_ten_percent(charged: &Value, list: i64) {
    let charged = charged.as_i64().unwrap();
    assert!(
        (charged - list).abs() * 10 <= list,
        "charged {charged} micros for a list price of {list}"
    );
}

/// Posts `body` to `/api/chat` on a connection of its own, reads the
/// answer's head, and resets the connection (SO_LINGER 0: an RST, no FIN)
/// right after its 200.
async fn reset_after_the_200(app: &TestApp, clerk_id: &str, body: &Value) {
    let address = app.address.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        app.token(clerk_id),
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the connection closed before the answer's head");
        head.extend_from_slice(&buffer[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    socket.set_zero_linger().unwrap();
    drop(socket);
}

#[actix::test]
async fn a_platform_openai_stream_whose_client_resets_right_after_the_200_is_charged_its_counted_prompt(
) {
    let fakes = fakes().await;
    let (open, gate) = oneshot::channel();
    let (address, closed, received) = recorded_provider(
        vec![openai_role_chunk()],
        Then::Gated,
        openai_chunk("Too late"),
        gate,
    )
    .await;
    let app = app_with(&fakes, |s| {
        s.providers.openai_base_url = address;
        s.chat.stream_keep_alive_ms = 100;
    })
    .await;
    fund(&app, "user_reset", 10_000_000).await;
    let messages = long_conversation();

    reset_after_the_200(
        &app,
        "user_reset",
        &json!({ "stream": true, "model": "gpt-4o", "maxTokens": 1000, "messages": messages }),
    )
    .await;

    let usage = settled_usage(&app, "user_reset").await;
    let prompt = openai_prompt_tokens(&messages);
    assert!(
        (11_000..=13_000).contains(&prompt),
        "{prompt} prompt tokens"
    );
    assert_eq!(usage["inputTokens"], prompt, "{usage}");
    assert_eq!(usage["outputTokens"], 0, "{usage}");
    assert_eq!(usage["costMicros"], gpt_4o_cost(prompt, 0), "{usage}");
    assert_eq!(
        balance(&app, "user_reset").await["balanceMicros"],
        10_000_000 - gpt_4o_cost(prompt, 0)
    );
    let sent = received
        .lock()
        .unwrap()
        .clone()
        .expect("the provider got a body");
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    open.send(()).unwrap();
    let upstream_closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the provider was told")
        .unwrap();
    assert!(upstream_closed, "the upstream call went on after the reset");
    app.db.reconcile_is_clean().await;
}

/// What OpenAI streams: one token per chunk.
const ONE_TOKEN_DELTAS: [&str; 6] = ["Here", " is", " your", " todo", " app", ":"];

fn one_token_chunks() -> Vec<String> {
    let mut chunks = vec![openai_role_chunk()];
    chunks.extend(ONE_TOKEN_DELTAS.iter().map(|delta| openai_chunk(delta)));
    chunks
}

#[actix::test]
async fn an_openai_stream_whose_client_leaves_after_its_first_text_is_charged_within_ten_percent_of_what_was_produced(
) {
    let fakes = fakes().await;
    let (open, gate) = oneshot::channel();
    let (address, closed) =
        gated_provider(one_token_chunks(), Then::Gated, openai_chunk(" more"), gate).await;
    let app = app_with(&fakes, |s| {
        s.providers.openai_base_url = address;
        s.chat.stream_keep_alive_ms = 100;
    })
    .await;
    fund(&app, "user_left", 10_000_000).await;
    let messages = long_conversation();

    let mut response = stream_chat(
        &app,
        "user_left",
        json!({ "stream": true, "model": "gpt-4o", "maxTokens": 1000, "messages": messages }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut seen = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        read_until(&mut response, &mut seen, r#""text":":""#),
    )
    .await
    .expect("the first text reached the client");
    drop(response);

    let usage = settled_usage(&app, "user_left").await;
    let prompt = openai_prompt_tokens(&messages);
    let produced = ONE_TOKEN_DELTAS.len() as u64;
    assert_eq!(usage["inputTokens"], prompt, "{usage}");
    assert_within_ten_percent(&usage["costMicros"], gpt_4o_cost(prompt, produced));
    open.send(()).unwrap();
    let upstream_closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the provider was told")
        .unwrap();
    assert!(
        upstream_closed,
        "the upstream call went on after the client left"
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_openai_stream_the_provider_drops_after_its_first_text_is_charged_within_ten_percent_of_what_was_produced(
) {
    let fakes = fakes().await;
    let (address, _closed) = raw_provider(one_token_chunks(), Then::Break, String::new()).await;
    let app = app_with(&fakes, |s| s.providers.openai_base_url = address).await;
    fund(&app, "user_dropped", 10_000_000).await;
    let messages = long_conversation();

    let events = events_of(
        stream_chat(
            &app,
            "user_dropped",
            json!({ "stream": true, "model": "gpt-4o", "maxTokens": 1000, "messages": messages }),
        )
        .await,
    )
    .await;

    assert_eq!(streamed_text(&events), ONE_TOKEN_DELTAS.concat());
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    let prompt = openai_prompt_tokens(&messages);
    let produced = ONE_TOKEN_DELTAS.len() as u64;
    assert_eq!(last["credits"]["inputTokens"], prompt, "{last}");
    assert_within_ten_percent(
        &last["credits"]["usedMicros"],
        gpt_4o_cost(prompt, produced),
    );
    assert_eq!(balance(&app, "user_dropped").await["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_hold_of_an_openai_chat_is_its_prompt_counted_in_tokens_not_bytes() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .expect(0)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_held", 10_000).await;
    let messages = long_conversation();

    let (status, body) = json_of(
        stream_chat(
            &app,
            "user_held",
            json!({ "stream": true, "model": "gpt-4o", "maxTokens": 1000, "messages": messages }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"], "INSUFFICIENT_CREDITS");
    // gpt-4o's dearest input price is its input price (cache writes are
    // priced as input): the prompt's tokens at it, and 1,000 output tokens.
    let prompt = openai_prompt_tokens(&messages);
    assert_eq!(body["estimatedCostMicros"], gpt_4o_cost(prompt, 1_000));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_error_event_mid_stream_settles_what_was_produced_and_ends_with_an_error_event() {
    let fakes = fakes().await;
    let body = message_start(50, 0, 0)
        + &ping()
        + &text_delta("Hello ")
        + &sse(
            Some("error"),
            &anthropic_error("overloaded_error", "Overloaded"),
        );
    Mock::given(method("POST"))
        .respond_with(sse_response(body))
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_e", 10_000_000).await;

    let events = events_of(
        stream_chat(
            &app,
            "user_e",
            json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(streamed_text(&events), "Hello ");
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(last["error"], "PROVIDER_UNAVAILABLE");
    // input from message_start (50); output counted from 6 bytes: ceil(6 / 3) = 2
    // 50 × 2_916_667 + 2 × 14_583_334 = 175_000_018 → 176
    assert_eq!(last["credits"]["usedMicros"], 176);
    assert_eq!(last["credits"]["outputTokens"], 2);
    assert_eq!(balance(&app, "user_e").await["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stream_refused_before_any_output_is_an_ordinary_503_and_is_not_charged() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(529)
                .set_body_json(anthropic_error("overloaded_error", "Overloaded")),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_f", 10_000_000).await;

    let response = stream_chat(
        &app,
        "user_f",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert!(response.headers().contains_key("retry-after"));
    let (status, body) = json_of(response).await;

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "PROVIDER_UNAVAILABLE");
    let overview = balance(&app, "user_f").await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    assert_eq!(overview["heldMicros"], 0);
    assert_eq!(count(&app, "credit_usages", "user_f").await, 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stream_that_breaks_midway_settles_the_text_received_and_ends_with_an_error_event() {
    let fakes = fakes().await;
    let (address, _closed) = raw_provider(
        vec![message_start(50, 0, 0), ping(), text_delta("Hello world")],
        Then::Break,
        String::new(),
    )
    .await;
    let app = app_with(&fakes, |s| s.providers.anthropic_base_url = address).await;
    fund(&app, "user_broken", 10_000_000).await;

    let events = events_of(
        stream_chat(
            &app,
            "user_broken",
            json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(streamed_text(&events), "Hello world");
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "error", "{events:?}");
    assert_eq!(last["error"], "PROVIDER_ERROR");
    // 50 input tokens (message_start) and ceil(11 / 3) = 4 output tokens:
    // 145_833_350 + 58_333_336 = 204_166_686 → 205
    assert_eq!(last["credits"]["usedMicros"], 205);
    assert_eq!(last["credits"]["outputTokens"], 4);
    assert_eq!(balance(&app, "user_broken").await["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_client_that_disconnects_stops_the_upstream_call_and_is_charged_for_what_was_produced() {
    let fakes = fakes().await;
    // Multi-byte text: 10 three-byte characters and a four-byte one, then
    // fillers of a space and a three-byte check mark.
    let first_text = "Premiers mots déjà écrits: 日本語のテキストです 🙂";
    let filler_text = " ✓";
    let (address, closed, fillers) = counted_provider(
        vec![openai_chunk(first_text)],
        Then::KeepStreaming,
        openai_chunk(filler_text),
    )
    .await;
    let app = app_with(&fakes, |s| s.providers.openai_base_url = address).await;
    fund(&app, "user_gone", 10_000_000).await;

    let mut response = stream_chat(
        &app,
        "user_gone",
        json!({ "stream": true, "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut seen = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&seen).contains(first_text) {
            let chunk = response
                .chunk()
                .await
                .unwrap()
                .expect("a delta before the end");
            seen.extend_from_slice(&chunk);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the first text reached the client whole, as UTF-8");
    drop(response);

    let upstream_closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the provider connection is closed after the client left")
        .unwrap();
    assert!(
        upstream_closed,
        "the upstream call went on after the client left"
    );
    let usage = settled_usage(&app, "user_gone").await;
    // No usage chunk came: the input is the prompt counted with gpt-4o's
    // tokenizer; the output is the text received, counted with it too: at
    // least the first text's tokens, at most those of all the provider wrote.
    let prompt = openai_prompt_tokens(&json!([{ "role": "user", "content": "hi" }]));
    assert_eq!(usage["inputTokens"], prompt);
    let output = usage["outputTokens"].as_u64().unwrap();
    let o200k = tiktoken_rs::o200k_base_singleton();
    let first = o200k.encode_ordinary(first_text).len() as u64;
    let written = first_text.to_owned() + &filler_text.repeat(fillers.load(Ordering::SeqCst));
    let most = o200k.encode_ordinary(&written).len() as u64;
    assert!(
        (first..=most).contains(&output),
        "{output} output tokens for {first} to {most} tokens of text: {usage}"
    );
    let cost = gpt_4o_cost(prompt, output);
    assert_eq!(usage["costMicros"], cost);
    assert_eq!(
        balance(&app, "user_gone").await["balanceMicros"],
        10_000_000 - cost
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_client_that_leaves_while_the_provider_is_silent_is_noticed_by_the_keep_alive() {
    let fakes = fakes().await;
    let (address, closed) = raw_provider(
        vec![message_start(50, 0, 0), text_delta("The first words")],
        Then::KeepStreaming,
        ping(),
    )
    .await;
    let app = app_with(&fakes, |s| {
        s.providers.anthropic_base_url = address;
        s.chat.stream_keep_alive_ms = 100;
    })
    .await;
    fund(&app, "user_quiet", 10_000_000).await;

    let mut response = stream_chat(
        &app,
        "user_quiet",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    let mut seen = String::new();
    let read = async {
        while !seen.contains(": keep-alive") {
            let chunk = response.chunk().await.unwrap().expect("more of the stream");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the stream reached the awaited point");
    drop(response);

    let upstream_closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the provider connection is closed after the client left")
        .unwrap();
    assert!(
        upstream_closed,
        "the upstream call went on after the client left"
    );
    let mut usage = Value::Null;
    for _ in 0..100 {
        let overview = balance(&app, "user_quiet").await;
        if overview["heldMicros"] == 0 && overview["usages"][0].is_object() {
            usage = overview["usages"][0].clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 50 input tokens (message_start), ceil(15 / 3) = 5 output tokens:
    // 145_833_350 + 72_916_670 = 218_750_020 → 219
    assert_eq!(usage["inputTokens"], 50, "{usage}");
    assert_eq!(usage["outputTokens"], 5);
    assert_eq!(usage["costMicros"], 219);
    app.db.reconcile_is_clean().await;
}

/// Polls the balance page until a usage is settled and nothing is held.
async fn settled_usage(app: &TestApp, clerk_id: &str) -> Value {
    for _ in 0..300 {
        let overview = balance(app, clerk_id).await;
        if overview["heldMicros"] == 0 && overview["usages"][0].is_object() {
            return overview["usages"][0].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the stream was never settled");
}

/// Reads the stream into `seen` until it contains `mark`.
async fn read_until(response: &mut reqwest::Response, seen: &mut String, mark: &str) {
    while !seen.contains(mark) {
        match response.chunk().await.unwrap() {
            Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
            None => panic!("the stream ended before `{mark}`: {seen}"),
        }
    }
}

/// Seconds the database stays down at the end of a stream (30 by default).
fn stream_outage() -> Duration {
    Duration::from_secs(
        std::env::var("STREAM_OUTAGE_S")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    )
}

#[actix::test]
async fn a_stream_whose_settlement_meets_a_database_outage_is_charged_once_it_is_back() {
    let fakes = fakes().await;
    let (open, gate) = oneshot::channel();
    let (address, _closed) = gated_provider(
        vec![message_start(50, 0, 0), text_delta("Hello")],
        Then::Gated,
        text_delta(" world") + &anthropic_end(4),
        gate,
    )
    .await;
    let app = app_with(&fakes, |s| s.providers.anthropic_base_url = address).await;
    fund(&app, "user_late", 10_000_000).await;

    let mut response = stream_chat(
        &app,
        "user_late",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    wait_for_count(
        &app,
        "SELECT count(*) FROM credit_holds WHERE status = 'ACTIVE'",
        1,
    )
    .await;
    let cut = cut_database(&app).await;
    open.send(()).unwrap();
    let mut seen = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        read_until(&mut response, &mut seen, " world"),
    )
    .await
    .expect("the whole text was delivered");
    tokio::time::sleep(stream_outage()).await;
    assert!(
        !seen.contains("event: done") && !seen.contains("event: error"),
        "the stream ended while its charge could not be recorded: {seen}"
    );
    cut.restore().await;
    tokio::time::timeout(
        Duration::from_secs(20),
        read_until(&mut response, &mut seen, "event: done"),
    )
    .await
    .expect("the stream ends once the charge is durable");

    // 50 input tokens at 2_916_667 and 4 output at 14_583_334 micros per
    // million: 145_833_350 + 58_333_336 = 204_166_686 → 205.
    assert!(seen.contains(r#""usedMicros":205"#), "{seen}");
    let usage = settled_usage(&app, "user_late").await;
    assert_eq!(usage["costMicros"], 205);
    assert_eq!(count(&app, "credit_usages", "user_late").await, 1);
    assert_eq!(
        balance(&app, "user_late").await["balanceMicros"],
        10_000_000 - 205
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout_and_charged_for_what_was_produced(
) {
    let fakes = fakes().await;
    let filler = text_delta(&"x".repeat(3000));
    let (address, closed) = raw_provider(vec![message_start(50, 0, 0)], Then::Flood, filler).await;
    let app = app_with(&fakes, |s| {
        s.providers.anthropic_base_url = address;
        s.chat.stream_write_timeout_ms = 300;
    })
    .await;
    fund(&app, "user_stalled", 100_000_000).await;

    let mut response = stream_chat(
        &app,
        "user_stalled",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first delta");
    assert!(String::from_utf8_lossy(&first).contains("delta"));
    // The client now stops reading but keeps its connection open.
    let upstream_closed = tokio::time::timeout(Duration::from_secs(30), closed)
        .await
        .expect("the provider call is stopped while the client still holds the socket")
        .unwrap();
    assert!(upstream_closed, "the provider was never cut off");
    let usage = settled_usage(&app, "user_stalled").await;
    assert_eq!(usage["inputTokens"], 50, "{usage}");
    let output = usage["outputTokens"].as_i64().unwrap();
    // At least the first 3,000 bytes of text (1,000 tokens) were produced;
    // never more than the provider could have written (256 MiB).
    assert!((1_000..=(256 << 20) / 3).contains(&output), "{usage}");
    let cost = (50 * 2_916_667 + output * 14_583_334 + 999_999) / 1_000_000;
    assert_eq!(usage["costMicros"], cost);
    assert_eq!(
        balance(&app, "user_stalled").await["balanceMicros"],
        100_000_000 - cost
    );
    drop(response);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_client_that_leaves_before_any_text_is_charged_the_input_the_provider_reported() {
    let fakes = fakes().await;
    let (address, closed) =
        raw_provider(vec![message_start(50, 0, 0)], Then::KeepStreaming, ping()).await;
    let app = app_with(&fakes, |s| {
        s.providers.anthropic_base_url = address;
        s.chat.stream_keep_alive_ms = 100;
    })
    .await;
    fund(&app, "user_early", 10_000_000).await;

    let mut response = stream_chat(
        &app,
        "user_early",
        json!({ "stream": true, "messages": [{ "role": "user", "content": "hi" }] }),
    )
    .await;
    assert_eq!(response.status(), 200);
    // The first keep-alive comes after the provider's message_start was read.
    let first = response.chunk().await.unwrap().expect("a keep-alive");
    assert!(String::from_utf8_lossy(&first).contains("keep-alive"));
    drop(response);

    let upstream_closed = tokio::time::timeout(Duration::from_secs(15), closed)
        .await
        .expect("the provider connection is closed after the client left")
        .unwrap();
    assert!(upstream_closed);
    let usage = settled_usage(&app, "user_early").await;
    // 50 input tokens reported; 1 output token (message_start's count):
    // 145_833_350 + 14_583_334 = 160_416_684 → 161.
    assert_eq!(usage["inputTokens"], 50, "{usage}");
    assert_eq!(usage["outputTokens"], 1, "{usage}");
    assert_eq!(usage["costMicros"], 161);
    app.db.reconcile_is_clean().await;
}
