//! `POST /api/chat` on the platform's keys: holds before the call, exact
//! settlement after it, releases on provider failure; against local fake
//! providers speaking Anthropic's and OpenAI's wire formats.

use futures_util::future::join_all;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

#[actix::test]
async fn an_anthropic_chat_is_charged_the_price_table_cost_of_its_reported_usage_with_cache_tokens()
{
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", PLATFORM_ANTHROPIC_KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .and(body_partial_json(json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1000,
            "system": "You write apps.",
            "messages": [{ "role": "user", "content": "Build me a todo app." }],
        })))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message(
            "Here it is.",
            1000,
            500,
            2000,
            300,
        )))
        .expect(1)
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_a", 10_000_000).await;

    let (status, body) = json_of(
        app.post_as(
            "user_a",
            "/api/chat",
            &json!({ "messages": conversation(), "maxTokens": 1000, "conversationId": "conv_1" }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "Here it is.");
    assert_eq!(body["model"], "claude-sonnet-4-5");
    // 1000 × 2_916_667 + 500 × 14_583_334 + 2000 × 291_667 + 300 × 3_645_834
    // = 11_885_418_200 → ceil(/ 1e6) = 11_886 micros
    let credits = &body["credits"];
    assert_eq!(credits["usedMicros"], 11_886);
    assert_eq!(credits["used"], 2);
    assert_eq!(credits["balanceMicros"], 10_000_000 - 11_886);
    assert_eq!(credits["balance"], 998);
    assert_eq!(credits["inputTokens"], 1000);
    assert_eq!(credits["outputTokens"], 500);
    assert_eq!(credits["cacheReadTokens"], 2000);
    assert_eq!(credits["cacheWriteTokens"], 300);
    let overview = balance(&app, "user_a").await;
    assert_eq!(overview["heldMicros"], 0);
    assert_eq!(overview["usages"][0]["costMicros"], 11_886);
    assert_eq!(overview["usages"][0]["conversationId"], "conv_1");
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"creditd_provider_calls_total{provider="anthropic",model="claude-sonnet-4-5",outcome="ok"}"#,
        r#"creditd_provider_call_duration_seconds_count{provider="anthropic",model="claude-sonnet-4-5"}"#,
        r#"creditd_chat_tokens_total{model="claude-sonnet-4-5",kind="cache_write"}"#,
        r#"creditd_charged_micros_total{model="claude-sonnet-4-5"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn exact_costs_match_the_price_table_for_each_provider_with_and_without_cache() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("ok", 1000, 500, 0, 0)),
        )
        .mount(&fakes.anthropic)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header(
            "authorization",
            format!("Bearer {PLATFORM_OPENAI_KEY}").as_str(),
        ))
        .and(body_partial_json(
            json!({ "model": "gpt-4o", "max_completion_tokens": 800 }),
        ))
        .and(body_partial_json(
            json!({ "messages": [{ "role": "system", "content": "cached" }] }),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_completion("ok", 3000, 500, 2000)),
        )
        .mount(&fakes.openai)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_completion("ok", 1000, 500, 0)),
        )
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_x", 10_000_000).await;
    let ask = |model: &str, system: &str| {
        json!({
            "model": model,
            "maxTokens": 800,
            "messages": [{ "role": "system", "content": system }, { "role": "user", "content": "hi" }],
        })
    };

    let mut used = Vec::new();
    for body in [
        ask("claude-sonnet-4-5", "plain"),
        ask("gpt-4o", "cached"),
        ask("gpt-4o", "plain"),
    ] {
        let (status, answer) = json_of(app.post_as("user_x", "/api/chat", &body).await).await;
        assert_eq!(status, 200, "{answer}");
        used.push(answer["credits"]["usedMicros"].as_i64().unwrap());
    }

    // claude-sonnet-4-5: 1000 × 2_916_667 + 500 × 14_583_334 = 10_208_334_000 → 10_209
    // gpt-4o, 2000 of 3000 prompt tokens cached: 1000 × 2_430_556 + 500 × 9_722_223
    //   + 2000 × 1_215_278 = 9_722_223_500 → 9_723
    // gpt-4o, nothing cached: 1000 × 2_430_556 + 500 × 9_722_223 = 7_291_667_500 → 7_292
    assert_eq!(used, vec![10_209, 9_723, 7_292]);
    let overview = balance(&app, "user_x").await;
    assert_eq!(
        overview["balanceMicros"],
        10_000_000 - 10_209 - 9_723 - 7_292
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refused_hold_answers_402_with_the_seed_fields_in_cents_and_micros() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message("x", 1, 1, 0, 0)))
        .expect(0)
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_poor", 50_000).await;

    let (status, body) = json_of(
        app.post_as(
            "user_poor",
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "hello" }], "maxTokens": 4096 }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 402, "{body}");
    assert_eq!(body["error"], "INSUFFICIENT_CREDITS");
    assert_eq!(
        body["message"],
        "Not enough credits. Please top up or add your own API key."
    );
    assert_eq!(body["balance"], 5);
    assert_eq!(body["balanceMicros"], 50_000);
    // input estimate 16 + (5 + 8) = 29 tokens at the dearest input price
    // (cache write, 3_645_834) + 4096 × 14_583_334:
    // 105_729_186 + 59_733_336_064 = 59_839_065_250 → 59_840 micros
    assert_eq!(body["estimatedCostMicros"], 59_840);
    assert_eq!(body["estimatedCost"], 6);
    assert_eq!(count(&app, "credit_holds", "user_poor").await, 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn busy_or_failing_providers_answer_503_with_retry_after_and_release_the_hold() {
    let fakes = fakes().await;
    for (status, body, model) in [
        (
            429,
            anthropic_error(
                "rate_limit_error",
                "Number of requests has exceeded your rate limit",
            ),
            "claude-sonnet-4-5",
        ),
        (
            529,
            anthropic_error("overloaded_error", "Overloaded"),
            "claude-haiku-4-5",
        ),
        (
            500,
            anthropic_error("api_error", "Internal server error"),
            "claude-opus-4-5",
        ),
    ] {
        Mock::given(method("POST"))
            .and(body_partial_json(json!({ "model": model })))
            .respond_with(
                ResponseTemplate::new(status)
                    .insert_header("retry-after", "7")
                    .set_body_json(body),
            )
            .mount(&fakes.anthropic)
            .await;
    }
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).set_body_json(json!({
            "error": { "message": "The server is overloaded", "type": "server_error", "param": null, "code": null }
        })))
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_b", 10_000_000).await;

    for model in [
        "claude-sonnet-4-5",
        "claude-haiku-4-5",
        "claude-opus-4-5",
        "gpt-4o",
    ] {
        let response = app
            .post_as(
                "user_b",
                "/api/chat",
                &json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] }),
            )
            .await;
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let (status, body) = json_of(response).await;
        assert_eq!(status, 503, "{model}: {body}");
        assert_eq!(body["error"], "PROVIDER_UNAVAILABLE", "{model}");
        let expected = if model == "gpt-4o" { "1" } else { "7" };
        assert_eq!(retry_after.as_deref(), Some(expected), "{model}");
    }

    let overview = balance(&app, "user_b").await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    assert_eq!(overview["heldMicros"], 0);
    assert_eq!(count(&app, "credit_usages", "user_b").await, 0);
    assert_eq!(count(&app, "credit_holds", "user_b").await, 4);
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"creditd_holds_released_total{reason="unavailable"}"#));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_provider_that_does_not_answer_in_time_gives_504_and_no_charge() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("late", 10, 10, 0, 0))
                .set_delay(std::time::Duration::from_secs(3)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |s| s.providers.total_timeout_ms = 300).await;
    fund(&app, "user_slow", 10_000_000).await;

    let (status, body) = json_of(
        app.post_as(
            "user_slow",
            "/api/chat",
            &json!({ "messages": conversation() }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "PROVIDER_TIMEOUT");
    let overview = balance(&app, "user_slow").await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    assert_eq!(overview["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn without_a_platform_key_for_the_model_the_seed_message_is_returned() {
    let fakes = fakes().await;
    let app = app_with(&fakes, |s| {
        s.providers.anthropic_api_key = creditd::config::Secret::new("");
    })
    .await;
    fund(&app, "user_c", 10_000_000).await;

    let (status, body) = json_of(
        app.post_as(
            "user_c",
            "/api/chat",
            &json!({ "messages": conversation() }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "NO_API_KEY");
    assert_eq!(
        body["message"],
        "No API key configured. Please add your OpenAI or Anthropic API key in settings."
    );
    assert_eq!(count(&app, "credit_holds", "user_c").await, 0);
}

#[actix::test]
async fn bad_chat_requests_are_refused_by_field_before_any_hold() {
    let fakes = fakes().await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_d", 10_000_000).await;

    for (body, field) in [
        (json!({ "messages": [] }), "messages"),
        (
            json!({ "messages": [{ "role": "robot", "content": "hi" }] }),
            "messages[0].role",
        ),
        (
            json!({ "messages": [{ "role": "user", "content": " " }] }),
            "messages[0].content",
        ),
        (
            json!({ "messages": [{ "role": "system", "content": "x" }] }),
            "messages",
        ),
        (
            json!({ "messages": conversation(), "model": "gpt-2" }),
            "model",
        ),
        (
            json!({ "messages": conversation(), "maxTokens": 0 }),
            "maxTokens",
        ),
        (
            json!({ "messages": conversation(), "maxTokens": 1_000_000 }),
            "maxTokens",
        ),
        (
            json!({ "messages": conversation(), "conversationId": "" }),
            "conversationId",
        ),
    ] {
        let (status, answer) = json_of(app.post_as("user_d", "/api/chat", &body).await).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}`")),
            "{field}: {message}"
        );
    }
    assert_eq!(count(&app, "credit_holds", "user_d").await, 0);
}

#[actix::test]
async fn two_hundred_concurrent_chats_never_spend_more_than_the_balance() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("done", 20, 1000, 0, 0))
                .set_delay(std::time::Duration::from_millis(50)),
        )
        .mount(&fakes.anthropic)
        .await;
    // Not the in-flight limit under test here: the balance is.
    let app = app_with(&fakes, |s| s.rate_limits.chats_in_flight_per_account = 1000).await;
    // A hold: input estimate 16 + (2 + 8) = 26 tokens × 3_645_834 + 1000 × 14_583_334
    // = 14_678_125_684 → 14_679 micros; a settled call: 20 × 2_916_667 + 1000 × 14_583_334
    // = 14_641_667_340 → 14_642 micros. The balance covers 20 holds.
    let funds = 20 * 14_679 + 5_000;
    fund(&app, "user_rush", funds).await;

    let answers = join_all((0..200).map(|_| async {
        json_of(
            app.post_as(
                "user_rush",
                "/api/chat",
                &json!({ "messages": [{ "role": "user", "content": "go" }], "maxTokens": 1000 }),
            )
            .await,
        )
        .await
    }))
    .await;

    let ok: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b)
        .collect();
    let refused = answers.iter().filter(|(s, _)| *s == 402).count();
    assert_eq!(
        ok.len() + refused,
        200,
        "{:?}",
        answers.iter().find(|(s, _)| *s != 200 && *s != 402)
    );
    assert!(ok.len() >= 20, "{} calls served", ok.len());
    let charged: i64 = ok
        .iter()
        .map(|b| b["credits"]["usedMicros"].as_i64().unwrap())
        .sum();
    let client = app.db.client().await;
    let row = client
        .query_one(
            "SELECT coalesce(sum(cost_micros), 0)::BIGINT, min(balance_after_micros), count(*)
               FROM credit_usages",
            &[],
        )
        .await
        .unwrap();
    let (settled, lowest, usages): (i64, Option<i64>, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(usages as usize, ok.len());
    assert_eq!(charged, settled);
    assert!(lowest.unwrap_or(0) >= 0, "balance went to {lowest:?}");
    let overview = balance(&app, "user_rush").await;
    assert_eq!(overview["balanceMicros"], funds - settled);
    assert_eq!(overview["heldMicros"], 0);
    assert!(overview["availableMicros"].as_i64().unwrap() >= 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_answer_whose_charge_cannot_commit_yet_is_returned_charged_once_the_database_is_back() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("billed late", 10, 10, 0, 0))
                .set_delay(std::time::Duration::from_millis(1500)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_outage", 10_000_000).await;

    let request = json!({ "messages": conversation() });
    let chat = app.post_as("user_outage", "/api/chat", &request);
    let outage = async {
        // Cut once the hold is durable, while the provider is answering.
        wait_for_count(
            &app,
            "SELECT count(*) FROM credit_holds WHERE status = 'ACTIVE'",
            1,
        )
        .await;
        let cut = cut_database(&app).await;
        // The provider answers at 1.5 s; the database comes back at 3.5 s.
        tokio::time::sleep(std::time::Duration::from_millis(3500)).await;
        cut.restore().await;
    };
    let (response, ()) = tokio::join!(chat, outage);
    let (status, body) = json_of(response).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["content"], "billed late");
    // 10 input tokens at 2_916_667 + 10 output at 14_583_334 micros per
    // million: 175_000_010 / 1_000_000, rounded up once.
    assert_eq!(body["credits"]["usedMicros"], 176);
    assert_eq!(count(&app, "credit_usages", "user_outage").await, 1);
    let overview = balance(&app, "user_outage").await;
    assert_eq!(overview["balanceMicros"], 10_000_000 - 176);
    assert_eq!(overview["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_answer_that_outlives_its_hold_is_still_charged_in_full() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("slow answer", 10, 10, 0, 0))
                .set_delay(std::time::Duration::from_millis(2500)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |s| s.engine.hold_ttl_s = 1).await;
    fund(&app, "user_slow", 10_000_000).await;

    let (status, body) = json_of(
        app.post_as(
            "user_slow",
            "/api/chat",
            &json!({ "messages": conversation() }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credits"]["usedMicros"], 176);
    let client = app.db.client().await;
    let row = client
        .query_one(
            "SELECT h.status, u.cost_micros, u.held_micros FROM credit_usages u
               JOIN credit_holds h ON h.id = u.hold_id",
            &[],
        )
        .await
        .unwrap();
    let (status, cost, held): (String, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(status, "EXPIRED", "the hold expired before the answer came");
    assert_eq!(cost, 176, "the usage is charged all the same");
    assert_eq!(held, 0, "a late settlement holds nothing");
    let overview = balance(&app, "user_slow").await;
    assert_eq!(overview["balanceMicros"], 10_000_000 - 176);
    assert_eq!(overview["heldMicros"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn control_characters_in_a_stored_field_are_refused_with_400_before_any_provider_call() {
    let fakes = fakes().await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_nul", 10_000_000).await;

    for stream in [false, true] {
        for (field, body) in [
            (
                "conversationId",
                json!({ "messages": conversation(), "conversationId": "conv\u{0}x" }),
            ),
            (
                "messageId",
                json!({ "messages": conversation(), "messageId": "msg\u{7}1" }),
            ),
            (
                "conversationId",
                json!({ "messages": conversation(), "conversationId": "line\nbreak" }),
            ),
            (
                "model",
                json!({ "messages": conversation(), "model": "claude\u{0}" }),
            ),
        ] {
            let mut body = body;
            body["stream"] = json!(stream);
            let (status, answer) = json_of(app.post_as("user_nul", "/api/chat", &body).await).await;
            assert_eq!(status, 400, "{body}: {answer}");
            let message = answer["message"].as_str().unwrap();
            assert!(message.contains(&format!("`{field}`")), "{message}");
        }
    }
    let calls = fakes
        .anthropic
        .received_requests()
        .await
        .unwrap_or_default();
    assert!(calls.is_empty(), "a provider was called: {}", calls.len());
    assert_eq!(count(&app, "credit_holds", "user_nul").await, 0);
    app.db.reconcile_is_clean().await;
}
