//! `customer.subscription.*`: the user's plan follows the newest event.

use serde_json::{json, Value};

use crate::support::stripe::*;
use crate::support::*;

fn subscription_event(id: &str, kind: &str, price: &str) -> Value {
    let now = chrono::Utc::now().timestamp();
    subscription_event_at(id, kind, "sub_1", price, "active", now)
}

/// A `customer.subscription.*` event created at `created` (unix s).
fn subscription_event_at(
    id: &str,
    kind: &str,
    subscription: &str,
    price: &str,
    status: &str,
    created: i64,
) -> Value {
    let mut event = event(
        id,
        kind,
        json!({
            "id": subscription,
            "object": "subscription",
            "customer": "cus_plan",
            "status": status,
            "items": { "object": "list", "data": [
                { "id": "si_1", "object": "subscription_item", "price": { "id": price, "object": "price" } }
            ]},
        }),
    );
    event["created"] = json!(created);
    event
}

#[actix::test]
async fn subscription_events_keep_the_users_plan() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_plan").await.0;
    let client = stripe.app.db.client().await;
    client
        .execute(
            "UPDATE users SET stripe_customer_id = 'cus_plan' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    let plan = || async {
        let row = client
            .query_one(
                "SELECT plan, stripe_subscription_id FROM users WHERE id = $1",
                &[&account],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1))
    };

    assert_eq!(
        stripe
            .deliver(&subscription_event(
                "evt_s1",
                "customer.subscription.created",
                "price_starter"
            ))
            .await,
        200
    );
    assert_eq!(
        plan().await,
        ("STARTER".to_owned(), Some("sub_1".to_owned()))
    );
    assert_eq!(
        stripe
            .deliver(&subscription_event(
                "evt_s2",
                "customer.subscription.updated",
                "price_team"
            ))
            .await,
        200
    );
    assert_eq!(plan().await, ("TEAM".to_owned(), Some("sub_1".to_owned())));
    assert_eq!(
        stripe
            .deliver(&subscription_event(
                "evt_s3",
                "customer.subscription.deleted",
                "price_team"
            ))
            .await,
        200
    );
    assert_eq!(plan().await, ("FREE".to_owned(), None));
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_redelivered_subscription_event_does_not_undo_a_newer_one_of_the_same_second() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_same_second").await.0;
    let client = stripe.app.db.client().await;
    client
        .execute(
            "UPDATE users SET stripe_customer_id = 'cus_plan' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    let second = chrono::Utc::now().timestamp();
    let pro = subscription_event_at(
        "evt_same_second_pro",
        "customer.subscription.updated",
        "sub_1",
        "price_pro",
        "active",
        second,
    );
    let team = subscription_event_at(
        "evt_same_second_team",
        "customer.subscription.updated",
        "sub_1",
        "price_team",
        "active",
        second,
    );
    assert_eq!(stripe.deliver(&pro).await, 200);
    assert_eq!(stripe.deliver(&team).await, 200);

    // Both were created in the same second, so the event time cannot order
    // them: only the record of the event id keeps the retry from writing
    // PRO back over TEAM.
    let body = pro.to_string();
    let (status, answer) = json_of(
        stripe
            .deliver_with(&body, Some(&signed_header(&body)))
            .await,
    )
    .await;
    let plan: String = client
        .query_one("SELECT plan FROM users WHERE id = $1", &[&account])
        .await
        .unwrap()
        .get(0);
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

    assert_eq!(
        plan, "TEAM",
        "the retry of the older event was applied again"
    );
    assert_eq!(status, 200);
    assert_eq!(answer, json!({ "received": true, "duplicate": true }));
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("creditd_webhook_events_total{")
                && line.contains(r#"source="stripe""#)
                && line.contains(r#"type="customer.subscription.updated""#)
                && line.contains(r#"outcome="duplicate""#)),
        "{metrics}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn subscription_events_delivered_out_of_order_leave_the_newest_plan() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_plan_order").await.0;
    let client = stripe.app.db.client().await;
    client
        .execute(
            "UPDATE users SET stripe_customer_id = 'cus_plan' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    let plan = || async {
        let row = client
            .query_one(
                "SELECT plan, stripe_subscription_id FROM users WHERE id = $1",
                &[&account],
            )
            .await
            .unwrap();
        (row.get::<_, String>(0), row.get::<_, Option<String>>(1))
    };
    let t = chrono::Utc::now().timestamp() - 1000;
    let old_created = subscription_event_at(
        "evt_o1",
        "customer.subscription.created",
        "sub_old",
        "price_starter",
        "active",
        t,
    );
    let new_created = subscription_event_at(
        "evt_o2",
        "customer.subscription.created",
        "sub_new",
        "price_pro",
        "active",
        t + 10,
    );
    let old_deleted = subscription_event_at(
        "evt_o3",
        "customer.subscription.deleted",
        "sub_old",
        "price_starter",
        "canceled",
        t + 20,
    );
    let new_canceled = subscription_event_at(
        "evt_o4",
        "customer.subscription.updated",
        "sub_new",
        "price_pro",
        "canceled",
        t + 30,
    );

    assert_eq!(stripe.deliver(&new_created).await, 200);
    assert_eq!(stripe.deliver(&old_created).await, 200);
    assert_eq!(
        plan().await,
        ("PRO".to_owned(), Some("sub_new".to_owned())),
        "an older event changes nothing"
    );
    assert_eq!(stripe.deliver(&old_deleted).await, 200);
    assert_eq!(
        plan().await,
        ("PRO".to_owned(), Some("sub_new".to_owned())),
        "deleting a replaced subscription keeps the current one"
    );
    assert_eq!(stripe.deliver(&new_canceled).await, 200);
    assert_eq!(
        plan().await,
        ("FREE".to_owned(), Some("sub_new".to_owned())),
        "a subscription no longer live is FREE"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_webhook_whose_effect_did_not_commit_answers_an_error_and_is_processed_on_redelivery() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_sabotage").await.0;
    let client = stripe.app.db.client().await;
    client
        .execute(
            "UPDATE users SET stripe_customer_id = 'cus_plan' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    let created = subscription_event("evt_sabotage", "customer.subscription.created", "price_pro");
    client
        .batch_execute("ALTER TABLE users ADD CONSTRAINT sabotage CHECK (plan <> 'PRO') NOT VALID")
        .await
        .unwrap();

    let failed = stripe.deliver(&created).await;

    assert!(failed >= 500, "{failed}");
    assert_eq!(stripe.recorded_events().await, 0);
    client
        .batch_execute("ALTER TABLE users DROP CONSTRAINT sabotage")
        .await
        .unwrap();
    assert_eq!(stripe.deliver(&created).await, 200);
    assert_eq!(stripe.recorded_events().await, 1);
    let plan: String = client
        .query_one("SELECT plan FROM users WHERE id = $1", &[&account])
        .await
        .unwrap()
        .get(0);
    assert_eq!(plan, "PRO");
    stripe.app.db.reconcile_is_clean().await;
}
