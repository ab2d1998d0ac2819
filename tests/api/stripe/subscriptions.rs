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

/// Makes the next writes of `table` fail (`BEFORE <op>` trigger).
async fn refuse(client: &tokio_postgres::Client, table: &str, op: &str) {
    let sql = match (table, op) {
        ("users", "UPDATE") => {
            "CREATE TRIGGER refuse BEFORE UPDATE ON users
                FOR EACH ROW EXECUTE FUNCTION refuse()"
        }
        ("processed_webhook_events", "INSERT") => {
            "CREATE TRIGGER refuse BEFORE INSERT ON processed_webhook_events
                FOR EACH ROW EXECUTE FUNCTION refuse()"
        }
        other => panic!("no refusal for {other:?}"),
    };
    client
        .batch_execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'refused for the test'; END $$",
        )
        .await
        .expect("refusing function");
    client.batch_execute(sql).await.expect("refusing trigger");
}

async fn allow_again(client: &tokio_postgres::Client, table: &str) {
    client
        .batch_execute(&format!(
            "DROP TRIGGER refuse ON {table}; DROP FUNCTION refuse()"
        ))
        .await
        .expect("drop the refusal");
}

async fn customer_with_plan(stripe: &StripeApp, clerk_id: &str) -> i64 {
    let account = stripe.app.account(clerk_id).await.0;
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE users SET stripe_customer_id = 'cus_plan' WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    account
}

async fn plan_of(client: &tokio_postgres::Client, account: i64) -> String {
    client
        .query_one("SELECT plan FROM users WHERE id = $1", &[&account])
        .await
        .unwrap()
        .get(0)
}

async fn recorded(client: &tokio_postgres::Client, event_id: &str) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM processed_webhook_events WHERE source = 'stripe' AND event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap()
        .is_some()
}

#[actix::test]
async fn an_event_whose_effect_fails_is_not_recorded_and_its_redelivery_applies_it_once() {
    let stripe = spawn_stripe_app().await;
    let account = customer_with_plan(&stripe, "user_plan").await;
    let client = stripe.app.db.client().await;
    let created = subscription_event("evt_retry", "customer.subscription.created", "price_pro");

    refuse(&client, "users", "UPDATE").await;
    assert_eq!(stripe.deliver(&created).await, 500);
    assert!(
        !recorded(&client, "evt_retry").await,
        "a failed effect is not done"
    );
    assert_eq!(plan_of(&client, account).await, "FREE");

    allow_again(&client, "users").await;
    assert_eq!(stripe.deliver(&created).await, 200);
    assert_eq!(plan_of(&client, account).await, "PRO");
    assert!(recorded(&client, "evt_retry").await);
    client
        .execute("UPDATE users SET plan = 'TEAM' WHERE id = $1", &[&account])
        .await
        .unwrap();
    let body = created.to_string();
    let response = stripe
        .deliver_with(&body, Some(&signed_header(&body)))
        .await;
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["duplicate"], true, "{body}");
    assert_eq!(
        plan_of(&client, account).await,
        "TEAM",
        "a redelivery after success changes nothing"
    );
}

#[actix::test]
async fn a_plan_change_commits_with_its_event_id_or_not_at_all() {
    let stripe = spawn_stripe_app().await;
    let account = customer_with_plan(&stripe, "user_plan").await;
    let client = stripe.app.db.client().await;
    let created = subscription_event("evt_atomic", "customer.subscription.created", "price_pro");

    refuse(&client, "processed_webhook_events", "INSERT").await;
    assert_eq!(stripe.deliver(&created).await, 500);
    assert_eq!(
        plan_of(&client, account).await,
        "FREE",
        "the plan is not written when its event id cannot be"
    );

    allow_again(&client, "processed_webhook_events").await;
    assert_eq!(stripe.deliver(&created).await, 200);
    assert_eq!(plan_of(&client, account).await, "PRO");
    assert!(recorded(&client, "evt_atomic").await);
}
