//! Alert and receipt emails: made from the outbox's events, sent over real
//! SMTP (creditd's lettre client) to a local SMTP server that keeps every
//! message (`creditd::demo::smtp`), once per event, in order per account,
//! retried while the server is down, without holding back the ledger or the
//! event webhooks.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use creditd::config::{Secret, Settings};
use creditd::demo::smtp::{Mailbox, Received, SmtpServer};
use creditd::ledger::{AccountId, Engine, HoldId, TransactionType, UsageCharge};
use creditd::money::Micros;
use creditd::pricing::TokenUsage;
use reqwest::Method;
use serde_json::json;

use crate::browser::{demo_sign_in, grant, start_demo, Browser};
use crate::events::{sending_to, Receiver};
use crate::support::stripe::*;
use crate::support::*;

const BILLING_URL: &str = "https://app.example.test/billing";

/// A local SMTP server and what it received.
async fn smtp_server() -> (SmtpServer, Mailbox) {
    let mailbox = Mailbox::default();
    let server = SmtpServer::start("127.0.0.1:0".parse().expect("address"), mailbox.clone())
        .await
        .expect("the SMTP server starts");
    (server, mailbox)
}

/// Settings that mail through `smtp_url` and retry within milliseconds.
fn mailing_to(settings: &mut Settings, smtp_url: &str) {
    settings.email.smtp_url = Secret::new(smtp_url);
    settings.email.billing_url = BILLING_URL.into();
    settings.email.poll_interval_ms = 20;
    settings.email.retry_ms_base = 50;
    settings.email.retry_ms_max = 200;
    settings.email.timeout_ms = 2_000;
}

async fn set_address(db: &TestDb, account: AccountId, address: &str) {
    db.client()
        .await
        .execute(
            "UPDATE users SET email = $2 WHERE id = $1",
            &[&account.0, &address],
        )
        .await
        .expect("address set");
}

/// Waits until `mailbox` holds `count` messages; then a moment more, so a
/// duplicate would show.
async fn wait_for_mail(mailbox: &Mailbox, count: usize, limit: Duration) -> Vec<Received> {
    let deadline = Instant::now() + limit;
    while mailbox.messages().len() < count {
        assert!(
            Instant::now() < deadline,
            "{} emails after {limit:?}, expected {count}: {:?}",
            mailbox.messages().len(),
            subjects(&mailbox.messages())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    mailbox.messages()
}

/// Waits until no email delivery is PENDING.
async fn wait_until_decided(db: &TestDb, limit: Duration) {
    wait_for_count_in(
        db,
        "SELECT count(*) FROM email_deliveries WHERE status = 'PENDING'",
        0,
        limit,
    )
    .await;
}

async fn wait_for_count_in(db: &TestDb, sql: &str, expected: i64, limit: Duration) {
    let client = db.client().await;
    let deadline = Instant::now() + limit;
    loop {
        let found: i64 = client.query_one(sql, &[]).await.expect("count").get(0);
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {found}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn subjects(messages: &[Received]) -> Vec<String> {
    messages.iter().map(Received::subject).collect()
}

/// The `field` (micros) of each event of `kind` of an account, in journal order.
async fn event_amounts(db: &TestDb, account: AccountId, kind: &str, field: &str) -> Vec<Micros> {
    db.client()
        .await
        .query(
            "SELECT (data->>$3)::int8 FROM outgoing_events
              WHERE user_id = $1 AND type = $2 ORDER BY seq, ordinal",
            &[&account.0, &kind, &field],
        )
        .await
        .expect("events")
        .iter()
        .map(|row| Micros::new(row.get(0)))
        .collect()
}

fn engine(db: &TestDb, settings: &Settings) -> Engine {
    let database = db.database(settings);
    let pool = database.pool(&settings.database).expect("pool");
    crate::support::listening(Engine::start_with_alerts(
        &settings.engine,
        &settings.journal,
        database,
        pool,
        creditd::clock::Clock::system(),
        creditd::app::alert_thresholds(&settings.credits),
    ))
}

/// `count` chats of `cost` each, as 10 concurrent callers.
async fn chats(engine: &Engine, account: AccountId, count: usize, cost: Micros) {
    let tasks = (0..10).map(|_| async move {
        for _ in 0..count / 10 {
            let hold = HoldId::generate();
            engine.admit(account, hold, cost).await.expect("admitted");
            let usage = UsageCharge {
                model: "claude-sonnet-4-5".into(),
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
            };
            engine.settle(account, hold, usage).await.expect("settled");
        }
    });
    futures_util::future::join_all(tasks).await;
}

#[actix::test]
async fn a_thousand_chats_across_the_threshold_twice_send_each_alert_and_each_receipt_once_in_order(
) {
    let (server, mailbox) = smtp_server().await;
    let db = TestDb::new().await;
    let mut settings = settings();
    mailing_to(&mut settings, &server.url());
    let engine = engine(&db, &settings);
    let pool = db
        .database(&settings)
        .pool(&settings.database)
        .expect("pool");
    // Two instances' senders on one database: one sends, the other waits.
    let senders: Vec<_> = ["first", "second"]
        .into_iter()
        .map(|instance| {
            creditd::email::spawn_sender(
                db.election(&settings, instance),
                pool.clone(),
                &settings.email,
            )
            .expect("sender")
            .expect("an SMTP URL is configured")
        })
        .collect();
    let account = db.user("user_mailed").await;
    set_address(&db, account, "lea@example.test").await;
    engine
        .credit(
            account,
            posting("opening", TransactionType::Adjustment, eur(10)),
        )
        .await
        .expect("opening credit");

    // 500 chats of 2 cents: 10 € down to zero; a top-up; 500 chats of 1.8
    // cents: 10 € down to 1 €, low but not depleted; a top-up.
    chats(&engine, account, 500, micros(20_000)).await;
    engine
        .credit(account, posting("topup-1", TransactionType::TopUp, eur(10)))
        .await
        .expect("first top-up");
    chats(&engine, account, 500, micros(18_000)).await;
    engine
        .credit(account, posting("topup-2", TransactionType::TopUp, eur(10)))
        .await
        .expect("second top-up");
    let messages = wait_for_mail(&mailbox, 5, Duration::from_secs(60)).await;
    wait_until_decided(&db, Duration::from_secs(10)).await;
    for sender in senders {
        sender.abort();
    }

    let lows = event_amounts(&db, account, "balance.low", "availableMicros").await;
    assert_eq!(lows.len(), 2, "two crossings");
    assert_eq!(
        subjects(&messages),
        [
            format!("Solde bas : il vous reste {}", lows[0]),
            "Solde épuisé : vos conversations sont en pause".to_owned(),
            "Reçu : recharge de 10.00€".to_owned(),
            format!("Solde bas : il vous reste {}", lows[1]),
            "Reçu : recharge de 10.00€".to_owned(),
        ],
        "one email per event, in the account's order, none twice"
    );
    let low = &messages[0];
    assert_eq!(low.to, ["lea@example.test"]);
    let text = low.text();
    assert!(
        text.contains(&format!("passé sous 2.00€ : il vous reste {}", lows[0])),
        "{text}"
    );
    assert!(
        text.contains(&format!("Recharger : {BILLING_URL}")),
        "{text}"
    );
    assert!(low.html().contains(&format!("href=\"{BILLING_URL}\"")));
    assert!(
        messages[2].text().contains("Nouveau solde : 10.00€"),
        "{}",
        messages[2].text()
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn after_opting_out_a_person_gets_no_alert_email_but_still_a_receipt_with_its_invoice_link() {
    let (server, mailbox) = smtp_server().await;
    let url = server.url();
    let stripe = spawn_stripe_app_with(move |s| {
        mailing_to(s, &url);
        s.stripe.followup_retry_ms_base = 20;
    })
    .await;
    stripe.mount_reads().await;
    let app = &stripe.app;
    let account = app.account("user_quiet").await;
    set_address(&app.db, account, "quiet@example.test").await;
    let (status, shown) = json_of(
        app.get_as("user_quiet", "/api/credits/email-preferences")
            .await,
    )
    .await;
    assert_eq!(
        (status, shown),
        (200, json!({"alertEmails": true})),
        "on by default"
    );
    let (status, saved) = json_of(
        app.http
            .put(app.url("/api/credits/email-preferences"))
            .bearer_auth(app.token("user_quiet"))
            .json(&json!({"alertEmails": false}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!((status, saved), (200, json!({"alertEmails": false})));

    app.operator_debt("user_quiet").await;
    let mut session = checkout_session("cs_quiet", account.0, 2_500, "paid");
    session["invoice"] = json!("in_quiet");
    assert_eq!(
        stripe
            .deliver(&event(
                "evt_cs_quiet",
                "checkout.session.completed",
                session
            ))
            .await,
        200
    );
    let messages = wait_for_mail(&mailbox, 1, Duration::from_secs(30)).await;
    wait_until_decided(&app.db, Duration::from_secs(10)).await;

    assert_eq!(subjects(&messages), ["Reçu : recharge de 25.00€"]);
    let text = messages[0].text();
    assert!(
        text.contains("Facture : https://invoice.stripe.com/i/"),
        "the receipt waited for its invoice link: {text}"
    );
    let (status, listed) = json_of(
        app.admin(Method::GET, "/admin/emails?userId=user_quiet")
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let states: Vec<(&str, &str, Option<&str>)> = listed["emails"]
        .as_array()
        .expect("emails")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default(),
                e["status"].as_str().unwrap_or_default(),
                e["skippedReason"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("topup.succeeded", "SENT", None),
            ("balance.depleted", "SKIPPED", Some("opted_out")),
            ("balance.low", "SKIPPED", Some("opted_out")),
        ]
    );
}

#[actix::test]
async fn while_the_smtp_server_is_down_the_ledger_and_the_webhooks_go_on_and_the_emails_arrive_once_it_is_back(
) {
    let (server, mailbox) = smtp_server().await;
    let address: SocketAddr = server.address();
    server.stop();
    let (receiver_server, receiver) = Receiver::start(0).await;
    let url = format!("smtp://{address}");
    let app = spawn_app_with(|settings| {
        mailing_to(settings, &url);
        sending_to(settings, &receiver_server);
    })
    .await;
    let account = app.account("user_patient").await;
    set_address(&app.db, account, "patient@example.test").await;

    let started = Instant::now();
    let (status, _) = json_of(
        app.admin(Method::POST, "/admin/accounts/user_patient/credits")
            .json(&json!({"amountMicros": -1_000_000, "key": "debt", "reason": "chargeback"}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    let answered_in = started.elapsed();
    assert_eq!(status, 201);
    // The webhooks go out while every SMTP attempt is refused.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.accepted().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "webhooks held back: {:?}",
            receiver.deliveries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let webhooks_in = started.elapsed();
    wait_for_count_in(
        &app.db,
        "SELECT count(*) FROM email_deliveries WHERE status = 'PENDING' AND attempts >= 2 AND last_error LIKE 'SMTP%'",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert!(mailbox.messages().is_empty());
    let metrics = app.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with("creditd_emails_total{")
                && line.contains("outcome=\"retried\"")
                && !line.ends_with(" 0")),
        "failed attempts are counted"
    );

    let _back = SmtpServer::start(address, mailbox.clone())
        .await
        .expect("the SMTP server comes back on its port");
    let messages = wait_for_mail(&mailbox, 2, Duration::from_secs(30)).await;
    wait_until_decided(&app.db, Duration::from_secs(10)).await;

    assert_eq!(
        subjects(&messages),
        [
            "Solde bas : il vous reste -1.00€",
            "Solde épuisé : vos conversations sont en pause"
        ]
    );
    assert!(
        answered_in < Duration::from_secs(2) && webhooks_in < Duration::from_secs(10),
        "the debit answered in {answered_in:?}, the webhooks arrived in {webhooks_in:?}"
    );
}

#[actix::test]
async fn a_deleted_account_gets_no_email_and_a_bad_preference_is_refused_naming_the_field() {
    let (server, mailbox) = smtp_server().await;
    let url = server.url();
    let app = spawn_app_with(|settings| mailing_to(settings, &url)).await;
    let (status, refused) = json_of(
        app.http
            .put(app.url("/api/credits/email-preferences"))
            .bearer_auth(app.token("user_gone"))
            .json(&json!({"alertEmails": "no"}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap_or_default()
            .contains("alertEmails"),
        "{refused}"
    );

    let account = app.account("user_gone").await;
    set_address(&app.db, account, "gone@example.test").await;
    app.db
        .client()
        .await
        .execute(
            "UPDATE users SET deleted_at = now() WHERE id = $1",
            &[&account.0],
        )
        .await
        .expect("deleted");
    app.operator_debt("user_gone").await;
    wait_for_count_in(
        &app.db,
        "SELECT count(*) FROM email_deliveries WHERE status = 'SKIPPED' AND skipped_reason = 'account_deleted'",
        2,
        Duration::from_secs(30),
    )
    .await;
    assert!(mailbox.messages().is_empty());
}

#[actix::test]
async fn the_demos_mailbox_page_shows_the_low_balance_email_once_a_chat_crosses_the_threshold_and_the_billing_page_switches_alerts_off(
) {
    let (demo, handle) = start_demo().await;
    let mut browser = Browser::start().await;
    demo_sign_in(&browser, &demo, "Mailer").await;
    // 10 € of bonus, less 7.9999 €: a hundredth of a cent above the 2 € line.
    grant(
        &demo.url,
        "user_demo_Mailer",
        -7_999_900,
        "down-to-the-line",
    )
    .await;
    browser.goto(&format!("{}/demo", demo.url)).await;
    browser
        .type_into(".chat__input", "Une application de recettes.")
        .await;
    browser.click(".chat__send").await;
    browser
        .until(
            "the chat's answer",
            "return document.querySelector('.chat__message.is-assistant') !== null",
        )
        .await;

    browser.click(".demo-banner a[href$='/mailbox']").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let subject = loop {
        let subjects = browser
            .js("return [...document.querySelectorAll('.mailbox__subject')].map(e => e.textContent)")
            .await;
        if let Some(found) = subjects.as_array().and_then(|s| s.first()) {
            break found.as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "no email in the demo's mailbox");
        tokio::time::sleep(Duration::from_millis(300)).await;
        browser.goto(&demo.mailbox_url).await;
    };
    assert!(
        subject.starts_with("Solde bas : il vous reste 1.9"),
        "{subject}"
    );
    assert_eq!(
        browser.text(".mailbox__meta").await.split(" · ").next(),
        Some("À mailer@demo.test")
    );
    let text = browser.text(".mailbox__text").await;
    assert!(
        text.contains(&format!("Recharger : {}/billing", demo.url)),
        "{text}"
    );
    assert_eq!(
        browser
            .js("return document.querySelectorAll('.mailbox__message').length")
            .await,
        json!(1),
        "one crossing, one email"
    );
    browser.resize(1280).await;
    browser.fits(1280).await;

    // The person switches alert emails off on the billing page; it holds.
    browser.goto(&format!("{}/billing", demo.url)).await;
    browser
        .until(
            "the alerts checkbox, on",
            "const c = document.querySelector('#email-alerts'); return c && !c.disabled && c.checked",
        )
        .await;
    browser.click("#email-alerts").await;
    browser
        .until(
            "the switch-off saved",
            "return document.querySelector('.email-preferences__status').textContent === 'Alertes par e-mail désactivées.'",
        )
        .await;
    browser.goto(&format!("{}/billing", demo.url)).await;
    browser
        .until(
            "the alerts checkbox, off after a reload",
            "const c = document.querySelector('#email-alerts'); return c && !c.disabled && !c.checked",
        )
        .await;
    browser.assert_no_console_errors().await;
    browser.close().await;
    handle.stop(true).await;
}
