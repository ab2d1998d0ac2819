//! `POST /api/credits/topup`: Checkout Sessions opened on the local Stripe
//! API, with their limits, idempotency and Stripe's errors.

use futures_util::future::join_all;
use serde_json::json;
use std::sync::atomic::Ordering;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer};

use crate::support::stripe::*;
use crate::support::*;

#[actix::test]
async fn a_top_up_opens_a_checkout_session_in_payment_mode_with_the_amount_and_metadata() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_topup").await.0;

    let (status, body) = json_of(
        stripe
            .app
            .post_as(
                "user_topup",
                "/api/credits/topup",
                &json!({ "amount": 1000 }),
            )
            .await,
    )
    .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessionId"], "cs_test_1");
    assert_eq!(body["url"], "https://checkout.stripe.com/c/pay/cs_test_1");
    let received = stripe.sessions.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (key, fields) = &received[0];
    let field = |name: &str| fields.get(name).map(String::as_str);
    assert!(
        key.as_deref()
            .is_some_and(|k| k.starts_with(&format!("creditd-topup-{account}-1000-"))),
        "{key:?}"
    );
    assert_eq!(field("mode"), Some("payment"));
    assert_eq!(field("customer"), Some("cus_test_1"));
    assert_eq!(
        field("client_reference_id"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("line_items[0][quantity]"), Some("1"));
    assert_eq!(field("line_items[0][price_data][currency]"), Some("eur"));
    assert_eq!(
        field("line_items[0][price_data][unit_amount]"),
        Some("1000")
    );
    assert_eq!(
        field("line_items[0][price_data][product_data][name]"),
        Some("AppForge Credits")
    );
    assert_eq!(
        field("line_items[0][price_data][product_data][description]"),
        Some("10.00€ de crédits AI")
    );
    assert_eq!(field("metadata[type]"), Some("credit_topup"));
    assert_eq!(
        field("metadata[userId]"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("metadata[amountCents]"), Some("1000"));
    assert_eq!(
        field("payment_intent_data[metadata][type]"),
        Some("credit_topup")
    );
    assert_eq!(
        field("payment_intent_data[metadata][userId]"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("invoice_creation[enabled]"), Some("true"));
    assert_eq!(
        field("success_url"),
        Some("http://localhost:3000/billing?topup=success")
    );
    assert_eq!(
        field("cancel_url"),
        Some("http://localhost:3000/billing?topup=canceled")
    );
    let client = stripe.app.db.client().await;
    let stored: Option<String> = client
        .query_one(
            "SELECT stripe_customer_id FROM users WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored.as_deref(), Some("cus_test_1"));
    assert_eq!(
        stripe.balance_micros("user_topup").await,
        0,
        "nothing is credited before payment"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn top_ups_outside_the_limits_or_with_a_bad_body_get_400_and_no_stripe_call() {
    let stripe = spawn_stripe_app().await;
    let cases = [
        (json!({ "amount": 499 }), "Minimum top-up is 5€"),
        (json!({ "amount": 0 }), "Minimum top-up is 5€"),
        (json!({ "amount": -1000 }), "Minimum top-up is 5€"),
        (json!({ "amount": 100_001 }), "Maximum top-up is 1000€"),
        (json!({ "amount": "1000" }), "field `amount`"),
        (json!({ "amount": 10.5 }), "field `amount`"),
        (json!({ "amount": null }), "field `amount`"),
        (json!({}), "amount"),
        (json!([1000]), "request body"),
    ];

    for (body, message) in cases {
        let (status, answer) = json_of(
            stripe
                .app
                .post_as("user_limits", "/api/credits/topup", &body)
                .await,
        )
        .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "INVALID_REQUEST");
        assert!(
            answer["message"].as_str().unwrap().contains(message),
            "{body} -> {answer}"
        );
    }
    let not_json = stripe
        .app
        .http
        .post(stripe.app.url("/api/credits/topup"))
        .bearer_auth(stripe.app.token("user_limits"))
        .body("amount=1000")
        .send()
        .await
        .unwrap();

    assert_eq!(not_json.status(), 400);
    assert_eq!(stripe.stripe.received_requests().await.unwrap().len(), 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_limits_themselves_are_accepted() {
    let stripe = spawn_stripe_app().await;

    for amount in [500, 100_000] {
        let (status, body) = json_of(
            stripe
                .app
                .post_as(
                    "user_edges",
                    "/api/credits/topup",
                    &json!({ "amount": amount }),
                )
                .await,
        )
        .await;
        assert_eq!(status, 200, "{amount}: {body}");
    }
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn concurrent_first_top_ups_create_one_stripe_customer() {
    let stripe = spawn_stripe_app_with(|s| s.rate_limits.topups_per_minute = 10).await;
    let account = stripe.app.account("user_race").await.0;

    let answers = join_all((0..10).map(|i| {
        let app = &stripe.app;
        async move {
            json_of(
                app.post_as(
                    "user_race",
                    "/api/credits/topup",
                    &json!({ "amount": 500 + i }),
                )
                .await,
            )
            .await
        }
    }))
    .await;

    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(stripe.customers.created.load(Ordering::SeqCst), 1);
    let customers: Vec<String> = stripe
        .sessions
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, fields)| fields["customer"].clone())
        .collect();
    assert_eq!(customers.len(), 10);
    assert!(customers.iter().all(|c| c == "cus_test_1"), "{customers:?}");
    let keys: Vec<String> = stripe
        .stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/v1/customers")
        .filter_map(idempotency_key)
        .collect();
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| *k == format!("creditd-customer-{account}")),
        "{keys:?}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_double_click_reuses_the_idempotency_key_of_the_first_session() {
    let stripe = spawn_stripe_app().await;

    for _ in 0..2 {
        let (status, _) = json_of(
            stripe
                .app
                .post_as(
                    "user_double",
                    "/api/credits/topup",
                    &json!({ "amount": 2500 }),
                )
                .await,
        )
        .await;
        assert_eq!(status, 200);
    }

    let keys: Vec<Option<String>> = stripe
        .sessions
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .collect();
    assert_eq!(keys.len(), 2);
    // Two clicks straddling a window boundary legitimately differ; two
    // clicks inside one window share the key Stripe deduplicates on.
    let window = |key: &Option<String>| {
        key.as_deref()
            .and_then(|k| k.rsplit('-').next())
            .map(str::to_owned)
    };
    if window(&keys[0]) == window(&keys[1]) {
        assert_eq!(keys[0], keys[1]);
    }
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn fifty_concurrent_top_ups_of_one_account_with_a_limit_of_5_per_minute_open_5_sessions() {
    let stripe = spawn_stripe_app_with(|s| s.rate_limits.topups_per_minute = 5).await;

    let bodies: Vec<_> = (0..50).map(|i| json!({ "amount": 500 + i })).collect();
    let answers = join_all(bodies.iter().map(|body| {
        stripe
            .app
            .post_as("user_card_testing", "/api/credits/topup", body)
    }))
    .await;
    let other = stripe
        .app
        .post_as(
            "user_honest",
            "/api/credits/topup",
            &json!({ "amount": 500 }),
        )
        .await
        .status();

    let mut opened = 0;
    let mut refused = 0;
    for answer in answers {
        match answer.status().as_u16() {
            200 => opened += 1,
            429 => {
                let retry_after = answer
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(
                    retry_after.is_some_and(|s| (1..=60).contains(&s)),
                    "{retry_after:?}"
                );
                let (_, body) = json_of(answer).await;
                assert_eq!(body["error"], "RATE_LIMITED");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((opened, refused), (5, 45));
    assert_eq!(other, 200, "the limit is per account");
    assert_eq!(stripe.sessions.received.lock().unwrap().len(), 6);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stripe_error_answers_a_clear_error_and_stores_no_customer() {
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(stripe_error(401, "Invalid API Key provided: sk_test_***"))
        .mount(&stripe)
        .await;
    let uri = stripe.uri();
    let app = spawn_app_with(move |settings| {
        settings.stripe.secret_key = creditd::config::Secret::new(SECRET_KEY);
        settings.stripe.api_base = uri;
    })
    .await;

    let (status, body) = json_of(
        app.post_as("user_err", "/api/credits/topup", &json!({ "amount": 1000 }))
            .await,
    )
    .await;

    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("payment provider refused"),
        "{body}"
    );
    let client = app.db.client().await;
    let stored: Option<String> = client
        .query_one(
            "SELECT stripe_customer_id FROM users WHERE clerk_id = 'user_err'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, None);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn top_ups_and_webhooks_answer_503_when_stripe_is_not_configured() {
    let app = spawn_app().await;

    let (topup, topup_body) = json_of(
        app.post_as("user_off", "/api/credits/topup", &json!({ "amount": 1000 }))
            .await,
    )
    .await;
    let webhook = app
        .http
        .post(app.url("/api/webhooks/stripe"))
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(topup, 503, "{topup_body}");
    assert!(topup_body["message"]
        .as_str()
        .unwrap()
        .contains("stripe.secret_key"));
    assert_eq!(webhook.status(), 503);
    let (_, webhook_body) = json_of(webhook).await;
    assert!(webhook_body["message"]
        .as_str()
        .unwrap()
        .contains("stripe.webhook_secret"));
    app.db.reconcile_is_clean().await;
}
