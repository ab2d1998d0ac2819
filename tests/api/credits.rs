//! `/api/credits…`: the balance page, history pages and the signup bonus.

use futures_util::future::join_all;
use serde_json::json;

use crate::support::*;

#[actix::test]
async fn a_new_user_sees_a_zero_balance_with_every_amount_named_by_unit() {
    let app = spawn_app().await;

    let (status, body) = json_of(app.get_as("user_new", "/api/credits").await).await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balance"], 0);
    assert_eq!(body["balanceMicros"], 0);
    assert_eq!(body["heldMicros"], 0);
    assert_eq!(body["availableMicros"], 0);
    assert_eq!(body["balanceFormatted"], "0.00€");
    assert_eq!(body["isLow"], true);
    assert_eq!(body["hasByok"], false);
    assert_eq!(body["transactions"], json!([]));
    assert_eq!(body["usages"], json!([]));
}

#[actix::test]
async fn claiming_the_bonus_credits_ten_euros_once_and_replays_answer_the_same_transaction() {
    let app = spawn_app().await;

    let (first_status, first) = json_of(
        app.post_as("user_bonus", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    let (second_status, second) = json_of(
        app.post_as("user_bonus", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    let (_, overview) = json_of(app.get_as("user_bonus", "/api/credits").await).await;

    assert_eq!(first_status, 201, "{first}");
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(first["transaction"], second["transaction"]);
    assert_eq!(first["transaction"]["type"], "SIGNUP_BONUS");
    assert_eq!(first["transaction"]["amountMicros"], 10_000_000);
    assert_eq!(overview["balance"], 1000);
    assert_eq!(overview["balanceFormatted"], "10.00€");
    assert_eq!(overview["isLow"], false);
    assert_eq!(overview["transactions"].as_array().map(Vec::len), Some(1));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn fifty_concurrent_bonus_claims_grant_one_bonus() {
    let app = spawn_app().await;

    let statuses = join_all((0..50).map(|_| async {
        app.post_as("user_rush", "/api/credits/claim-bonus", &json!({}))
            .await
            .status()
            .as_u16()
    }))
    .await;
    let (_, overview) = json_of(app.get_as("user_rush", "/api/credits").await).await;

    assert_eq!(
        statuses.iter().filter(|&&s| s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        49,
        "{statuses:?}"
    );
    assert_eq!(overview["balanceMicros"], 10_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_user_never_sees_another_users_balance_or_history() {
    let app = spawn_app().await;
    let claimed = app
        .post_as("user_alice", "/api/credits/claim-bonus", &json!({}))
        .await;
    assert_eq!(claimed.status(), 201, "Alice has credits Bob could see");
    let (_, alice) = json_of(app.get_as("user_alice", "/api/credits").await).await;
    assert_eq!(alice["balanceMicros"], 10_000_000);

    let (_, bob) = json_of(app.get_as("user_bob", "/api/credits").await).await;
    let (_, bob_history) = json_of(app.get_as("user_bob", "/api/credits/transactions").await).await;

    assert_eq!(bob["balanceMicros"], 0);
    assert_eq!(bob["transactions"], json!([]));
    assert_eq!(bob_history["items"], json!([]));
}

#[actix::test]
async fn the_balance_page_shows_every_new_entry_on_the_next_read() {
    let app = spawn_app().await;
    for index in 1..=12_i64 {
        let response = app
            .admin(reqwest::Method::POST, "/admin/accounts/user_poll/credits")
            .json(
                &json!({"amountMicros": 10_000, "key": format!("poll-{index}"), "reason": "poll"}),
            )
            .send()
            .await
            .expect("credit");
        assert_eq!(response.status().as_u16(), 201);
        for _ in 0..2 {
            let (_, page) = json_of(app.get_as("user_poll", "/api/credits").await).await;
            assert_eq!(page["balanceMicros"], 10_000 * index);
            let newest = &page["transactions"][0];
            assert_eq!(newest["balanceAfterMicros"], 10_000 * index, "{page}");
            assert_eq!(
                page["transactions"].as_array().map(Vec::len),
                Some(index.min(10) as usize)
            );
        }
    }
}

#[actix::test]
async fn daily_usage_refuses_a_range_outside_one_to_ninety_days_by_name() {
    let app = spawn_app().await;
    for query in [
        "days=0",
        "days=91",
        "days=ten",
        "days=-1",
        "from=2026-01-01",
    ] {
        let (status, body) = json_of(
            app.get_as("user_days", &format!("/api/credits/usage/daily?{query}"))
                .await,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"], "INVALID_REQUEST");
        let field = if query.starts_with("from") {
            "from"
        } else {
            "days"
        };
        assert!(
            body["message"].as_str().unwrap_or_default().contains(field),
            "{query}: {body}"
        );
    }
}

#[actix::test]
async fn daily_usage_lists_every_utc_day_up_to_today_with_a_chat_on_today() {
    let fakes = fakes().await;
    let app = app_with(&fakes, |_| {}).await;
    fund(&app, "user_daily", 5_000_000).await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path("/v1/messages"))
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(anthropic_message("Voici.", 1_200, 300, 0, 0)),
        )
        .mount(&fakes.anthropic)
        .await;
    let (status, chat) = json_of(
        app.post_as(
            "user_daily",
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "Bonjour" }], "maxTokens": 500 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{chat}");

    let (status, body) = json_of(
        app.get_as("user_daily", "/api/credits/usage/daily?days=7")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let days = body["days"].as_array().expect("days");
    assert_eq!(days.len(), 7);
    let today = chrono::Utc::now().date_naive();
    for (index, day) in days.iter().enumerate() {
        let expected = today - chrono::Duration::days(6 - index as i64);
        assert_eq!(day["date"], json!(expected.to_string()), "oldest first");
    }
    for day in &days[..6] {
        assert_eq!(
            (
                &day["costMicros"],
                &day["chats"],
                &day["inputTokens"],
                &day["outputTokens"]
            ),
            (&json!(0), &json!(0), &json!(0), &json!(0))
        );
    }
    assert_eq!(days[6]["costMicros"], chat["credits"]["usedMicros"]);
    assert_eq!(days[6]["chats"], 1);
    assert_eq!(days[6]["inputTokens"], 1_200);
    assert_eq!(days[6]["outputTokens"], 300);

    let (_, default) = json_of(app.get_as("user_daily", "/api/credits/usage/daily").await).await;
    assert_eq!(default["days"].as_array().map(Vec::len), Some(30));
    let (_, other) = json_of(
        app.get_as("user_other", "/api/credits/usage/daily?days=1")
            .await,
    )
    .await;
    assert_eq!(
        other["days"][0]["costMicros"], 0,
        "one's usage is one's own"
    );
}
