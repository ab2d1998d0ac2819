//! The payment worker asks before it pays: an attempt whose auto-recharge
//! was switched off, or whose card changed, while Stripe was failing is
//! canceled, never charged once Stripe recovers. An attempt past
//! `recharge.attempt_timeout_s` is looked up on Stripe by its metadata,
//! never created again. Late PaymentIntent events never undo a success.

use serde_json::json;

use super::*;

/// The only attempt's id and recorded PaymentIntent.
async fn attempt_and_payment(stripe: &StripeApp) -> (String, Option<String>) {
    let row = stripe
        .app
        .db
        .client()
        .await
        .query_one(
            "SELECT id::text, payment_intent_id FROM auto_recharge_attempts",
            &[],
        )
        .await
        .expect("one attempt");
    (row.get(0), row.get(1))
}

/// A topped-up account with auto-recharge on (5 EUR, 20 EUR) whose chat
/// took it under the threshold while Stripe answers 500: its attempt is
/// recorded and was tried.
async fn attempt_while_stripe_fails(stripe: &StripeApp, fakes: &Fakes, clerk_id: &str) {
    top_up_saving_the_card(stripe, clerk_id, 1_000).await;
    enable(stripe, clerk_id, 500, 2_000).await;
    stripe.payment_intents.fail(Some(500));
    chat_spend(stripe, fakes, clerk_id, 6_000_000).await;
    until("a call to Stripe, failed", || async { calls(stripe) >= 1 }).await;
}

/// Holds the pending attempt's next try back and waits until no call of it
/// is still on its way to Stripe: what the test changes next is then seen
/// by the worker's check before any further call (a call decided before
/// the change could otherwise reach Stripe after it recovered).
async fn park(stripe: &StripeApp) {
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE auto_recharge_attempts SET next_try_at = now() + interval '1 hour'
              WHERE status = 'PENDING'",
            &[],
        )
        .await
        .expect("the attempt held back");
    let mut seen = calls(stripe);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(500) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = calls(stripe);
        if now != seen {
            seen = now;
            quiet_since = Instant::now();
        }
    }
}

/// Makes the pending attempt due now: its failed calls back off
/// exponentially, and a loaded machine may have let them grow past the
/// test's patience.
async fn due_now(stripe: &StripeApp) {
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE auto_recharge_attempts SET next_try_at = NULL WHERE status = 'PENDING'",
            &[],
        )
        .await
        .expect("the attempt due now");
}

#[actix::test]
async fn switched_off_while_stripe_fails_the_card_is_not_charged_after_recovery_and_the_attempt_is_canceled(
) {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    attempt_while_stripe_fails(&stripe, &fakes, "user_switched").await;
    park(&stripe).await;

    let (status, body) = put_settings(
        &stripe,
        "user_switched",
        &json!({ "enabled": false, "thresholdCents": 500, "amountCents": 2_000 }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        settings_of(&stripe, "user_switched").await["enabled"],
        false
    );
    stripe.payment_intents.fail(None);
    due_now(&stripe).await;

    until("the attempt canceled", || async {
        attempts(&stripe).await == [("CANCELED".to_owned(), Some("disabled".to_owned()))]
    })
    .await;
    assert!(stripe.payment_intents.created().is_empty());
    assert_eq!(
        events_with_reason(&stripe, "auto_recharge.canceled", "disabled").await,
        1
    );

    // The account's actor learned the attempt ended: on again, the next
    // spend under the threshold starts a new one.
    let (canceled, _) = attempt_and_payment(&stripe).await;
    enable(&stripe, "user_switched", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_switched", 100_000).await;
    let created = wait_for_intents(&stripe, 1).await;
    assert_eq!(created.len(), 1);
    assert_ne!(created[0]["metadata"]["attemptId"], canceled.as_str());
}

#[actix::test]
async fn an_attempt_whose_card_changed_is_canceled_and_never_charged_to_the_new_card() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    attempt_while_stripe_fails(&stripe, &fakes, "user_new_card").await;
    park(&stripe).await;

    // Another card saved since (a top-up paid with it).
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE users SET stripe_payment_method_id = 'pm_card_mastercard'
              WHERE clerk_id = 'user_new_card'",
            &[],
        )
        .await
        .expect("new card");
    stripe.payment_intents.fail(None);
    due_now(&stripe).await;

    until("the attempt canceled", || async {
        attempts(&stripe).await == [("CANCELED".to_owned(), Some("card_changed".to_owned()))]
    })
    .await;
    assert!(stripe.payment_intents.created().is_empty());
    assert_eq!(
        events_with_reason(&stripe, "auto_recharge.canceled", "card_changed").await,
        1
    );
}

#[actix::test]
async fn an_attempt_past_its_timeout_is_looked_up_on_stripe_and_adopted_not_created_again() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |s| {
        s.recharge.attempt_timeout_s = 2;
        s.stripe.timeout_ms = 1_000;
    })
    .await;
    top_up_saving_the_card(&stripe, "user_lost_answer", 1_000).await;
    enable(&stripe, "user_lost_answer", 500, 2_000).await;
    // Stripe makes the PaymentIntent, but its answers come too late.
    stripe
        .payment_intents
        .answer_after(Some(Duration::from_millis(2_500)));
    chat_spend(&stripe, &fakes, "user_lost_answer", 6_000_000).await;

    until("the attempt adopted", || async {
        count_of(
            &stripe,
            "SELECT count(*) FROM auto_recharge_attempts WHERE payment_intent_id IS NOT NULL",
        )
        .await
            == 1
    })
    .await;
    let (attempt, payment) = attempt_and_payment(&stripe).await;
    let created = stripe.payment_intents.created();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(payment.as_deref(), created[0]["id"].as_str());
    assert_eq!(
        stripe.payment_intents.searched(),
        [format!("metadata['attemptId']:'{attempt}'")]
    );
    let keys: Vec<Option<String>> = stripe
        .payment_intents
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .collect();
    assert!(
        keys.iter()
            .all(|key| key.as_deref() == Some(attempt.as_str())),
        "every call under the attempt's key: {keys:?}"
    );

    assert_eq!(
        stripe.deliver(&succeeded("evt_adopted", &created[0])).await,
        200
    );
    assert_eq!(attempts(&stripe).await, [("SUCCEEDED".to_owned(), None)]);
    assert_eq!(stripe.balance_micros("user_lost_answer").await, 24_000_000);
}

#[actix::test]
async fn an_attempt_past_its_timeout_that_stripe_never_made_is_canceled_and_the_next_spend_starts_another(
) {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |s| {
        s.recharge.attempt_timeout_s = 1;
        s.stripe.timeout_ms = 500;
    })
    .await;
    attempt_while_stripe_fails(&stripe, &fakes, "user_timed_out").await;

    until("the attempt canceled", || async {
        attempts(&stripe).await == [("CANCELED".to_owned(), Some("timed_out".to_owned()))]
    })
    .await;
    let (canceled, _) = attempt_and_payment(&stripe).await;
    assert_eq!(
        stripe.payment_intents.searched(),
        [format!("metadata['attemptId']:'{canceled}'")]
    );
    assert_eq!(
        events_with_reason(&stripe, "auto_recharge.canceled", "timed_out").await,
        1
    );
    assert_eq!(
        settings_of(&stripe, "user_timed_out").await["enabled"],
        true
    );

    // Stripe back: the canceled attempt is never sent again; the next
    // spend under the threshold is a new attempt, under a new key.
    stripe.payment_intents.fail(None);
    chat_spend(&stripe, &fakes, "user_timed_out", 100_000).await;
    let created = wait_for_intents(&stripe, 1).await;
    assert_eq!(created.len(), 1);
    assert_ne!(created[0]["metadata"]["attemptId"], canceled.as_str());
}

#[actix::test]
async fn a_payment_failed_after_succeeded_leaves_auto_recharge_on_in_postgresql_and_in_memory() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_late_failure", 1_000).await;
    enable(&stripe, "user_late_failure", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_late_failure", 6_000_000).await;
    let intent = wait_for_intents(&stripe, 1).await.remove(0);
    assert_eq!(stripe.deliver(&succeeded("evt_ok", &intent)).await, 200);

    let mut failed = intent.clone();
    failed["status"] = json!("requires_payment_method");
    failed["last_payment_error"] = json!({ "type": "card_error", "code": "card_declined" });
    assert_eq!(
        stripe
            .deliver(&event(
                "evt_late_failure",
                "payment_intent.payment_failed",
                failed
            ))
            .await,
        200
    );

    assert_eq!(attempts(&stripe).await, [("SUCCEEDED".to_owned(), None)]);
    let settings = settings_of(&stripe, "user_late_failure").await;
    assert_eq!(settings["enabled"], true, "{settings}");
    assert_eq!(settings["disabledReason"], json!(null));
    assert_eq!(settings["monthTotalCents"], 2_000);
    // In memory too: spending under the threshold recharges again.
    chat_spend(&stripe, &fakes, "user_late_failure", 20_000_000).await;
    wait_for_intents(&stripe, 2).await;
}
