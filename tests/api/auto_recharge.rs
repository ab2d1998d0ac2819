//! Auto-recharge: the card a top-up saved is charged off session when
//! spending (a chat's usage) takes the available balance under the user's
//! threshold; one attempt at a time, credited once on Stripe's
//! `payment_intent.succeeded`, switched off by a refused card, never past
//! the monthly cap. `safety`: what never charges the card (money taken
//! back, disputes, a deleted account); `worker`: the worker asks before it
//! pays, and looks an old attempt up on Stripe rather than create it again.

mod safety;
mod worker;

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::events::Receiver;
use crate::support::providers::*;
use crate::support::stripe::*;
use crate::support::*;

/// How long a test watches for a charge that must not come.
pub(super) const NOTHING_WITHIN: Duration = Duration::from_secs(5);

/// The app with Stripe and the providers faked, its payment worker polling
/// every few milliseconds, room for many chats at once, Clerk's webhook
/// signed, and prices that make every token cost one micro.
pub(super) async fn recharge_app(
    fakes: &Fakes,
    adjust: impl FnOnce(&mut creditd::config::Settings) + Send + 'static,
) -> StripeApp {
    let anthropic = fakes.anthropic.uri();
    spawn_stripe_app_with(move |s| {
        s.providers.anthropic_base_url = anthropic;
        s.providers.anthropic_api_key = creditd::config::Secret::new(PLATFORM_ANTHROPIC_KEY);
        s.rate_limits.chats_in_flight_per_account = 1_000;
        s.credits.auto_recharge_poll_interval_ms = 10;
        s.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
        s.pricing.usd_per_eur = "1".into();
        s.pricing.margin_bps = 0;
        for price in s.pricing.models.values_mut() {
            price.input_usd = "1".into();
            price.output_usd = "1".into();
            price.cache_read_usd = "1".into();
            price.cache_write_usd = "1".into();
        }
        adjust(s);
    })
    .await
}

/// One chat costing `micros` (its provider reports that many output
/// tokens, a micro each): a usage, the spending auto-recharge watches.
pub(super) async fn chat_spend(stripe: &StripeApp, fakes: &Fakes, clerk_id: &str, micros: u64) {
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("ok", 0, micros, 0, 0)),
        )
        .up_to_n_times(1)
        .mount(&fakes.anthropic)
        .await;
    let (status, body) = json_of(
        stripe
            .app
            .post_as(
                clerk_id,
                "/api/chat",
                &json!({ "messages": conversation(), "maxTokens": 16 }),
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["credits"]["usedMicros"], micros, "{body}");
}

/// Polls `check` until it holds, failing after 15 s with `what`.
pub(super) async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// Watches the Stripe stand-in for `NOTHING_WITHIN`: it must receive no
/// PaymentIntent call past the `before` it had received.
pub(super) async fn no_payment_intent_within(stripe: &StripeApp, before: usize) {
    let deadline = Instant::now() + NOTHING_WITHIN;
    while Instant::now() < deadline {
        let received = stripe.payment_intents.received.lock().unwrap().clone();
        assert_eq!(
            received.len(),
            before,
            "the card was charged: {:?}",
            &received[before.min(received.len())..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every attempt's status and cancel reason, oldest first.
pub(super) async fn attempts(stripe: &StripeApp) -> Vec<(String, Option<String>)> {
    stripe
        .app
        .db
        .client()
        .await
        .query(
            "SELECT status, cancel_reason FROM auto_recharge_attempts ORDER BY created_at",
            &[],
        )
        .await
        .expect("attempts")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// PaymentIntent calls the stand-in received so far.
pub(super) fn calls(stripe: &StripeApp) -> usize {
    stripe.payment_intents.received.lock().unwrap().len()
}

/// A top-up of `cents` through Checkout, paid: it credits the account and,
/// once its follow-up ran, its card (`pm_card_visa`) is saved, as Stripe
/// reports it. Its session id.
pub(super) async fn top_up_saving_the_card(
    stripe: &StripeApp,
    clerk_id: &str,
    cents: i64,
) -> String {
    let account = stripe.app.account(clerk_id).await.0;
    let (status, body) = json_of(
        stripe
            .app
            .post_as(clerk_id, "/api/credits/topup", &json!({ "amount": cents }))
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let session = body["sessionId"].as_str().expect("sessionId").to_owned();
    let (_, form) = stripe
        .sessions
        .received
        .lock()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(
        form.get("payment_intent_data[setup_future_usage]")
            .map(String::as_str),
        Some("off_session"),
        "the top-up must save its card for off-session payments"
    );
    Mock::given(method("GET"))
        .and(path(format!("/v1/payment_intents/pi_{session}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": format!("pi_{session}"), "object": "payment_intent",
            "metadata": { "type": "credit_topup" },
            "payment_method": "pm_card_visa", "status": "succeeded",
        })))
        .mount(&stripe.stripe)
        .await;
    let completed = event(
        &format!("evt_{session}"),
        "checkout.session.completed",
        checkout_session(&session, account, cents, "paid"),
    );
    assert_eq!(stripe.deliver(&completed).await, 200);
    // The card is saved by the top-up's follow-up, after the credit.
    until("the top-up's card is saved", || async {
        settings_of(stripe, clerk_id).await["hasSavedCard"] == json!(true)
    })
    .await;
    session
}

pub(super) async fn settings_of(stripe: &StripeApp, clerk_id: &str) -> Value {
    let (status, body) = json_of(
        stripe
            .app
            .get_as(clerk_id, "/api/credits/auto-recharge")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

pub(super) async fn put_settings(stripe: &StripeApp, clerk_id: &str, body: &Value) -> (u16, Value) {
    let response = stripe
        .app
        .http
        .put(stripe.app.url("/api/credits/auto-recharge"))
        .bearer_auth(stripe.app.token(clerk_id))
        .json(body)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

pub(super) async fn enable(
    stripe: &StripeApp,
    clerk_id: &str,
    threshold_cents: i64,
    amount_cents: i64,
) {
    let (status, body) = put_settings(
        stripe,
        clerk_id,
        &json!({ "enabled": true, "thresholdCents": threshold_cents, "amountCents": amount_cents }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["enabled"], true);
}

pub(super) async fn count_of(stripe: &StripeApp, sql: &str) -> i64 {
    stripe
        .app
        .db
        .client()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

/// Outgoing events of type `kind` recorded with `reason`.
pub(super) async fn events_with_reason(stripe: &StripeApp, kind: &str, reason: &str) -> i64 {
    stripe
        .app
        .db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM outgoing_events WHERE type = $1 AND data->>'reason' = $2",
            &[&kind, &reason],
        )
        .await
        .expect("count")
        .get(0)
}

/// Waits until the fake Stripe has created `n` PaymentIntents and the
/// worker has recorded the last one's outcome.
pub(super) async fn wait_for_intents(stripe: &StripeApp, n: usize) -> Vec<Value> {
    for _ in 0..1_000 {
        let created = stripe.payment_intents.created();
        let settled = count_of(
            stripe,
            "SELECT count(*) FROM auto_recharge_attempts
              WHERE payment_intent_id IS NOT NULL OR status <> 'PENDING'",
        )
        .await;
        if created.len() >= n && settled >= i64::try_from(n).unwrap() {
            return created;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} PaymentIntents, {n} expected",
        stripe.payment_intents.created().len()
    );
}

pub(super) fn succeeded(event_id: &str, intent: &Value) -> Value {
    let mut intent = intent.clone();
    intent["amount_received"] = intent["amount"].clone();
    event(event_id, "payment_intent.succeeded", intent)
}

#[actix::test]
async fn two_hundred_concurrent_chats_crossing_the_threshold_together_create_exactly_one_payment_intent(
) {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            // 5010 micros a chat: the 200 of them spend a little over 1 EUR.
            ResponseTemplate::new(200).set_body_json(anthropic_message("ok", 10, 5_000, 0, 0)),
        )
        .mount(&fakes.anthropic)
        .await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_crowd", 1_000).await;
    enable(&stripe, "user_crowd", 950, 2_000).await;

    let chats = (0..200).map(|i| {
        let app = &stripe.app;
        async move {
            app.post_as(
                "user_crowd",
                "/api/chat",
                &json!({ "messages": conversation(), "maxTokens": 1000, "conversationId": format!("c{i}") }),
            )
            .await
            .status()
            .as_u16()
        }
    });
    let statuses = futures_util::future::join_all(chats).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    let created = wait_for_intents(&stripe, 1).await;
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(
        count_of(
            &stripe,
            "SELECT count(*) FROM outgoing_events WHERE type = 'auto_recharge.requested'"
        )
        .await,
        1
    );
    let received = stripe.payment_intents.received.lock().unwrap().clone();
    let (key, form) = &received[0];
    let account = stripe.app.account("user_crowd").await.0;
    assert_eq!(form["amount"], "2000");
    assert_eq!(form["currency"], "eur");
    assert_eq!(form["confirm"], "true");
    assert_eq!(form["off_session"], "true");
    assert_eq!(form["customer"], "cus_test_1");
    assert_eq!(form["payment_method"], "pm_card_visa");
    assert_eq!(form["metadata[userId]"], account.to_string());
    assert_eq!(
        key.as_deref(),
        form.get("metadata[attemptId]").map(String::as_str)
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_succeeded_payment_credits_once_even_when_its_webhook_is_replayed() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_paid", 1_000).await;
    enable(&stripe, "user_paid", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_paid", 6_000_000).await;
    let intent = wait_for_intents(&stripe, 1).await.remove(0);
    assert_eq!(stripe.balance_micros("user_paid").await, 4_000_000);

    let first = succeeded("evt_pi_1", &intent);
    assert_eq!(stripe.deliver(&first).await, 200);
    assert_eq!(stripe.deliver(&first).await, 200);
    // Stripe may also send the same change under another event id.
    assert_eq!(
        stripe.deliver(&succeeded("evt_pi_1_again", &intent)).await,
        200
    );

    assert_eq!(stripe.balance_micros("user_paid").await, 24_000_000);
    let credits = stripe.transactions("TOP_UP").await;
    let paid: Vec<_> = credits
        .iter()
        .filter(|(_, key)| key.starts_with("stripe:payment_intent:"))
        .collect();
    assert_eq!(paid.len(), 1, "{credits:?}");
    assert_eq!(paid[0].0, 20_000_000);
    assert_eq!(
        count_of(
            &stripe,
            "SELECT count(*) FROM outgoing_events WHERE type = 'auto_recharge.succeeded'"
        )
        .await,
        1
    );
    let settings = settings_of(&stripe, "user_paid").await;
    assert_eq!(settings["monthTotalCents"], 2_000);
    assert_eq!(settings["enabled"], true);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_declined_card_credits_nothing_and_switches_auto_recharge_off_announcing_why() {
    let fakes = fakes().await;
    let (receiver_server, receiver) = Receiver::start(0).await;
    let uri = receiver_server.uri();
    let stripe = recharge_app(&fakes, move |s| {
        s.events.webhook_url = format!("{uri}/events");
        s.events.signing_secret = creditd::config::Secret::new(crate::events::SIGNING_SECRET);
        s.events.retry_ms_base = 5;
        s.events.retry_ms_max = 40;
        s.events.poll_interval_ms = 10;
    })
    .await;
    stripe.payment_intents.refuse(Some("card_declined"));
    top_up_saving_the_card(&stripe, "user_declined", 1_000).await;
    enable(&stripe, "user_declined", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_declined", 6_000_000).await;

    wait_for_intents(&stripe, 1).await;
    let settings = settings_of(&stripe, "user_declined").await;
    assert_eq!(settings["enabled"], false, "{settings}");
    assert_eq!(settings["disabledReason"], "card_declined");
    assert_eq!(settings["monthTotalCents"], 0);
    assert_eq!(stripe.balance_micros("user_declined").await, 4_000_000);

    for _ in 0..1_000 {
        let kinds: Vec<String> = receiver.accepted().into_iter().map(|d| d.kind).collect();
        if kinds.contains(&"auto_recharge.disabled".to_owned()) {
            let failed = kinds.iter().position(|k| k == "auto_recharge.failed");
            let disabled = kinds.iter().position(|k| k == "auto_recharge.disabled");
            assert!(failed.is_some() && failed < disabled, "{kinds:?}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let kinds: Vec<String> = receiver.accepted().into_iter().map(|d| d.kind).collect();
    assert!(
        kinds.contains(&"auto_recharge.disabled".to_owned()),
        "{kinds:?}"
    );

    // Off: a further fall starts nothing.
    chat_spend(&stripe, &fakes, "user_declined", 1_000_000).await;
    assert_eq!(
        count_of(
            &stripe,
            "SELECT count(*) FROM outgoing_events WHERE type = 'auto_recharge.requested'"
        )
        .await,
        1
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_bank_asking_for_authentication_switches_auto_recharge_off_with_that_reason() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    stripe
        .payment_intents
        .refuse(Some("authentication_required"));
    top_up_saving_the_card(&stripe, "user_3ds", 1_000).await;
    enable(&stripe, "user_3ds", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_3ds", 6_000_000).await;
    wait_for_intents(&stripe, 1).await;
    let settings = settings_of(&stripe, "user_3ds").await;
    assert_eq!(settings["enabled"], false, "{settings}");
    assert_eq!(settings["disabledReason"], "authentication_required");
}

#[actix::test]
async fn repeated_crossings_never_charge_past_the_monthly_cap() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |s| {
        s.credits.auto_recharge_monthly_cents_max = 5_000;
    })
    .await;
    top_up_saving_the_card(&stripe, "user_capped", 1_000).await;
    enable(&stripe, "user_capped", 500, 2_000).await;

    let mut paid = 0;
    for round in 0..4 {
        // Down to 1 EUR (under the 5 EUR threshold), or 10 cents lower
        // when already there: a fall under the threshold either way.
        let balance = stripe.balance_micros("user_capped").await;
        let down = u64::try_from((balance - 1_000_000).max(100_000)).unwrap();
        chat_spend(&stripe, &fakes, "user_capped", down).await;
        let requested = count_of(
            &stripe,
            "SELECT count(*) FROM outgoing_events WHERE type = 'auto_recharge.requested'",
        )
        .await;
        if requested > paid {
            let intents = wait_for_intents(&stripe, usize::try_from(requested).unwrap()).await;
            let intent = intents.last().unwrap();
            assert_eq!(
                stripe
                    .deliver(&succeeded(&format!("evt_cap_{round}"), intent))
                    .await,
                200
            );
            paid = requested;
            assert_eq!(stripe.balance_micros("user_capped").await, 21_000_000);
        }
    }
    assert_eq!(
        paid, 2,
        "two recharges of 20 EUR fit under 50 EUR, a third does not"
    );
    assert_eq!(stripe.payment_intents.created().len(), 2);
    assert_eq!(stripe.payment_intents.received.lock().unwrap().len(), 2);
    let settings = settings_of(&stripe, "user_capped").await;
    assert_eq!(settings["monthTotalCents"], 4_000);
    assert_eq!(settings["enabled"], true);
}

#[actix::test]
async fn the_settings_are_refused_by_field_and_enabling_needs_a_saved_card() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    let (status, body) = put_settings(
        &stripe,
        "user_nocard",
        &json!({ "enabled": true, "thresholdCents": 500, "amountCents": 2_000 }),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("saved card"),
        "{body}"
    );
    for (field, request) in [
        (
            "amountCents",
            json!({ "enabled": false, "thresholdCents": 500, "amountCents": 100 }),
        ),
        (
            "amountCents",
            json!({ "enabled": false, "thresholdCents": 500, "amountCents": 50_001 }),
        ),
        (
            "thresholdCents",
            json!({ "enabled": false, "thresholdCents": 0, "amountCents": 2_000 }),
        ),
        (
            "thresholdCents",
            json!({ "enabled": false, "thresholdCents": 10_001, "amountCents": 2_000 }),
        ),
        (
            "enabled",
            json!({ "thresholdCents": 500, "amountCents": 2_000 }),
        ),
    ] {
        let (status, body) = put_settings(&stripe, "user_nocard", &request).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(field),
            "{field}: {body}"
        );
    }
    let settings = settings_of(&stripe, "user_nocard").await;
    assert_eq!(settings["enabled"], false);
    assert_eq!(settings["hasSavedCard"], false);
}

/// Waits until no account actor is resident (each passivated: the next
/// operation loads its account from PostgreSQL).
async fn wait_until_passivated(stripe: &StripeApp) {
    for _ in 0..1_000 {
        let metrics = stripe
            .app
            .http
            .get(stripe.app.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        if metrics
            .lines()
            .any(|line| line == "creditd_account_actors_resident 0")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the account actors never passivated");
}

#[actix::test]
async fn an_account_reloaded_from_postgresql_keeps_its_attempt_in_flight_and_starts_the_next_only_after_it_ended(
) {
    let fakes = fakes().await;
    // Passivated after 20 ms, the account reloads for almost every request,
    // each load taking one of the pool's four connections beside the
    // workers polling every 10 ms: the pool waits long enough for them on
    // a loaded machine; what is under test is the attempt in flight.
    let stripe = recharge_app(&fakes, |s| {
        s.engine.idle_timeout_ms = 20;
        s.database.pool_wait_timeout_ms = 10_000;
    })
    .await;
    top_up_saving_the_card(&stripe, "user_reloaded", 1_000).await;
    enable(&stripe, "user_reloaded", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_reloaded", 6_000_000).await;
    let intent = wait_for_intents(&stripe, 1).await.remove(0);
    let requested = "SELECT count(*) FROM outgoing_events WHERE type = 'auto_recharge.requested'";

    wait_until_passivated(&stripe).await;
    chat_spend(&stripe, &fakes, "user_reloaded", 100_000).await;
    assert_eq!(
        count_of(&stripe, requested).await,
        1,
        "one attempt in flight"
    );

    assert_eq!(stripe.deliver(&succeeded("evt_paid", &intent)).await, 200);
    wait_until_passivated(&stripe).await;
    chat_spend(&stripe, &fakes, "user_reloaded", 20_000_000).await;
    assert_eq!(
        count_of(&stripe, requested).await,
        2,
        "the next one, once it ended"
    );
    wait_for_intents(&stripe, 2).await;
}
