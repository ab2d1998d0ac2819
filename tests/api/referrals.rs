//! Referrals: a stable code per user, presented once by a new person, and
//! one pair of bonuses after the referred user's first paid top-up, through
//! the signed Stripe webhook; the bonuses follow that top-up's refunds and
//! disputes; the window follows Clerk's signup time.

use chrono::{DateTime, Duration, Utc};
use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::clerk_webhooks::deliver as deliver_clerk;
use crate::support::stripe::{
    charge, checkout_session, event, spawn_stripe_app_on_clock, spawn_stripe_app_with, StripeApp,
};
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

const WITHDRAWN: &str = "charge.dispute.funds_withdrawn";
const REINSTATED: &str = "charge.dispute.funds_reinstated";

/// `charge.refunded` of the top-up `session`: `refunded` of its `cents`, in all.
fn refunded(event_id: &str, session: &str, cents: i64, refunded: i64) -> Value {
    let charge = charge(
        &format!("ch_{session}"),
        &format!("pi_{session}"),
        cents,
        refunded,
    );
    event(event_id, "charge.refunded", charge)
}

/// A `charge.dispute.*` event of the top-up `session`, as Stripe sends it.
fn disputed(event_id: &str, kind: &str, session: &str, cents: i64, status: &str) -> Value {
    event(
        event_id,
        kind,
        json!({
            "id": format!("dp_{session}"),
            "object": "dispute",
            "amount": cents,
            "charge": format!("ch_{session}"),
            "currency": "eur",
            "payment_intent": format!("pi_{session}"),
            "reason": "fraudulent",
            "status": status,
        }),
    )
}

/// Delivers `event` as `copies` events of their own all at once (none
/// known to creditd when the others arrive), then the first one again.
async fn deliver_at_once(stripe: &StripeApp, event: &Value, copies: usize) {
    let base = event["id"].as_str().expect("event id");
    let events: Vec<Value> = (0..copies)
        .map(|i| {
            let mut copy = event.clone();
            copy["id"] = json!(format!("{base}_{i}"));
            copy
        })
        .collect();
    let statuses = join_all(events.iter().map(|event| stripe.deliver(event))).await;
    assert!(statuses.iter().all(|&s| s == 200), "{base}: {statuses:?}");
    assert_eq!(stripe.deliver(&events[0]).await, 200, "{base} redelivered");
}

/// `referrer` refers `referred`, whose top-up `session` pays both bonuses;
/// the referred account.
async fn paid_referral(
    stripe: &StripeApp,
    referrer: &str,
    referred: &str,
    session: &str,
    cents: i64,
) -> i64 {
    let code = code_of(&stripe.app, referrer).await;
    assert_eq!(present(&stripe.app, referred, &code).await.0, 201);
    top_up(stripe, referred, session, cents).await;
    stripe.app.account(referred).await.0
}

/// Every posting that moved a referral bonus after it was paid: its key
/// and its amount, negative for a debit.
async fn reversals(app: &TestApp) -> Vec<(String, i64)> {
    app.db
        .client()
        .await
        .query(
            "SELECT idempotency_key,
                    CASE direction WHEN 'CREDIT' THEN amount_micros ELSE -amount_micros END
               FROM credit_transactions
              WHERE idempotency_key LIKE 'referral:%:reversal:%'
              ORDER BY idempotency_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The reversal postings `steps` (step, amount) of both sides of the
/// referral of `referred`, in the order `reversals` lists them.
fn both_sides(referred: i64, steps: &[(u32, i64)]) -> Vec<(String, i64)> {
    let mut postings: Vec<(String, i64)> = ["referee", "referrer"]
        .iter()
        .flat_map(|side| {
            steps.iter().map(move |(step, amount)| {
                (
                    format!("referral:{referred}:{side}:reversal:{step}"),
                    *amount,
                )
            })
        })
        .collect();
    postings.sort();
    postings
}

#[actix::test]
async fn a_refunded_referral_top_up_takes_both_bonuses_back_once_from_ten_deliveries_at_once() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let ben = paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 500).await;
    assert_eq!(stripe.balance_micros("user_ben").await, 10_000_000);
    assert_eq!(stripe.balance_micros("user_anna").await, BONUS_MICROS);

    deliver_at_once(&stripe, &refunded("evt_refund_ben", "cs_ben", 500, 500), 10).await;
    // A dispute of the refunded top-up, lost then won, moves the top-up's
    // own money; the bonuses stay taken back.
    let lost = disputed("evt_lost_ben", WITHDRAWN, "cs_ben", 500, "needs_response");
    deliver_at_once(&stripe, &lost, 3).await;
    let won = disputed("evt_won_ben", REINSTATED, "cs_ben", 500, "won");
    deliver_at_once(&stripe, &won, 3).await;
    // A later top-up pays no bonus again.
    top_up(&stripe, "user_ben", "cs_ben_again", 1000).await;

    assert_eq!(reversals(app).await, both_sides(ben, &[(1, -BONUS_MICROS)]));
    assert_eq!(stripe.balance_micros("user_ben").await, 10_000_000);
    assert_eq!(stripe.balance_micros("user_anna").await, 0);
    let anna = referral(app, "user_anna").await;
    assert_eq!(anna["referredCount"], 1);
    assert_eq!(
        anna["rewardedCount"], 0,
        "a refunded referral is not a reward"
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_lost_dispute_takes_the_bonuses_back_and_a_won_one_gives_them_back_once_in_any_order() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let ben = paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 500).await;

    let lost = disputed("evt_lost_ben", WITHDRAWN, "cs_ben", 500, "needs_response");
    deliver_at_once(&stripe, &lost, 10).await;
    assert_eq!(stripe.balance_micros("user_anna").await, 0);
    assert_eq!(stripe.balance_micros("user_ben").await, 0);
    let won = disputed("evt_won_ben", REINSTATED, "cs_ben", 500, "won");
    deliver_at_once(&stripe, &won, 10).await;
    // The older withdrawal, redelivered late, changes nothing.
    assert_eq!(stripe.deliver(&lost).await, 200);

    // Stripe tells a won dispute before its withdrawal: nothing moves.
    let dora = paid_referral(&stripe, "user_carl", "user_dora", "cs_dora", 500).await;
    let won_first = disputed("evt_won_dora", REINSTATED, "cs_dora", 500, "won");
    deliver_at_once(&stripe, &won_first, 3).await;
    let lost_after = disputed("evt_lost_dora", WITHDRAWN, "cs_dora", 500, "won");
    deliver_at_once(&stripe, &lost_after, 3).await;

    assert_eq!(
        reversals(app).await,
        both_sides(ben, &[(1, -BONUS_MICROS), (2, BONUS_MICROS)])
    );
    assert!(!reversals(app)
        .await
        .iter()
        .any(|(key, _)| key.contains(&dora.to_string())));
    for (clerk_id, balance) in [
        ("user_anna", BONUS_MICROS),
        ("user_ben", 10_000_000),
        ("user_carl", BONUS_MICROS),
        ("user_dora", 10_000_000),
    ] {
        assert_eq!(stripe.balance_micros(clerk_id).await, balance, "{clerk_id}");
    }
    assert_eq!(referral(app, "user_anna").await["rewardedCount"], 1);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refund_and_a_dispute_of_one_top_up_take_the_bonuses_back_once_whichever_comes_first() {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let ben = paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 500).await;
    let dora = paid_referral(&stripe, "user_carl", "user_dora", "cs_dora", 500).await;

    // Ben's top-up: refunded, then disputed, lost and won.
    assert_eq!(
        stripe
            .deliver(&refunded("evt_r_ben", "cs_ben", 500, 500))
            .await,
        200
    );
    for (id, kind, status) in [
        ("evt_l_ben", WITHDRAWN, "needs_response"),
        ("evt_w_ben", REINSTATED, "won"),
    ] {
        assert_eq!(
            stripe
                .deliver(&disputed(id, kind, "cs_ben", 500, status))
                .await,
            200
        );
    }
    // Dora's: disputed, then refunded, then the dispute won: still refunded.
    let lost = disputed("evt_l_dora", WITHDRAWN, "cs_dora", 500, "needs_response");
    assert_eq!(stripe.deliver(&lost).await, 200);
    assert_eq!(
        stripe
            .deliver(&refunded("evt_r_dora", "cs_dora", 500, 500))
            .await,
        200
    );
    let won = disputed("evt_w_dora", REINSTATED, "cs_dora", 500, "won");
    assert_eq!(stripe.deliver(&won).await, 200);

    let mut expected = both_sides(ben, &[(1, -BONUS_MICROS)]);
    expected.extend(both_sides(dora, &[(1, -BONUS_MICROS)]));
    expected.sort();
    assert_eq!(reversals(app).await, expected);
    let reasons: Vec<(i64, String)> = app
        .db
        .client()
        .await
        .query(
            "SELECT referred_user_id, reason FROM referral_reversals ORDER BY referred_user_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        reasons,
        vec![(ben, "REFUNDED".to_owned()), (dora, "DISPUTED".to_owned())]
    );
    for clerk_id in ["user_anna", "user_carl"] {
        assert_eq!(stripe.balance_micros(clerk_id).await, 0, "{clerk_id}");
    }
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_partial_refund_keeping_the_minimum_top_up_keeps_the_bonuses_and_one_keeping_less_does_not(
) {
    let stripe = spawn_stripe_app_with(|_| {}).await;
    let app = &stripe.app;
    let ben = paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 2000).await;

    // 15 € of 20 € refunded: the 5 € kept are the minimum top-up.
    let keeps_five = refunded("evt_r1_ben", "cs_ben", 2000, 1500);
    assert_eq!(stripe.deliver(&keeps_five).await, 200);
    assert!(reversals(app).await.is_empty());
    assert_eq!(stripe.balance_micros("user_anna").await, BONUS_MICROS);

    // One more cent: less than the minimum kept.
    let keeps_less = refunded("evt_r2_ben", "cs_ben", 2000, 1501);
    assert_eq!(stripe.deliver(&keeps_less).await, 200);
    let mut older = keeps_five.clone();
    older["id"] = json!("evt_r1_ben_late");
    assert_eq!(stripe.deliver(&older).await, 200);

    assert_eq!(reversals(app).await, both_sides(ben, &[(1, -BONUS_MICROS)]));
    assert_eq!(stripe.balance_micros("user_anna").await, 0);
    assert_eq!(
        stripe.balance_micros("user_ben").await,
        20_000_000 + BONUS_MICROS - 15_010_000 - BONUS_MICROS
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_referral_bonus_spent_on_a_chat_becomes_debt_when_its_top_up_is_refunded() {
    let anthropic = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::path("/v1/messages"))
        .respond_with(
            wiremock::ResponseTemplate::new(200)
                .set_body_json(anthropic_message("ok", 1_000_000, 10, 0, 0)),
        )
        .mount(&anthropic)
        .await;
    let uri = anthropic.uri();
    let stripe = spawn_stripe_app_with(move |s| {
        s.providers.anthropic_base_url = uri;
        s.providers.anthropic_api_key = creditd::config::Secret::new(PLATFORM_ANTHROPIC_KEY);
    })
    .await;
    let app = &stripe.app;
    paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 500).await;
    let chat = json!({ "messages": conversation(), "maxTokens": 10 });
    let (status, body) = json_of(app.post_as("user_anna", "/api/chat", &chat).await).await;
    assert_eq!(status, 200, "{body}");
    let spent = BONUS_MICROS - stripe.balance_micros("user_anna").await;
    assert!(spent > 0 && spent < BONUS_MICROS, "{spent}");

    assert_eq!(
        stripe
            .deliver(&refunded("evt_r_ben", "cs_ben", 500, 500))
            .await,
        200
    );

    assert_eq!(stripe.balance_micros("user_anna").await, -spent);
    let (_, overview) = json_of(app.get_as("user_anna", "/api/credits").await).await;
    assert_eq!(overview["availableMicros"], -spent, "{overview}");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_bonus_that_expired_unspent_is_not_taken_back_only_what_was_spent_of_it() {
    let clock = creditd::clock::Clock::manual(Utc::now());
    let stripe = spawn_stripe_app_on_clock(clock.clone(), |s| {
        s.credits.referral_bonus_expiry_days = 30;
    })
    .await;
    let app = &stripe.app;
    let ben = paid_referral(&stripe, "user_anna", "user_ben", "cs_ben", 500).await;
    // Anna spends 2 € of her bonus; Ben spends none of his.
    let spend = app
        .admin(reqwest::Method::POST, "/admin/accounts/user_anna/credits")
        .json(&json!({ "amountMicros": -2_000_000, "key": "spend", "reason": "usage" }))
        .send()
        .await
        .unwrap();
    assert!(spend.status().is_success(), "{}", spend.status());
    clock.advance(Duration::days(31)).unwrap();

    assert_eq!(
        stripe
            .deliver(&refunded("evt_r_ben", "cs_ben", 500, 500))
            .await,
        200
    );

    assert_eq!(
        reversals(app).await,
        vec![(format!("referral:{ben}:referrer:reversal:1"), -2_000_000)]
    );
    assert_eq!(stripe.balance_micros("user_anna").await, -2_000_000);
    assert_eq!(stripe.balance_micros("user_ben").await, 0);
    app.db.reconcile_is_clean().await;
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

    // Presented before Clerk told its address, which then names Xavier: the
    // top-up pays no bonus to either.
    assert_eq!(present(app, "user_quick", &xavier).await.0, 201);
    sign_up(app, "user_quick", "xavier+later@gmail.com", now).await;
    top_up(&stripe, "user_quick", "cs_quick", 500).await;

    assert!(referral_credits(app).await.is_empty());
    assert_eq!(referral(app, "user_xavier").await["rewardedCount"], 0);
    assert_eq!(stripe.balance_micros("user_quick").await, 5_000_000);
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

#[actix::test]
async fn referrals_and_bonus_claims_from_before_are_migrated_to_be_reversible_and_per_person() {
    let stripe = stripe_and_clerk_app().await;
    let app = &stripe.app;
    sign_up(app, "user_first", "first.person@gmail.com", Utc::now()).await;
    let friend = paid_referral(&stripe, "user_first", "user_friend", "cs_friend", 500).await;
    // The database as it was before: no record of the paying top-up, and
    // person hashes of the address merely trimmed and lower-cased.
    let mut client = app.db.client().await;
    client
        .batch_execute(
            "DROP TABLE referral_reversals;
             DROP INDEX credit_grants_transaction;
             ALTER TABLE referrals DROP COLUMN referred_email_hash,
                 DROP COLUMN paid_by_session_id, DROP COLUMN paid_by_payment_id,
                 DROP COLUMN bonus_micros, DROP COLUMN reversal_steps;
             ALTER TABLE users DROP COLUMN signed_up_at;
             UPDATE users
                SET email_hash = encode(sha256(convert_to(lower(btrim(email)), 'UTF8')), 'hex')
              WHERE email_hash IS NOT NULL;
             UPDATE signup_bonus_claims c SET email_hash = u.email_hash
               FROM users u WHERE u.id = c.user_id;
             DELETE FROM schema_migrations WHERE version = 12;",
        )
        .await
        .unwrap();

    creditd::db::migrate(&mut client).await.unwrap();

    let row = client
        .query_one(
            "SELECT paid_by_session_id, paid_by_payment_id, bonus_micros
               FROM referrals WHERE referred_user_id = $1",
            &[&friend],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get(0), row.get(1), row.get(2)),
        (
            Some("cs_friend".to_owned()),
            Some("pi_cs_friend".to_owned()),
            Some(BONUS_MICROS)
        )
    );
    let refund = refunded("evt_r_friend", "cs_friend", 500, 500);
    assert_eq!(stripe.deliver(&refund).await, 200);
    assert_eq!(
        reversals(app).await,
        both_sides(friend, &[(1, -BONUS_MICROS)])
    );
    sign_up(
        app,
        "user_first_again",
        "FirstPerson+new@googlemail.com",
        Utc::now(),
    )
    .await;
    assert_eq!(stripe.balance_micros("user_first_again").await, 0);
    app.db.reconcile_is_clean().await;
}
