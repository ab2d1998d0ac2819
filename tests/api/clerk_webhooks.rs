//! `POST /api/webhooks/clerk`: Svix signatures and Clerk's user events.

use creditd::clerk::svix::{self, SvixError, SvixHeaders};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::*;

/// An app that takes Clerk's webhooks. Concurrent deliveries about one
/// person wait in turn for the user row inside the inbox's transaction,
/// each holding one of the test pool's four connections: the pool waits
/// long enough for them on a loaded machine, what the tests check is
/// what the deliveries did, not how many fit in the pool at once.
pub(crate) async fn clerk_app() -> TestApp {
    spawn_app_with(|settings| {
        settings.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
        settings.database.pool_wait_timeout_ms = 10_000;
    })
    .await
}

async fn deliver_signed(
    app: &TestApp,
    id: &str,
    timestamp: i64,
    signature: &str,
    body: &str,
) -> reqwest::Response {
    app.http
        .post(app.url("/api/webhooks/clerk"))
        .header("svix-id", id)
        .header("svix-timestamp", timestamp.to_string())
        .header("svix-signature", signature)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("request")
}

/// Delivers `event` as Svix message `id`, signed now; its status.
pub(crate) async fn deliver(app: &TestApp, id: &str, event: &Value) -> u16 {
    let body = event.to_string();
    let now = chrono::Utc::now().timestamp();
    deliver_signed(app, id, now, &sign(SIGNING_SECRET, id, now, &body), &body)
        .await
        .status()
        .as_u16()
}

pub(crate) fn user_event(
    kind: &str,
    clerk_id: &str,
    email: &str,
    first: &str,
    last: &str,
) -> Value {
    json!({
        "object": "event",
        "type": kind,
        "timestamp": 1_716_883_200_000i64,
        "instance_id": "ins_test",
        "data": {
            "object": "user",
            "id": clerk_id,
            "email_addresses": [
                { "id": "idn_secondary", "object": "email_address", "email_address": "old@example.com" },
                { "id": "idn_primary", "object": "email_address", "email_address": email },
            ],
            "primary_email_address_id": "idn_primary",
            "first_name": first,
            "last_name": last,
            "image_url": "https://img.clerk.com/x",
            "created_at": 1_716_883_200_000i64,
        },
    })
}

async fn user_row(app: &TestApp, clerk_id: &str) -> Option<(Option<String>, Option<String>, bool)> {
    let client = app.db.client().await;
    client
        .query_opt(
            "SELECT email, name, deleted_at IS NOT NULL FROM users WHERE clerk_id = $1",
            &[&clerk_id],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

pub(crate) async fn bonuses(app: &TestApp) -> i64 {
    let client = app.db.client().await;
    client
        .query_one(
            "SELECT count(*) FROM credit_transactions WHERE type = 'SIGNUP_BONUS'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[test]
fn the_svix_documentation_test_vector_verifies() {
    let body = br#"{"test": 2432232314}"#;
    let headers = SvixHeaders {
        id: Some("msg_p5jXN8AQM9LWM0D4loKWxJek"),
        timestamp: Some("1614265330"),
        signature: Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
    };

    assert_eq!(
        svix::verify(SIGNING_SECRET, headers, body, 300, 1_614_265_330),
        Ok(())
    );
    assert_eq!(
        svix::verify(
            SIGNING_SECRET,
            headers,
            br#"{"test": 2432232315}"#,
            300,
            1_614_265_330
        ),
        Err(SvixError::NoMatch)
    );
    assert_eq!(
        svix::verify(SIGNING_SECRET, headers, body, 300, 1_614_265_330 + 301),
        Err(SvixError::TimestampOutsideTolerance)
    );
    assert_eq!(
        svix::verify(SIGNING_SECRET, headers, body, 300, 1_614_265_330 - 301),
        Err(SvixError::TimestampOutsideTolerance),
        "a timestamp from the future is refused too"
    );
    let rotated = SvixHeaders {
        signature: Some("v1,bm9wZQ== v1a,abc v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
        ..headers
    };
    assert_eq!(
        svix::verify(SIGNING_SECRET, rotated, body, 300, 1_614_265_330),
        Ok(())
    );
    assert_eq!(
        sign(
            SIGNING_SECRET,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            r#"{"test": 2432232314}"#
        ),
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        "the test's own signer matches Svix's"
    );
}

#[actix::test]
async fn badly_signed_clerk_deliveries_get_400_and_change_nothing() {
    let app = clerk_app().await;
    let body = user_event("user.created", "user_forged", "f@example.com", "F", "G").to_string();
    let now = chrono::Utc::now().timestamp();
    let cases = [
        (
            "wrong secret",
            now,
            sign("whsec_c2VjcmV0", "msg_1", now, &body),
        ),
        (
            "other message id",
            now,
            sign(SIGNING_SECRET, "msg_2", now, &body),
        ),
        (
            "too old",
            now - 301,
            sign(SIGNING_SECRET, "msg_1", now - 301, &body),
        ),
        (
            "too far ahead",
            now + 301,
            sign(SIGNING_SECRET, "msg_1", now + 301, &body),
        ),
        ("not base64", now, "v1,???".to_owned()),
        (
            "other scheme",
            now,
            sign(SIGNING_SECRET, "msg_1", now, &body).replacen("v1,", "v2,", 1),
        ),
    ];

    for (case, timestamp, signature) in &cases {
        let response = deliver_signed(&app, "msg_1", *timestamp, signature, &body).await;
        assert_eq!(response.status(), 400, "{case}");
    }
    let unsigned = app
        .http
        .post(app.url("/api/webhooks/clerk"))
        .body(body.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(unsigned.status(), 400);
    assert_eq!(user_row(&app, "user_forged").await, None);
    assert_eq!(bonuses(&app).await, 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn clerk_webhooks_answer_503_when_the_signing_secret_is_not_set() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(app.url("/api/webhooks/clerk"))
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 503);
    let (_, body) = json_of(response).await;
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("clerk_webhook.signing_secret"));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn twenty_concurrent_user_created_deliveries_make_one_user_with_one_bonus() {
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_signup",
        "ada@example.com",
        "Ada",
        "Lovelace",
    );

    // None has committed when the others arrive: ten Svix retries of one
    // message and ten resends under new message ids race the upsert and
    // the bonus, not the event record.
    let ids: Vec<String> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                "msg_signup".to_owned()
            } else {
                format!("msg_signup_resent_{i}")
            }
        })
        .collect();
    let statuses = join_all(ids.iter().map(|id| deliver(&app, id, &created))).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(
        user_row(&app, "user_signup").await,
        Some((
            Some("ada@example.com".into()),
            Some("Ada Lovelace".into()),
            false
        ))
    );
    assert_eq!(bonuses(&app).await, 1);
    let (_, overview) = json_of(app.get_as("user_signup", "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_redelivered_older_clerk_event_does_not_undo_a_newer_one() {
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_redelivered",
        "first@example.com",
        "Old",
        "Name",
    );
    let older = user_event(
        "user.updated",
        "user_redelivered",
        "older@example.com",
        "Older",
        "Name",
    );
    let newer = user_event(
        "user.updated",
        "user_redelivered",
        "newer@example.com",
        "Newer",
        "Name",
    );
    let deleted = json!({ "object": "event", "type": "user.deleted",
        "data": { "object": "user", "id": "user_redelivered", "deleted": true } });
    assert_eq!(deliver(&app, "msg_r_created", &created).await, 200);
    assert_eq!(deliver(&app, "msg_r_older", &older).await, 200);
    assert_eq!(deliver(&app, "msg_r_newer", &newer).await, 200);

    // Only the record of the message id tells this redelivery from news:
    // the upsert itself would write the older name and email back.
    assert_eq!(deliver(&app, "msg_r_older", &older).await, 200);
    assert_eq!(
        user_row(&app, "user_redelivered").await,
        Some((
            Some("newer@example.com".into()),
            Some("Newer Name".into()),
            false
        ))
    );

    // A late retry of `user.created` would bring the deleted user back.
    assert_eq!(deliver(&app, "msg_r_deleted", &deleted).await, 200);
    assert_eq!(deliver(&app, "msg_r_created", &created).await, 200);
    let (_, _, is_deleted) = user_row(&app, "user_redelivered").await.unwrap();
    assert!(
        is_deleted,
        "a redelivered user.created revived a deleted user"
    );
    assert_eq!(bonuses(&app).await, 1);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn user_created_and_claim_bonus_grant_one_bonus_whichever_comes_first() {
    let app = clerk_app().await;

    let (claimed, _) = json_of(
        app.post_as("user_first_claims", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    let created = deliver(
        &app,
        "msg_after_claim",
        &user_event(
            "user.created",
            "user_first_claims",
            "a@example.com",
            "A",
            "B",
        ),
    )
    .await;
    let webhook_first = deliver(
        &app,
        "msg_before_claim",
        &user_event(
            "user.created",
            "user_first_hooked",
            "b@example.com",
            "B",
            "C",
        ),
    )
    .await;
    let (claimed_after, body) = json_of(
        app.post_as("user_first_hooked", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;

    assert_eq!((claimed, created, webhook_first), (201, 200, 200));
    assert_eq!(claimed_after, 200, "already granted by user.created");
    assert_eq!(body["alreadyClaimed"], true);
    assert_eq!(bonuses(&app).await, 2);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn user_updated_and_user_deleted_keep_the_user_row_and_the_ledger() {
    let app = clerk_app().await;
    deliver(
        &app,
        "msg_c",
        &user_event(
            "user.created",
            "user_life",
            "grace@example.com",
            "Grace",
            "Hopper",
        ),
    )
    .await;

    let updated = deliver(
        &app,
        "msg_u",
        &user_event(
            "user.updated",
            "user_life",
            "admiral@example.com",
            "Grace",
            "B. Hopper",
        ),
    )
    .await;
    assert_eq!(updated, 200);
    assert_eq!(
        user_row(&app, "user_life").await,
        Some((
            Some("admiral@example.com".into()),
            Some("Grace B. Hopper".into()),
            false
        ))
    );

    let deleted = deliver(
        &app,
        "msg_d",
        &json!({ "object": "event", "type": "user.deleted",
                 "data": { "object": "user", "id": "user_life", "deleted": true } }),
    )
    .await;

    assert_eq!(deleted, 200);
    let (_, _, is_deleted) = user_row(&app, "user_life").await.unwrap();
    assert!(is_deleted);
    assert_eq!(bonuses(&app).await, 1, "the ledger is kept");
    app.db.reconcile_is_clean().await;
}

/// Makes the writes that `trigger` (`BEFORE <op> ON <table> FOR EACH ROW
/// [WHEN …]`) names fail, as a database refusing them would.
async fn refuse(app: &TestApp, trigger: &str) {
    app.db
        .client()
        .await
        .batch_execute(&format!(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
             CREATE TRIGGER refuse {trigger} EXECUTE FUNCTION refuse()"
        ))
        .await
        .expect("refusing trigger");
}

async fn allow_again(app: &TestApp, table: &str) {
    app.db
        .client()
        .await
        .batch_execute(&format!(
            "DROP TRIGGER refuse ON {table}; DROP FUNCTION refuse()"
        ))
        .await
        .expect("drop the refusal");
}

async fn recorded(app: &TestApp, event_id: &str) -> bool {
    app.db
        .client()
        .await
        .query_opt(
            "SELECT 1 FROM processed_webhook_events WHERE source = 'clerk' AND event_id = $1",
            &[&event_id],
        )
        .await
        .unwrap()
        .is_some()
}

fn deleted_event(clerk_id: &str) -> Value {
    json!({ "object": "event", "type": "user.deleted",
            "data": { "object": "user", "id": clerk_id, "deleted": true } })
}

#[actix::test]
async fn a_clerk_event_whose_effect_fails_is_not_recorded_and_its_redelivery_applies_it_once() {
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_retry",
        "old@example.com",
        "Old",
        "Name",
    );
    let updated = user_event(
        "user.updated",
        "user_retry",
        "new@example.com",
        "New",
        "Name",
    );
    assert_eq!(deliver(&app, "msg_retry_created", &created).await, 200);

    refuse(
        &app,
        "BEFORE UPDATE ON users FOR EACH ROW WHEN (OLD.clerk_id = 'user_retry')",
    )
    .await;
    assert_eq!(deliver(&app, "msg_retry_updated", &updated).await, 500);
    assert!(
        !recorded(&app, "msg_retry_updated").await,
        "a failed effect is not done"
    );
    assert_eq!(
        user_row(&app, "user_retry").await,
        Some((
            Some("old@example.com".into()),
            Some("Old Name".into()),
            false
        ))
    );

    allow_again(&app, "users").await;
    assert_eq!(deliver(&app, "msg_retry_updated", &updated).await, 200);
    assert!(recorded(&app, "msg_retry_updated").await);
    assert_eq!(
        user_row(&app, "user_retry").await,
        Some((
            Some("new@example.com".into()),
            Some("New Name".into()),
            false
        ))
    );
    app.db
        .client()
        .await
        .execute(
            "UPDATE users SET name = 'Renamed Since' WHERE clerk_id = 'user_retry'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(deliver(&app, "msg_retry_updated", &updated).await, 200);
    let (_, name, _) = user_row(&app, "user_retry").await.unwrap();
    assert_eq!(
        name.as_deref(),
        Some("Renamed Since"),
        "a redelivery after success changes nothing"
    );
    assert_eq!(bonuses(&app).await, 1);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_user_deleted_commits_the_deletion_and_its_event_id_together_or_not_at_all() {
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_gone",
        "gone@example.com",
        "Gone",
        "Soon",
    );
    assert_eq!(deliver(&app, "msg_gone_created", &created).await, 200);
    assert_eq!(app.get_as("user_gone", "/api/credits").await.status(), 200);

    refuse(
        &app,
        "BEFORE INSERT ON processed_webhook_events FOR EACH ROW",
    )
    .await;
    let deleted = deleted_event("user_gone");
    assert_eq!(deliver(&app, "msg_gone_deleted", &deleted).await, 500);
    let (email, _, is_deleted) = user_row(&app, "user_gone").await.unwrap();
    assert!(
        !is_deleted,
        "the user is not deleted when the event id cannot be recorded"
    );
    assert_eq!(email.as_deref(), Some("gone@example.com"));
    assert_eq!(app.get_as("user_gone", "/api/credits").await.status(), 200);

    allow_again(&app, "processed_webhook_events").await;
    assert_eq!(deliver(&app, "msg_gone_deleted", &deleted).await, 200);
    assert!(recorded(&app, "msg_gone_deleted").await);
    let (email, _, is_deleted) = user_row(&app, "user_gone").await.unwrap();
    assert!(is_deleted);
    assert_eq!(email, None, "the address is released");
    assert_eq!(
        app.get_as("user_gone", "/api/credits").await.status(),
        401,
        "the deleted user's requests are refused once it committed"
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_signup_bonus_that_fails_after_its_user_committed_is_granted_by_the_redelivery_once() {
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_bonus",
        "bonus@example.com",
        "Bo",
        "Nus",
    );

    // The user row and the event id commit; the bonus, through the engine,
    // comes after them and fails.
    refuse(&app, "BEFORE INSERT ON signup_bonus_claims FOR EACH ROW").await;
    assert_eq!(deliver(&app, "msg_bonus", &created).await, 500);
    assert!(recorded(&app, "msg_bonus").await);
    assert!(user_row(&app, "user_bonus").await.is_some());
    assert_eq!(bonuses(&app).await, 0);

    allow_again(&app, "signup_bonus_claims").await;
    assert_eq!(
        deliver(&app, "msg_bonus", &created).await,
        200,
        "the redelivery of a recorded event still grants what followed it"
    );
    assert_eq!(bonuses(&app).await, 1);
    assert_eq!(deliver(&app, "msg_bonus", &created).await, 200);
    assert_eq!(bonuses(&app).await, 1, "no bonus is paid twice");
    let (_, overview) = json_of(app.get_as("user_bonus", "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 10_000_000);
    app.db.reconcile_is_clean().await;
}
