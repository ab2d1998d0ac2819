//! Money taken back never charges the card again: a refund, a dispute or
//! an operator's debit that takes the balance under the threshold starts
//! nothing (the next chat does, while auto-recharge is on). A dispute and
//! the account's deletion switch auto-recharge off and forget the card; a
//! refunded auto-recharge switches it off until its owner turns it on.

use serde_json::{json, Value};

use super::*;

/// A dispute of the top-up paid by `payment_intent`, as Stripe sends it.
fn dispute(event_id: &str, kind: &str, payment_intent: &str, cents: i64) -> Value {
    event(
        event_id,
        kind,
        json!({
            "id": "dp_auto_1",
            "object": "dispute",
            "amount": cents,
            "charge": "ch_disputed_1",
            "currency": "eur",
            "payment_intent": payment_intent,
            "reason": "fraudulent",
            "status": "needs_response",
        }),
    )
}

/// The stored settings and saved card, read from PostgreSQL (a deleted
/// user's routes answer 401).
async fn stored(stripe: &StripeApp, clerk_id: &str) -> (bool, Option<String>, Option<String>) {
    let row = stripe
        .app
        .db
        .client()
        .await
        .query_one(
            "SELECT s.enabled, s.disabled_reason, u.stripe_payment_method_id
               FROM users u JOIN auto_recharge_settings s ON s.user_id = u.id
              WHERE u.clerk_id = $1",
            &[&clerk_id],
        )
        .await
        .expect("settings");
    (row.get(0), row.get(1), row.get(2))
}

#[actix::test]
async fn a_refunded_top_up_under_the_threshold_charges_nothing_and_the_next_chat_does() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    let session = top_up_saving_the_card(&stripe, "user_refund_topup", 1_000).await;
    enable(&stripe, "user_refund_topup", 500, 2_000).await;

    let refund = event(
        "evt_refund_topup",
        "charge.refunded",
        charge("ch_refund_topup", &format!("pi_{session}"), 1_000, 800),
    );
    assert_eq!(stripe.deliver(&refund).await, 200);
    assert_eq!(stripe.balance_micros("user_refund_topup").await, 2_000_000);
    no_payment_intent_within(&stripe, 0).await;

    // Still on: spending under the threshold recharges.
    assert_eq!(
        settings_of(&stripe, "user_refund_topup").await["enabled"],
        true
    );
    chat_spend(&stripe, &fakes, "user_refund_topup", 100_000).await;
    wait_for_intents(&stripe, 1).await;
}

#[actix::test]
async fn an_operator_debit_under_the_threshold_charges_nothing_and_the_next_chat_does() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_debited", 1_000).await;
    enable(&stripe, "user_debited", 500, 2_000).await;

    let debit = stripe
        .app
        .admin(
            reqwest::Method::POST,
            "/admin/accounts/user_debited/credits",
        )
        .json(&json!({ "amountMicros": -8_000_000, "key": "correction-1", "reason": "correction" }))
        .send()
        .await
        .expect("debit");
    assert!(debit.status().is_success(), "{}", debit.status());
    assert_eq!(stripe.balance_micros("user_debited").await, 2_000_000);
    no_payment_intent_within(&stripe, 0).await;

    chat_spend(&stripe, &fakes, "user_debited", 100_000).await;
    wait_for_intents(&stripe, 1).await;
}

#[actix::test]
async fn a_lost_dispute_charges_nothing_switches_auto_recharge_off_and_forgets_the_card() {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    let session = top_up_saving_the_card(&stripe, "user_lost_dispute", 1_000).await;
    enable(&stripe, "user_lost_dispute", 500, 2_000).await;

    // The funds event alone (its `created` late or lost) is enough.
    let withdrawn = dispute(
        "evt_withdrawn",
        "charge.dispute.funds_withdrawn",
        &format!("pi_{session}"),
        1_000,
    );
    assert_eq!(stripe.deliver(&withdrawn).await, 200);
    assert_eq!(stripe.balance_micros("user_lost_dispute").await, 0);

    let settings = settings_of(&stripe, "user_lost_dispute").await;
    assert_eq!(settings["enabled"], false, "{settings}");
    assert_eq!(settings["disabledReason"], "dispute");
    assert_eq!(settings["hasSavedCard"], false);
    assert_eq!(
        events_with_reason(&stripe, "auto_recharge.disabled", "dispute").await,
        1
    );
    no_payment_intent_within(&stripe, 0).await;
    // Turning it back on needs a card: the disputed one is gone.
    let (status, body) = put_settings(
        &stripe,
        "user_lost_dispute",
        &json!({ "enabled": true, "thresholdCents": 500, "amountCents": 2_000 }),
    )
    .await;
    assert_eq!(status, 409, "{body}");
}

#[actix::test]
async fn an_opened_dispute_switches_auto_recharge_off_before_any_money_moves_so_spending_charges_nothing(
) {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    let session = top_up_saving_the_card(&stripe, "user_disputed", 1_000).await;
    enable(&stripe, "user_disputed", 500, 2_000).await;

    let created = dispute(
        "evt_dispute_created",
        "charge.dispute.created",
        &format!("pi_{session}"),
        1_000,
    );
    assert_eq!(stripe.deliver(&created).await, 200);
    assert_eq!(stripe.balance_micros("user_disputed").await, 10_000_000);
    let settings = settings_of(&stripe, "user_disputed").await;
    assert_eq!(settings["enabled"], false, "{settings}");
    assert_eq!(settings["disabledReason"], "dispute");
    assert_eq!(settings["hasSavedCard"], false);

    // Spending under the threshold now charges nothing.
    chat_spend(&stripe, &fakes, "user_disputed", 6_000_000).await;
    no_payment_intent_within(&stripe, 0).await;
    // A redelivery changes nothing and announces nothing twice.
    assert_eq!(stripe.deliver(&created).await, 200);
    assert_eq!(
        events_with_reason(&stripe, "auto_recharge.disabled", "dispute").await,
        1
    );
}

#[actix::test]
async fn a_refunded_auto_recharge_is_clawed_back_and_switches_auto_recharge_off_until_turned_on_again(
) {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_refunded", 1_000).await;
    enable(&stripe, "user_refunded", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_refunded", 6_000_000).await;
    let intent = wait_for_intents(&stripe, 1).await.remove(0);
    assert_eq!(stripe.deliver(&succeeded("evt_paid", &intent)).await, 200);
    assert_eq!(stripe.balance_micros("user_refunded").await, 24_000_000);

    // Stripe copies the PaymentIntent's metadata to its charge.
    let refunded = event(
        "evt_refunded",
        "charge.refunded",
        json!({
            "id": "ch_auto_1",
            "object": "charge",
            "amount": 2_000,
            "amount_captured": 2_000,
            "amount_refunded": 2_000,
            "currency": "eur",
            "metadata": intent["metadata"],
            "payment_intent": intent["id"],
            "refunded": true,
            "status": "succeeded",
        }),
    );
    assert_eq!(stripe.deliver(&refunded).await, 200);
    assert_eq!(stripe.balance_micros("user_refunded").await, 4_000_000);
    let settings = settings_of(&stripe, "user_refunded").await;
    assert_eq!(settings["enabled"], false, "{settings}");
    assert_eq!(settings["disabledReason"], "refunded");
    assert_eq!(settings["hasSavedCard"], true, "a refund keeps the card");

    // Spending under the threshold charges nothing while it is off...
    chat_spend(&stripe, &fakes, "user_refunded", 100_000).await;
    no_payment_intent_within(&stripe, 1).await;
    // ...and recharges again once its owner turns it on.
    enable(&stripe, "user_refunded", 500, 2_000).await;
    chat_spend(&stripe, &fakes, "user_refunded", 100_000).await;
    wait_for_intents(&stripe, 2).await;
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_deleted_account_has_auto_recharge_off_its_card_forgotten_and_its_pending_attempt_canceled(
) {
    let fakes = fakes().await;
    let stripe = recharge_app(&fakes, |_| {}).await;
    top_up_saving_the_card(&stripe, "user_gone", 1_000).await;
    enable(&stripe, "user_gone", 500, 2_000).await;
    stripe.payment_intents.fail(Some(500));
    chat_spend(&stripe, &fakes, "user_gone", 6_000_000).await;
    until("a call to Stripe, failed", || async { calls(&stripe) >= 1 }).await;

    let deleted = json!({ "object": "event", "type": "user.deleted",
        "data": { "object": "user", "id": "user_gone", "deleted": true } });
    assert_eq!(
        crate::clerk_webhooks::deliver(&stripe.app, "msg_gone", &deleted).await,
        200
    );
    assert_eq!(
        stored(&stripe, "user_gone").await,
        (false, Some("account_deleted".into()), None)
    );

    stripe.payment_intents.fail(None);
    until("the attempt canceled", || async {
        attempts(&stripe).await == [("CANCELED".to_owned(), Some("account_deleted".to_owned()))]
    })
    .await;
    assert!(stripe.payment_intents.created().is_empty());
    assert_eq!(
        count_of(
            &stripe,
            "SELECT count(*) FROM outgoing_events
              WHERE type = 'auto_recharge.canceled' AND data->>'reason' = 'account_deleted'"
        )
        .await,
        1
    );
}
