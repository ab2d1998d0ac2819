//! Stripe: top-ups against a local Stripe API that checks what creditd
//! sends, and webhooks signed as Stripe's own libraries sign them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use creditd::ledger::HoldId;
use futures_util::future::join_all;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::*;

const SECRET_KEY: &str = "sk_test_creditd_0123456789";
const WEBHOOK_SECRET: &str = "whsec_test_creditd_webhook_secret";

/// The form fields of a request, as Stripe reads them.
fn form(request: &Request) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

fn idempotency_key(request: &Request) -> Option<String> {
    request
        .headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

fn stripe_error(status: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "error": { "type": "invalid_request_error", "message": message }
    }))
}

/// `POST /v1/customers` as Stripe answers it: the same customer for the
/// same idempotency key.
#[derive(Clone, Default)]
struct Customers {
    by_key: Arc<Mutex<HashMap<String, Value>>>,
    created: Arc<AtomicUsize>,
}

impl Respond for Customers {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {SECRET_KEY}"))
        {
            return stripe_error(401, "Invalid API Key provided");
        }
        let Some(key) = idempotency_key(request) else {
            return stripe_error(400, "creditd always sends an idempotency key");
        };
        let fields = form(request);
        let mut by_key = self.by_key.lock().unwrap();
        let customer = by_key.entry(key).or_insert_with(|| {
            let n = self.created.fetch_add(1, Ordering::SeqCst) + 1;
            json!({
                "id": format!("cus_test_{n}"),
                "object": "customer",
                "created": chrono::Utc::now().timestamp(),
                "livemode": false,
                "email": fields.get("email"),
                "metadata": {
                    "userId": fields.get("metadata[userId]"),
                    "clerkId": fields.get("metadata[clerkId]"),
                },
            })
        });
        ResponseTemplate::new(200).set_body_json(customer.clone())
    }
}

/// `POST /v1/checkout/sessions`: answers a Checkout Session built from the
/// form, and keeps every form it received.
/// One request as received: its idempotency key and its form fields.
type Received = (Option<String>, HashMap<String, String>);

#[derive(Clone, Default)]
struct Sessions {
    received: Arc<Mutex<Vec<Received>>>,
}

impl Respond for Sessions {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let fields = form(request);
        let key = idempotency_key(request);
        let mut received = self.received.lock().unwrap();
        received.push((key, fields.clone()));
        let id = format!("cs_test_{}", received.len());
        let now = chrono::Utc::now().timestamp();
        ResponseTemplate::new(200).set_body_json(json!({
            "id": id,
            "object": "checkout.session",
            "amount_total": fields.get("line_items[0][price_data][unit_amount]")
                .and_then(|a| a.parse::<i64>().ok()),
            "automatic_tax": { "enabled": false, "liability": null, "status": null },
            "client_reference_id": fields.get("client_reference_id"),
            "created": now,
            "currency": "eur",
            "custom_fields": [],
            "custom_text": {
                "after_submit": null, "shipping_address": null,
                "submit": null, "terms_of_service_acceptance": null
            },
            "customer": fields.get("customer"),
            "expires_at": now + 86_400,
            "livemode": false,
            "metadata": {
                "type": fields.get("metadata[type]"),
                "userId": fields.get("metadata[userId]"),
                "amountCents": fields.get("metadata[amountCents]"),
            },
            "mode": "payment",
            "payment_method_types": ["card"],
            "payment_status": "unpaid",
            "shipping_options": [],
            "status": "open",
            "url": format!("https://checkout.stripe.com/c/pay/{id}"),
        }))
    }
}

pub struct StripeApp {
    pub app: TestApp,
    stripe: MockServer,
    customers: Customers,
    sessions: Sessions,
}

async fn spawn_stripe_app() -> StripeApp {
    spawn_stripe_app_with(|_| {}).await
}

pub async fn spawn_stripe_app_with(
    adjust: impl FnOnce(&mut creditd::config::Settings) + Send + 'static,
) -> StripeApp {
    let stripe = MockServer::start().await;
    let customers = Customers::default();
    let sessions = Sessions::default();
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(customers.clone())
        .mount(&stripe)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/checkout/sessions"))
        .respond_with(sessions.clone())
        .mount(&stripe)
        .await;
    let uri = stripe.uri();
    let app = spawn_app_with(move |settings| {
        settings.stripe.secret_key = creditd::config::Secret::new(SECRET_KEY);
        settings.stripe.webhook_secret = creditd::config::Secret::new(WEBHOOK_SECRET);
        settings.stripe.api_base = uri;
        settings.stripe.starter_price_id = "price_starter".into();
        settings.stripe.pro_price_id = "price_pro".into();
        settings.stripe.team_price_id = "price_team".into();
        adjust(settings);
    })
    .await;
    StripeApp {
        app,
        stripe,
        customers,
        sessions,
    }
}

/// `Stripe-Signature` as Stripe's libraries build it: `t=<ts>,v1=<hex>`,
/// HMAC-SHA256 over `"{t}.{body}"` keyed with the whole secret.
fn v1(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn signed_header(body: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    format!("t={now},v1={}", v1(WEBHOOK_SECRET, now, body))
}

impl StripeApp {
    async fn deliver_with(&self, body: &str, header: Option<&str>) -> reqwest::Response {
        let mut request = self
            .app
            .http
            .post(self.app.url("/api/webhooks/stripe"))
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(header) = header {
            request = request.header("Stripe-Signature", header);
        }
        request.send().await.expect("request")
    }

    /// Delivers `event` signed now; its status.
    pub async fn deliver(&self, event: &Value) -> u16 {
        let body = event.to_string();
        self.deliver_with(&body, Some(&signed_header(&body)))
            .await
            .status()
            .as_u16()
    }

    pub async fn balance_micros(&self, clerk_id: &str) -> i64 {
        let (status, body) = json_of(self.app.get_as(clerk_id, "/api/credits").await).await;
        assert_eq!(status, 200, "{body}");
        body["balanceMicros"].as_i64().expect("balanceMicros")
    }

    async fn recorded_events(&self) -> i64 {
        let client = self.app.db.client().await;
        client
            .query_one(
                "SELECT count(*) FROM processed_webhook_events WHERE source = 'stripe'",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn transactions(&self, kind: &str) -> Vec<(i64, String)> {
        let client = self.app.db.client().await;
        client
            .query(
                "SELECT amount_micros, idempotency_key FROM credit_transactions
                  WHERE type = $1 ORDER BY seq",
                &[&kind],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }
}

pub fn event(id: &str, kind: &str, object: Value) -> Value {
    json!({
        "id": id,
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null },
        "type": kind,
        "data": { "object": object },
    })
}

pub fn checkout_session(id: &str, account: i64, cents: i64, payment_status: &str) -> Value {
    json!({
        "id": id,
        "object": "checkout.session",
        "amount_subtotal": cents,
        "amount_total": cents,
        "client_reference_id": account.to_string(),
        "currency": "eur",
        "customer": "cus_test_1",
        "metadata": {
            "type": "credit_topup",
            "userId": account.to_string(),
            "amountCents": cents.to_string(),
        },
        "mode": "payment",
        "payment_intent": format!("pi_{id}"),
        "payment_status": payment_status,
        "status": "complete",
    })
}

/// A charge of a top-up: Stripe copied the payment intent's metadata to it.
fn charge(id: &str, payment_intent: &str, amount: i64, refunded: i64) -> Value {
    json!({
        "id": id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount,
        "amount_refunded": refunded,
        "currency": "eur",
        "metadata": { "type": "credit_topup", "amountCents": amount.to_string() },
        "payment_intent": payment_intent,
        "refunded": refunded == amount,
        "status": "succeeded",
    })
}

async fn top_up(stripe: &StripeApp, clerk_id: &str, session: &str, cents: i64) -> i64 {
    let account = stripe.app.account(clerk_id).await.0;
    let status = stripe
        .deliver(&event(
            &format!("evt_{session}"),
            "checkout.session.completed",
            checkout_session(session, account, cents, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    account
}

#[actix::test]
async fn a_top_up_opens_a_checkout_session_in_payment_mode_with_the_amount_and_metadata() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_topup").await.0;

    let (status, body) = json_of(
        stripe
            .app
            .post_as(
                "user_topup",
                "/api/credits/topup",
                &json!({ "amount": 1000 }),
            )
            .await,
    )
    .await;

    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sessionId"], "cs_test_1");
    assert_eq!(body["url"], "https://checkout.stripe.com/c/pay/cs_test_1");
    let received = stripe.sessions.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let (key, fields) = &received[0];
    let field = |name: &str| fields.get(name).map(String::as_str);
    assert!(
        key.as_deref()
            .is_some_and(|k| k.starts_with(&format!("creditd-topup-{account}-1000-"))),
        "{key:?}"
    );
    assert_eq!(field("mode"), Some("payment"));
    assert_eq!(field("customer"), Some("cus_test_1"));
    assert_eq!(
        field("client_reference_id"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("line_items[0][quantity]"), Some("1"));
    assert_eq!(field("line_items[0][price_data][currency]"), Some("eur"));
    assert_eq!(
        field("line_items[0][price_data][unit_amount]"),
        Some("1000")
    );
    assert_eq!(
        field("line_items[0][price_data][product_data][name]"),
        Some("AppForge Credits")
    );
    assert_eq!(
        field("line_items[0][price_data][product_data][description]"),
        Some("10.00€ de crédits AI")
    );
    assert_eq!(field("metadata[type]"), Some("credit_topup"));
    assert_eq!(
        field("metadata[userId]"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("metadata[amountCents]"), Some("1000"));
    assert_eq!(
        field("payment_intent_data[metadata][type]"),
        Some("credit_topup")
    );
    assert_eq!(
        field("payment_intent_data[metadata][userId]"),
        Some(account.to_string().as_str())
    );
    assert_eq!(field("invoice_creation[enabled]"), Some("true"));
    assert_eq!(
        field("success_url"),
        Some("http://localhost:3000/billing?topup=success")
    );
    assert_eq!(
        field("cancel_url"),
        Some("http://localhost:3000/billing?topup=canceled")
    );
    let client = stripe.app.db.client().await;
    let stored: Option<String> = client
        .query_one(
            "SELECT stripe_customer_id FROM users WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored.as_deref(), Some("cus_test_1"));
    assert_eq!(
        stripe.balance_micros("user_topup").await,
        0,
        "nothing is credited before payment"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn top_ups_outside_the_limits_or_with_a_bad_body_get_400_and_no_stripe_call() {
    let stripe = spawn_stripe_app().await;
    let cases = [
        (json!({ "amount": 499 }), "Minimum top-up is 5€"),
        (json!({ "amount": 0 }), "Minimum top-up is 5€"),
        (json!({ "amount": -1000 }), "Minimum top-up is 5€"),
        (json!({ "amount": 100_001 }), "Maximum top-up is 1000€"),
        (json!({ "amount": "1000" }), "field `amount`"),
        (json!({ "amount": 10.5 }), "field `amount`"),
        (json!({ "amount": null }), "field `amount`"),
        (json!({}), "amount"),
        (json!([1000]), "request body"),
    ];

    for (body, message) in cases {
        let (status, answer) = json_of(
            stripe
                .app
                .post_as("user_limits", "/api/credits/topup", &body)
                .await,
        )
        .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"], "INVALID_REQUEST");
        assert!(
            answer["message"].as_str().unwrap().contains(message),
            "{body} -> {answer}"
        );
    }
    let not_json = stripe
        .app
        .http
        .post(stripe.app.url("/api/credits/topup"))
        .bearer_auth(stripe.app.token("user_limits"))
        .body("amount=1000")
        .send()
        .await
        .unwrap();

    assert_eq!(not_json.status(), 400);
    assert_eq!(stripe.stripe.received_requests().await.unwrap().len(), 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_limits_themselves_are_accepted() {
    let stripe = spawn_stripe_app().await;

    for amount in [500, 100_000] {
        let (status, body) = json_of(
            stripe
                .app
                .post_as(
                    "user_edges",
                    "/api/credits/topup",
                    &json!({ "amount": amount }),
                )
                .await,
        )
        .await;
        assert_eq!(status, 200, "{amount}: {body}");
    }
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn concurrent_first_top_ups_create_one_stripe_customer() {
    let stripe = spawn_stripe_app_with(|s| s.limits.topups_per_minute = 10).await;
    let account = stripe.app.account("user_race").await.0;

    let answers = join_all((0..10).map(|i| {
        let app = &stripe.app;
        async move {
            json_of(
                app.post_as(
                    "user_race",
                    "/api/credits/topup",
                    &json!({ "amount": 500 + i }),
                )
                .await,
            )
            .await
        }
    }))
    .await;

    for (status, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    assert_eq!(stripe.customers.created.load(Ordering::SeqCst), 1);
    let customers: Vec<String> = stripe
        .sessions
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, fields)| fields["customer"].clone())
        .collect();
    assert_eq!(customers.len(), 10);
    assert!(customers.iter().all(|c| c == "cus_test_1"), "{customers:?}");
    let keys: Vec<String> = stripe
        .stripe
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/v1/customers")
        .filter_map(idempotency_key)
        .collect();
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| *k == format!("creditd-customer-{account}")),
        "{keys:?}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_double_click_reuses_the_idempotency_key_of_the_first_session() {
    let stripe = spawn_stripe_app().await;

    for _ in 0..2 {
        let (status, _) = json_of(
            stripe
                .app
                .post_as(
                    "user_double",
                    "/api/credits/topup",
                    &json!({ "amount": 2500 }),
                )
                .await,
        )
        .await;
        assert_eq!(status, 200);
    }

    let keys: Vec<Option<String>> = stripe
        .sessions
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|(key, _)| key.clone())
        .collect();
    assert_eq!(keys.len(), 2);
    // Two clicks straddling a window boundary legitimately differ; two
    // clicks inside one window share the key Stripe deduplicates on.
    let window = |key: &Option<String>| {
        key.as_deref()
            .and_then(|k| k.rsplit('-').next())
            .map(str::to_owned)
    };
    if window(&keys[0]) == window(&keys[1]) {
        assert_eq!(keys[0], keys[1]);
    }
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn fifty_concurrent_top_ups_of_one_account_with_a_limit_of_5_per_minute_open_5_sessions() {
    let stripe = spawn_stripe_app_with(|s| s.limits.topups_per_minute = 5).await;

    let bodies: Vec<_> = (0..50).map(|i| json!({ "amount": 500 + i })).collect();
    let answers = join_all(bodies.iter().map(|body| {
        stripe
            .app
            .post_as("user_card_testing", "/api/credits/topup", body)
    }))
    .await;
    let other = stripe
        .app
        .post_as(
            "user_honest",
            "/api/credits/topup",
            &json!({ "amount": 500 }),
        )
        .await
        .status();

    let mut opened = 0;
    let mut refused = 0;
    for answer in answers {
        match answer.status().as_u16() {
            200 => opened += 1,
            429 => {
                let retry_after = answer
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                assert!(
                    retry_after.is_some_and(|s| (1..=60).contains(&s)),
                    "{retry_after:?}"
                );
                let (_, body) = json_of(answer).await;
                assert_eq!(body["error"], "RATE_LIMITED");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((opened, refused), (5, 45));
    assert_eq!(other, 200, "the limit is per account");
    assert_eq!(stripe.sessions.received.lock().unwrap().len(), 6);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stripe_error_answers_a_clear_error_and_stores_no_customer() {
    let stripe = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/customers"))
        .respond_with(stripe_error(401, "Invalid API Key provided: sk_test_***"))
        .mount(&stripe)
        .await;
    let uri = stripe.uri();
    let app = spawn_app_with(move |settings| {
        settings.stripe.secret_key = creditd::config::Secret::new(SECRET_KEY);
        settings.stripe.api_base = uri;
    })
    .await;

    let (status, body) = json_of(
        app.post_as("user_err", "/api/credits/topup", &json!({ "amount": 1000 }))
            .await,
    )
    .await;

    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("payment provider refused"),
        "{body}"
    );
    let client = app.db.client().await;
    let stored: Option<String> = client
        .query_one(
            "SELECT stripe_customer_id FROM users WHERE clerk_id = 'user_err'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, None);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn top_ups_and_webhooks_answer_503_when_stripe_is_not_configured() {
    let app = spawn_app().await;

    let (topup, topup_body) = json_of(
        app.post_as("user_off", "/api/credits/topup", &json!({ "amount": 1000 }))
            .await,
    )
    .await;
    let webhook = app
        .http
        .post(app.url("/api/webhooks/stripe"))
        .body("{}")
        .send()
        .await
        .unwrap();

    assert_eq!(topup, 503, "{topup_body}");
    assert!(topup_body["message"]
        .as_str()
        .unwrap()
        .contains("stripe.secret_key"));
    assert_eq!(webhook.status(), 503);
    let (_, webhook_body) = json_of(webhook).await;
    assert!(webhook_body["message"]
        .as_str()
        .unwrap()
        .contains("stripe.webhook_secret"));
    app.db.reconcile_is_clean().await;
}

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

#[actix::test]
async fn fifty_concurrent_deliveries_of_a_paid_checkout_credit_once() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_fifty").await.0;
    let completed = event(
        "evt_fifty",
        "checkout.session.completed",
        checkout_session("cs_fifty", account, 2000, "paid"),
    );

    let statuses = join_all((0..50).map(|_| stripe.deliver(&completed))).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_fifty").await, 20_000_000);
    let topups = stripe.transactions("TOP_UP").await;
    assert_eq!(
        topups,
        vec![(20_000_000, "stripe:checkout:cs_fifty".to_owned())]
    );
    let client = stripe.app.db.client().await;
    let row = client
        .query_one(
            "SELECT stripe_session_id, stripe_payment_id FROM credit_transactions WHERE type = 'TOP_UP'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("cs_fifty"));
    assert_eq!(
        row.get::<_, Option<String>>(1).as_deref(),
        Some("pi_cs_fifty")
    );
    assert_eq!(stripe.recorded_events().await, 1);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_unpaid_checkout_and_its_async_success_credit_once_in_either_order_and_redelivered() {
    let stripe = spawn_stripe_app().await;
    for (user, reversed) in [("user_async_a", false), ("user_async_b", true)] {
        let account = stripe.app.account(user).await.0;
        let session = format!("cs_{user}");
        let unpaid = event(
            &format!("evt_completed_{user}"),
            "checkout.session.completed",
            checkout_session(&session, account, 1500, "unpaid"),
        );
        let succeeded = event(
            &format!("evt_async_{user}"),
            "checkout.session.async_payment_succeeded",
            checkout_session(&session, account, 1500, "paid"),
        );
        let order = if reversed {
            [&succeeded, &unpaid]
        } else {
            [&unpaid, &succeeded]
        };

        assert_eq!(stripe.deliver(order[0]).await, 200);
        if !reversed {
            assert_eq!(stripe.balance_micros(user).await, 0, "unpaid: nothing yet");
        }
        assert_eq!(stripe.deliver(order[1]).await, 200);
        for redelivery in [&unpaid, &succeeded, &unpaid, &succeeded] {
            assert_eq!(stripe.deliver(redelivery).await, 200);
        }

        assert_eq!(stripe.balance_micros(user).await, 15_000_000, "{user}");
    }
    assert_eq!(stripe.transactions("TOP_UP").await.len(), 2);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_paid_checkout_in_another_currency_credits_nothing() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_usd").await.0;
    let mut session = checkout_session("cs_usd", account, 1000, "paid");
    session["currency"] = json!("usd");

    let status = stripe
        .deliver(&event("evt_usd", "checkout.session.completed", session))
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
    assert_eq!(stripe.balance_micros("user_usd").await, 0);
    assert!(
        metrics.contains("creditd_topup_currency_mismatch_total"),
        "{metrics}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_checkout_that_is_not_a_top_up_credits_nothing() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_sub_checkout").await.0;
    let mut session = checkout_session("cs_sub", account, 1000, "paid");
    session["metadata"] = json!({});
    session["mode"] = json!("subscription");

    let status = stripe
        .deliver(&event(
            "evt_sub_checkout",
            "checkout.session.completed",
            session,
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_sub_checkout").await, 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refund_after_the_credits_were_spent_leaves_debt_and_the_next_reserve_is_refused() {
    let stripe = spawn_stripe_app().await;
    let account = top_up(&stripe, "user_refund", "cs_refund", 1000).await;
    let engine = stripe.app.db.engine(&stripe.app.settings);
    let spend = stripe
        .app
        .admin(reqwest::Method::POST, "/admin/accounts/user_refund/credits")
        .json(&json!({ "amountMicros": -8_000_000, "key": "spent", "reason": "usage" }))
        .send()
        .await
        .unwrap();
    assert!(spend.status().is_success());

    let status = stripe
        .deliver(&event(
            "evt_refund",
            "charge.refunded",
            charge("ch_refund", "pi_cs_refund", 1000, 1000),
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_refund").await, -8_000_000);
    let refunds = stripe.transactions("REFUND").await;
    assert_eq!(
        refunds,
        vec![(
            10_000_000,
            "stripe:charge:ch_refund:refunded:1000".to_owned()
        )]
    );
    let refused = engine
        .reserve(
            creditd::ledger::AccountId(account),
            HoldId::generate(),
            micros(1),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(creditd::ledger::LedgerError::InsufficientCredits { .. })
        ),
        "{refused:?}"
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn two_partial_refunds_claw_back_their_sum_once_each() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_partial", "cs_partial", 5000).await;
    let first = event(
        "evt_refund_1",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 1000),
    );
    let second = event(
        "evt_refund_2",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 3500),
    );
    // A redelivery under a new event id (as after a manual resend) must not
    // claw back again either.
    let second_resent = event(
        "evt_refund_2b",
        "charge.refunded",
        charge("ch_partial", "pi_cs_partial", 5000, 3500),
    );

    assert_eq!(stripe.deliver(&first).await, 200);
    assert_eq!(stripe.balance_micros("user_partial").await, 40_000_000);
    assert_eq!(stripe.deliver(&second).await, 200);
    for again in [&first, &second, &second_resent, &first] {
        assert_eq!(stripe.deliver(again).await, 200);
    }

    assert_eq!(stripe.balance_micros("user_partial").await, 15_000_000);
    assert_eq!(
        stripe.transactions("REFUND").await,
        vec![
            (
                10_000_000,
                "stripe:charge:ch_partial:refunded:1000".to_owned()
            ),
            (
                25_000_000,
                "stripe:charge:ch_partial:refunded:3500".to_owned()
            ),
        ]
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn partial_refunds_delivered_newest_first_claw_back_the_total_once() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_reorder", "cs_reorder", 5000).await;

    let newest = event(
        "evt_new",
        "charge.refunded",
        charge("ch_reorder", "pi_cs_reorder", 5000, 3000),
    );
    let oldest = event(
        "evt_old",
        "charge.refunded",
        charge("ch_reorder", "pi_cs_reorder", 5000, 1000),
    );
    assert_eq!(stripe.deliver(&newest).await, 200);
    assert_eq!(stripe.deliver(&oldest).await, 200);

    assert_eq!(stripe.balance_micros("user_reorder").await, 20_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_refund_of_a_charge_that_paid_no_top_up_is_acknowledged_and_ignored() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_other_charge", "cs_other", 1000).await;

    let mut subscription_charge = charge("ch_foreign", "pi_subscription", 2900, 2900);
    subscription_charge["metadata"] = json!({});

    let status = stripe
        .deliver(&event(
            "evt_foreign",
            "charge.refunded",
            subscription_charge,
        ))
        .await;

    assert_eq!(status, 200);
    assert_eq!(stripe.balance_micros("user_other_charge").await, 10_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

fn dispute_object(id: &str, payment_intent: &str, amount: i64, status: &str) -> Value {
    json!({
        "id": id,
        "object": "dispute",
        "amount": amount,
        "charge": format!("ch_{id}"),
        "currency": "eur",
        "payment_intent": payment_intent,
        "reason": "fraudulent",
        "status": status,
    })
}

fn dispute_event(
    event_id: &str,
    kind: &str,
    id: &str,
    payment_intent: &str,
    status: &str,
) -> Value {
    event(
        event_id,
        kind,
        dispute_object(id, payment_intent, 3000, status),
    )
}

/// Delivers `event` once, then 20 times concurrently, then under a new event id.
async fn deliver_many_times(stripe: &StripeApp, event: &Value) -> Vec<u16> {
    let mut statuses = vec![stripe.deliver(event).await];
    statuses.extend(join_all((0..20).map(|_| stripe.deliver(event))).await);
    let mut resent = event.clone();
    resent["id"] = json!(format!("{}_resent", event["id"].as_str().unwrap()));
    statuses.push(stripe.deliver(&resent).await);
    statuses
}

#[actix::test]
async fn a_dispute_is_debited_once_when_funds_are_withdrawn_and_credited_back_once_when_reinstated()
{
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_dispute", "cs_dispute", 3000).await;
    let pi = "pi_cs_dispute";

    let created = dispute_event(
        "evt_dp_created",
        "charge.dispute.created",
        "dp_1",
        pi,
        "needs_response",
    );
    assert!(deliver_many_times(&stripe, &created)
        .await
        .iter()
        .all(|&s| s == 200));
    assert_eq!(
        stripe.balance_micros("user_dispute").await,
        30_000_000,
        "no funds left yet, no credits either"
    );

    let withdrawn = dispute_event(
        "evt_dp_withdrawn",
        "charge.dispute.funds_withdrawn",
        "dp_1",
        pi,
        "needs_response",
    );
    let statuses = deliver_many_times(&stripe, &withdrawn).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_dispute").await, 0);

    let won = dispute_event("evt_dp_closed", "charge.dispute.closed", "dp_1", pi, "won");
    assert!(deliver_many_times(&stripe, &won)
        .await
        .iter()
        .all(|&s| s == 200));
    let reinstated = dispute_event(
        "evt_dp_reinstated",
        "charge.dispute.funds_reinstated",
        "dp_1",
        pi,
        "won",
    );
    let statuses = deliver_many_times(&stripe, &reinstated).await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");

    assert_eq!(stripe.balance_micros("user_dispute").await, 30_000_000);
    assert_eq!(
        stripe.transactions("DISPUTE").await,
        vec![
            (30_000_000, "stripe:dispute:dp_1".to_owned()),
            (30_000_000, "stripe:dispute:dp_1:reinstated".to_owned()),
        ]
    );
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_inquiry_moves_no_credits_however_often_it_is_delivered() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_inquiry", "cs_inquiry", 3000).await;
    let pi = "pi_cs_inquiry";

    for (id, kind, status) in [
        (
            "evt_inq_created",
            "charge.dispute.created",
            "warning_needs_response",
        ),
        (
            "evt_inq_funds",
            "charge.dispute.funds_withdrawn",
            "warning_under_review",
        ),
        ("evt_inq_closed", "charge.dispute.closed", "warning_closed"),
    ] {
        let statuses =
            deliver_many_times(&stripe, &dispute_event(id, kind, "dp_inq", pi, status)).await;
        assert!(statuses.iter().all(|&s| s == 200), "{kind}: {statuses:?}");
    }

    assert_eq!(stripe.balance_micros("user_inquiry").await, 30_000_000);
    assert!(stripe.transactions("DISPUTE").await.is_empty());
    stripe.app.db.reconcile_is_clean().await;
}

/// `GET /v1/payment_intents/{id}` answering `metadata`.
async fn mount_payment_intent(stripe: &StripeApp, id: &str, metadata: Value) {
    Mock::given(method("GET"))
        .and(path(format!("/v1/payment_intents/{id}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": id, "object": "payment_intent", "metadata": metadata,
        })))
        .mount(&stripe.stripe)
        .await;
}

#[actix::test]
async fn a_dispute_before_its_top_up_credit_answers_503_then_applies_once_after_the_credit() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_early_dispute").await.0;
    let pi = "pi_cs_early_dispute";
    mount_payment_intent(&stripe, pi, json!({ "type": "credit_topup" })).await;
    mount_payment_intent(&stripe, "pi_subscription", json!({})).await;
    let withdrawn = dispute_event(
        "evt_early_dp",
        "charge.dispute.funds_withdrawn",
        "dp_early",
        pi,
        "needs_response",
    );

    let early = stripe.deliver(&withdrawn).await;
    let not_a_top_up = stripe
        .deliver(&dispute_event(
            "evt_sub_dp",
            "charge.dispute.funds_withdrawn",
            "dp_sub",
            "pi_subscription",
            "needs_response",
        ))
        .await;

    assert_eq!(early, 503, "Stripe must retry it");
    assert_eq!(not_a_top_up, 200);
    assert_eq!(stripe.recorded_events().await, 1);
    let status = stripe
        .deliver(&event(
            "evt_cs_early_dispute",
            "checkout.session.completed",
            checkout_session("cs_early_dispute", account, 3000, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    let statuses = deliver_many_times(&stripe, &withdrawn).await;

    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(stripe.balance_micros("user_early_dispute").await, 0);
    assert_eq!(stripe.transactions("DISPUTE").await.len(), 1);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_paid_session_whose_amount_differs_from_the_top_up_asked_is_recorded_and_not_credited() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_mismatch").await.0;
    let mut session = checkout_session("cs_mismatch", account, 500, "paid");
    session["amount_total"] = json!(100_000);
    let mut without_amount = checkout_session("cs_no_amount", account, 500, "paid");
    without_amount["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("amountCents");

    let status = stripe
        .deliver(&event(
            "evt_mismatch",
            "checkout.session.completed",
            session,
        ))
        .await;
    let status_without = stripe
        .deliver(&event(
            "evt_no_amount",
            "checkout.session.completed",
            without_amount,
        ))
        .await;

    assert_eq!((status, status_without), (200, 200));
    assert_eq!(stripe.recorded_events().await, 2, "Stripe stops retrying");
    assert_eq!(stripe.balance_micros("user_mismatch").await, 0);
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
    let counted = metrics
        .lines()
        .find(|line| line.starts_with("creditd_topup_amount_mismatch_total"))
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(counted >= 2.0, "{counted}");
    stripe.app.db.reconcile_is_clean().await;
}

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

#[actix::test]
async fn a_refund_that_arrives_before_its_top_up_credit_is_retried_until_the_credit_lands() {
    let stripe = spawn_stripe_app().await;
    let account = stripe.app.account("user_early_refund").await.0;
    let refund = event(
        "evt_early_refund",
        "charge.refunded",
        charge("ch_early", "pi_cs_early", 2000, 2000),
    );

    let early = stripe.deliver(&refund).await;
    assert_eq!(early, 503, "Stripe must retry it");
    assert_eq!(stripe.recorded_events().await, 0);
    let status = stripe
        .deliver(&event(
            "evt_cs_early",
            "checkout.session.completed",
            checkout_session("cs_early", account, 2000, "paid"),
        ))
        .await;
    assert_eq!(status, 200);
    let retried = stripe.deliver(&refund).await;

    assert_eq!(retried, 200);
    assert_eq!(stripe.balance_micros("user_early_refund").await, 0);
    stripe.app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn concurrent_deliveries_of_two_partial_refunds_claw_back_their_total_once() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_refund_rush", "cs_rush", 5000).await;
    let first = event(
        "evt_rush_1",
        "charge.refunded",
        charge("ch_rush", "pi_cs_rush", 5000, 1000),
    );
    let second = event(
        "evt_rush_2",
        "charge.refunded",
        charge("ch_rush", "pi_cs_rush", 5000, 3500),
    );

    let statuses = join_all((0..20).map(|i| {
        let refund = if i % 2 == 0 { &first } else { &second };
        stripe.deliver(refund)
    }))
    .await;
    // A delivery that met another one holding the charge is told to retry.
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    assert_eq!(stripe.deliver(&first).await, 200);
    assert_eq!(stripe.deliver(&second).await, 200);

    assert_eq!(stripe.balance_micros("user_refund_rush").await, 15_000_000);
    let clawed_back: i64 = stripe
        .transactions("REFUND")
        .await
        .iter()
        .map(|(amount, _)| amount)
        .sum();
    assert_eq!(clawed_back, 35_000_000);
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
async fn refunds_out_of_order_and_concurrent_with_a_commit_slower_than_the_call_claw_back_the_total_once(
) {
    let stripe = spawn_stripe_app_with(|s| s.engine.call_timeout_ms = 800).await;
    let account = top_up(&stripe, "user_refund_slow", "cs_slow", 5000).await;
    let first = event(
        "evt_slow_1",
        "charge.refunded",
        charge("ch_slow", "pi_cs_slow", 5000, 1000),
    );
    let second = event(
        "evt_slow_2",
        "charge.refunded",
        charge("ch_slow", "pi_cs_slow", 5000, 3000),
    );
    // Hold the account's balance row: its clawbacks apply in the actor but
    // cannot commit, and every delivery's engine call times out.
    let mut locker = stripe.app.db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account],
    )
    .await
    .unwrap();
    assert_eq!(
        stripe.deliver(&first).await,
        503,
        "the first commit is late"
    );
    let statuses = join_all((0..10).map(|i| {
        let refund = if i % 2 == 0 { &second } else { &first };
        stripe.deliver(refund)
    }))
    .await;
    assert!(
        statuses.iter().all(|&s| s == 503 || s == 200),
        "{statuses:?}"
    );
    lock.rollback().await.unwrap();
    // Stripe redelivers what was not acknowledged, newest first.
    for refund in [&second, &first, &second] {
        let mut status = 0;
        for _ in 0..50 {
            status = stripe.deliver(refund).await;
            if status == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(status, 200);
    }

    let clawed_back: i64 = stripe
        .transactions("REFUND")
        .await
        .iter()
        .map(|(amount, _)| amount)
        .sum();
    assert_eq!(clawed_back, 30_000_000, "exactly the refunded total");
    assert_eq!(stripe.balance_micros("user_refund_slow").await, 20_000_000);
    stripe.app.db.reconcile_is_clean().await;
}
