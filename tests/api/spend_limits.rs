//! Spending limits: daily and monthly UTC windows enforced by the account's
//! actor on every hold, the owner's limits under an administrator's
//! ceiling, BYOK chats left alone; on a clock the test moves by hand.

use chrono::{DateTime, Duration, Utc};
use futures_util::future::join_all;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;
use creditd::clock::Clock;
use creditd::config::{Secret, Settings};

/// One chat as these tests send it ("go", 1000 tokens at most) holds
/// 26 input tokens at the dearest input price (cache write, 3_645_834 per
/// million) plus 1000 output tokens at 14_583_334 per million: 14_679
/// micros. The fake provider reports exactly those tokens (26 of them as
/// cache writes), so each chat also settles at 14_679 micros.
const CHAT_MICROS: i64 = 14_679;

fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("a time")
}

/// The fake Anthropic answering every chat at exactly `CHAT_MICROS`.
async fn exact_provider(fakes: &Fakes) {
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("done", 0, 1000, 0, 26))
                .set_delay(std::time::Duration::from_millis(20)),
        )
        .mount(&fakes.anthropic)
        .await;
}

fn platform(fakes: &Fakes, settings: &mut Settings) {
    settings.providers.anthropic_base_url = fakes.anthropic.uri();
    settings.providers.openai_base_url = fakes.openai.uri();
    settings.providers.anthropic_api_key = Secret::new(PLATFORM_ANTHROPIC_KEY);
    settings.providers.openai_api_key = Secret::new(PLATFORM_OPENAI_KEY);
    // Not the in-flight limit under test here: the spending limits are.
    settings.rate_limits.chats_in_flight_per_account = 1000;
}

async fn app_on(fakes: &Fakes, clock: &Clock) -> TestApp {
    spawn_app_on_clock(clock.clone(), |s| platform(fakes, s)).await
}

async fn chat(app: &TestApp, clerk_id: &str) -> (u16, Value, Option<String>) {
    let response = app
        .post_as(
            clerk_id,
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "go" }], "maxTokens": 1000 }),
        )
        .await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (status, body) = json_of(response).await;
    (status, body, retry_after)
}

async fn put_limits(app: &TestApp, clerk_id: &str, body: &Value) -> (u16, Value) {
    let response = app
        .http
        .put(app.url("/api/credits/limits"))
        .bearer_auth(app.token(clerk_id))
        .json(body)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

async fn admin_limits(app: &TestApp, clerk_id: &str, body: &Value) -> (u16, Value) {
    let response = app
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/accounts/{clerk_id}/limits"),
        )
        .json(body)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

async fn limits(app: &TestApp, clerk_id: &str) -> Value {
    let (status, body) = json_of(app.get_as(clerk_id, "/api/credits/limits").await).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[actix::test]
async fn five_hundred_concurrent_chats_against_a_daily_limit_of_thirty_seven_serve_exactly_thirty_seven_until_midnight(
) {
    let fakes = fakes().await;
    exact_provider(&fakes).await;
    let clock = Clock::manual(at("2026-03-10T21:30:00Z"));
    let app = app_on(&fakes, &clock).await;
    fund(&app, "user_cap", 100_000_000).await;
    let (status, set) = put_limits(
        &app,
        "user_cap",
        &json!({ "dailyMicros": 37 * CHAT_MICROS, "monthlyMicros": null }),
    )
    .await;
    assert_eq!(status, 200, "{set}");

    let answers = join_all((0..500).map(|_| chat(&app, "user_cap"))).await;

    let served = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let refused: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 402).collect();
    assert_eq!(served, 37);
    assert_eq!(
        refused.len(),
        463,
        "{:?}",
        answers.iter().find(|a| a.0 != 200 && a.0 != 402)
    );
    for (_, body, retry_after) in &refused {
        assert_eq!(body["error"], "SPEND_LIMIT_REACHED", "{body}");
        assert_eq!(body["limit"], "daily");
        assert_eq!(body["limitMicros"], 37 * CHAT_MICROS);
        assert_eq!(body["resetsAt"], "2026-03-11T00:00:00Z");
        assert_eq!(retry_after.as_deref(), Some("9000"), "2h30 to midnight");
        let counted = body["spentMicros"].as_i64().unwrap() + body["heldMicros"].as_i64().unwrap();
        assert!(counted + CHAT_MICROS > 37 * CHAT_MICROS, "{body}");
    }
    let client = app.db.client().await;
    let settled: i64 = client
        .query_one(
            "SELECT coalesce(sum(cost_micros), 0)::int8 FROM credit_usages",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(settled, 37 * CHAT_MICROS);
    let today = limits(&app, "user_cap").await;
    assert_eq!(today["spentTodayMicros"], 37 * CHAT_MICROS);
    assert_eq!(today["heldMicros"], 0);
    assert_eq!(today["daily"]["resetsAt"], "2026-03-11T00:00:00Z");
    assert_eq!(today["monthly"]["resetsAt"], "2026-04-01T00:00:00Z");

    // A minute before midnight the day is still spent; at midnight it is new.
    clock.set(at("2026-03-10T23:59:00Z")).unwrap();
    assert_eq!(chat(&app, "user_cap").await.0, 402);
    // 464 refusals in one window: one `spend_limit.reached`, with its window.
    let reached = client
        .query(
            "SELECT e.data FROM outgoing_events e JOIN users u ON u.id = e.user_id
              WHERE u.clerk_id = $1 AND e.type = 'spend_limit.reached'",
            &[&"user_cap"],
        )
        .await
        .unwrap();
    assert_eq!(reached.len(), 1);
    let data: Value = reached[0].get(0);
    assert_eq!(data["limit"], "daily");
    assert_eq!(data["limitMicros"], 37 * CHAT_MICROS);
    assert_eq!(data["resetsAt"], "2026-03-11T00:00:00Z");
    clock.set(at("2026-03-11T00:00:00Z")).unwrap();
    let (status, body, _) = chat(&app, "user_cap").await;
    assert_eq!(status, 200, "{body}");
    let tomorrow = limits(&app, "user_cap").await;
    assert_eq!(tomorrow["spentTodayMicros"], CHAT_MICROS);
    assert_eq!(tomorrow["spentThisMonthMicros"], 38 * CHAT_MICROS);
    assert_eq!(tomorrow["dailyMicros"], 37 * CHAT_MICROS);

    // Another instance loads the limit and the day's spend from PostgreSQL.
    let (other, _handle) =
        start_app_on_clock(app.db.database(&app.settings), &app.settings, clock.clone()).await;
    let (_, reloaded) = json_of(
        app.http
            .get(format!("{other}/api/credits/limits"))
            .bearer_auth(app.token("user_cap"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reloaded["dailyMicros"], 37 * CHAT_MICROS);
    assert_eq!(reloaded["spentTodayMicros"], CHAT_MICROS);
    assert_eq!(reloaded["spentThisMonthMicros"], 38 * CHAT_MICROS);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_monthly_limit_counts_every_day_of_the_month_and_starts_again_on_the_first() {
    let fakes = fakes().await;
    exact_provider(&fakes).await;
    let clock = Clock::manual(at("2026-01-30T12:00:00Z"));
    let app = app_on(&fakes, &clock).await;
    fund(&app, "user_month", 10_000_000).await;
    put_limits(
        &app,
        "user_month",
        &json!({ "dailyMicros": 5 * CHAT_MICROS, "monthlyMicros": 3 * CHAT_MICROS }),
    )
    .await;

    assert_eq!(chat(&app, "user_month").await.0, 200);
    assert_eq!(chat(&app, "user_month").await.0, 200);
    clock.advance(Duration::days(1)).unwrap();
    assert_eq!(chat(&app, "user_month").await.0, 200);
    let (status, body, retry_after) = chat(&app, "user_month").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["limit"], "monthly");
    assert_eq!(body["spentMicros"], 3 * CHAT_MICROS);
    assert_eq!(body["resetsAt"], "2026-02-01T00:00:00Z");
    assert_eq!(retry_after.as_deref(), Some("43200"));

    clock.set(at("2026-02-01T00:00:01Z")).unwrap();
    assert_eq!(chat(&app, "user_month").await.0, 200);
    let now = limits(&app, "user_month").await;
    assert_eq!(now["spentThisMonthMicros"], CHAT_MICROS);
    assert_eq!(now["monthly"]["resetsAt"], "2026-03-01T00:00:00Z");
}

#[actix::test]
async fn an_owner_cannot_raise_a_limit_past_the_ceiling_an_administrator_set() {
    let fakes = fakes().await;
    exact_provider(&fakes).await;
    let clock = Clock::manual(at("2026-05-05T10:00:00Z"));
    let app = app_on(&fakes, &clock).await;
    fund(&app, "user_kid", 10_000_000).await;

    let (status, body) = admin_limits(
        &app,
        "user_kid",
        &json!({ "dailyCeilingMicros": 2 * CHAT_MICROS, "monthlyCeilingMicros": null }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, refused) =
        put_limits(&app, "user_kid", &json!({ "dailyMicros": 3 * CHAT_MICROS })).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"], "CONFLICT");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("`dailyMicros`"),
        "{refused}"
    );
    let (status, bad) = put_limits(&app, "user_kid", &json!({ "monthlyMicros": -1 })).await;
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["message"].as_str().unwrap().contains("`monthlyMicros`"),
        "{bad}"
    );

    // With no limit of the owner's, the ceiling is the limit.
    let shown = limits(&app, "user_kid").await;
    assert_eq!(shown["dailyMicros"], Value::Null);
    assert_eq!(shown["dailyCeilingMicros"], 2 * CHAT_MICROS);
    assert_eq!(shown["daily"]["limitMicros"], 2 * CHAT_MICROS);
    assert_eq!(chat(&app, "user_kid").await.0, 200);
    assert_eq!(chat(&app, "user_kid").await.0, 200);
    let (status, body, _) = chat(&app, "user_kid").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["limitMicros"], 2 * CHAT_MICROS);

    // A lower limit of the owner's applies; it was stored before the answer.
    let (status, lower) =
        put_limits(&app, "user_kid", &json!({ "dailyMicros": CHAT_MICROS })).await;
    assert_eq!(status, 200, "{lower}");
    assert_eq!(lower["daily"]["limitMicros"], CHAT_MICROS);
    // The very next chat is judged by it (two chats are spent already).
    let (status, body, _) = chat(&app, "user_kid").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["limitMicros"], CHAT_MICROS);
    let row = app
        .db
        .client()
        .await
        .query_one(
            "SELECT daily_micros, daily_ceiling_micros FROM credit_limits l
               JOIN users u ON u.id = l.user_id WHERE u.clerk_id = 'user_kid'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(CHAT_MICROS));
    assert_eq!(row.get::<_, Option<i64>>(1), Some(2 * CHAT_MICROS));
}

#[actix::test]
async fn byok_chats_are_neither_counted_nor_refused_by_spending_limits() {
    use base64::Engine as _;
    const USER_KEY: &str = "sk-ant-api03-user-key-abcdefghijWXYZ";
    let fakes = fakes().await;
    exact_provider(&fakes).await;
    let clock = Clock::manual(at("2026-07-01T09:00:00Z"));
    let app = spawn_app_on_clock(clock.clone(), |s| {
        platform(&fakes, s);
        s.byok.encryption_key =
            Secret::new(base64::engine::general_purpose::STANDARD.encode([42u8; 32]));
    })
    .await;
    fund(&app, "user_byok", 10_000_000).await;
    put_limits(&app, "user_byok", &json!({ "dailyMicros": CHAT_MICROS })).await;
    assert_eq!(chat(&app, "user_byok").await.0, 200);
    assert_eq!(chat(&app, "user_byok").await.0, 402);

    let response = app
        .http
        .put(app.url("/api/settings/api-keys"))
        .bearer_auth(app.token("user_byok"))
        .json(&json!({ "anthropicKey": USER_KEY }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    for _ in 0..3 {
        let (status, body, _) = chat(&app, "user_byok").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.get("credits").is_none(), "{body}");
    }
    let shown = limits(&app, "user_byok").await;
    assert_eq!(shown["spentTodayMicros"], CHAT_MICROS);
}

#[actix::test]
async fn a_limit_change_that_cannot_be_stored_is_refused_and_changes_nothing() {
    let fakes = fakes().await;
    exact_provider(&fakes).await;
    let clock = Clock::manual(at("2026-09-09T09:00:00Z"));
    let app = app_on(&fakes, &clock).await;
    fund(&app, "user_outage", 10_000_000).await;
    let (status, _) = put_limits(&app, "user_outage", &json!({ "dailyMicros": CHAT_MICROS })).await;
    assert_eq!(status, 200);

    let cut = cut_database(&app).await;
    let (status, refused) = put_limits(&app, "user_outage", &json!({ "dailyMicros": null })).await;
    cut.restore().await;

    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"], "UNAVAILABLE");
    // Once the database is back, the account serves the limit it had.
    let mut shown = Value::Null;
    for _ in 0..100 {
        let (status, body) = json_of(app.get_as("user_outage", "/api/credits/limits").await).await;
        if status == 200 {
            shown = body;
            break;
        }
        assert_eq!(status, 503, "{body}");
    }
    assert_eq!(shown["dailyMicros"], CHAT_MICROS, "{shown}");
    assert_eq!(chat(&app, "user_outage").await.0, 200);
    assert_eq!(chat(&app, "user_outage").await.0, 402);
}
