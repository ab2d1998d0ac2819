//! `checkout.session.*` webhooks: a paid top-up is credited exactly once.

use futures_util::future::join_all;
use serde_json::json;

use crate::support::stripe::*;

#[actix::test]
async fn fifty_concurrent_deliveries_of_a_paid_checkout_credit_once() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_fifty").await.0;
    let completed = event(
        "evt_fifty",
        "checkout.session.completed",
        checkout_session("cs_fifty", account, 2000, "paid"),
    );

    let statuses = join_all((0..50).map(|_| stripe.deliver(&completed))).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_fifty").await, 20_000_000);
    let topups = stripe.transactions("TOP_UP").await;
    assert_eq!(
        topups,
        vec![(20_000_000, "stripe:checkout:cs_fifty".to_owned())]
    );
    let client = stripe.app.db.client().await;
    let row = client
        .query_one(
            "SELECT stripe_session_id, stripe_payment_id FROM credit_transactions WHERE type = 'TOP_UP'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("cs_fifty"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("pi_cs_fifty")
    );
    assert_eq!(stripe.recorded_events().await, 1);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_unpaid_checkout_and_its_async_success_credit_once_in_either_order_and_redelivered() {
    let stripe = spawn_stripe_app().await;
    for (user, reversed) in [("user_async_a", false), ("user_async_b", true)] {
        let account = stripe.app.account(user).await.0;
        let session = format!("cs_{user}");
        let unpaid = event(
            &format!("evt_completed_{user}"),
            "checkout.session.completed",
            checkout_session(&session, account, 1500, "unpaid"),
        );
        let succeeded = event(
            &format!("evt_async_{user}"),
            "checkout.session.async_payment_succeeded",
            checkout_session(&session, account, 1500, "paid"),
        );
        let order = if reversed {
            [&succeeded, &unpaid]
        } else {
            [&unpaid, &succeeded]
        };

        assert_eq!(stripe.deliver(order[0]).await, 200);
        if !reversed {
            assert_eq!(stripe.balance_micros(user).await, 0, "unpaid: nothing yet");
        }
        assert_eq!(stripe.deliver(order[1]).await, 200);
        for redelivery in [&unpaid, &succeeded, &unpaid, &succeeded] {
            assert_eq!(stripe.deliver(redelivery).await, 200);
        }

        assert_eq!(stripe.balance_micros(user).await, 15_000_000, "{user}");
    }
    assert_eq!(stripe.transactions("TOP_UP").await.len(), 2);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_paid_checkout_in_another_currency_credits_nothing() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_usd").await.0;
    let mut session = checkout_session("cs_usd", account, 1000, "paid");
    session["currency"] = json!("usd");

    let status = stripe
        .deliver(&event("evt_usd", "checkout.session.completed", session))
        .await;
    let metrics = stripe
        .app
        .http
        .get(stripe.app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_usd").await, 0);
    assert!(
        metrics.contains("creditd_topup_currency_mismatch_total"),
        "{metrics}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_checkout_that_is_not_a_top_up_credits_nothing() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_sub_checkout").await.0;
    let mut session = checkout_session("cs_sub", account, 1000, "paid");
    session["metadata"] = json!({});
    session["mode"] = json!("subscription");

    let status = stripe
        .deliver(&event(
            "evt_sub_checkout",
            "checkout.session.completed",
            session,
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_sub_checkout").await, 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_paid_session_whose_amount_differs_from_the_top_up_asked_is_recorded_and_not_credited() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_mismatch").await.0;
    let mut session = checkout_session("cs_mismatch", account, 500, "paid");
    session["amount_total"] = json!(100_000);
    let mut without_amount = checkout_session("cs_no_amount", account, 500, "paid");
    without_amount["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("amountCents");

    let status = stripe
        .deliver(&event(
            "evt_mismatch",
            "checkout.session.completed",
            session,
        ))
        .await;
    let status_without = stripe
        .deliver(&event(
            "evt_no_amount",
            "checkout.session.completed",
            without_amount,
        ))
        .await;

    assert_eq!((status, status_without), (200, 200));
    assert_eq!(stripe.recorded_events().await, 2, "Stripe stops retrying");
    assert_eq!(stripe.balance_micros("user_mismatch").await, 0);
    let metrics = stripe
        .app
        .http
        .get(stripe.app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find(|line| line.starts_with("creditd_topup_amount_mismatch_total"))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(counted >= 2.0, "{counted}");
    stripe.app.db.reconcile_is_clean().await;
}
