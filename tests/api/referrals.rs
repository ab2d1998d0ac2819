//! Referrals: a stable code per user, presented once by a new person, and
//! one pair of bonuses after the referred user's first paid top-up, through
//! the signed Stripe webhook; the window follows Clerk's signup time.

use chrono::{DateTime, Duration, Utc};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::clerk_webhooks::deliver as deliver_clerk;
use crate::support::stripe::{checkout_session, event, spawn_stripe_app_with, StripeApp};
use crate::support::*;

/// `credits.referral_bonus_cents` by default: 5 €.
const BONUS_MICROS: i64 = 5_000_000;

async fn referral(app: &TestApp, clerk_id: &str) -> Value {
    let (status, body) = json_of(app.get_as(clerk_id, "/api/credits/referral").await).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn code_of(app: &TestApp, clerk_id: &str) -> String {
    referral(app, clerk_id).await["code"]
        .as_str()
        .expect("code")
        .to_owned()
}

async fn present(app: &TestApp, clerk_id: &str, code: &str) -> (u16, Value) {
    json_of(
        app.post_as(clerk_id, "/api/credits/referral", &json!({ "code": code }))
            .await,
    )
    .await
}

/// A paid top-up of `cents` for `clerk_id` through the webhook.
async fn top_up(stripe: &StripeApp, clerk_id: &str, session: &str, cents: i64) {
    let account = stripe.app.account(clerk_id).await.0;
    let status = stripe
        .deliver(&event(
            &format!("evt_{session}"),
            "checkout.session.completed",
            checkout_session(session, account, cents, "paid"),
        ))
        .await;
    assert_eq!(status, 200, "top-up {session}");
}

async fn referral_credits(app: &TestApp) -> Vec<(String, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT idempotency_key, amount_micros FROM credit_transactions
              WHERE idempotency_key LIKE 'referral:%' AND type = 'PROMO_BONUS'
              ORDER BY idempotency_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn sql(app: &TestApp, statement: &str) {
    app.db
        .client()
        .await
        .batch_execute(statement)
        .await
        .unwrap();
}

#[actix::test]
async fn one_bonus_pair_follows_the_first_paid_top_up_and_a_second_top_up_gives_nothing_more() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let code = code_of(app, "user_anna").await;
    assert_eq!(code.len(), 8);
    assert_eq!(code_of(app, "user_anna").await, code, "a code is stable");

    let (status, taken) = present(app, "user_ben", &code.to_lowercase()).await;
    assert_eq!(status, 201, "{taken}");
    let (status, again) = present(app, "user_ben", &code).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["alreadyApplied"], true);
    assert!(
        referral_credits(app).await.is_empty(),
        "nothing before a top-up"
    );

    top_up(&stripe, "user_ben", "cs_ben_1", 2000).await;
    // Redelivered: the event is known; a new event of the same session
    // replays the credit and pays nothing more.
    top_up(&stripe, "user_ben", "cs_ben_1", 2000).await;
    let replay = event(
        "evt_cs_ben_1_again",
        "checkout.session.async_payment_succeeded",
        checkout_session("cs_ben_1", app.account("user_ben").await.0, 2000, "paid"),
    );
    assert_eq!(stripe.deliver(&replay).await, 200);
    top_up(&stripe, "user_ben", "cs_ben_2", 1000).await;

    let ben = app.account("user_ben").await.0;
    assert_eq!(
        referral_credits(app).await,
        vec![
            (format!("referral:{ben}:referee"), BONUS_MICROS),
            (format!("referral:{ben}:referrer"), BONUS_MICROS),
        ]
    );
    assert_eq!(
        stripe.balance_micros("user_ben").await,
        30_000_000 + BONUS_MICROS
    );
    assert_eq!(stripe.balance_micros("user_anna").await, BONUS_MICROS);
    let anna = referral(app, "user_anna").await;
    assert_eq!(anna["referredCount"], 1);
    assert_eq!(anna["rewardedCount"], 1);
    let ben = referral(app, "user_ben").await;
    assert_eq!(ben["referred"], true);
    assert_eq!(ben["redeemUntil"], Value::Null);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn own_codes_same_emails_second_codes_and_late_codes_are_refused_by_name() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let code = code_of(app, "user_owner").await;
    let other = code_of(app, "user_other").await;
    for clerk_id in ["user_twin", "user_late", "user_fickle"] {
        app.account(clerk_id).await;
    }
    sql(
        app,
        "UPDATE users SET email_hash = 'same-person' WHERE clerk_id IN ('user_owner', 'user_twin');
         UPDATE users SET created_at = now() - interval '8 days' WHERE clerk_id = 'user_late';",
    )
    .await;

    let expect = |(status, body): (u16, Value), code: u16, error: &str| {
        assert_eq!(status, code, "{body}");
        assert_eq!(body["error"], error, "{body}");
    };
    expect(
        present(app, "user_owner", &code).await,
        409,
        "SELF_REFERRAL",
    );
    let (_, twin) = present(app, "user_twin", &code).await;
    assert!(
        twin["message"].as_str().unwrap().contains("email"),
        "{twin}"
    );
    expect((409, twin), 409, "SELF_REFERRAL");
    expect(
        present(app, "user_late", &code).await,
        409,
        "REFERRAL_WINDOW_CLOSED",
    );
    let gone = code_of(app, "user_gone").await;
    sql(
        app,
        "UPDATE users SET deleted_at = now() WHERE clerk_id = 'user_gone'",
    )
    .await;
    expect(
        present(app, "user_fickle", &gone).await,
        404,
        "REFERRAL_CODE_UNKNOWN",
    );
    expect(
        present(app, "user_fickle", "ZZZZZZZZ").await,
        404,
        "REFERRAL_CODE_UNKNOWN",
    );
    let (status, bad) = present(app, "user_fickle", "not a code!").await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["message"].as_str().unwrap().contains("`code`"), "{bad}");
    assert_eq!(present(app, "user_fickle", &other).await.0, 201);
    expect(
        present(app, "user_fickle", &code).await,
        409,
        "ALREADY_REFERRED",
    );

    // None of the refused ones is a referral: their top-ups pay no bonus.
    top_up(&stripe, "user_twin", "cs_twin", 1000).await;
    assert_eq!(stripe.balance_micros("user_owner").await, 0);
    assert_eq!(referral(app, "user_owner").await["referredCount"], 0);
    assert!(referral_credits(app).await.is_empty());
}

#[actix::test]
async fn a_top_up_paid_by_the_referrers_own_stripe_customer_pays_no_bonus() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let code = code_of(app, "user_host").await;
    assert_eq!(present(app, "user_guest", &code).await.0, 201);
    // The test sessions are paid by cus_test_1: make it the referrer's.
    sql(
        app,
        "UPDATE users SET stripe_customer_id = 'cus_test_1' WHERE clerk_id = 'user_host'",
    )
    .await;
    top_up(&stripe, "user_guest", "cs_guest", 1000).await;
    assert!(referral_credits(app).await.is_empty());
    assert_eq!(stripe.balance_micros("user_guest").await, 10_000_000);
}

#[actix::test]
async fn twenty_concurrent_redeemers_of_one_code_are_each_counted_and_paid_once() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let code = code_of(app, "user_star").await;
    let friends: Vec<String> = (0..20).map(|i| format!("user_friend_{i}")).collect();
    for friend in &friends {
        app.account(friend).await;
    }

    // Each friend presents the code twice at once, all friends together.
    let answers = join_all(
        friends
            .iter()
            .chain(friends.iter())
            .map(|friend| present(app, friend, &code)),
    )
    .await;
    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let repeated = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, repeated), (20, 20), "{answers:?}");
    assert_eq!(referral(app, "user_star").await["referredCount"], 20);

    let stripe = &stripe;
    join_all(friends.iter().enumerate().map(|(i, friend)| async move {
        top_up(stripe, friend, &format!("cs_friend_{i}"), 500).await
    }))
    .await;
    let star = referral(app, "user_star").await;
    assert_eq!(star["rewardedCount"], 20);
    assert_eq!(stripe.balance_micros("user_star").await, 20 * BONUS_MICROS);
    assert_eq!(referral_credits(app).await.len(), 40);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn with_an_expiry_both_referral_bonuses_are_promo_grants_that_expire_after_so_many_days() {
    let stripe = spawn_stripe_app_with(|s| s.credits.referral_bonus_expiry_days = 30).await;
    let app = &stripe.app;
    let code = code_of(app, "user_giver").await;
    assert_eq!(present(app, "user_taker", &code).await.0, 201);
    let before = chrono::Utc::now();
    top_up(&stripe, "user_taker", "cs_taker", 1000).await;
    let after = chrono::Utc::now();

    let grants = app
        .db
        .client()
        .await
        .query(
            "SELECT g.kind, g.amount_micros, g.expires_at FROM credit_grants g
               JOIN credit_transactions t ON t.id = g.transaction_id
              WHERE t.idempotency_key LIKE 'referral:%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(grants.len(), 2);
    for grant in &grants {
        assert_eq!(grant.get::<_, String>(0), "PROMO");
        assert_eq!(grant.get::<_, i64>(1), BONUS_MICROS);
        let expires: chrono::DateTime<chrono::Utc> = grant.get(2);
        assert!(
            expires >= before + chrono::Duration::days(30)
                && expires <= after + chrono::Duration::days(30),
            "{expires}"
        );
    }
}

/// Clerk's `kind` event of `clerk_id`, whose verified primary address is
/// `email`, signed up at Clerk at `signed_up`.
fn clerk_user(kind: &str, clerk_id: &str, email: &str, signed_up: DateTime<Utc>) -> Value {
    json!({
        "object": "event",
        "type": kind,
        "data": {
            "object": "user",
            "id": clerk_id,
            "email_addresses": [{
                "id": "idn_primary",
                "object": "email_address",
                "email_address": email,
                "verification": { "status": "verified", "strategy": "email_code" },
            }],
            "primary_email_address_id": "idn_primary",
            "first_name": "Test",
            "last_name": "User",
            "created_at": signed_up.timestamp_millis(),
        },
    })
}

async fn sign_up(app: &TestApp, clerk_id: &str, email: &str, signed_up: DateTime<Utc>) {
    let created = clerk_user("user.created", clerk_id, email, signed_up);
    let status = deliver_clerk(app, &format!("msg_{clerk_id}"), &created).await;
    assert_eq!(status, 200, "user.created of {clerk_id}");
}

async fn stripe_and_clerk_app() -> StripeApp {
    spawn_stripe_app_with(|s| {
        s.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
    })
    .await
}

fn refused_with(answer: (u16, Value), error: &str) {
    let (status, body) = answer;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], error, "{body}");
}

#[actix::test]
async fn mailbox_aliases_cannot_refer_each_other_and_one_person_presents_one_code() {
    let stripe = stripe_and_clerk_app().await;
    let app = &stripe.app;
    let now = Utc::now();
    for (clerk_id, email) in [
        ("user_xavier", "x.avier@gmail.com"),
        ("user_xavier_tagged", "XAVIER+2@googlemail.com"),
        ("user_yves", "yves@example.com"),
        ("user_yves_tagged", "Yves+promo@Example.com"),
        ("user_zoe", "zoe@example.com"),
    ] {
        sign_up(app, clerk_id, email, now).await;
    }
    let xavier = code_of(app, "user_xavier").await;
    let zoe = code_of(app, "user_zoe").await;

    refused_with(
        present(app, "user_xavier_tagged", &xavier).await,
        "SELF_REFERRAL",
    );
    assert_eq!(present(app, "user_yves", &zoe).await.0, 201);
    let (status, again) = present(app, "user_yves_tagged", &xavier).await;
    refused_with((status, again.clone()), "ALREADY_REFERRED");
    assert!(
        again["message"].as_str().unwrap().contains("email"),
        "{again}"
    );

    assert_eq!(referral(app, "user_xavier").await["referredCount"], 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_referral_window_follows_clerks_signup_time_not_creditds_first_sight() {
    let stripe = stripe_and_clerk_app().await;
    let app = &stripe.app;
    let code = code_of(app, "user_host").await;

    // At Clerk 8 days ago, first seen by creditd now.
    let eight_days_ago = Utc::now() - Duration::days(8);
    sign_up(app, "user_old", "old@example.com", eight_days_ago).await;
    refused_with(
        present(app, "user_old", &code).await,
        "REFERRAL_WINDOW_CLOSED",
    );
    let until = referral(app, "user_old").await["redeemUntil"]
        .as_str()
        .expect("redeemUntil")
        .parse::<DateTime<Utc>>()
        .unwrap();
    assert!(until < Utc::now(), "{until}");

    // First seen 8 days ago, at Clerk 6 days ago: Clerk's time counts.
    app.account("user_recent").await;
    sql(
        app,
        "UPDATE users SET created_at = now() - interval '8 days' WHERE clerk_id = 'user_recent'",
    )
    .await;
    refused_with(
        present(app, "user_recent", &code).await,
        "REFERRAL_WINDOW_CLOSED",
    );
    let updated = clerk_user(
        "user.updated",
        "user_recent",
        "recent@example.com",
        Utc::now() - Duration::days(6),
    );
    assert_eq!(deliver_clerk(app, "msg_recent", &updated).await, 200);
    assert_eq!(present(app, "user_recent", &code).await.0, 201);

    // A signup time that is not one is refused by its field.
    let mut bad = clerk_user("user.created", "user_bad", "bad@example.com", Utc::now());
    bad["data"]["created_at"] = json!(-1);
    let body = bad.to_string();
    let now = Utc::now().timestamp();
    let response = app
        .http
        .post(app.url("/api/webhooks/clerk"))
        .header("svix-id", "msg_bad")
        .header("svix-timestamp", now.to_string())
        .header(
            "svix-signature",
            sign(SIGNING_SECRET, "msg_bad", now, &body),
        )
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, error) = json_of(response).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("data.created_at"),
        "{error}"
    );
}
