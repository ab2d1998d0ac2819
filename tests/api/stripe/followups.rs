//! A paid top-up's follow-ups: its credit never waits for Stripe's API;
//! the card (for auto-recharge) and the invoice link are read afterwards by
//! a worker that retries with backoff, shows its failures and gives up
//! after `stripe.followup_attempts_max`.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::stripe::*;
use crate::support::*;

const INTENTS: &str = "/v1/payment_intents/";

async fn followup_app(
    adjust: impl FnOnce(&mut creditd::config::Settings) + Send + 'static,
) -> (StripeApp, Reads) {
    let stripe = spawn_stripe_app_with(|s| {
        s.stripe.followup_retry_ms_base = 20;
        s.stripe.followup_retry_ms_max = 100;
        adjust(s);
    })
    .await;
    let reads = stripe.mount_reads().await;
    (stripe, reads)
}

/// A paid `checkout.session.completed` of `cents` naming invoice `in_<session>`.
fn paid(event_id: &str, session: &str, account: i64, cents: i64) -> Value {
    let mut object = checkout_session(session, account, cents, "paid");
    object["invoice"] = json!(format!("in_{session}"));
    event(event_id, "checkout.session.completed", object)
}

/// Polls `check` until it holds, for up to 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn newest_transaction(stripe: &StripeApp, clerk_id: &str) -> Value {
    let (status, history) = json_of(
        stripe
            .app
            .get_as(clerk_id, "/api/credits/transactions")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{history}");
    history["items"][0].clone()
}

async fn has_saved_card(stripe: &StripeApp, clerk_id: &str) -> bool {
    let (status, body) = json_of(
        stripe
            .app
            .get_as(clerk_id, "/api/credits/auto-recharge")
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["hasSavedCard"] == json!(true)
}

async fn admin_follow_ups(stripe: &StripeApp, clerk_id: &str) -> Vec<Value> {
    let (status, body) = json_of(
        stripe
            .app
            .admin(reqwest::Method::GET, &format!("/admin/accounts/{clerk_id}"))
            .send()
            .await
            .expect("admin account"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["followUps"].as_array().expect("followUps").clone()
}

async fn counter(stripe: &StripeApp, name: &str) -> u64 {
    let text = stripe.app.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

async fn count_of(stripe: &StripeApp, sql: &str) -> i64 {
    stripe
        .app
        .db
        .client()
        .await
        .query_one(sql, &[])
        .await
        .expect("count")
        .get(0)
}

/// Stripe failing every read the way `failure` says: the top-up is
/// credited at once all the same; once Stripe answers, the card and the
/// invoice link arrive.
async fn credited_at_once_then_followed_up(failure: ReadMode, clerk_id: &str) {
    let (stripe, reads) = followup_app(|_| {}).await;
    reads.answer(failure);
    let account = stripe.app.account(clerk_id).await.0;

    let status = stripe
        .deliver(&paid("evt_paid", "cs_paid", account, 2_500))
        .await;
    let balance = stripe.balance_micros(clerk_id).await;

    assert_eq!(status, 200, "a paid top-up's webhook waits for no read");
    assert_eq!(balance, 25_000_000, "credited at once");
    reads.wait_for(INTENTS, 2).await;
    assert!(
        newest_transaction(&stripe, clerk_id).await["invoiceUrl"].is_null(),
        "no link while Stripe cannot say where the invoice is"
    );
    assert!(!has_saved_card(&stripe, clerk_id).await);

    reads.answer(ReadMode::Answer);
    eventually("the invoice link", || async {
        newest_transaction(&stripe, clerk_id).await["invoiceUrl"]
            == json!("https://invoice.stripe.com/i/acct_test/in_cs_paid")
    })
    .await;
    eventually("the saved card", || has_saved_card(&stripe, clerk_id)).await;
    let (status, body) = json_of(
        stripe
            .app
            .http
            .put(stripe.app.url("/api/credits/auto-recharge"))
            .bearer_auth(stripe.app.token(clerk_id))
            .json(&json!({ "enabled": true, "thresholdCents": 500, "amountCents": 2_000 }))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "auto-recharge has the card: {body}");
    let (status, overview) = json_of(stripe.app.get_as(clerk_id, "/api/credits").await).await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(
        overview["transactions"][0]["invoiceUrl"],
        "https://invoice.stripe.com/i/acct_test/in_cs_paid",
        "the balance page shows the link too"
    );
    assert_eq!(overview["balanceMicros"], 25_000_000);
    assert!(admin_follow_ups(&stripe, clerk_id).await.is_empty());
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_paid_top_up_is_credited_at_once_while_stripe_answers_500_to_every_read_and_followed_up_once_it_answers(
) {
    credited_at_once_then_followed_up(ReadMode::Error(500), "user_followup_500").await;
}

#[actix::test]
async fn a_paid_top_up_is_credited_at_once_while_stripe_answers_no_json_and_followed_up_once_it_answers(
) {
    credited_at_once_then_followed_up(ReadMode::NotJson, "user_followup_html").await;
}

#[actix::test]
async fn a_redelivered_paid_checkout_makes_no_second_credit_nor_follow_up() {
    let (stripe, reads) = followup_app(|_| {}).await;
    reads.answer(ReadMode::Error(500));
    let account = stripe.app.account("user_followup_again").await.0;
    let completed = paid("evt_again", "cs_again", account, 1_000);
    let mut async_paid = completed.clone();
    async_paid["id"] = json!("evt_again_async");
    async_paid["type"] = json!("checkout.session.async_payment_succeeded");
    let mut redelivered = completed.clone();
    redelivered["id"] = json!("evt_again_later");
    let jobs = "SELECT count(*) FROM credit_transactions WHERE stripe_session_id = 'cs_again'";
    let open = "SELECT count(*) FROM credit_transactions WHERE stripe_session_id = 'cs_again'
                  AND followup_done_at IS NULL AND followup_failed_at IS NULL";

    let statuses = [
        stripe.deliver(&completed).await,
        stripe.deliver(&completed).await,
        stripe.deliver(&async_paid).await,
    ];
    reads.wait_for(INTENTS, 1).await;
    let while_failing = (count_of(&stripe, jobs).await, count_of(&stripe, open).await);
    reads.answer(ReadMode::Answer);
    eventually("the follow-up done", || async {
        count_of(&stripe, open).await == 0
    })
    .await;
    let later = stripe.deliver(&redelivered).await;

    assert_eq!(statuses, [200, 200, 200]);
    assert_eq!(later, 200);
    assert_eq!(while_failing, (1, 1), "one credit, one open follow-up");
    assert_eq!(count_of(&stripe, jobs).await, 1);
    assert_eq!(count_of(&stripe, open).await, 0, "done, and none reopened");
    assert_eq!(
        stripe.balance_micros("user_followup_again").await,
        10_000_000
    );
    assert_eq!(
        stripe.transactions("TOP_UP").await,
        [(10_000_000, "stripe:checkout:cs_again".to_owned())]
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_failing_follow_up_is_retried_with_backoff_and_shown_in_the_metrics_and_the_admin_account_view(
) {
    let (stripe, reads) = followup_app(|s| {
        s.stripe.followup_retry_ms_base = 40;
        s.stripe.followup_retry_ms_max = 10_000;
    })
    .await;
    reads.answer(ReadMode::Error(500));
    let account = stripe.app.account("user_followup_retried").await.0;
    let failures_before = counter(&stripe, "creditd_topup_followup_failures_total").await;

    assert_eq!(
        stripe
            .deliver(&paid("evt_retried", "cs_retried", account, 1_000))
            .await,
        200
    );
    let arrivals = reads.wait_for(INTENTS, 4).await;
    let follow_ups = admin_follow_ups(&stripe, "user_followup_retried").await;
    let failures_after = counter(&stripe, "creditd_topup_followup_failures_total").await;

    // Attempt k + 1 comes no sooner than 40 ms × 2^(k−1) after attempt k.
    for (k, pair) in arrivals.windows(2).take(3).enumerate() {
        let gap = pair[1] - pair[0];
        let floor = Duration::from_millis(40 << k);
        assert!(gap >= floor, "retry {k}: {gap:?} < {floor:?}");
    }
    assert_eq!(follow_ups.len(), 1, "{follow_ups:?}");
    let follow_up = &follow_ups[0];
    assert_eq!(follow_up["status"], "PENDING");
    assert_eq!(follow_up["stripeSessionId"], "cs_retried");
    assert!(follow_up["attempts"].as_i64().unwrap() >= 3, "{follow_up}");
    let error = follow_up["lastError"].as_str().unwrap_or_default();
    assert!(error.contains("500"), "{follow_up}");
    assert!(follow_up["nextAttemptAt"].is_string(), "{follow_up}");
    assert!(
        failures_after >= failures_before + 3,
        "{failures_before} -> {failures_after}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_follow_up_still_failing_at_its_last_attempt_is_given_up_and_shown_failed() {
    let (stripe, reads) = followup_app(|s| s.stripe.followup_attempts_max = 2).await;
    reads.answer(ReadMode::Error(503));
    let account = stripe.app.account("user_followup_failed").await.0;
    let given_up_before = counter(&stripe, "creditd_topup_followups_failed_total").await;

    assert_eq!(
        stripe
            .deliver(&paid("evt_failed", "cs_failed", account, 1_000))
            .await,
        200
    );
    eventually("the follow-up given up", || async {
        admin_follow_ups(&stripe, "user_followup_failed").await[0]["status"] == "FAILED"
    })
    .await;
    let follow_up = admin_follow_ups(&stripe, "user_followup_failed")
        .await
        .remove(0);

    assert_eq!(follow_up["attempts"], 2, "{follow_up}");
    assert!(follow_up["failedAt"].is_string(), "{follow_up}");
    assert!(
        follow_up["lastError"]
            .as_str()
            .is_some_and(|error| error.contains("503")),
        "{follow_up}"
    );
    assert!(counter(&stripe, "creditd_topup_followups_failed_total").await > given_up_before);
    assert_eq!(
        stripe.balance_micros("user_followup_failed").await,
        10_000_000,
        "the credit stays"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_late_follow_up_does_not_replace_the_card_of_a_newer_top_up() {
    // A failed follow-up waits a minute: the older one stays behind.
    let (stripe, reads) = followup_app(|s| {
        s.stripe.followup_retry_ms_base = 60_000;
        s.stripe.followup_retry_ms_max = 60_000;
    })
    .await;
    reads.pay_with("pi_cs_older", "pm_card_older");
    reads.pay_with("pi_cs_newer", "pm_card_newer");
    let account = stripe.app.account("user_followup_cards").await.0;
    let card = "SELECT stripe_payment_method_id FROM users WHERE clerk_id = 'user_followup_cards'";
    let older_failed = "SELECT count(*) FROM credit_transactions
                         WHERE stripe_session_id = 'cs_older' AND followup_attempts = 1";
    let open = "SELECT count(*) FROM credit_transactions
                 WHERE followup_done_at IS NULL AND followup_failed_at IS NULL";

    reads.answer(ReadMode::Error(500));
    let older = stripe
        .deliver(&paid("evt_older", "cs_older", account, 1_000))
        .await;
    wait_for_count(&stripe.app, older_failed, 1).await;
    reads.answer(ReadMode::Answer);
    let newer = stripe
        .deliver(&paid("evt_newer", "cs_newer", account, 2_000))
        .await;
    wait_for_count(&stripe.app, open, 1).await;
    let newer_card: Option<String> = stripe
        .app
        .db
        .client()
        .await
        .query_one(card, &[])
        .await
        .expect("card")
        .get(0);
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE credit_transactions SET followup_next_at = NULL
              WHERE stripe_session_id = 'cs_older'",
            &[],
        )
        .await
        .expect("the older follow-up due now");
    wait_for_count(&stripe.app, open, 0).await;
    let saved: Option<String> = stripe
        .app
        .db
        .client()
        .await
        .query_one(card, &[])
        .await
        .expect("card")
        .get(0);

    assert_eq!((older, newer), (200, 200));
    assert_eq!(newer_card.as_deref(), Some("pm_card_newer"));
    assert_eq!(
        reads.arrivals("/v1/payment_intents/pi_cs_older").len(),
        2,
        "the older follow-up ran again, and read its card"
    );
    assert_eq!(
        saved.as_deref(),
        Some("pm_card_newer"),
        "the newest card kept"
    );
}

#[actix::test]
async fn a_late_follow_up_does_not_save_again_a_card_that_a_dispute_forgot() {
    // The follow-up fails while Stripe is down and waits a minute.
    let (stripe, reads) = followup_app(|s| {
        s.stripe.followup_retry_ms_base = 60_000;
        s.stripe.followup_retry_ms_max = 60_000;
    })
    .await;
    reads.pay_with("pi_cs_disputed", "pm_card_disputed");
    let account = stripe.app.account("user_followup_disputed").await.0;
    let failed_once = "SELECT count(*) FROM credit_transactions
                        WHERE stripe_session_id = 'cs_disputed' AND followup_attempts = 1";
    let open = "SELECT count(*) FROM credit_transactions
                 WHERE followup_done_at IS NULL AND followup_failed_at IS NULL";
    reads.answer(ReadMode::Error(500));
    let paid_status = stripe
        .deliver(&paid("evt_disputed", "cs_disputed", account, 1_000))
        .await;
    wait_for_count(&stripe.app, failed_once, 1).await;

    // The card's owner disputes the payment before the follow-up ran.
    let disputed = stripe
        .deliver(&event(
            "evt_dispute_opened",
            "charge.dispute.created",
            json!({
                "id": "dp_followup_1",
                "object": "dispute",
                "amount": 1_000,
                "charge": "ch_cs_disputed",
                "currency": "eur",
                "payment_intent": "pi_cs_disputed",
                "reason": "fraudulent",
                "status": "needs_response",
            }),
        ))
        .await;
    reads.answer(ReadMode::Answer);
    stripe
        .app
        .db
        .client()
        .await
        .execute(
            "UPDATE credit_transactions SET followup_next_at = NULL
              WHERE stripe_session_id = 'cs_disputed'",
            &[],
        )
        .await
        .expect("the follow-up due now");
    wait_for_count(&stripe.app, open, 0).await;

    assert_eq!((paid_status, disputed), (200, 200));
    assert_eq!(
        reads.arrivals("/v1/payment_intents/pi_cs_disputed").len(),
        2,
        "the follow-up ran again, and read the card"
    );
    assert!(
        !has_saved_card(&stripe, "user_followup_disputed").await,
        "a disputed card is never saved again by its top-up's late follow-up"
    );
    assert_eq!(
        newest_transaction(&stripe, "user_followup_disputed").await["invoiceUrl"],
        "https://invoice.stripe.com/i/acct_test/in_cs_disputed",
        "the invoice link still arrives"
    );
}
