//! Outgoing events: written with the change that caused them, delivered
//! signed, in order per account, at least once, to a local receiver that
//! records every delivery and answers as each test tells it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use creditd::config::{Secret, Settings};
use creditd::ledger::{AccountId, Engine, HoldId, LedgerError, TransactionType, UsageCharge};
use creditd::money::Micros;
use creditd::pricing::TokenUsage;
use reqwest::Method;
use serde_json::json;

use crate::support::*;

pub const SIGNING_SECRET: &str = "whsec_creditd_events_test";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub kind: String,
    pub user: String,
    pub status: u16,
    pub signed: bool,
    /// The envelope's `sequence`.
    pub sequence: Option<i64>,
}

/// A webhook receiver: records each delivery, checks its signature, and
/// answers 500 to every `fail_every`-th request (0: never), to all of
/// them while `down` is set, and to events of the types in `refused`.
#[derive(Clone)]
pub struct Receiver {
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    fail_every: usize,
    pub down: Arc<AtomicBool>,
    pub refused: Arc<Mutex<HashSet<String>>>,
}

impl wiremock::Respond for Receiver {
    fn respond(&self, request: &wiremock::Request) -> wiremock::ResponseTemplate {
        let header = request
            .headers
            .get("creditd-signature")
            .and_then(|value| value.to_str().ok());
        let now = chrono::Utc::now().timestamp();
        let signed =
            creditd::stripe::signature::verify(header, &request.body, SIGNING_SECRET, 300, now)
                .is_ok();
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let kind = body["type"].as_str().unwrap_or_default().to_owned();
        let mut deliveries = lock(&self.deliveries);
        let count = deliveries.len() + 1;
        let failing = self.down.load(Ordering::SeqCst)
            || (self.fail_every > 0 && count.is_multiple_of(self.fail_every))
            || lock(&self.refused).contains(&kind);
        let status = if failing { 500 } else { 200 };
        deliveries.push(Delivery {
            id: body["id"].as_str().unwrap_or_default().to_owned(),
            kind,
            user: body["data"]["userId"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            status,
            signed,
            sequence: body["sequence"].as_i64(),
        });
        wiremock::ResponseTemplate::new(status)
    }
}

impl Receiver {
    pub async fn start(fail_every: usize) -> (wiremock::MockServer, Receiver) {
        let server = wiremock::MockServer::start().await;
        let receiver = Receiver {
            deliveries: Arc::new(Mutex::new(Vec::new())),
            fail_every,
            down: Arc::new(AtomicBool::new(false)),
            refused: Arc::new(Mutex::new(HashSet::new())),
        };
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path("/events"))
            .respond_with(receiver.clone())
            .mount(&server)
            .await;
        (server, receiver)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        lock(&self.deliveries).clone()
    }

    /// The deliveries it answered 2xx, in the order they arrived.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| d.status == 200)
            .collect()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Settings that send events to `server` and retry within milliseconds.
pub fn sending_to(settings: &mut Settings, server: &wiremock::MockServer) {
    settings.events.webhook_url = format!("{}/events", server.uri());
    settings.events.signing_secret = Secret::new(SIGNING_SECRET);
    settings.events.retry_ms_base = 5;
    settings.events.retry_ms_max = 40;
    settings.events.poll_interval_ms = 10;
}

/// The outbox of an account, in its journal order: (id, type, status).
async fn outbox(db: &TestDb, account: AccountId) -> Vec<(String, String, String)> {
    db.client()
        .await
        .query(
            "SELECT id::text, type, status FROM outgoing_events
              WHERE user_id = $1 ORDER BY seq, ordinal",
            &[&account.0],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// Waits until the database has no PENDING event left.
async fn wait_until_sent(db: &TestDb, limit: Duration) {
    let client = db.client().await;
    let deadline = Instant::now() + limit;
    loop {
        let pending: i64 = client
            .query_one(
                "SELECT count(*) FROM outgoing_events WHERE status = 'PENDING'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} events still pending after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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

fn charge(cost: Micros) -> UsageCharge {
    UsageCharge {
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
    }
}

/// `count` chats of `cost` each, as `streams` concurrent callers: each
/// admitted on a hold of its cost, then settled.
async fn chats(engine: &Engine, account: AccountId, count: usize, cost: Micros, streams: usize) {
    let per_stream = count / streams;
    let mut tasks = Vec::new();
    for _ in 0..streams {
        tasks.push(async move {
            for _ in 0..per_stream {
                let hold = HoldId::generate();
                engine.admit(account, hold, cost).await.expect("admitted");
                engine
                    .settle(account, hold, charge(cost))
                    .await
                    .expect("settled");
            }
        });
    }
    futures_util::future::join_all(tasks).await;
}

#[actix::test]
async fn a_thousand_chats_through_the_threshold_twice_send_each_alert_once_signed_in_order_despite_failures(
) {
    let (server, receiver) = Receiver::start(3).await;
    let db = TestDb::new().await;
    let mut settings = settings();
    sending_to(&mut settings, &server);
    let engine = engine(&db, &settings);
    let database = db.database(&settings);
    let pool = database.pool(&settings.database).expect("pool");
    // Two instances' senders on one database: one sends, the other waits.
    let second = creditd::events::spawn_sender(
        db.election(&settings, "second"),
        pool.clone(),
        &settings.events,
    )
    .expect("sender")
    .expect("a URL is configured");
    let sender =
        creditd::events::spawn_sender(db.election(&settings, "first"), pool, &settings.events)
            .expect("sender")
            .expect("a URL is configured");
    let account = db.user("user_walks_down").await;
    engine
        .credit(
            account,
            posting("opening", TransactionType::Adjustment, eur(10)),
        )
        .await
        .expect("opening credit");

    // 500 chats of 2 cents: 10 EUR down to exactly zero.
    chats(&engine, account, 500, micros(20_000), 10).await;
    engine
        .credit(account, posting("topup-1", TransactionType::TopUp, eur(10)))
        .await
        .expect("first top-up");
    // 500 chats of 1.8 cents: 10 EUR down to 1 EUR, low but not depleted.
    chats(&engine, account, 500, micros(18_000), 10).await;
    engine
        .credit(account, posting("topup-2", TransactionType::TopUp, eur(10)))
        .await
        .expect("second top-up");
    let balance = engine.balance(account).await.expect("balance");
    wait_until_sent(&db, Duration::from_secs(60)).await;
    sender.abort();
    second.abort();

    assert_eq!(balance.balance_micros, eur(11));
    let outbox = outbox(&db, account).await;
    let types: Vec<&str> = outbox.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        types,
        [
            "balance.low",
            "balance.depleted",
            "topup.succeeded",
            "balance.recovered",
            "balance.low",
            "topup.succeeded",
            "balance.recovered",
        ]
    );
    assert!(outbox.iter().all(|(_, _, status)| status == "DELIVERED"));
    let deliveries = receiver.deliveries();
    assert!(
        deliveries.iter().any(|d| d.status == 500),
        "the receiver refused some deliveries"
    );
    assert!(deliveries.iter().all(|d| d.signed), "{deliveries:?}");
    assert!(deliveries.iter().all(|d| d.user == "user_walks_down"));
    let accepted: Vec<String> = receiver.accepted().into_iter().map(|d| d.id).collect();
    let in_order: Vec<String> = outbox.into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(accepted, in_order, "accepted once each, in journal order");
    // Every attempt of an event comes before any of the next one's.
    let mut attempted: Vec<String> = Vec::new();
    for delivery in &deliveries {
        if attempted.last() != Some(&delivery.id) {
            assert!(
                !attempted.contains(&delivery.id),
                "{} retried after a later event was sent",
                delivery.id
            );
            attempted.push(delivery.id.clone());
        }
    }
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn alerts_are_not_repeated_by_an_engine_that_reloads_the_account() {
    let db = TestDb::new().await;
    let settings = settings();
    let account = db.user("user_reloads").await;
    {
        let engine = engine(&db, &settings);
        engine
            .credit(account, posting("in", TransactionType::Adjustment, eur(5)))
            .await
            .expect("credit");
        engine
            .debit(account, posting("out", TransactionType::Adjustment, eur(4)))
            .await
            .expect("debit under the threshold");
        engine.shutdown(Duration::from_secs(5)).await;
    }
    let engine = engine(&db, &settings);
    engine
        .debit(
            account,
            posting("out-2", TransactionType::Adjustment, micros(500_000)),
        )
        .await
        .expect("a debit still under the threshold");
    engine
        .credit(
            account,
            posting("back", TransactionType::Adjustment, eur(3)),
        )
        .await
        .expect("back above the threshold and its margin");

    let types: Vec<String> = outbox(&db, account)
        .await
        .into_iter()
        .map(|(_, t, _)| t)
        .collect();
    assert_eq!(types, ["balance.low", "balance.recovered"]);
}

#[actix::test]
async fn without_a_webhook_url_events_are_recorded_and_wait_pending() {
    let app = spawn_app().await;
    app.operator_debt("user_unsent").await;

    let account = app.account("user_unsent").await;
    let outbox = outbox(&app.db, account).await;
    let found: Vec<(&str, &str)> = outbox
        .iter()
        .map(|(_, t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(
        found,
        [("balance.low", "PENDING"), ("balance.depleted", "PENDING")]
    );
}

#[actix::test]
async fn an_operator_lists_delivery_states_and_redelivers_an_event_which_is_sent_again() {
    let (server, receiver) = Receiver::start(0).await;
    let app = spawn_app_with(|settings| sending_to(settings, &server)).await;
    app.operator_debt("user_ops").await;
    wait_until_sent(&app.db, Duration::from_secs(30)).await;

    let (status, listed) = json_of(
        app.admin(
            Method::GET,
            "/admin/events?status=DELIVERED&userId=user_ops",
        )
        .send()
        .await
        .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{listed}");
    let events = listed["events"].as_array().expect("events").clone();
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["balance.depleted", "balance.low"], "newest first");
    assert!(events.iter().all(|e| e["attempts"] == 1), "{listed}");
    let low = events[1]["id"].as_str().expect("id").to_owned();
    let id = events[0]["id"].as_str().expect("id").to_owned();

    let (status, again) = json_of(
        app.admin(Method::POST, &format!("/admin/events/{id}/redeliver"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["status"], "PENDING");
    wait_until_sent(&app.db, Duration::from_secs(30)).await;
    let sent: Vec<String> = receiver.accepted().into_iter().map(|d| d.id).collect();
    assert_eq!(sent, [low, id.clone(), id]);

    for (path, field) in [
        ("/admin/events?status=LOST", "status"),
        ("/admin/events?limit=0", "limit"),
        ("/admin/events?color=red", "color"),
        ("/admin/events/not-a-uuid/redeliver", "eventId"),
    ] {
        let method = if path.ends_with("redeliver") {
            Method::POST
        } else {
            Method::GET
        };
        let (status, body) = json_of(app.admin(method, path).send().await.expect("request")).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains(field),
            "{path}: {body}"
        );
    }
    let missing = uuid::Uuid::new_v4();
    let (status, _) = json_of(
        app.admin(Method::POST, &format!("/admin/events/{missing}/redeliver"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 404);

    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("creditd_events_delivered_total"),
        "{metrics}"
    );
    assert!(metrics.contains("creditd_events_pending"), "{metrics}");
}

/// Ids accepted more than once by the receiver.
pub fn duplicates(deliveries: &[Delivery]) -> Vec<String> {
    let mut seen = HashSet::new();
    let mut twice: HashMap<String, usize> = HashMap::new();
    for delivery in deliveries.iter().filter(|d| d.status == 200) {
        if !seen.insert(delivery.id.clone()) {
            *twice.entry(delivery.id.clone()).or_default() += 1;
        }
    }
    twice.into_keys().collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A running `creditd serve`, killed with SIGKILL when dropped.
struct Creditd {
    child: std::process::Child,
    base: String,
}

impl Creditd {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Creditd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The real `creditd serve` on `db`, sending events to `receiver`.
async fn start_creditd(
    db: &TestDb,
    jwks: &wiremock::MockServer,
    receiver: &wiremock::MockServer,
) -> Creditd {
    use std::process::{Command, Stdio};

    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("serve")
        .env("CREDITD__DATABASE__URL", db.url())
        .env(
            "CREDITD__CLERK__JWKS_URL",
            format!("{}{JWKS_PATH}", jwks.uri()),
        )
        .env("CREDITD__CLERK__ISSUER", ISSUER)
        .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("CREDITD__ADMIN__TOKEN", ADMIN_TOKEN)
        .env("CREDITD__DATABASE__POOL_SIZE", "4")
        .env("CREDITD__LOG__LEVEL", "warn")
        .env(
            "CREDITD__EVENTS__WEBHOOK_URL",
            format!("{}/events", receiver.uri()),
        )
        .env("CREDITD__EVENTS__SIGNING_SECRET", SIGNING_SECRET)
        .env("CREDITD__EVENTS__RETRY_MS_BASE", "5")
        .env("CREDITD__EVENTS__RETRY_MS_MAX", "40")
        .env("CREDITD__EVENTS__POLL_INTERVAL_MS", "10")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start creditd");
    let creditd = Creditd {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    let base = creditd.base.clone();
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            if response.status().is_success() {
                return creditd;
            }
        }
        assert!(Instant::now() < deadline, "creditd did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn adjust(base: &str, user: &str, amount_micros: i64, key: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/admin/accounts/{user}/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amountMicros": amount_micros, "key": key, "reason": "drill"}))
        .send()
        .await
        .expect("request")
        .status()
        .as_u16()
}

#[actix::test]
async fn an_event_survives_a_sigkill_before_its_delivery_and_is_delivered_once_after_restart() {
    let db = TestDb::new().await;
    let jwks = jwks_server().await;
    let (server, receiver) = Receiver::start(0).await;
    receiver.down.store(true, Ordering::SeqCst);
    let mut first = start_creditd(&db, &jwks, &server).await;
    assert_eq!(
        adjust(&first.base, "user_killed", 5_000_000, "in").await,
        201
    );
    assert_eq!(
        adjust(&first.base, "user_killed", -4_000_000, "out").await,
        201
    );
    // The change is acknowledged and its event tried (and refused) at least once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.deliveries().is_empty() {
        assert!(Instant::now() < deadline, "no delivery attempted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.kill();
    receiver.down.store(false, Ordering::SeqCst);

    let mut second = start_creditd(&db, &jwks, &server).await;
    wait_until_sent(&db, Duration::from_secs(30)).await;
    // Still under the threshold: the alert was sent before the kill, not again.
    assert_eq!(
        adjust(&second.base, "user_killed", -500_000, "out-2").await,
        201
    );
    let account = db.user("user_killed").await;
    let outbox = outbox(&db, account).await;
    second.kill();

    let found: Vec<(&str, &str)> = outbox
        .iter()
        .map(|(_, t, s)| (t.as_str(), s.as_str()))
        .collect();
    assert_eq!(found, [("balance.low", "DELIVERED")]);
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    assert_eq!(accepted[0].id, outbox[0].0);
    assert_eq!(accepted[0].kind, "balance.low");
    assert!(duplicates(&receiver.deliveries()).is_empty());
    assert!(receiver.deliveries().iter().all(|d| d.signed));
}

#[actix::test]
async fn a_change_refused_in_its_batch_leaves_no_event_and_the_other_accounts_keep_theirs() {
    let db = TestDb::new().await;
    let mut settings = settings();
    // One writer with a wide batch, so both accounts share a transaction.
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = 5_000;
    settings.journal.gather_when_idle = true;
    let engine = engine(&db, &settings);
    let bad = db.user("user_event_refused").await;
    let good = db.user("user_event_kept").await;
    for account in [bad, good] {
        engine
            .credit(account, posting("in", TransactionType::Adjustment, eur(3)))
            .await
            .expect("credit");
    }
    // Another writer took the bad account's next journal row (seq 2) without
    // moving its balance row: the fence passes, the insert is refused.
    db.client()
        .await
        .execute(
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), $1, 2, 'ADJUSTMENT', 'DEBIT', 1, 'elsewhere',
                 3000000, 2999999, now())",
            &[&bad.0],
        )
        .await
        .expect("conflicting row");

    let (refused, kept) = tokio::join!(
        engine.debit(bad, posting("out", TransactionType::Adjustment, eur(2))),
        engine.debit(good, posting("out", TransactionType::Adjustment, eur(2))),
    );

    assert!(refused.is_err(), "{refused:?}");
    kept.expect("the other account's debit commits");
    assert!(
        outbox(&db, bad).await.is_empty(),
        "no event without its change"
    );
    let types: Vec<String> = outbox(&db, good)
        .await
        .into_iter()
        .map(|(_, t, _)| t)
        .collect();
    assert_eq!(types, ["balance.low"], "no change without its event");
}

#[actix::test]
async fn a_top_up_and_its_refund_announce_themselves_with_their_amounts() {
    let db = TestDb::new().await;
    let engine = engine(&db, &settings());
    let account = db.user("user_refunded").await;
    let mut topup = posting("stripe:checkout:cs_1", TransactionType::TopUp, eur(20));
    topup.stripe_session_id = Some("cs_1".into());
    engine.credit(account, topup).await.expect("top-up");
    let mut refund = posting(
        "stripe:charge:ch_1:refunded:500",
        TransactionType::Refund,
        eur(5),
    );
    refund.stripe_payment_id = Some("pi_1".into());
    engine.debit(account, refund).await.expect("refund");

    let rows = db
        .client()
        .await
        .query(
            "SELECT type, data FROM outgoing_events WHERE user_id = $1 ORDER BY seq, ordinal",
            &[&account.0],
        )
        .await
        .expect("outbox");
    let events: Vec<(String, serde_json::Value)> =
        rows.iter().map(|row| (row.get(0), row.get(1))).collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].0, "topup.succeeded");
    assert_eq!(events[0].1["amountMicros"], 20_000_000);
    assert_eq!(events[0].1["balanceMicros"], 20_000_000);
    assert_eq!(events[0].1["stripeSessionId"], "cs_1");
    assert_eq!(events[1].0, "topup.refunded");
    assert_eq!(events[1].1["amountMicros"], 5_000_000);
    assert_eq!(events[1].1["balanceMicros"], 15_000_000);
    assert_eq!(events[1].1["stripePaymentId"], "pi_1");
}

/// Waits until `sql` (one bigint) returns `expected`.
async fn wait_for(db: &TestDb, sql: &str, expected: i64) {
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: i64 = client.query_one(sql, &[]).await.expect("query").get(0);
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: {found}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[actix::test]
async fn an_event_refused_past_its_retry_window_fails_and_lets_the_next_one_go_until_redelivered() {
    let (server, receiver) = Receiver::start(0).await;
    receiver.down.store(true, Ordering::SeqCst);
    let app = spawn_app_with(|settings| sending_to(settings, &server)).await;
    app.operator_debt("user_window").await;
    wait_for(
        &app.db,
        "SELECT count(*) FROM outgoing_events WHERE type = 'balance.low' AND attempts >= 3",
        1,
    )
    .await;
    let depleted_attempts: i64 = app
        .db
        .client()
        .await
        .query_one(
            "SELECT attempts::int8 FROM outgoing_events WHERE type = 'balance.depleted'",
            &[],
        )
        .await
        .expect("attempts")
        .get(0);
    // The first event has been refused for longer than its retry window.
    app.db
        .client()
        .await
        .execute(
            "UPDATE outgoing_events SET pending_since = now() - interval '73 hours'
              WHERE type = 'balance.low'",
            &[],
        )
        .await
        .expect("age the event");
    wait_for(
        &app.db,
        "SELECT count(*) FROM outgoing_events WHERE type = 'balance.low' AND status = 'FAILED'",
        1,
    )
    .await;
    receiver.down.store(false, Ordering::SeqCst);
    wait_until_sent(&app.db, Duration::from_secs(30)).await;

    assert_eq!(depleted_attempts, 0, "nothing sent behind a pending event");
    let (_, failed) = json_of(
        app.admin(Method::GET, "/admin/events?status=FAILED")
            .send()
            .await
            .expect("request"),
    )
    .await;
    let failed = failed["events"].as_array().expect("events").clone();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["type"], "balance.low");
    assert!(
        failed[0]["lastError"]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "{failed:?}"
    );
    let accepted: Vec<String> = receiver.accepted().into_iter().map(|d| d.kind).collect();
    assert_eq!(accepted, ["balance.depleted"], "the next event went");

    let id = failed[0]["id"].as_str().expect("id");
    let (status, _) = json_of(
        app.admin(Method::POST, &format!("/admin/events/{id}/redeliver"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200);
    wait_until_sent(&app.db, Duration::from_secs(30)).await;
    let accepted: Vec<String> = receiver.accepted().into_iter().map(|d| d.kind).collect();
    assert_eq!(accepted, ["balance.depleted", "balance.low"]);
}

/// The sequence of each delivery of `user`'s events the receiver accepted,
/// in arrival order, the first acceptance of each event only.
fn accepted_sequences(receiver: &Receiver, user: &str) -> Vec<(String, i64)> {
    let mut seen = HashSet::new();
    receiver
        .accepted()
        .into_iter()
        .filter(|d| d.user == user && seen.insert(d.id.clone()))
        .map(|d| {
            (
                d.kind,
                d.sequence.expect("every envelope carries its sequence"),
            )
        })
        .collect()
}

/// An account's events in journal order: (id, sequence).
async fn sequences_in_journal_order(db: &TestDb, account: AccountId) -> Vec<(String, Option<i64>)> {
    db.client()
        .await
        .query(
            "SELECT id::text, sequence FROM outgoing_events
              WHERE user_id = $1 ORDER BY seq, ordinal",
            &[&account.0],
        )
        .await
        .expect("outbox")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn admin_adjust(app: &TestApp, user: &str, amount_micros: i64, key: &str) {
    let (status, body) = json_of(
        app.admin(Method::POST, &format!("/admin/accounts/{user}/credits"))
            .json(&json!({"amountMicros": amount_micros, "key": key, "reason": "test"}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

#[actix::test]
async fn an_event_that_ends_failed_leaves_a_gap_in_its_accounts_sequence_and_its_redelivery_carries_its_own_number(
) {
    let (server, receiver) = Receiver::start(0).await;
    lock(&receiver.refused).insert("balance.depleted".into());
    let app = spawn_app_with(|settings| sending_to(settings, &server)).await;
    admin_adjust(&app, "user_gap", 5_000_000, "in").await;
    admin_adjust(&app, "user_gap", -4_000_000, "low").await;
    admin_adjust(&app, "user_gap", -2_000_000, "depleted").await;
    admin_adjust(&app, "user_gap", 5_000_000, "recovered").await;
    wait_for(
        &app.db,
        "SELECT count(*) FROM outgoing_events WHERE type = 'balance.depleted' AND attempts >= 3",
        1,
    )
    .await;
    app.db
        .client()
        .await
        .execute(
            "UPDATE outgoing_events SET pending_since = now() - interval '73 hours'
              WHERE type = 'balance.depleted'",
            &[],
        )
        .await
        .expect("age the event");
    wait_until_sent(&app.db, Duration::from_secs(30)).await;

    // The receiver applied 1, then got 3: the gap is the FAILED event.
    assert_eq!(
        accepted_sequences(&receiver, "user_gap"),
        [
            ("balance.low".to_owned(), 1),
            ("balance.recovered".to_owned(), 3)
        ]
    );
    let (_, listed) = json_of(
        app.admin(Method::GET, "/admin/events?userId=user_gap")
            .send()
            .await
            .expect("request"),
    )
    .await;
    let listed: Vec<(String, String, i64)> = listed["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_owned(),
                e["status"].as_str().unwrap_or_default().to_owned(),
                e["sequence"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            ("balance.recovered".into(), "DELIVERED".into(), 3),
            ("balance.depleted".into(), "FAILED".into(), 2),
            ("balance.low".into(), "DELIVERED".into(), 1),
        ]
    );

    lock(&receiver.refused).clear();
    let depleted = receiver
        .deliveries()
        .into_iter()
        .find(|d| d.kind == "balance.depleted")
        .expect("the depleted event was tried")
        .id;
    let (status, again) = json_of(
        app.admin(Method::POST, &format!("/admin/events/{depleted}/redeliver"))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["sequence"], 2, "{again}");
    wait_until_sent(&app.db, Duration::from_secs(30)).await;

    // Late, under its own number: the receiver knows it is not news.
    assert_eq!(
        accepted_sequences(&receiver, "user_gap"),
        [
            ("balance.low".to_owned(), 1),
            ("balance.recovered".to_owned(), 3),
            ("balance.depleted".to_owned(), 2),
        ]
    );
    let tries: Vec<Option<i64>> = receiver
        .deliveries()
        .into_iter()
        .filter(|d| d.id == depleted)
        .map(|d| d.sequence)
        .collect();
    assert!(tries.len() >= 4, "{tries:?}");
    assert!(
        tries.iter().all(|s| *s == Some(2)),
        "every try carried 2: {tries:?}"
    );
}

/// `count` top-ups of 1 EUR on each account, the accounts in parallel.
async fn top_ups(engine: &Engine, accounts: &[AccountId], round: &str, count: usize) {
    futures_util::future::join_all(accounts.iter().map(|&account| async move {
        for index in 0..count {
            engine
                .credit(
                    account,
                    posting(&format!("{round}-{index}"), TransactionType::TopUp, eur(1)),
                )
                .await
                .expect("top-up");
        }
    }))
    .await;
}

/// Two senders on `db`, as two instances would run them.
fn two_senders(db: &TestDb, settings: &Settings) -> [tokio::task::JoinHandle<()>; 2] {
    let database = db.database(settings);
    let pool = database.pool(&settings.database).expect("pool");
    let spawn = || {
        creditd::events::spawn_sender(
            db.election(settings, "sender"),
            pool.clone(),
            &settings.events,
        )
        .expect("sender")
        .expect("a URL is configured")
    };
    [spawn(), spawn()]
}

#[actix::test]
async fn sequences_stay_gap_free_and_in_order_per_account_across_a_restart_and_with_two_senders_on_one_database(
) {
    let (server, receiver) = Receiver::start(3).await;
    let db = TestDb::new().await;
    let mut settings = settings();
    sending_to(&mut settings, &server);
    let users = ["user_seq_a", "user_seq_b", "user_seq_c"];
    let mut accounts = Vec::new();
    for user in users {
        accounts.push(db.user(user).await);
    }

    let first = engine(&db, &settings);
    let senders = two_senders(&db, &settings);
    top_ups(&first, &accounts, "before", 6).await;
    // Stopped with deliveries half done: numbered events still pending.
    wait_for(
        &db,
        "SELECT least(count(*), 9) FROM outgoing_events WHERE status = 'DELIVERED'",
        9,
    )
    .await;
    for sender in senders {
        sender.abort();
    }
    first.shutdown(Duration::from_secs(5)).await;

    let second = engine(&db, &settings);
    let senders = two_senders(&db, &settings);
    top_ups(&second, &accounts, "after", 6).await;
    wait_until_sent(&db, Duration::from_secs(60)).await;
    for sender in senders {
        sender.abort();
    }

    assert!(receiver.deliveries().iter().any(|d| d.status == 500));
    let mut numbers: HashMap<String, HashSet<Option<i64>>> = HashMap::new();
    for delivery in receiver.deliveries() {
        numbers
            .entry(delivery.id)
            .or_default()
            .insert(delivery.sequence);
    }
    assert!(
        numbers.values().all(|tries| tries.len() == 1),
        "every delivery of an event carries one number: {numbers:?}"
    );
    for (user, account) in users.into_iter().zip(accounts) {
        let got: Vec<i64> = accepted_sequences(&receiver, user)
            .into_iter()
            .map(|(_, sequence)| sequence)
            .collect();
        assert_eq!(got, (1..=12).collect::<Vec<i64>>(), "{user}");
        let stored: Vec<Option<i64>> = sequences_in_journal_order(&db, account)
            .await
            .into_iter()
            .map(|(_, sequence)| sequence)
            .collect();
        assert_eq!(stored, (1..=12).map(Some).collect::<Vec<_>>(), "{user}");
    }
}

#[actix::test]
async fn two_senders_numbering_one_accounts_events_at_once_cannot_both_take_its_next_number() {
    let db = TestDb::new().await;
    let engine = engine(&db, &settings());
    let account = db.user("user_seq_race").await;
    top_ups(&engine, &[account], "race", 2).await;
    let events: Vec<uuid::Uuid> = sequences_in_journal_order(&db, account)
        .await
        .into_iter()
        .map(|(id, _)| id.parse().expect("uuid"))
        .collect();
    assert_eq!(events.len(), 2);

    // The first sender numbers its event and has not committed yet when
    // the second numbers the account's other event.
    let mut first = db.client().await;
    let first = first.transaction().await.expect("begin");
    let taken = creditd::events::store::assign_sequence(&first, events[0], account.0)
        .await
        .expect("the first takes 1");
    assert_eq!(taken, 1);
    let second = db.client().await;
    let racing = creditd::events::store::assign_sequence(&second, events[1], account.0);
    tokio::pin!(racing);
    let early = tokio::select! {
        result = &mut racing => Some(result),
        _ = backend_waiting(&db, "Lock", "%SET sequence%") => None,
    };
    first.commit().await.expect("commit");
    let raced = match early {
        Some(result) => result,
        None => racing.await,
    };

    assert!(raced.is_err(), "the second took a number too: {raced:?}");
    let stored: Vec<Option<i64>> = sequences_in_journal_order(&db, account)
        .await
        .into_iter()
        .map(|(_, sequence)| sequence)
        .collect();
    assert_eq!(stored, [Some(1), None]);
    let next = creditd::events::store::assign_sequence(&second, events[1], account.0)
        .await
        .expect("its next round takes the next number");
    assert_eq!(next, 2);
}

/// Waits until a backend of `db` other than this one is in `state` (a
/// wait event type such as `Lock`, or `idle in transaction`) with its last
/// query like `query`.
async fn backend_waiting(db: &TestDb, state: &str, query: &str) {
    let client = db.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND (wait_event_type = $1 OR state = $1) AND query LIKE $2",
                &[&state, &query],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if found > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no backend in {state} on {query}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Locks `account`'s balance row in a transaction of its own: the journal
/// batch carrying the account's next entries stalls on it until rollback.
async fn stall_account(
    client: &mut tokio_postgres::Client,
    account: AccountId,
) -> tokio_postgres::Transaction<'_> {
    let lock = client.transaction().await.expect("begin");
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .expect("lock the balance row");
    lock
}

/// Polls the account's actor until `applied` holds of its state.
async fn until_applied(
    engine: &Engine,
    account: AccountId,
    applied: impl Fn(&creditd::ledger::BalanceSnapshot) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !applied(&engine.balance(account).await.expect("balance")) {
        assert!(Instant::now() < deadline, "the change was not applied");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[actix::test]
async fn spend_limit_reached_recorded_while_a_chat_is_still_uncommitted_is_delivered_after_its_events(
) {
    let (server, receiver) = Receiver::start(0).await;
    let db = TestDb::new().await;
    let mut settings = settings();
    sending_to(&mut settings, &server);
    let engine = engine(&db, &settings);
    let [sender, second] = two_senders(&db, &settings);
    let account = db.user("user_limit_in_flight").await;
    engine
        .credit(account, posting("topup", TransactionType::TopUp, eur(3)))
        .await
        .expect("top-up");
    engine
        .set_limits(
            account,
            creditd::ledger::LimitsChange::Owner {
                daily_micros: Some(micros(1_500_000)),
                monthly_micros: None,
            },
        )
        .await
        .expect("a daily limit of 1.50 EUR");
    wait_until_sent(&db, Duration::from_secs(30)).await;

    // A chat of 1.20 EUR: its hold (available 3 → 1.80: balance.low) and
    // its settlement are applied, their batch stalled on the balance row.
    let mut locker = db.client().await;
    let lock = stall_account(&mut locker, account).await;
    let hold = HoldId::generate();
    engine
        .admit(account, hold, micros(1_200_000))
        .await
        .expect("admitted");
    let settle = engine.settle(account, hold, charge(micros(1_200_000)));
    let refusal = async {
        until_applied(&engine, account, |s| s.held_micros == Micros::ZERO).await;
        // The next chat passes the balance, not the day's limit.
        let refused = engine.admit(account, HoldId::generate(), micros(500_000));
        tokio::pin!(refused);
        let early = tokio::select! {
            result = &mut refused => Some(result),
            _ = backend_waiting(&db, "idle in transaction", "START TRANSACTION%") => None,
        };
        lock.rollback().await.expect("rollback");
        match early {
            Some(result) => result,
            None => refused.await,
        }
    };
    let (settled, refused) = tokio::join!(settle, refusal);
    settled.expect("settled");
    assert!(
        matches!(refused, Err(LedgerError::SpendLimitReached { .. })),
        "{refused:?}"
    );
    wait_until_sent(&db, Duration::from_secs(30)).await;
    sender.abort();
    second.abort();

    assert_eq!(
        accepted_sequences(&receiver, "user_limit_in_flight"),
        [
            ("topup.succeeded".to_owned(), 1),
            ("balance.low".to_owned(), 2),
            ("spend_limit.reached".to_owned(), 3),
        ]
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn auto_recharge_failed_recorded_while_a_debit_is_still_uncommitted_is_delivered_after_its_events(
) {
    let (server, receiver) = Receiver::start(0).await;
    let db = TestDb::new().await;
    let mut settings = settings();
    sending_to(&mut settings, &server);
    let engine = engine(&db, &settings);
    let [sender, second] = two_senders(&db, &settings);
    let account = db.user("user_recharge_in_flight").await;
    engine
        .credit(account, posting("topup", TransactionType::TopUp, eur(3)))
        .await
        .expect("top-up");
    let attempt = uuid::Uuid::new_v4();
    db.client()
        .await
        .execute(
            "INSERT INTO auto_recharge_attempts (id, user_id, amount_cents, created_at)
             VALUES ($1, $2, 2000, now())",
            &[&attempt, &account.0],
        )
        .await
        .expect("an attempt in flight");
    wait_until_sent(&db, Duration::from_secs(30)).await;

    let mut locker = db.client().await;
    let lock = stall_account(&mut locker, account).await;
    let debit = engine.debit(
        account,
        posting("spend", TransactionType::Adjustment, eur(2)),
    );
    let failure = async {
        until_applied(&engine, account, |s| s.balance_micros == eur(1)).await;
        let pool = db
            .database(&settings)
            .pool(&settings.database)
            .expect("pool");
        let mut client = pool.get().await.expect("client");
        let failing = creditd::recharge::store::fail(
            &mut client,
            &engine,
            account,
            attempt,
            "card_declined",
            chrono::Utc::now(),
        );
        tokio::pin!(failing);
        let early = tokio::select! {
            result = &mut failing => Some(result),
            _ = backend_waiting(&db, "idle in transaction", "%auto_recharge_settings%") => None,
        };
        lock.rollback().await.expect("rollback");
        match early {
            Some(result) => result,
            None => failing.await,
        }
    };
    let (debited, failed) = tokio::join!(debit, failure);
    debited.expect("debited");
    assert!(failed.expect("the attempt ends"), "it was pending");
    wait_until_sent(&db, Duration::from_secs(30)).await;
    sender.abort();
    second.abort();

    assert_eq!(
        accepted_sequences(&receiver, "user_recharge_in_flight"),
        [
            ("topup.succeeded".to_owned(), 1),
            ("balance.low".to_owned(), 2),
            ("auto_recharge.failed".to_owned(), 3),
            ("auto_recharge.disabled".to_owned(), 4),
        ]
    );
    db.reconcile_is_clean().await;
}
