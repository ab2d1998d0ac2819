//! `charge.dispute.*`: withdrawn funds are debited once, reinstated funds
//! credited back once.

use futures_util::future::join_all;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use super::*;
use crate::support::stripe::*;

fn dispute_object(id: &str, payment_intent: &str, amount: i64, status: &str) -> Value {
    json!({
        "id": id,
        "object": "dispute",
        "amount": amount,
        "charge": format!("ch_{id}"),
        "currency": "eur",
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": status,
    })
}

fn dispute_event(
    event_id: &str,
    kind: &str,
    id: &str,
    payment_intent: &str,
    status: &str,
) -> Value {
    event(
        event_id,
        kind,
        dispute_object(id, payment_intent, 3000, status),
    )
}

/// Delivers `event` once, then 20 times concurrently, then under a new event id.
async fn deliver_many_times(stripe: &StripeApp, event: &Value) -> Vec<u16> {
    let mut statuses = vec![stripe.deliver(event).await];
    statuses.extend(join_all((0..20).map(|_| stripe.deliver(event))).await);
    let mut resent = event.clone();
    resent["id"] = json!(format!("{}_resent", event["id"].as_str().unwrap()));
    statuses.push(stripe.deliver(&resent).await);
    statuses
}

#[actix::test]
async fn a_dispute_is_debited_once_when_funds_are_withdrawn_and_credited_back_once_when_reinstated()
{
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_dispute", "cs_dispute", 3000).await;
    let pi = "pi_cs_dispute";

    let created = dispute_event(
        "evt_dp_created",
        "charge.dispute.created",
        "dp_1",
        pi,
        "needs_response",
    );
    assert!(deliver_many_times(&stripe, &created)
        .await
        .iter()
        .all(|&s| s == 200));
    assert_eq!(
        stripe.balance_micros("user_dispute").await,
        30_000_000,
        "no funds left yet, no credits either"
    );

    let withdrawn = dispute_event(
        "evt_dp_withdrawn",
        "charge.dispute.funds_withdrawn",
        "dp_1",
        pi,
        "needs_response",
    );
    let statuses = deliver_many_times(&stripe, &withdrawn).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_dispute").await, 0);

    let won = dispute_event("evt_dp_closed", "charge.dispute.closed", "dp_1", pi, "won");
    assert!(deliver_many_times(&stripe, &won)
        .await
        .iter()
        .all(|&s| s == 200));
    let reinstated = dispute_event(
        "evt_dp_reinstated",
        "charge.dispute.funds_reinstated",
        "dp_1",
        pi,
        "won",
    );
    let statuses = deliver_many_times(&stripe, &reinstated).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    assert_eq!(stripe.balance_micros("user_dispute").await, 30_000_000);
    assert_eq!(
        stripe.transactions("DISPUTE").await,
        vec![
            (30_000_000, "stripe:dispute:dp_1".to_owned()),
            (30_000_000, "stripe:dispute:dp_1:reinstated".to_owned()),
        ]
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_inquiry_moves_no_credits_however_often_it_is_delivered() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_inquiry", "cs_inquiry", 3000).await;
    let pi = "pi_cs_inquiry";

    for (id, kind, status) in [
        (
            "evt_inq_created",
            "charge.dispute.created",
            "warning_needs_response",
        ),
        (
            "evt_inq_funds",
            "charge.dispute.funds_withdrawn",
            "warning_under_review",
        ),
        ("evt_inq_closed", "charge.dispute.closed", "warning_closed"),
    ] {
        let statuses =
            deliver_many_times(&stripe, &dispute_event(id, kind, "dp_inq", pi, status)).await;
        assert!(statuses.iter().all(|&s| s == 200), "{kind}: {statuses:?}");
    }

    assert_eq!(stripe.balance_micros("user_inquiry").await, 30_000_000);
    assert!(stripe.transactions("DISPUTE").await.is_empty());
    stripe.app.db.reconcile_is_clean().await;
}

/// `GET /v1/payment_intents/{id}` answering `metadata`.
async fn mount_payment_intent(stripe: &StripeApp, id: &str, metadata: Value) {
    Mock::given(method("GET"))
        .and(path(format!("/v1/payment_intents/{id}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": id, "object": "payment_intent", "metadata": metadata,
        })))
        .mount(&stripe.stripe)
        .await;
}

#[actix::test]
async fn a_dispute_before_its_top_up_credit_answers_503_then_applies_once_after_the_credit() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_early_dispute").await.0;
    let pi = "pi_cs_early_dispute";
    mount_payment_intent(&stripe, pi, json!({ "type": "credit_topup" })).await;
    mount_payment_intent(&stripe, "pi_subscription", json!({})).await;
    let withdrawn = dispute_event(
        "evt_early_dp",
        "charge.dispute.funds_withdrawn",
        "dp_early",
        pi,
        "needs_response",
    );

    let early = stripe.deliver(&withdrawn).await;
    let not_a_top_up = stripe
        .deliver(&dispute_event(
            "evt_sub_dp",
            "charge.dispute.funds_withdrawn",
            "dp_sub",
            "pi_subscription",
            "needs_response",
        ))
        .await;

    assert_eq!(early, 503, "Stripe must retry it");
    assert_eq!(not_a_top_up, 200);
    assert_eq!(stripe.recorded_events().await, 1);
    let status = stripe
        .deliver(&event(
            "evt_cs_early_dispute",
            "checkout.session.completed",
            checkout_session("cs_early_dispute", account, 3000, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    let statuses = deliver_many_times(&stripe, &withdrawn).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_early_dispute").await, 0);
    assert_eq!(stripe.transactions("DISPUTE").await.len(), 1);
    stripe.app.db.reconcile_is_clean().await;
}
