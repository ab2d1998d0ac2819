//! Grants: every credit is money of its own, spent in order (promo before
//! paid, then earliest expiry, then oldest), expiring when its time comes,
//! and clawed back from its own top-up first.

use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use creditd::clock::Clock;
use creditd::config::Settings;
use creditd::ledger::{
    usages_page, AccountId, Engine, GrantKind, GrantSpend, HoldId, LedgerError, Posting,
    TransactionType, UsageCharge,
};
use creditd::money::Micros;
use creditd::pricing::TokenUsage;
use serde_json::{json, Value};

use crate::stripe::top_up;
use crate::support::stripe::{charge, event, spawn_stripe_app};
use crate::support::*;

fn promo(key: &str, amount: Micros, expires_at: Option<DateTime<Utc>>) -> Posting {
    Posting {
        expires_at,
        ..posting(key, TransactionType::PromoBonus, amount)
    }
}

/// Holds that outlive the hours the tests move the clock by.
fn long_holds() -> Settings {
    let mut settings = settings();
    settings.engine.hold_ttl_s = 10 * 86_400;
    settings
}

fn usage(cost: Micros) -> UsageCharge {
    UsageCharge {
        model: "claude-haiku-4-5".into(),
        tokens: TokenUsage {
            input_tokens: 10,
            output_tokens: 10,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost,
        conversation_id: None,
        message_id: None,
        api_key: None,
    }
}

fn spent(grant: uuid::Uuid, kind: GrantKind, amount: Micros) -> GrantSpend {
    GrantSpend {
        grant_id: grant,
        kind,
        amount_micros: amount,
    }
}

/// The id of the grant a credit made.
async fn grant_of(engine: &Engine, account: AccountId, transaction: uuid::Uuid) -> uuid::Uuid {
    engine
        .balance(account)
        .await
        .expect("balance")
        .grants
        .iter()
        .find(|g| g.transaction_id == Some(transaction))
        .map(|g| g.id)
        .expect("the credit's grant")
}

/// The EXPIRED debits of an account: (key, amount).
async fn expiries(db: &TestDb, account: AccountId) -> Vec<(String, i64)> {
    db.client()
        .await
        .query(
            "SELECT idempotency_key, amount_micros FROM credit_transactions
              WHERE user_id = $1 AND type = 'EXPIRED' ORDER BY seq",
            &[&account.0],
        )
        .await
        .expect("expiries")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Waits until the engine serves `balance` for the account.
async fn wait_for_balance(engine: &Engine, account: AccountId, balance: Micros) {
    for _ in 0..1000 {
        if engine.balance(account).await.map(|s| s.balance_micros) == Ok(balance) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the balance never reached {balance}");
}

#[actix::test]
async fn a_spend_takes_the_bonus_before_an_older_top_up_and_a_full_refund_of_the_top_up_leaves_exact_debt(
) {
    let stripe = spawn_stripe_app().await;
    let app = &stripe.app;
    let user = "user_grants_refund";
    // The top-up comes first: the bonus is spent first all the same.
    top_up(&stripe, user, "cs_grants", 2000).await;
    let expires = (Utc::now() + chrono::Duration::days(30)).trunc_subsecs(0);
    let bonus = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{user}/credits"),
        )
        .json(&json!({
            "amountMicros": 10_000_000, "key": "bonus", "reason": "bienvenue",
            "type": "PROMO_BONUS", "expiresAt": expires.to_rfc3339(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(bonus.status(), 201);
    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    let grants = overview["grants"].as_array().cloned().unwrap_or_default();
    assert_eq!(grants.len(), 2, "{overview}");
    let (bonus_grant, topup_grant) = (&grants[0], &grants[1]);
    assert_eq!(bonus_grant["kind"], "PROMO");
    assert_eq!(bonus_grant["remainingMicros"], 10_000_000);
    assert_eq!(
        bonus_grant["expiresAt"]
            .as_str()
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map(|at| at.with_timezone(&Utc)),
        Some(expires)
    );
    assert_eq!(topup_grant["kind"], "PAID");
    assert_eq!(topup_grant["source"], "cs_grants");
    assert_eq!(topup_grant["expiresAt"], Value::Null);

    let (status, spend) = json_of(
        app.admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{user}/credits"),
        )
        .json(&json!({ "amountMicros": -12_000_000, "key": "spend", "reason": "usage" }))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{spend}");
    assert_eq!(
        spend["transaction"]["paidBy"],
        json!([
            { "grantId": bonus_grant["id"], "kind": "PROMO", "amountMicros": 10_000_000 },
            { "grantId": topup_grant["id"], "kind": "PAID", "amountMicros": 2_000_000 },
        ])
    );
    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 18_000_000);
    assert_eq!(overview["grants"].as_array().map(Vec::len), Some(1));
    assert_eq!(overview["grants"][0]["id"], topup_grant["id"]);
    assert_eq!(overview["grants"][0]["remainingMicros"], 18_000_000);

    let status = stripe
        .deliver(&event(
            "evt_grants_refund",
            "charge.refunded",
            charge("ch_grants", "pi_cs_grants", 2000, 2000),
        ))
        .await;
    assert_eq!(status, 200);

    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    // 20 € refunded, 18 € of it still in its grant: 2 € of debt.
    assert_eq!(overview["balanceMicros"], -2_000_000);
    assert_eq!(overview["grants"], json!([]));
    let (_, history) = json_of(app.get_as(user, "/api/credits/transactions").await).await;
    let refund = &history["items"][0];
    assert_eq!(refund["type"], "REFUND");
    assert_eq!(refund["amountMicros"], 20_000_000);
    assert_eq!(
        refund["paidBy"],
        json!([{ "grantId": topup_grant["id"], "kind": "PAID", "amountMicros": 18_000_000 }])
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_expiry_in_the_past_or_on_a_debit_is_refused_naming_expires_at() {
    let app = spawn_app().await;
    app.account("user_grants_bad_expiry").await;
    for (body, reason) in [
        (
            json!({ "amountMicros": 1_000_000, "key": "past", "reason": "r",
                    "type": "PROMO_BONUS", "expiresAt": "2001-01-01T00:00:00Z" }),
            "in the past",
        ),
        (
            json!({ "amountMicros": -1_000_000, "key": "debit", "reason": "r",
                    "expiresAt": "2999-01-01T00:00:00Z" }),
            "on a debit",
        ),
        (
            json!({ "amountMicros": 1_000_000, "key": "garbled", "reason": "r",
                    "expiresAt": "tomorrow" }),
            "unreadable",
        ),
    ] {
        let (status, answer) = json_of(
            app.admin(
                reqwest::Method::POST,
                "/admin/accounts/user_grants_bad_expiry/credits",
            )
            .json(&body)
            .send()
            .await
            .unwrap(),
        )
        .await;
        assert_eq!(status, 400, "{reason}: {answer}");
        assert!(
            answer.to_string().contains("expiresAt"),
            "{reason}: {answer}"
        );
    }
    let (_, overview) = json_of(app.get_as("user_grants_bad_expiry", "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 0);
    assert_eq!(overview["grants"], json!([]));
}

#[actix::test]
async fn a_signup_bonus_expires_after_the_configured_days() {
    let app = spawn_app_with(|settings| settings.credits.signup_bonus_expiry_days = 30).await;
    let before = Utc::now();
    let (status, _) = json_of(
        app.post_as("user_grants_bonus", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    assert_eq!(status, 201);
    let (_, overview) = json_of(app.get_as("user_grants_bonus", "/api/credits").await).await;
    let grant = &overview["grants"][0];
    assert_eq!(grant["kind"], "PROMO");
    let expires = grant["expiresAt"]
        .as_str()
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map(|at| at.with_timezone(&Utc))
        .expect("an expiry");
    assert!(expires >= before + chrono::Duration::days(30), "{expires}");
    assert!(
        expires <= Utc::now() + chrono::Duration::days(30),
        "{expires}"
    );
}

#[actix::test]
async fn a_settlement_says_which_grants_paid_it_and_what_no_grant_could_pay_is_debt() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_grants_usage").await;
    let later = Utc::now() + chrono::Duration::days(1);
    let topup = engine
        .credit(account, posting("t", TransactionType::TopUp, eur(5)))
        .await
        .unwrap();
    let lasting = engine
        .credit(account, promo("q", eur(1), None))
        .await
        .unwrap();
    let expiring = engine
        .credit(account, promo("p", eur(2), Some(later)))
        .await
        .unwrap();
    let (topup, lasting, expiring) = (
        grant_of(&engine, account, topup.record.id).await,
        grant_of(&engine, account, lasting.record.id).await,
        grant_of(&engine, account, expiring.record.id).await,
    );

    let hold = HoldId::generate();
    engine.reserve(account, hold, eur(8)).await.unwrap();
    let settled = engine.settle(account, hold, usage(eur(9))).await.unwrap();

    let expected = vec![
        spent(expiring, GrantKind::Promo, eur(2)),
        spent(lasting, GrantKind::Promo, eur(1)),
        spent(topup, GrantKind::Paid, eur(5)),
    ];
    assert_eq!(settled.record.paid_by, expected);
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.balance_micros, eur(-1));
    assert!(snapshot.grants.is_empty());
    engine.shutdown(Duration::from_secs(5)).await;
    let stored = usages_page(&db.client().await, account, None, 10)
        .await
        .unwrap();
    assert_eq!(stored[0].paid_by, expected);

    // A new credit repays the debt first; the rest is spendable.
    let engine = db.engine(&settings());
    let repaying = engine
        .credit(account, posting("t2", TransactionType::TopUp, eur(3)))
        .await
        .unwrap();
    let grants = engine.balance(account).await.unwrap().grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].transaction_id, Some(repaying.record.id));
    assert_eq!(
        (grants[0].amount_micros, grants[0].remaining_micros),
        (eur(3), eur(2))
    );
    engine.shutdown(Duration::from_secs(5)).await;
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn paid_credits_never_expire() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_grants_paid").await;
    let paid = Posting {
        expires_at: Some(Utc::now() + chrono::Duration::days(1)),
        ..posting("t", TransactionType::TopUp, eur(5))
    };
    let refused = engine.credit(account, paid).await;
    assert!(
        matches!(&refused, Err(LedgerError::InvalidRequest(m)) if m.contains("expiresAt")),
        "{refused:?}"
    );
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        Micros::ZERO
    );
}

#[actix::test]
async fn a_resident_account_expires_its_bonus_when_the_time_comes_once() {
    let db = TestDb::new().await;
    let clock = Clock::manual(Utc::now());
    let engine = db.engine_with_clock(&long_holds(), clock.clone());
    let account = db.user("user_grants_resident").await;
    let bonus = engine
        .credit(
            account,
            promo(
                "bonus",
                eur(10),
                Some(clock.now() + chrono::Duration::seconds(1)),
            ),
        )
        .await
        .unwrap();
    let bonus = grant_of(&engine, account, bonus.record.id).await;
    engine
        .credit(account, posting("t", TransactionType::TopUp, eur(5)))
        .await
        .unwrap();

    // The actor's own timer, armed by the credit, finds it due.
    clock.advance(chrono::Duration::hours(1)).unwrap();
    wait_for_balance(&engine, account, eur(5)).await;

    assert_eq!(
        engine.expire_grants(account, clock.now()).await.unwrap(),
        Vec::new()
    );
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.grants.len(), 1);
    assert_eq!(snapshot.grants[0].kind, GrantKind::Paid);
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        expiries(&db, account).await,
        vec![(format!("grant:{bonus}:expired"), 10_000_000)]
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_bonus_that_expired_while_its_account_was_not_loaded_expires_once_at_load() {
    let db = TestDb::new().await;
    let clock = Clock::manual(Utc::now());
    let account = db.user("user_grants_restart").await;
    let engine = db.engine_with_clock(&long_holds(), clock.clone());
    let bonus = engine
        .credit(
            account,
            promo(
                "bonus",
                eur(10),
                Some(clock.now() + chrono::Duration::hours(1)),
            ),
        )
        .await
        .unwrap();
    let bonus = grant_of(&engine, account, bonus.record.id).await;
    engine
        .credit(account, posting("t", TransactionType::TopUp, eur(5)))
        .await
        .unwrap();
    engine.shutdown(Duration::from_secs(5)).await;
    assert_eq!(expiries(&db, account).await, Vec::new());

    clock.advance(chrono::Duration::hours(2)).unwrap();
    for _ in 0..2 {
        let engine = db.engine_with_clock(&long_holds(), clock.clone());
        assert_eq!(
            engine.balance(account).await.unwrap().balance_micros,
            eur(5)
        );
        engine.shutdown(Duration::from_secs(5)).await;
    }

    assert_eq!(
        expiries(&db, account).await,
        vec![(format!("grant:{bonus}:expired"), 10_000_000)]
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_bonus_partly_held_by_a_chat_expires_its_unheld_part_then_what_the_chat_left() {
    let db = TestDb::new().await;
    let clock = Clock::manual(Utc::now());
    let engine = db.engine_with_clock(&long_holds(), clock.clone());
    let account = db.user("user_grants_held").await;
    let bonus = engine
        .credit(
            account,
            promo(
                "bonus",
                eur(10),
                Some(clock.now() + chrono::Duration::hours(1)),
            ),
        )
        .await
        .unwrap();
    let bonus = grant_of(&engine, account, bonus.record.id).await;
    let topup = engine
        .credit(account, posting("t", TransactionType::TopUp, eur(20)))
        .await
        .unwrap();
    let topup = grant_of(&engine, account, topup.record.id).await;
    let hold = HoldId::generate();
    engine.reserve(account, hold, eur(8)).await.unwrap();

    clock.advance(chrono::Duration::hours(2)).unwrap();
    let expired = engine.expire_grants(account, clock.now()).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].amount_micros, eur(2));
    assert_eq!(
        expired[0].paid_by,
        vec![spent(bonus, GrantKind::Promo, eur(2))]
    );
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.balance_micros, eur(28));
    // A new chat cannot spend what the first one kept of the bonus.
    let second = HoldId::generate();
    engine.reserve(account, second, eur(1)).await.unwrap();
    let late = engine.settle(account, second, usage(eur(1))).await.unwrap();
    assert_eq!(
        late.record.paid_by,
        vec![spent(topup, GrantKind::Paid, eur(1))]
    );

    // The chat spends 3 € of what it kept; the other 5 € expire.
    let settled = engine.settle(account, hold, usage(eur(3))).await.unwrap();
    assert_eq!(
        settled.record.paid_by,
        vec![spent(bonus, GrantKind::Promo, eur(3))]
    );
    wait_for_balance(&engine, account, eur(19)).await;
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.grants.len(), 1);
    assert_eq!(snapshot.grants[0].id, topup);
    assert_eq!(snapshot.grants[0].remaining_micros, eur(19));
    engine.shutdown(Duration::from_secs(5)).await;
    let found = expiries(&db, account).await;
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].1, 2_000_000);
    assert_eq!(found[1], (format!("grant:{bonus}:expired"), 5_000_000));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_partial_refund_takes_from_its_own_top_up_before_a_bonus_that_comes_first_in_spend_order()
{
    let stripe = spawn_stripe_app().await;
    let app = &stripe.app;
    let user = "user_grants_own";
    top_up(&stripe, user, "cs_own", 2000).await;
    let bonus = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{user}/credits"),
        )
        .json(&json!({
            "amountMicros": 5_000_000, "key": "bonus", "reason": "geste", "type": "PROMO_BONUS",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(bonus.status(), 201);

    let status = stripe
        .deliver(&event(
            "evt_own_refund",
            "charge.refunded",
            charge("ch_own", "pi_cs_own", 2000, 1000),
        ))
        .await;
    assert_eq!(status, 200);

    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 15_000_000);
    let grants = overview["grants"].as_array().cloned().unwrap_or_default();
    let remaining: Vec<(Value, Value)> = grants
        .iter()
        .map(|g| (g["kind"].clone(), g["remainingMicros"].clone()))
        .collect();
    assert_eq!(
        remaining,
        vec![
            (json!("PROMO"), json!(5_000_000)),
            (json!("PAID"), json!(10_000_000)),
        ]
    );
    let (_, history) = json_of(app.get_as(user, "/api/credits/transactions").await).await;
    assert_eq!(
        history["items"][0]["paidBy"],
        json!([{ "grantId": grants[1]["id"], "kind": "PAID", "amountMicros": 10_000_000 }])
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn many_spends_of_one_grant_written_in_one_batch_store_what_it_has_left_after_the_last() {
    let db = TestDb::new().await;
    let mut settings = settings();
    // Batches wait for company: the spends share one.
    settings.journal.batch_delay_us = 20_000;
    settings.journal.gather_when_idle = true;
    let engine = db.engine(&settings);
    let account = db.user("user_grants_batch").await;
    engine
        .credit(account, posting("t", TransactionType::TopUp, eur(10)))
        .await
        .unwrap();
    let spends = futures_util::future::join_all((0..20).map(|i| {
        engine.debit(
            account,
            posting(
                &format!("d{i}"),
                TransactionType::Adjustment,
                micros(100_000),
            ),
        )
    }))
    .await;
    assert!(spends.iter().all(Result::is_ok), "{spends:?}");
    let batches = engine.writer().stats().batches_committed;
    assert!(batches < 21, "{batches} batches for 21 entries");
    engine.shutdown(Duration::from_secs(5)).await;

    let engine = db.engine(&settings);
    let grants = engine.balance(account).await.unwrap().grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(grants[0].remaining_micros, eur(8));
    engine.shutdown(Duration::from_secs(5)).await;
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refused_batch_entry_puts_back_what_its_account_spent_of_a_grant_in_that_batch() {
    let db = TestDb::new().await;
    let (engine, bad, _good, reused) = crate::ledger::bad_and_good_on_one_writer(&db, 50_000).await;
    let before = engine.balance(bad).await.unwrap();

    // The debit spends from the grant; the reserve in the same batch reuses
    // a hold id PostgreSQL refuses: the whole account is undone.
    let (debit, refused) = tokio::join!(
        engine.debit(
            bad,
            posting("spend", TransactionType::Adjustment, micros(500))
        ),
        engine.reserve(bad, reused, micros(100)),
    );
    assert!(
        matches!(refused, Err(LedgerError::Unavailable(_))),
        "{refused:?}"
    );
    assert!(
        matches!(debit, Err(LedgerError::Unavailable(_))),
        "{debit:?}"
    );

    let after = engine.balance(bad).await.unwrap();
    assert_eq!(after.balance_micros, before.balance_micros);
    assert_eq!(after.grants, before.grants);
    engine.shutdown(Duration::from_secs(5)).await;
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_balance_from_before_grants_becomes_one_paid_grant_that_never_expires() {
    let db = TestDb::new().await;
    let rich = db.user("user_grants_migrated").await;
    let indebted = db.user("user_grants_migrated_debt").await;
    let mut client = db.client().await;
    // The database as it was before grants: their migration undone, and
    // two accounts, one in credit, one in debt.
    client
        .batch_execute(&format!(
            "DROP TABLE credit_grants;
             ALTER TABLE credit_transactions DROP COLUMN paid_by;
             ALTER TABLE credit_usages DROP COLUMN paid_by;
             DELETE FROM schema_migrations WHERE name = 'grants';
             INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), {rich}, 1, 'TOP_UP', 'CREDIT', 7000000, 'old-top-up',
                     0, 7000000, now()),
                    (gen_random_uuid(), {indebted}, 1, 'ADJUSTMENT', 'DEBIT', 2000000, 'old-debit',
                     0, -2000000, now());
             UPDATE credit_balances SET balance_micros = 7000000, version = 1
              WHERE user_id = {rich};
             UPDATE credit_balances SET balance_micros = -2000000, version = 1
              WHERE user_id = {indebted};",
            rich = rich.0,
            indebted = indebted.0,
        ))
        .await
        .unwrap();

    creditd::db::migrate(&mut client).await.unwrap();

    let engine = db.engine(&settings());
    let grants = engine.balance(rich).await.unwrap().grants;
    assert_eq!(grants.len(), 1);
    assert_eq!(
        (
            grants[0].kind,
            grants[0].amount_micros,
            grants[0].remaining_micros,
            grants[0].expires_at,
            grants[0].source.as_str()
        ),
        (GrantKind::Paid, eur(7), eur(7), None, "migrated")
    );
    assert!(engine.balance(indebted).await.unwrap().grants.is_empty());
    let spend = engine
        .debit(rich, posting("spend", TransactionType::Adjustment, eur(1)))
        .await
        .unwrap();
    assert_eq!(
        spend.record.paid_by,
        vec![spent(grants[0].id, GrantKind::Paid, eur(1))]
    );
    engine.shutdown(Duration::from_secs(5)).await;
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_chat_usage_lists_the_grants_that_paid_it_in_spend_order() {
    use crate::support::providers::{anthropic_message, app_with, conversation, fakes, fund};
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("Voilà.", 1000, 500, 2000, 300)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |_| {}).await;
    let user = "user_grants_chat";
    fund(&app, user, 10_000_000).await;
    let expires = Utc::now() + chrono::Duration::days(7);
    let bonus = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{user}/credits"),
        )
        .json(&json!({
            "amountMicros": 5_000, "key": "bonus", "reason": "essai", "type": "PROMO_BONUS",
            "expiresAt": expires.to_rfc3339(),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(bonus.status(), 201);
    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    let (expiring, lasting) = (
        overview["grants"][0]["id"].clone(),
        overview["grants"][1]["id"].clone(),
    );

    let (status, answer) = json_of(
        app.post_as(
            user,
            "/api/chat",
            &json!({ "messages": conversation(), "maxTokens": 1000 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{answer}");

    // 11_886 micros: the expiring bonus first, the rest from the older credit.
    let (_, usages) = json_of(app.get_as(user, "/api/credits/usages").await).await;
    assert_eq!(usages["items"][0]["costMicros"], 11_886);
    assert_eq!(
        usages["items"][0]["paidBy"],
        json!([
            { "grantId": expiring, "kind": "PROMO", "amountMicros": 5_000 },
            { "grantId": lasting, "kind": "PROMO", "amountMicros": 6_886 },
        ])
    );
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_dispute_takes_from_its_own_top_up_before_a_bonus_and_its_reinstatement_is_paid_money() {
    let stripe = spawn_stripe_app().await;
    let app = &stripe.app;
    let user = "user_grants_dispute";
    top_up(&stripe, user, "cs_disputed", 2000).await;
    let bonus = app
        .admin(
            reqwest::Method::POST,
            &format!("/admin/accounts/{user}/credits"),
        )
        .json(&json!({
            "amountMicros": 5_000_000, "key": "bonus", "reason": "geste", "type": "PROMO_BONUS",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(bonus.status(), 201);
    let dispute = |event_id: &str, kind: &str| {
        event(
            event_id,
            kind,
            json!({
                "id": "dp_grants", "object": "dispute", "amount": 1000, "charge": "ch_disputed",
                "currency": "eur", "payment_intent": "pi_cs_disputed", "reason": "fraudulent",
                "status": "needs_response",
            }),
        )
    };

    let status = stripe
        .deliver(&dispute("evt_withdrawn", "charge.dispute.funds_withdrawn"))
        .await;
    assert_eq!(status, 200);
    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    let topup = overview["grants"][1]["id"].clone();
    assert_eq!(overview["grants"][0]["remainingMicros"], 5_000_000);
    assert_eq!(overview["grants"][1]["remainingMicros"], 10_000_000);
    let (_, history) = json_of(app.get_as(user, "/api/credits/transactions").await).await;
    assert_eq!(history["items"][0]["type"], "DISPUTE");
    assert_eq!(
        history["items"][0]["paidBy"],
        json!([{ "grantId": topup, "kind": "PAID", "amountMicros": 10_000_000 }])
    );

    // Won: the funds come back as paid money, spent after the bonus.
    let status = stripe
        .deliver(&dispute(
            "evt_reinstated",
            "charge.dispute.funds_reinstated",
        ))
        .await;
    assert_eq!(status, 200);
    let (_, overview) = json_of(app.get_as(user, "/api/credits").await).await;
    let kinds: Vec<(Value, Value)> = overview["grants"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|g| (g["kind"].clone(), g["remainingMicros"].clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (json!("PROMO"), json!(5_000_000)),
            (json!("PAID"), json!(10_000_000)),
            (json!("PAID"), json!(10_000_000)),
        ]
    );
    app.db.reconcile_is_clean().await;
}
