//! The gateway: `/v1/chat/completions` and `/v1/messages` passed through
//! to the provider stand-ins (OpenAI's and Anthropic's wire formats) with
//! a gateway API key, metered like `/api/chat`; `/v1/models`; errors in
//! each format's shape; a key's spend limit under parallel calls.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use tiktoken_rs::ChatCompletionRequestMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::api_keys::create_key;
use crate::support::*;

/// gpt-4o per million tokens in micros (config.toml: 2.50 and 10.00 USD,
/// 5% margin, 1.08 USD per EUR, rounded up).
const GPT_4O_INPUT: i64 = 2_430_556;
const GPT_4O_OUTPUT: i64 = 9_722_223;

fn gpt_4o_cost(input: u64, output: u64) -> i64 {
    (input as i64 * GPT_4O_INPUT + output as i64 * GPT_4O_OUTPUT + 999_999) / 1_000_000
}

/// OpenAI's count of a chat's prompt (string contents) for gpt-4o.
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

/// A funded user and one of their keys: `(secret, key id)`.
async fn funded_key(app: &TestApp, clerk_id: &str, micros: i64, key: Value) -> (String, String) {
    if micros > 0 {
        fund(app, clerk_id, micros).await;
    }
    let created = create_key(app, clerk_id, key).await;
    (
        created["key"].as_str().unwrap().to_owned(),
        created["apiKey"]["id"].as_str().unwrap().to_owned(),
    )
}

async fn post_v1(app: &TestApp, route: &str, key: &str, body: &Value) -> reqwest::Response {
    let request = app.http.post(app.url(route)).json(body);
    let request = if route == "/v1/messages" {
        request
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
    } else {
        request.bearer_auth(key)
    };
    request.send().await.expect("gateway request")
}

/// The frames of an SSE body: `(event name or "", data)`.
fn frames(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|frame| !frame.trim().is_empty() && !frame.starts_with(':'))
        .map(|frame| {
            let mut name = String::new();
            let mut data = String::new();
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = value.to_owned();
                } else if let Some(value) = line.strip_prefix("data: ") {
                    data = value.to_owned();
                }
            }
            (name, data)
        })
        .collect()
}

async fn keys_of(app: &TestApp, clerk_id: &str) -> Value {
    json_of(app.get_as(clerk_id, "/api/credits/api-keys").await)
        .await
        .1
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
    panic!("the call was never settled");
}

#[actix::test]
async fn an_openai_call_with_tools_passes_through_and_is_charged_its_reported_usage_with_the_cost_in_the_answer(
) {
    let fakes = fakes().await;
    let tools = json!([{ "type": "function", "function": { "name": "add_todo",
        "parameters": { "type": "object", "properties": { "title": { "type": "string" } } } } }]);
    let messages = json!([
        { "role": "system", "content": "You write apps." },
        { "role": "user", "content": [
            { "type": "text", "text": "Add this:" },
            { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } },
        ]},
    ]);
    let mut answer = openai_completion("", 1200, 30, 0);
    answer["choices"][0]["message"] = json!({ "role": "assistant", "content": null,
        "tool_calls": [{ "id": "call_1", "type": "function",
            "function": { "name": "add_todo", "arguments": "{\"title\":\"milk\"}" } }] });
    answer["choices"][0]["finish_reason"] = json!("tool_calls");
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header(
            "authorization",
            format!("Bearer {PLATFORM_OPENAI_KEY}").as_str(),
        ))
        .and(body_partial_json(json!({
            "model": "gpt-4o", "messages": messages, "tools": tools,
            "temperature": 0.2, "stop": ["END"], "max_completion_tokens": 300,
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(&answer))
        .expect(1)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    let (key, key_id) = funded_key(&app, "user_gw", 10_000_000, json!({ "name": "app" })).await;

    let response = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "messages": messages, "tools": tools,
                 "temperature": 0.2, "stop": ["END"], "max_completion_tokens": 300 }),
    )
    .await;

    assert_eq!(response.status(), 200);
    let cost = gpt_4o_cost(1200, 30);
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
    assert_eq!(header("creditd-cost-micros"), cost.to_string());
    assert_eq!(
        header("creditd-balance-micros"),
        (10_000_000 - cost).to_string()
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"],
        answer["choices"][0]["message"]["tool_calls"]
    );
    assert_eq!(body["usage"]["prompt_tokens"], 1200);
    assert_eq!(body["usage"]["cost"]["amount_micros"], cost);
    assert_eq!(body["usage"]["cost"]["currency"], "EUR");
    let usage = settled_usage(&app, "user_gw").await;
    assert_eq!(usage["costMicros"], cost);
    assert_eq!(usage["apiKeyId"], json!(key_id));
    let keys = keys_of(&app, "user_gw").await;
    assert_eq!(keys["keys"][0]["spentMicros"], cost);
    assert!(keys["keys"][0]["lastUsedAt"].is_string(), "{keys}");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_openai_stream_asks_for_usage_and_gives_the_usage_chunk_with_its_cost_only_to_a_client_that_asked(
) {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(OpenaiStream {
            texts: vec!["Here", " it", " is."],
            prompt_tokens: 20,
            completion_tokens: 4,
            cached_tokens: 0,
        })
        .expect(2)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    let (key, _) = funded_key(&app, "user_gws", 10_000_000, json!({ "name": "app" })).await;
    let cost = gpt_4o_cost(20, 4);
    let body =
        json!({ "model": "gpt-4o", "stream": true, "max_tokens": 50, "messages": conversation() });

    let text = post_v1(&app, "/v1/chat/completions", &key, &body)
        .await
        .text()
        .await
        .unwrap();
    let plain = frames(&text);
    assert_eq!(plain.last().unwrap().1, "[DONE]", "{text}");
    assert!(
        !text.contains("prompt_tokens"),
        "the usage chunk was not asked for: {text}"
    );
    assert!(text.contains("\"Here\""), "{text}");
    assert_eq!(settled_usage(&app, "user_gws").await["costMicros"], cost);

    let mut asked = body.clone();
    asked["stream_options"] = json!({ "include_usage": true });
    let text = post_v1(&app, "/v1/chat/completions", &key, &asked)
        .await
        .text()
        .await
        .unwrap();
    let with_usage = frames(&text);
    let (_, usage_chunk) = &with_usage[with_usage.len() - 2];
    let usage_chunk: Value = serde_json::from_str(usage_chunk).unwrap();
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 4, "{text}");
    assert_eq!(
        usage_chunk["usage"]["cost"]["amount_micros"], cost,
        "{text}"
    );
    assert_eq!(
        usage_chunk["usage"]["cost"]["balance_after_micros"],
        10_000_000 - 2 * cost
    );
    assert_eq!(with_usage.last().unwrap().1, "[DONE]");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_anthropic_stream_with_an_x_api_key_carries_its_cost_in_the_message_delta() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", PLATFORM_ANTHROPIC_KEY))
        .and(body_partial_json(
            json!({ "stream": true, "max_tokens": 200,
            "metadata": { "user_id": "u-1" }, "system": "You write apps." }),
        ))
        .respond_with(sse_response(anthropic_stream(
            &["Here", " it is."],
            1000,
            40,
            0,
            0,
        )))
        .expect(1)
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    let (key, key_id) = funded_key(&app, "user_gwa", 10_000_000, json!({ "name": "app" })).await;

    let text = post_v1(
        &app,
        "/v1/messages",
        &key,
        &json!({ "model": "claude-sonnet-4-5", "max_tokens": 200, "stream": true,
                 "system": "You write apps.", "metadata": { "user_id": "u-1" },
                 "messages": [{ "role": "user", "content": "A todo app" }] }),
    )
    .await
    .text()
    .await
    .unwrap();

    // 1000 × 2_916_667 + 40 × 14_583_334 = 3_500_000_360 → 3_501 micros
    let events = frames(&text);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{text}");
    assert_eq!(
        &names[names.len() - 3..],
        ["message_delta", "message_delta", "message_stop"],
        "{text}"
    );
    let last_delta: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(last_delta["usage"]["output_tokens"], 40);
    assert_eq!(last_delta["usage"]["cost"]["amount_micros"], 3_501);
    let usage = settled_usage(&app, "user_gwa").await;
    assert_eq!(usage["costMicros"], 3_501);
    assert_eq!(usage["apiKeyId"], json!(key_id));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn out_of_credits_is_a_402_in_each_formats_shape_and_never_reaches_the_provider() {
    let fakes = fakes().await;
    for server in [&fakes.openai, &fakes.anthropic] {
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .expect(0)
            .mount(server)
            .await;
    }
    let app = app_with(&fakes, |_| {}).await;
    let (key, _) = funded_key(&app, "user_broke", 0, json!({ "name": "app" })).await;

    let openai = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "messages": conversation(), "max_tokens": 100 }),
    )
    .await;
    assert_eq!(openai.status(), 402);
    assert!(openai.headers().get("retry-after").is_none());
    let openai: Value = openai.json().await.unwrap();
    assert_eq!(openai["error"]["code"], "insufficient_credits", "{openai}");
    assert!(
        openai["error"]["required_micros"].as_i64().unwrap() > 0,
        "{openai}"
    );
    assert!(openai["error"]["message"].is_string());

    let anthropic = post_v1(
        &app,
        "/v1/messages",
        &key,
        &json!({ "model": "claude-sonnet-4-5", "messages": conversation(), "max_tokens": 100 }),
    )
    .await;
    assert_eq!(anthropic.status(), 402);
    let anthropic: Value = anthropic.json().await.unwrap();
    assert_eq!(anthropic["type"], "error", "{anthropic}");
    assert_eq!(anthropic["error"]["type"], "billing_error", "{anthropic}");
}

#[actix::test]
async fn a_revoked_key_and_a_deleted_users_key_answer_401_at_once() {
    let app = spawn_app().await;
    let (key, key_id) = funded_key(&app, "user_rev", 0, json!({ "name": "app" })).await;
    let models = |key: String| {
        let app = &app;
        async move {
            app.http
                .get(app.url("/v1/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
        }
    };
    // A Clerk session token opens the gateway too.
    assert_eq!(app.get_as("user_rev", "/v1/models").await.status(), 200);
    let listed = models(key.clone()).await;
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    let sonnet = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "claude-sonnet-4-5")
        .unwrap();
    assert_eq!(sonnet["object"], "model");
    assert_eq!(sonnet["pricing"]["prompt"], "0.000002916667");
    assert_eq!(sonnet["pricing"]["completion"], "0.000014583334");

    let revoked = app
        .http
        .delete(app.url(&format!("/api/credits/api-keys/{key_id}")))
        .bearer_auth(app.token("user_rev"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let refused = models(key).await;
    assert_eq!(refused.status(), 401);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(
        refused["error"]["type"], "authentication_error",
        "{refused}"
    );

    let (other, _) = funded_key(&app, "user_gone", 0, json!({ "name": "app" })).await;
    assert_eq!(models(other.clone()).await.status(), 200);
    app.db
        .client()
        .await
        .execute(
            "UPDATE users SET deleted_at = now() WHERE clerk_id = 'user_gone'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(models(other).await.status(), 401);
    assert_eq!(models("cd_not-a-key".into()).await.status(), 401);
}

#[actix::test]
async fn a_request_the_provider_refuses_is_released_charged_nothing_and_its_error_reaches_the_client_unchanged(
) {
    let fakes = fakes().await;
    let refusal = json!({ "error": { "message": "Invalid value for 'temperature': 7.",
        "type": "invalid_request_error", "param": "temperature", "code": "invalid_value" } });
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(ResponseTemplate::new(400).set_body_json(&refusal))
        .expect(1)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    let (key, _) = funded_key(&app, "user_refused", 10_000_000, json!({ "name": "app" })).await;

    let response = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "messages": conversation(), "temperature": 7 }),
    )
    .await;

    assert_eq!(response.status(), 400);
    assert_eq!(response.json::<Value>().await.unwrap(), refusal);
    let overview = balance(&app, "user_refused").await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    assert_eq!(overview["heldMicros"], 0);
    assert_eq!(overview["usages"], json!([]));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_model_of_the_other_format_is_refused_with_a_400_naming_the_route_to_use() {
    let app = spawn_app().await;
    let (key, _) = funded_key(&app, "user_cross", 0, json!({ "name": "app" })).await;
    let response = post_v1(
        &app,
        "/v1/messages",
        &key,
        &json!({ "model": "gpt-4o", "max_tokens": 10, "messages": conversation() }),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("gpt-4o") && message.contains("/v1/chat/completions"),
        "{message}"
    );
    let response = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "claude-sonnet-4-5", "messages": conversation() }),
    )
    .await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["param"], "model");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/messages"));
}

#[actix::test]
async fn two_hundred_parallel_calls_with_a_key_whose_limit_fits_37_holds_serve_exactly_37() {
    let fakes = fakes().await;
    let messages = json!([{ "role": "user", "content": "A todo app, please." }]);
    let prompt = openai_prompt_tokens(&messages);
    let max_tokens = 100;
    // The stand-in reports what the hold counted, slowly: every call is
    // judged while the first ones are held, and each costs its hold.
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(openai_completion("Done.", prompt, max_tokens, 0))
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |s| {
        s.rate_limits.chats_in_flight_per_account = 1000;
        s.database.pool_size = 16;
        s.database.pool_wait_timeout_ms = 20_000;
    })
    .await;
    let hold = gpt_4o_cost(prompt, max_tokens);
    let limit = 37 * hold + hold / 2;
    let limit_eur = format!("{}.{:06}", limit / 1_000_000, limit % 1_000_000);
    let (key, _) = funded_key(
        &app,
        "user_par",
        100_000_000,
        json!({ "name": "parallel", "spendLimitEur": limit_eur }),
    )
    .await;
    let body = json!({ "model": "gpt-4o", "messages": messages, "max_tokens": max_tokens });

    let answers =
        join_all((0..200).map(|_| post_v1(&app, "/v1/chat/completions", &key, &body))).await;

    let mut served = 0;
    for response in answers {
        match response.status().as_u16() {
            200 => served += 1,
            402 => {
                let error: Value = response.json().await.unwrap();
                assert_eq!(error["error"]["code"], "spend_limit_reached", "{error}");
                assert_eq!(error["error"]["limit"], "api_key", "{error}");
                assert_eq!(error["error"]["limit_micros"], limit, "{error}");
            }
            status => panic!("{status}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(served, 37);
    let keys = keys_of(&app, "user_par").await;
    assert_eq!(keys["keys"][0]["spentMicros"], 37 * hold);
    let overview = balance(&app, "user_par").await;
    assert_eq!(overview["balanceMicros"], 100_000_000 - 37 * hold);
    assert_eq!(overview["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

/// Posts `body` to `route` with `key` on a connection of its own, reads
/// the answer's head, and resets the connection right after its 200.
async fn reset_after_the_200(app: &TestApp, route: &str, key: &str, body: &Value) {
    let address = app.address.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(address).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST {route} HTTP/1.1\r\nhost: {address}\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
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
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    socket.set_zero_linger().unwrap();
    drop(socket);
}

#[actix::test]
async fn an_openai_stream_reset_right_after_its_200_is_charged_the_tokenizer_count_of_its_prompt() {
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
    let (key, _) = funded_key(&app, "user_gw_reset", 10_000_000, json!({ "name": "app" })).await;
    let messages = json!([
        { "role": "system", "content": "You write apps." },
        { "role": "user", "content": "Line after line, a todo app with due dates. ".repeat(200) },
    ]);

    reset_after_the_200(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "stream": true, "max_tokens": 1000, "messages": messages }),
    )
    .await;

    let usage = settled_usage(&app, "user_gw_reset").await;
    let prompt = openai_prompt_tokens(&messages);
    assert_eq!(usage["inputTokens"], prompt, "{usage}");
    assert_eq!(usage["outputTokens"], 0, "{usage}");
    assert_eq!(usage["costMicros"], gpt_4o_cost(prompt, 0), "{usage}");
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

#[actix::test]
async fn an_anthropic_stream_cut_mid_text_ends_with_an_error_event_and_is_charged_its_input_and_the_text_received(
) {
    let fakes = fakes().await;
    let (address, _closed) = raw_provider(
        vec![
            message_start(50, 0, 0),
            text_delta("Here is your app, "),
            text_delta("in three parts"),
        ],
        Then::Break,
        String::new(),
    )
    .await;
    let app = app_with(&fakes, |s| s.providers.anthropic_base_url = address).await;
    let (key, _) = funded_key(&app, "user_gw_cut", 10_000_000, json!({ "name": "app" })).await;

    let text = post_v1(
        &app,
        "/v1/messages",
        &key,
        &json!({ "model": "claude-sonnet-4-5", "max_tokens": 500, "stream": true,
                 "messages": [{ "role": "user", "content": "A todo app" }] }),
    )
    .await
    .text()
    .await
    .unwrap();

    let events = frames(&text);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error", "{text}");
    let data: Value = serde_json::from_str(data).unwrap();
    assert_eq!(data["type"], "error", "{data}");
    assert!(text.contains("in three parts"), "{text}");
    // 50 input tokens from message_start; 32 bytes of text → 11 tokens.
    let usage = settled_usage(&app, "user_gw_cut").await;
    assert_eq!(usage["inputTokens"], 50, "{usage}");
    assert_eq!(usage["outputTokens"], 11, "{usage}");
    let cost = (50 * 2_916_667 + 11 * 14_583_334 + 999_999) / 1_000_000;
    assert_eq!(usage["costMicros"], cost);
    assert!(cost > 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_byok_call_reaches_the_provider_with_the_persons_own_key_and_is_charged_nothing() {
    const USER_OPENAI_KEY: &str = "sk-proj-user-key-0123456789wxyz";
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header(
            "authorization",
            format!("Bearer {USER_OPENAI_KEY}").as_str(),
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(openai_completion("Hi", 900, 40, 0)))
        .expect(1)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |s| {
        s.byok.encryption_key =
            creditd::config::Secret::new("KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=");
    })
    .await;
    let (key, _) = funded_key(&app, "user_own", 1_000_000, json!({ "name": "app" })).await;
    let saved = app
        .http
        .put(app.url("/api/settings/api-keys"))
        .bearer_auth(app.token("user_own"))
        .json(&json!({ "openaiKey": USER_OPENAI_KEY }))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 200);

    let response = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "messages": conversation(), "max_tokens": 100 }),
    )
    .await;

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["creditd-cost-micros"], "0");
    assert!(response.headers().get("creditd-balance-micros").is_none());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["cost"]["amount_micros"], 0);
    assert_eq!(body["usage"]["cost"]["own_key"], true);
    let overview = balance(&app, "user_own").await;
    assert_eq!(overview["balanceMicros"], 1_000_000);
    assert_eq!(overview["usages"], json!([]));
}

#[actix::test]
async fn an_openai_stream_the_provider_drops_ends_with_an_error_chunk_then_done_and_is_charged_what_was_produced(
) {
    let fakes = fakes().await;
    let (address, _closed) = raw_provider(
        vec![
            openai_role_chunk(),
            openai_chunk("Here"),
            openai_chunk(" is"),
        ],
        Then::Break,
        String::new(),
    )
    .await;
    let app = app_with(&fakes, |s| s.providers.openai_base_url = address).await;
    let (key, _) = funded_key(&app, "user_gw_drop", 10_000_000, json!({ "name": "app" })).await;
    let messages = json!([{ "role": "user", "content": "A todo app" }]);

    let text = post_v1(
        &app,
        "/v1/chat/completions",
        &key,
        &json!({ "model": "gpt-4o", "stream": true, "max_tokens": 100, "messages": messages }),
    )
    .await
    .text()
    .await
    .unwrap();

    let events = frames(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]", "{text}");
    let error: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(error["error"]["type"], "server_error", "{text}");
    assert!(text.contains("\" is\""), "{text}");
    // The prompt as counted, and "Here is" as gpt-4o counts it: 2 tokens.
    let usage = settled_usage(&app, "user_gw_drop").await;
    let prompt = openai_prompt_tokens(&messages);
    assert_eq!(usage["inputTokens"], prompt, "{usage}");
    assert_eq!(usage["outputTokens"], 2, "{usage}");
    assert_eq!(usage["costMicros"], gpt_4o_cost(prompt, 2));
    app.db.reconcile_is_clean().await;
}
