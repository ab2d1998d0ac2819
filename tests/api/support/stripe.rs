//! A local Stripe API that checks what creditd sends and answers as Stripe
//! does, and webhook events signed as Stripe's own libraries sign them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::*;

pub const SECRET_KEY: &str = "sk_test_creditd_0123456789";
pub const WEBHOOK_SECRET: &str = "whsec_test_creditd_webhook_secret";

/// The form fields of a request, as Stripe reads them.
pub fn form(request: &Request) -> HashMap<String, String> {
    form_urlencoded::parse(&request.body).into_owned().collect()
}

pub fn idempotency_key(request: &Request) -> Option<String> {
    request
        .headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

pub fn stripe_error(status: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({
        "error": { "type": "invalid_request_error", "message": message }
    }))
}

/// `POST /v1/customers` as Stripe answers it: the same customer for the
/// same idempotency key.
#[derive(Clone, Default)]
pub struct Customers {
    pub by_key: Arc<Mutex<HashMap<String, Value>>>,
    pub created: Arc<AtomicUsize>,
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
pub type Received = (Option<String>, HashMap<String, String>);

#[derive(Clone, Default)]
pub struct Sessions {
    pub received: Arc<Mutex<Vec<Received>>>,
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

/// `POST /v1/payment_intents` (confirmed off session) as Stripe answers
/// it: the same answer for the same idempotency key (Stripe replays the
/// stored response, errors included). Told to refuse, it answers Stripe's
/// card error (402) with that code (`card_declined`,
/// `authentication_required`). Told to fail, it answers Stripe's
/// `api_error` with that status and creates nothing; told to be slow, it
/// creates the PaymentIntent and answers late (past creditd's timeout,
/// an answer lost). `GET /v1/payment_intents/search` finds what it created
/// (see `Search`).
#[derive(Clone, Default)]
pub struct PaymentIntents {
    /// Per idempotency key, the status and body answered.
    pub by_key: Arc<Mutex<HashMap<String, (u16, Value)>>>,
    /// Every request, replays included.
    pub received: Arc<Mutex<Vec<Received>>>,
    pub refuse_with: Arc<Mutex<Option<String>>>,
    pub fail_with: Arc<Mutex<Option<u16>>>,
    pub answer_after: Arc<Mutex<Option<std::time::Duration>>>,
    /// Every search query received.
    pub searches: Arc<Mutex<Vec<String>>>,
}

impl PaymentIntents {
    /// The PaymentIntents created (one per idempotency key), oldest first.
    pub fn created(&self) -> Vec<Value> {
        let by_key = self.by_key.lock().unwrap();
        let mut intents: Vec<Value> = by_key
            .values()
            .map(|(status, body)| {
                if *status == 200 {
                    body.clone()
                } else {
                    body["error"]["payment_intent"].clone()
                }
            })
            .collect();
        intents.sort_by_key(|intent| {
            intent["id"]
                .as_str()
                .and_then(|id| id.strip_prefix("pi_auto_"))
                .and_then(|n| n.parse::<u64>().ok())
        });
        intents
    }

    pub fn refuse(&self, code: Option<&str>) {
        *self.refuse_with.lock().unwrap() = code.map(str::to_owned);
    }

    /// Answers `status` (a 5xx: Stripe failing) to every creation, making
    /// nothing; `None`: back to normal.
    pub fn fail(&self, status: Option<u16>) {
        *self.fail_with.lock().unwrap() = status;
    }

    /// Creates as usual but answers only after `delay`; `None`: at once.
    pub fn answer_after(&self, delay: Option<std::time::Duration>) {
        *self.answer_after.lock().unwrap() = delay;
    }

    pub fn searched(&self) -> Vec<String> {
        self.searches.lock().unwrap().clone()
    }
}

fn authorized(request: &Request) -> bool {
    request
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {SECRET_KEY}"))
}

impl Respond for PaymentIntents {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if !authorized(request) {
            return stripe_error(401, "Invalid API Key provided");
        }
        let fields = form(request);
        let key = idempotency_key(request);
        self.received
            .lock()
            .unwrap()
            .push((key.clone(), fields.clone()));
        let Some(key) = key else {
            return stripe_error(400, "creditd always sends an idempotency key");
        };
        if let Some(status) = *self.fail_with.lock().unwrap() {
            return ResponseTemplate::new(status).set_body_json(json!({ "error": {
                "type": "api_error",
                "message": "An unknown error occurred",
                "request_log_url": "https://dashboard.stripe.com/test/logs/req_test",
            }}));
        }
        for field in ["amount", "currency", "customer", "payment_method"] {
            if !fields.contains_key(field) {
                return stripe_error(400, &format!("Missing required param: {field}."));
            }
        }
        let mut by_key = self.by_key.lock().unwrap();
        let seq = by_key.len();
        let refuse = self.refuse_with.lock().unwrap().clone();
        let (status, body) = by_key
            .entry(key)
            .or_insert_with(|| {
                let id = format!("pi_auto_{}", seq + 1);
                let metadata: serde_json::Map<String, Value> = fields
                    .iter()
                    .filter_map(|(name, value)| {
                        let name = name.strip_prefix("metadata[")?.strip_suffix(']')?;
                        Some((name.to_owned(), Value::String(value.clone())))
                    })
                    .collect();
                let mut intent = json!({
                    "id": id,
                    "object": "payment_intent",
                    "amount": fields["amount"].parse::<i64>().unwrap(),
                    "amount_capturable": 0,
                    "amount_received": 0,
                    "capture_method": "automatic_async",
                    "confirmation_method": "automatic",
                    "created": chrono::Utc::now().timestamp(),
                    "currency": fields["currency"],
                    "customer": fields["customer"],
                    "livemode": false,
                    "metadata": metadata,
                    "payment_method": fields["payment_method"],
                    "payment_method_types": ["card"],
                    "status": "succeeded",
                });
                match refuse {
                    None => {
                        intent["amount_received"] = intent["amount"].clone();
                        (200, intent)
                    }
                    Some(code) => {
                        intent["status"] = json!("requires_payment_method");
                        let (decline_code, message) = if code == "card_declined" {
                            (json!("generic_decline"), "Your card was declined.")
                        } else {
                            (
                                Value::Null,
                                "Your card was declined. This transaction requires authentication.",
                            )
                        };
                        intent["last_payment_error"] = json!({
                            "type": "card_error", "code": code, "message": message,
                        });
                        (
                            402,
                            json!({ "error": {
                                "type": "card_error",
                                "code": code,
                                "decline_code": decline_code,
                                "doc_url": format!("https://stripe.com/docs/error-codes/{code}"),
                                "message": message,
                                "payment_intent": intent,
                                "request_log_url": "https://dashboard.stripe.com/test/logs/req_test",
                            }}),
                        )
                    }
                }
            })
            .clone();
        let answer = ResponseTemplate::new(status).set_body_json(body);
        match *self.answer_after.lock().unwrap() {
            Some(delay) => answer.set_delay(delay),
            None => answer,
        }
    }
}

/// `GET /v1/payment_intents/search` as Stripe answers it, for the one
/// clause creditd sends, `metadata['<key>']:'<value>'` (either quotes):
/// the PaymentIntents created with that metadata, in a `search_result`.
/// Anything else is Stripe's 400 for a query it cannot parse.
#[derive(Clone)]
pub struct Search(pub PaymentIntents);

/// `metadata['key']:'value'` (or double quotes) as (key, value).
fn metadata_clause(query: &str) -> Option<(String, String)> {
    let rest = query.trim().strip_prefix("metadata[")?;
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let rest = &rest[1..];
    let (key, rest) = rest.split_once(quote)?;
    let rest = rest.strip_prefix("]:")?;
    let value_quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let value = rest[1..].strip_suffix(value_quote)?;
    (!value.contains(value_quote)).then(|| (key.to_owned(), value.to_owned()))
}

impl Respond for Search {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if !authorized(request) {
            return stripe_error(401, "Invalid API Key provided");
        }
        let query: HashMap<String, String> = request.url.query_pairs().into_owned().collect();
        let Some(text) = query.get("query") else {
            return stripe_error(400, "Missing required param: query.");
        };
        self.0.searches.lock().unwrap().push(text.clone());
        let Some((key, value)) = metadata_clause(text) else {
            return stripe_error(400, &format!("Invalid search query: {text}"));
        };
        let data: Vec<Value> = self
            .0
            .created()
            .into_iter()
            .filter(|intent| intent["metadata"][&key].as_str() == Some(value.as_str()))
            .collect();
        ResponseTemplate::new(200).set_body_json(json!({
            "object": "search_result",
            "url": "/v1/payment_intents/search",
            "has_more": false,
            "data": data,
            "next_page": null,
        }))
    }
}

/// How the stand-in answers Stripe's reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// As Stripe does: the object, or 404 `resource_missing`.
    Answer,
    /// Stripe's own error of that status (`api_error`), as during an incident.
    Error(u16),
    /// A 200 whose body is an HTML page, not JSON (a proxy in the way).
    NotJson,
}

/// `GET /v1/payment_intents/{id}` and `GET /v1/invoices/{id}` as Stripe
/// answers them for a Checkout top-up: the PaymentIntent paid with a card
/// saved for off-session use (`pm_card_visa` unless told otherwise), and
/// the finalized invoice with its hosted page and PDF. Every read is kept
/// with the instant it arrived.
#[derive(Clone)]
pub struct Reads {
    mode: Arc<Mutex<ReadMode>>,
    cards: Arc<Mutex<HashMap<String, String>>>,
    pub received: Arc<Mutex<Vec<(String, Instant)>>>,
}

impl Reads {
    pub fn answer(&self, mode: ReadMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// The card payment intent `id` was paid with.
    pub fn pay_with(&self, id: &str, payment_method: &str) {
        self.cards
            .lock()
            .unwrap()
            .insert(id.to_owned(), payment_method.to_owned());
    }

    /// When each read of a path starting with `prefix` arrived, in order.
    pub fn arrivals(&self, prefix: &str) -> Vec<Instant> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .map(|(_, at)| *at)
            .collect()
    }

    /// Waits until `count` reads of paths starting with `prefix` arrived.
    pub async fn wait_for(&self, prefix: &str, count: usize) -> Vec<Instant> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let arrivals = self.arrivals(prefix);
            if arrivals.len() >= count {
                return arrivals;
            }
            assert!(
                Instant::now() < deadline,
                "only {} reads of {prefix} arrived, {count} expected",
                arrivals.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn object(&self, path: &str) -> Option<Value> {
        if let Some(id) = path.strip_prefix("/v1/payment_intents/") {
            let card = self.cards.lock().unwrap().get(id).cloned();
            return id.starts_with("pi_").then(|| {
                json!({
                    "id": id,
                    "object": "payment_intent",
                    "amount_received": 2_500,
                    "currency": "eur",
                    "customer": "cus_test_1",
                    "metadata": { "type": "credit_topup" },
                    "payment_method": card.unwrap_or_else(|| "pm_card_visa".into()),
                    "setup_future_usage": "off_session",
                    "status": "succeeded",
                })
            });
        }
        let id = path.strip_prefix("/v1/invoices/")?;
        id.starts_with("in_").then(|| {
            json!({
                "id": id,
                "object": "invoice",
                "currency": "eur",
                "customer": "cus_test_1",
                "status": "paid",
                "hosted_invoice_url": format!("https://invoice.stripe.com/i/acct_test/{id}"),
                "invoice_pdf": format!("https://pay.stripe.com/invoice/acct_test/{id}/pdf"),
                "livemode": false,
            })
        })
    }
}

impl Respond for Reads {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            != Some(&format!("Bearer {SECRET_KEY}"))
        {
            return stripe_error(401, "Invalid API Key provided");
        }
        let path = request.url.path().to_owned();
        self.received
            .lock()
            .unwrap()
            .push((path.clone(), Instant::now()));
        match *self.mode.lock().unwrap() {
            ReadMode::Error(status) => ResponseTemplate::new(status).set_body_json(json!({
                "error": {
                    "type": "api_error",
                    "message": "An unknown error occurred",
                    "request_log_url": "https://dashboard.stripe.com/test/logs/req_test",
                }
            })),
            ReadMode::NotJson => ResponseTemplate::new(200).set_body_raw(
                "<html><body><h1>Service Temporarily Unavailable</h1></body></html>",
                "text/html",
            ),
            ReadMode::Answer => match self.object(&path) {
                Some(object) => ResponseTemplate::new(200).set_body_json(object),
                None => ResponseTemplate::new(404).set_body_json(json!({
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "message": format!("No such object: '{path}'"),
                    }
                })),
            },
        }
    }
}

pub struct StripeApp {
    pub app: TestApp,
    pub stripe: MockServer,
    pub customers: Customers,
    pub sessions: Sessions,
    pub payment_intents: PaymentIntents,
}

pub async fn spawn_stripe_app() -> StripeApp {
    spawn_stripe_app_with(|_| {}).await
}

pub async fn spawn_stripe_app_with(
    adjust: impl FnOnce(&mut creditd::config::Settings) + Send + 'static,
) -> StripeApp {
    spawn_stripe_app_on_clock(creditd::clock::Clock::system(), adjust).await
}

/// As `spawn_stripe_app_with`, the engine reading the time from `clock`.
pub async fn spawn_stripe_app_on_clock(
    clock: creditd::clock::Clock,
    adjust: impl FnOnce(&mut creditd::config::Settings) + Send + 'static,
) -> StripeApp {
    let stripe = MockServer::start().await;
    let customers = Customers::default();
    let sessions = Sessions::default();
    let payment_intents = PaymentIntents::default();
    Mock::given(method("POST"))
        .and(path("/v1/payment_intents"))
        .respond_with(payment_intents.clone())
        .mount(&stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/payment_intents/search"))
        .respond_with(Search(payment_intents.clone()))
        .mount(&stripe)
        .await;
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
    let app = spawn_app_on_clock(clock, move |settings| {
        settings.stripe.followup_poll_interval_ms = 20;
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
        payment_intents,
    }
}

/// `Stripe-Signature` as Stripe's libraries build it: `t=<ts>,v1=<hex>`,
/// HMAC-SHA256 over `"{t}.{body}"` keyed with the whole secret.
pub fn v1(secret: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn signed_header(body: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    format!("t={now},v1={}", v1(WEBHOOK_SECRET, now, body))
}

impl StripeApp {
    /// Answers Stripe's reads of payment intents and invoices (before any
    /// other mock of them), as `Answer` until told otherwise.
    pub async fn mount_reads(&self) -> Reads {
        let reads = Reads {
            mode: Arc::new(Mutex::new(ReadMode::Answer)),
            cards: Arc::default(),
            received: Arc::default(),
        };
        Mock::given(method("GET"))
            .and(path_regex(r"^/v1/(payment_intents|invoices)/[^/]+$"))
            .respond_with(reads.clone())
            .with_priority(1)
            .mount(&self.stripe)
            .await;
        reads
    }

    pub async fn deliver_with(&self, body: &str, header: Option<&str>) -> reqwest::Response {
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

    pub async fn recorded_events(&self) -> i64 {
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

    pub async fn transactions(&self, kind: &str) -> Vec<(i64, String)> {
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
pub fn charge(id: &str, payment_intent: &str, amount: i64, refunded: i64) -> Value {
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
