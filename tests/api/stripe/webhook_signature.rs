//! `Stripe-Signature`: deliveries signed as Stripe signs are accepted, the
//! rest refused as Stripe's libraries refuse them.

use serde_json::json;

use crate::support::stripe::*;

#[actix::test]
async fn a_webhook_signed_as_stripe_signs_is_accepted_and_an_unhandled_type_ignored() {
    let stripe = spawn_stripe_app().await;

    let status = stripe
        .deliver(&event(
            "evt_other",
            "invoice.paid",
            json!({ "id": "in_1", "object": "invoice" }),
        ))
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
    assert_eq!(stripe.recorded_events().await, 1);
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("creditd_webhook_events_total{")
                && line.contains(r#"source="stripe""#)
                && line.contains(r#"type="other""#)
                && line.contains(r#"outcome="ignored""#)),
        "{metrics}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn webhook_signatures_are_refused_as_stripes_libraries_refuse_them() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_sig").await.0;
    let body = event(
        "evt_sig",
        "checkout.session.completed",
        checkout_session("cs_sig", account, 1000, "paid"),
    )
    .to_string();
    let now = chrono::Utc::now().timestamp();
    let good = v1(WEBHOOK_SECRET, now, &body);
    let old = now - 301;
    let refused = [
        (
            "expired timestamp",
            Some(format!("t={old},v1={}", v1(WEBHOOK_SECRET, old, &body))),
        ),
        (
            "malformed header",
            Some("i'm not even a real signature header".to_owned()),
        ),
        ("no v1 signature", Some(format!("t={now}"))),
        (
            "only a v0 signature",
            Some(format!("t={now},v0={}", v1(WEBHOOK_SECRET, now, &body))),
        ),
        (
            "bad signature",
            Some(format!("t={now},v1={}", v1("whsec_wrong", now, &body))),
        ),
        (
            "signature of another body",
            Some(format!("t={now},v1={}", v1(WEBHOOK_SECRET, now, "{}"))),
        ),
        (
            "timestamp changed",
            Some(format!("t={},v1={good}", now + 1)),
        ),
        ("no header", None),
    ];

    for (case, header) in &refused {
        let response = stripe.deliver_with(&body, header.as_deref()).await;
        assert_eq!(response.status(), 400, "{case}");
    }
    assert_eq!(stripe.recorded_events().await, 0);
    assert_eq!(stripe.balance_micros("user_sig").await, 0);

    let empty_header = format!("t={now},v1={}", v1(WEBHOOK_SECRET, now, ""));
    let empty = stripe.deliver_with("", Some(&empty_header)).await;
    assert_eq!(empty.status(), 400, "a signed empty body is no event");

    let rolled = format!("t={now},v1={},v1={good}", v1("whsec_old", now, &body));
    let accepted = stripe.deliver_with(&body, Some(&rolled)).await;
    assert_eq!(
        accepted.status(),
        200,
        "a bad v1 next to a good one is accepted"
    );
    assert_eq!(stripe.balance_micros("user_sig").await, 10_000_000);
    stripe.app.db.reconcile_is_clean().await;
}
