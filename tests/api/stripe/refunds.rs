//! `charge.refunded`: refunds claw back what they refunded, once each,
//! whatever the delivery order.

use creditd::ledger::HoldId;
use futures_util::future::join_all;
use serde_json::json;

use super::*;
use crate::support::stripe::*;
use crate::support::*;

#[actix::test]
async fn a_refund_after_the_credits_were_spent_leaves_debt_and_the_next_reserve_is_refused() {
    let stripe = spawn_stripe_app().await;
    let account = top_up(&stripe, "user_refund", "cs_refund", 1000).await;
    let engine = stripe.app.db.engine(&stripe.app.settings);
    let spend = stripe
        .app
        .admin(reqwest::Method::POST, "/admin/accounts/user_refund/credits")
        .json(&json!({ "amountMicros": -8_000_000, "key": "spent", "reason": "usage" }))
        .send()
        .await
        .unwrap();
    assert!(spend.status().is_success());

    let status = stripe
        .deliver(&event(
            "evt_refund",
            "charge.refunded",
            charge("ch_refund", "pi_cs_refund", 1000, 1000),
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_refund").await, -8_000_000);
    let refunds = stripe.transactions("REFUND").await;
    assert_eq!(
        refunds,
        vec![(
            10_000_000,
            "stripe:charge:ch_refund:refunded:1000".to_owned()
        )]
    );
    let refused = engine
        .reserve(
            creditd::ledger::AccountId(account),
            HoldId::generate(),
            micros(1),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(creditd::ledger::LedgerError::InsufficientCredits { .. })
        ),
        "{refused:?}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn two_partial_refunds_claw_back_their_sum_once_each() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_partial", "cs_partial", 5000).await;
    let first = event(
        "evt_refund_1",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 1000),
    );
    let second = event(
        "evt_refund_2",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 3500),
    );
    // A redelivery under a new event id (as after a manual resend) must not
    // claw back again either.
    let second_resent = event(
        "evt_refund_2b",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 3500),
    );

    assert_eq!(stripe.deliver(&first).await, 200);
    assert_eq!(stripe.balance_micros("user_partial").await, 40_000_000);
    assert_eq!(stripe.deliver(&second).await, 200);
    for again in [&first, &second, &second_resent, &first] {
        assert_eq!(stripe.deliver(again).await, 200);
    }

    assert_eq!(stripe.balance_micros("user_partial").await, 15_000_000);
    assert_eq!(
        stripe.transactions("REFUND").await,
        vec![
            (
                10_000_000,
                "stripe:charge:ch_partial:refunded:1000".to_owned()
            ),
            (
                25_000_000,
                "stripe:charge:ch_partial:refunded:3500".to_owned()
            ),
        ]
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn partial_refunds_delivered_newest_first_claw_back_the_total_once() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_reorder", "cs_reorder", 5000).await;

    let newest = event(
        "evt_new",
        "charge.refunded",
        charge("ch_reorder", "pi_cs_reorder", 5000, 3000),
    );
    let oldest = event(
        "evt_old",
        "charge.refunded",
        charge("ch_reorder", "pi_cs_reorder", 5000, 1000),
    );
    assert_eq!(stripe.deliver(&newest).await, 200);
    assert_eq!(stripe.deliver(&oldest).await, 200);

    assert_eq!(stripe.balance_micros("user_reorder").await, 20_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refund_of_a_charge_that_paid_no_top_up_is_acknowledged_and_ignored() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_other_charge", "cs_other", 1000).await;

    let mut subscription_charge = charge("ch_foreign", "pi_subscription", 2900, 2900);
    subscription_charge["metadata"] = json!({});

    let status = stripe
        .deliver(&event(
            "evt_foreign",
            "charge.refunded",
            subscription_charge,
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_other_charge").await, 10_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refund_that_arrives_before_its_top_up_credit_is_retried_until_the_credit_lands() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_early_refund").await.0;
    let refund = event(
        "evt_early_refund",
        "charge.refunded",
        charge("ch_early", "pi_cs_early", 2000, 2000),
    );

    let early = stripe.deliver(&refund).await;
    assert_eq!(early, 503, "Stripe must retry it");
    assert_eq!(stripe.recorded_events().await, 0);
    let status = stripe
        .deliver(&event(
            "evt_cs_early",
            "checkout.session.completed",
            checkout_session("cs_early", account, 2000, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    let retried = stripe.deliver(&refund).await;

    assert_eq!(retried, 200);
    assert_eq!(stripe.balance_micros("user_early_refund").await, 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn concurrent_deliveries_of_two_partial_refunds_claw_back_their_total_once() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_refund_rush", "cs_rush", 5000).await;
    let first = event(
        "evt_rush_1",
        "charge.refunded",
        charge("ch_rush", "pi_cs_rush", 5000, 1000),
    );
    let second = event(
        "evt_rush_2",
        "charge.refunded",
        charge("ch_rush", "pi_cs_rush", 5000, 3500),
    );

    let statuses = join_all((0..20).map(|i| {
        let refund = if i % 2 == 0 { &first } else { &second };
        stripe.deliver(refund)
    }))
    .await;
    // A delivery that met another one holding the charge is told to retry.
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    assert_eq!(stripe.deliver(&first).await, 200);
    assert_eq!(stripe.deliver(&second).await, 200);

    assert_eq!(stripe.balance_micros("user_refund_rush").await, 15_000_000);
    let clawed_back: i64 = stripe
        .transactions("REFUND")
        .await
        .iter()
        .map(|(amount, _)| amount)
        .sum();
    assert_eq!(clawed_back, 35_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn refunds_out_of_order_and_concurrent_with_a_commit_slower_than_the_call_claw_back_the_total_once(
) {
    let stripe = spawn_stripe_app_with(|s| s.engine.call_timeout_ms = 800).await;
    let account = top_up(&stripe, "user_refund_slow", "cs_slow", 5000).await;
    let first = event(
        "evt_slow_1",
        "charge.refunded",
        charge("ch_slow", "pi_cs_slow", 5000, 1000),
    );
    let second = event(
        "evt_slow_2",
        "charge.refunded",
        charge("ch_slow", "pi_cs_slow", 5000, 3000),
    );
    // Hold the account's balance row: its clawbacks apply in the actor but
    // cannot commit, and every delivery's engine call times out.
    let mut locker = stripe.app.db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account],
    )
    .await
    .unwrap();
    assert_eq!(
        stripe.deliver(&first).await,
        503,
        "the first commit is late"
    );
    let statuses = join_all((0..10).map(|i| {
        let refund = if i % 2 == 0 { &second } else { &first };
        stripe.deliver(refund)
    }))
    .await;
    assert!(
        statuses.iter().all(|&s| s == 503 || s == 200),
        "{statuses:?}"
    );
    lock.rollback().await.unwrap();
    // Stripe redelivers what was not acknowledged, newest first.
    for refund in [&second, &first, &second] {
        let mut status = 0;
        for _ in 0..50 {
            status = stripe.deliver(refund).await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200);
    }

    let clawed_back: i64 = stripe
        .transactions("REFUND")
        .await
        .iter()
        .map(|(amount, _)| amount)
        .sum();
    assert_eq!(clawed_back, 30_000_000, "exactly the refunded total");
    assert_eq!(stripe.balance_micros("user_refund_slow").await, 20_000_000);
    stripe.app.db.reconcile_is_clean().await;
}
