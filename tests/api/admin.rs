//! Operator routes: credits and debits by Clerk id, the account view and
//! the reconcile report; bad bodies are refused by field, with nothing written.

use reqwest::Method;
use serde_json::json;

use crate::support::*;

async fn adjust(app: &TestApp, user: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let response = app
        .admin(Method::POST, &format!("/admin/accounts/{user}/credits"))
        .json(&body)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

async fn transaction_count(app: &TestApp) -> i64 {
    app.db
        .client()
        .await
        .query_one("SELECT count(*) FROM credit_transactions", &[])
        .await
        .expect("count")
        .get(0)
}

#[actix::test]
async fn an_admin_credit_to_an_unseen_user_creates_the_user_and_credits_once_per_key() {
    let app = spawn_app().await;
    let body =
        json!({"amountMicros": 5_000_000, "key": "goodwill-1", "reason": "support goodwill"});

    let (first_status, first) = adjust(&app, "user_unseen", body.clone()).await;
    let (again_status, again) = adjust(&app, "user_unseen", body).await;
    let (_, view) = json_of(app.get_as("user_unseen", "/api/credits").await).await;

    assert_eq!(first_status, 201, "{first}");
    assert_eq!(first["transaction"]["type"], "ADJUSTMENT");
    assert_eq!(first["balanceMicros"], 5_000_000);
    assert_eq!(again_status, 200, "{again}");
    assert_eq!(again["replayed"], true);
    assert_eq!(again["transaction"], first["transaction"]);
    assert_eq!(view["balanceMicros"], 5_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_same_admin_key_with_another_amount_is_a_conflict() {
    let app = spawn_app().await;
    adjust(
        &app,
        "user_k",
        json!({"amountMicros": 1_000_000, "key": "k1", "reason": "one"}),
    )
    .await;

    let (status, body) = adjust(
        &app,
        "user_k",
        json!({"amountMicros": 2_000_000, "key": "k1", "reason": "two"}),
    )
    .await;

    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "CONFLICT");
    assert_eq!(transaction_count(&app).await, 1);
}

#[actix::test]
async fn a_negative_admin_amount_debits_and_may_leave_debt() {
    let app = spawn_app().await;
    adjust(
        &app,
        "user_d",
        json!({"amountMicros": 1_000_000, "key": "in", "reason": "in"}),
    )
    .await;

    let (status, body) = adjust(
        &app,
        "user_d",
        json!({"amountMicros": -3_000_000, "key": "out", "reason": "chargeback"}),
    )
    .await;

    assert_eq!(status, 201, "{body}");
    assert_eq!(body["transaction"]["direction"], "DEBIT");
    assert_eq!(body["transaction"]["amountMicros"], 3_000_000);
    assert_eq!(body["balanceMicros"], -2_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_promo_bonus_is_recorded_with_its_type() {
    let app = spawn_app().await;
    let (status, body) = adjust(
        &app,
        "user_p",
        json!({"amountMicros": 2_500_000, "key": "promo-nov", "reason": "November promo", "type": "PROMO_BONUS"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["transaction"]["type"], "PROMO_BONUS");
}

#[actix::test]
async fn bad_admin_bodies_are_refused_naming_the_field_and_write_nothing() {
    let app = spawn_app().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("malformed JSON", b"{\"amountMicros\": 5,".to_vec()),
        (
            "amountMicros",
            br#"{"amountMicros": "5", "key": "k", "reason": "r"}"#.to_vec(),
        ),
        (
            "amountMicros",
            br#"{"amountMicros": 1.5, "key": "k", "reason": "r"}"#.to_vec(),
        ),
        (
            "amountMicros",
            br#"{"amountMicros": 99999999999999999999, "key": "k", "reason": "r"}"#.to_vec(),
        ),
        (
            "amountMicros",
            br#"{"amountMicros": 0, "key": "k", "reason": "r"}"#.to_vec(),
        ),
        ("key", br#"{"amountMicros": 5, "reason": "r"}"#.to_vec()),
        (
            "key",
            br#"{"amountMicros": 5, "key": "has space", "reason": "r"}"#.to_vec(),
        ),
        (
            "reason",
            br#"{"amountMicros": 5, "key": "k", "reason": "  "}"#.to_vec(),
        ),
        (
            "type",
            br#"{"amountMicros": 5, "key": "k", "reason": "r", "type": "TOP_UP"}"#.to_vec(),
        ),
        (
            "type",
            br#"{"amountMicros": -5, "key": "k", "reason": "r", "type": "PROMO_BONUS"}"#.to_vec(),
        ),
        (
            "surprise",
            br#"{"amountMicros": 5, "key": "k", "reason": "r", "surprise": 1}"#.to_vec(),
        ),
        ("JSON object", Vec::new()),
        ("JSON object", b"[1, 2]".to_vec()),
    ];
    for (field, body) in cases {
        let response = app
            .admin(Method::POST, "/admin/accounts/user_bad/credits")
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("request");
        let (status, answer) = json_of(response).await;
        let shown = String::from_utf8_lossy(&body);
        assert_eq!(status, 400, "{shown}: {answer}");
        assert_eq!(answer["error"], "INVALID_REQUEST", "{shown}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(field),
            "{shown}: `{message}` should name {field}"
        );
    }
    assert_eq!(transaction_count(&app).await, 0);
}

#[actix::test]
async fn a_body_over_the_size_limit_is_refused_with_413() {
    let app = spawn_app_with(|settings| settings.server.body_limit_bytes = 1024).await;
    let reason = "x".repeat(4096);
    let (status, body) = adjust(
        &app,
        "user_big",
        json!({"amountMicros": 5, "key": "k", "reason": reason}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "PAYLOAD_TOO_LARGE");
    assert_eq!(transaction_count(&app).await, 0);
}

#[actix::test]
async fn the_account_view_shows_amounts_first_then_holds_plan_and_entries() {
    let app = spawn_app().await;
    adjust(
        &app,
        "user_v",
        json!({"amountMicros": 7_000_000, "key": "v1", "reason": "seed"}),
    )
    .await;

    let response = app
        .admin(Method::GET, "/admin/accounts/user_v")
        .send()
        .await
        .expect("request");
    let (status, body) = json_of(response).await;
    let missing = app
        .admin(Method::GET, "/admin/accounts/user_nobody")
        .send()
        .await
        .expect("request");

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["balanceMicros"], 7_000_000);
    assert_eq!(body["heldMicros"], 0);
    assert_eq!(body["availableMicros"], 7_000_000);
    assert_eq!(body["plan"], "FREE");
    assert_eq!(body["holds"], json!([]));
    assert_eq!(body["grants"].as_array().map(Vec::len), Some(1));
    assert_eq!(body["grants"][0]["kind"], "PROMO");
    assert_eq!(body["grants"][0]["remainingMicros"], 7_000_000);
    assert_eq!(body["transactions"].as_array().map(Vec::len), Some(1));
    assert_eq!(missing.status().as_u16(), 404);
}

#[actix::test]
async fn the_reconcile_report_is_clean_after_traffic() {
    let app = spawn_app().await;
    for index in 0..5 {
        let (adjusted, body) = adjust(
            &app,
            &format!("user_r{index}"),
            json!({"amountMicros": 1_000_000 + index, "key": format!("r{index}"), "reason": "seed"}),
        )
        .await;
        assert_eq!(adjusted, 201, "{body}");
        let claimed = app
            .post_as(
                &format!("user_r{index}"),
                "/api/credits/claim-bonus",
                &json!({}),
            )
            .await;
        assert_eq!(claimed.status(), 201, "user_r{index}'s bonus");
    }
    let response = app
        .admin(Method::GET, "/admin/reconcile")
        .send()
        .await
        .expect("request");
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["clean"], true, "{body}");
    assert_eq!(body["accountsChecked"], 5);
    assert_eq!(transaction_count(&app).await, 10, "the traffic was written");
}

#[actix::test]
async fn the_platform_view_counts_the_last_hours_chats_spend_top_ups_and_refunds_and_nothing_older()
{
    use creditd::ledger::{HoldId, TransactionType, UsageCharge};
    let app = spawn_app().await;
    // Another instance on the same database: the view reads the journal,
    // not this instance's memory.
    let engine = app.db.engine_as(&app.settings, "instance-b");
    let account = app.account("user_last_hour").await;
    for (key, kind, amount) in [
        ("hour-top-up-1", TransactionType::TopUp, 5_000_000),
        ("hour-top-up-2", TransactionType::TopUp, 2_500_000),
        ("hour-old-top-up", TransactionType::TopUp, 9_000_000),
    ] {
        engine
            .credit(account, posting(key, kind, micros(amount)))
            .await
            .expect("credited");
    }
    engine
        .debit(
            account,
            posting("hour-refund", TransactionType::Refund, micros(1_000_000)),
        )
        .await
        .expect("refunded");
    for cost in [120_000, 80_000] {
        let hold = HoldId::generate();
        engine
            .admit(account, hold, micros(cost))
            .await
            .expect("held");
        let charge = UsageCharge {
            model: "claude-sonnet-4-5".into(),
            tokens: creditd::pricing::TokenUsage {
                input_tokens: 10,
                output_tokens: 10,
                cache_read_tokens: 0,
                cache_write_tokens: 0,
            },
            cost: micros(cost),
            conversation_id: None,
            message_id: None,
            api_key: None,
        };
        engine.settle(account, hold, charge).await.expect("settled");
    }
    // One top-up from two hours ago is not the last hour's.
    app.db
        .client()
        .await
        .execute(
            "UPDATE credit_transactions SET created_at = now() - interval '2 hours'
              WHERE idempotency_key = 'hour-old-top-up'",
            &[],
        )
        .await
        .expect("aged");

    let (status, view) = json_of(
        app.admin(Method::GET, "/admin/platform")
            .send()
            .await
            .unwrap(),
    )
    .await;

    assert_eq!(status, 200, "{view}");
    assert_eq!(
        view["lastHour"],
        json!({
            "chats": 2, "spendMicros": 200_000,
            "topUps": 2, "topUpMicros": 7_500_000,
            "refunds": 1, "refundMicros": 1_000_000,
        })
    );
}
