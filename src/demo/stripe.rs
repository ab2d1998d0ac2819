//! The demo's Stripe: the API calls creditd makes (customers, Checkout
//! Sessions, form-encoded, bearer key, idempotency keys honoured; invoices
//! read back) and the hosted checkout and invoice pages. "Payer" answers
//! like Stripe: the session's invoice is finalized, the browser goes back
//! to the success URL at once, and the `checkout.session.completed` event
//! (naming its `invoice`) follows as a signed webhook, a moment later
//! (webhooks lag).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use super::pages::{escape, page};
use super::Shared;
use crate::money::Micros;

/// How long after "Payer" the webhook is sent.
const WEBHOOK_DELAY: Duration = Duration::from_millis(1500);
/// Deliveries tried before the demo gives up on a webhook.
const WEBHOOK_ATTEMPTS: u32 = 5;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/v1/customers", web::post().to(create_customer))
        .route("/v1/checkout/sessions", web::post().to(create_session))
        .route("/c/pay/{id}", web::get().to(checkout_page))
        .route("/c/pay/{id}", web::post().to(pay))
        .route("/v1/invoices/{id}", web::get().to(retrieve_invoice))
        .route("/i/{id}", web::get().to(invoice_page));
}

/// A Checkout Session as the demo keeps it.
#[derive(Clone)]
struct Session {
    json: Value,
    amount_cents: i64,
    success_url: String,
    cancel_url: String,
    paid: bool,
}

/// The demo's Stripe objects, in memory.
#[derive(Default)]
pub struct Ledger {
    customers: Mutex<HashMap<String, Value>>,
    sessions: Mutex<HashMap<String, Session>>,
    by_idempotency_key: Mutex<HashMap<String, String>>,
    /// Invoices of paid sessions, by id, with their amount in cents.
    invoices: Mutex<HashMap<String, (Value, i64)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn stripe_error(status: u16, kind: &str, message: &str) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
    )
    .json(json!({ "error": { "type": kind, "message": message } }))
}

/// Why the demo's Stripe refuses a call, as Stripe would.
enum Refusal {
    InvalidApiKey,
    NoIdempotencyKey,
}

impl Refusal {
    fn response(self) -> HttpResponse {
        match self {
            Refusal::InvalidApiKey => {
                stripe_error(401, "invalid_request_error", "Invalid API Key provided")
            }
            Refusal::NoIdempotencyKey => stripe_error(
                400,
                "invalid_request_error",
                "creditd always sends an Idempotency-Key",
            ),
        }
    }
}

/// Stripe's checks before any call: the secret key, an idempotency key.
fn authorize(shared: &Shared, request: &HttpRequest) -> Result<String, Refusal> {
    let expected = format!("Bearer {}", shared.stripe_secret_key);
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if presented != Some(expected.as_str()) {
        return Err(Refusal::InvalidApiKey);
    }
    request
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or(Refusal::NoIdempotencyKey)
}

/// The fields of a form-encoded body, as Stripe reads them.
fn form(body: &[u8]) -> HashMap<String, String> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|text| web::Query::<Vec<(String, String)>>::from_query(text).ok())
        .map(|fields| fields.into_inner().into_iter().collect())
        .unwrap_or_default()
}

async fn create_customer(
    shared: web::Data<Shared>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let key = match authorize(&shared, &request) {
        Ok(key) => key,
        Err(refusal) => return refusal.response(),
    };
    let fields = form(&body);
    let mut customers = lock(&shared.stripe.customers);
    let count = customers.len();
    let customer = customers.entry(key).or_insert_with(|| {
        json!({
            "id": format!("cus_demo_{}", count + 1),
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
    HttpResponse::Ok().json(customer.clone())
}

async fn create_session(
    shared: web::Data<Shared>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let key = match authorize(&shared, &request) {
        Ok(key) => key,
        Err(refusal) => return refusal.response(),
    };
    if let Some(id) = lock(&shared.stripe.by_idempotency_key).get(&key) {
        if let Some(session) = lock(&shared.stripe.sessions).get(id) {
            return HttpResponse::Ok().json(session.json.clone());
        }
    }
    let fields = form(&body);
    let field = |name: &str| fields.get(name).cloned();
    let Some(amount_cents) = field("line_items[0][price_data][unit_amount]")
        .and_then(|a| a.parse::<i64>().ok())
        .filter(|a| *a > 0)
    else {
        return stripe_error(
            400,
            "invalid_request_error",
            "line_items[0][price_data][unit_amount]: a positive integer is required",
        );
    };
    let (Some(success_url), Some(cancel_url)) = (field("success_url"), field("cancel_url")) else {
        return stripe_error(
            400,
            "invalid_request_error",
            "success_url and cancel_url are required",
        );
    };
    let id = format!("cs_test_demo_{}", uuid::Uuid::new_v4().simple());
    let now = chrono::Utc::now().timestamp();
    let session = json!({
        "id": id,
        "object": "checkout.session",
        "amount_total": amount_cents,
        "automatic_tax": { "enabled": false, "liability": null, "status": null },
        "client_reference_id": field("client_reference_id"),
        "created": now,
        "currency": field("line_items[0][price_data][currency]").unwrap_or_else(|| "eur".into()),
        "custom_fields": [],
        "custom_text": {
            "after_submit": null, "shipping_address": null,
            "submit": null, "terms_of_service_acceptance": null
        },
        "customer": field("customer"),
        "expires_at": now + 86_400,
        "livemode": false,
        "metadata": {
            "type": field("metadata[type]"),
            "userId": field("metadata[userId]"),
            "amountCents": field("metadata[amountCents]"),
        },
        "mode": "payment",
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "shipping_options": [],
        "status": "open",
        "url": format!("{}/c/pay/{id}", shared.stand_ins_url),
    });
    lock(&shared.stripe.sessions).insert(
        id.clone(),
        Session {
            json: session.clone(),
            amount_cents,
            success_url,
            cancel_url,
            paid: false,
        },
    );
    lock(&shared.stripe.by_idempotency_key).insert(key, id);
    HttpResponse::Ok().json(session)
}

fn session(shared: &Shared, id: &str) -> Option<Session> {
    lock(&shared.stripe.sessions).get(id).cloned()
}

fn euros(cents: i64) -> String {
    Micros::from_cents(cents)
        .map(|m| m.to_string())
        .unwrap_or_else(|_| format!("{cents} cents"))
}

async fn checkout_page(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let Some(session) = session(&shared, &id) else {
        return HttpResponse::NotFound().body("no such Checkout Session");
    };
    let product = session.json["metadata"]["type"]
        .as_str()
        .map(|_| "Crédits AI")
        .unwrap_or("Paiement");
    let body = format!(
        r#"<h1>Paiement (démo de Stripe Checkout)</h1>
<section class="panel checkout" data-session-id="{id}" data-amount-cents="{cents}">
<h2>{product}</h2>
<p class="credit-balance__amount checkout__amount">{amount}</p>
<p class="credit-balance__message">Aucune carte n'est débitée : « Payer » envoie à creditd l'évènement signé checkout.session.completed, comme Stripe.</p>
<form method="post" action="{action}" class="topup__actions">
<a href="{cancel}" class="checkout__cancel">Annuler</a>
<button type="submit" class="topup__pay checkout__pay">Payer {amount}</button>
</form>
</section>"#,
        id = escape(&id),
        cents = session.amount_cents,
        amount = escape(&euros(session.amount_cents)),
        action = escape(&format!("{}/c/pay/{}", shared.stand_ins_url, id)),
        cancel = escape(&session.cancel_url),
    );
    page(&shared, "Paiement · Démo", &body)
}

/// "Payer": back to the success URL now, the signed webhook a moment later.
async fn pay(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let session = {
        let mut sessions = lock(&shared.stripe.sessions);
        let Some(session) = sessions.get_mut(id.as_str()) else {
            return HttpResponse::NotFound().body("no such Checkout Session");
        };
        let first_payment = !session.paid;
        session.paid = true;
        first_payment.then(|| session.clone())
    };
    let Some(session) = session else {
        return HttpResponse::Conflict().body("this Checkout Session is already paid");
    };
    let success_url = session.success_url.clone();
    let invoice = finalize_invoice(&shared, &session);
    let shared = shared.into_inner();
    actix_web::rt::spawn(async move {
        actix_web::rt::time::sleep(WEBHOOK_DELAY).await;
        deliver_completed(&shared, session, invoice).await;
    });
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, success_url))
        .finish()
}

/// `Stripe-Signature: t=<ts>,v1=<hex>`: HMAC-SHA256 over `"{t}.{body}"`.
fn signature(secret: &str, timestamp: i64, body: &str) -> Option<String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(format!("{timestamp}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(format!("t={timestamp},v1={hex}"))
}

/// The invoice Checkout creates for a paid session
/// (`invoice_creation[enabled]=true`), finalized and paid; its id.
fn finalize_invoice(shared: &Shared, session: &Session) -> String {
    let id = format!("in_demo_{}", uuid::Uuid::new_v4().simple());
    let hosted = format!("{}/i/{id}", shared.stand_ins_url);
    let invoice = json!({
        "id": id,
        "object": "invoice",
        "amount_paid": session.amount_cents,
        "currency": session.json["currency"],
        "customer": session.json["customer"],
        "status": "paid",
        "hosted_invoice_url": hosted,
        "invoice_pdf": format!("{hosted}/pdf"),
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
    });
    lock(&shared.stripe.invoices).insert(id.clone(), (invoice, session.amount_cents));
    id
}

/// `GET /v1/invoices/{id}`: a read, so the secret key only.
async fn retrieve_invoice(
    shared: web::Data<Shared>,
    request: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    let expected = format!("Bearer {}", shared.stripe_secret_key);
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if presented != Some(expected.as_str()) {
        return Refusal::InvalidApiKey.response();
    }
    match lock(&shared.stripe.invoices).get(id.as_str()) {
        Some((invoice, _)) => HttpResponse::Ok().json(invoice.clone()),
        None => stripe_error(
            404,
            "invalid_request_error",
            &format!("No such invoice: '{id}'"),
        ),
    }
}

/// The hosted invoice page.
async fn invoice_page(shared: web::Data<Shared>, id: web::Path<String>) -> HttpResponse {
    let Some(cents) = lock(&shared.stripe.invoices)
        .get(id.as_str())
        .map(|(_, cents)| *cents)
    else {
        return HttpResponse::NotFound().body("no such invoice");
    };
    let body = format!(
        r#"<h1>Facture (démo de Stripe)</h1>
<section class="panel invoice" data-invoice-id="{id}">
<h2>Crédits AI</h2>
<p class="credit-balance__amount">{amount}</p>
<p class="credit-balance__message">Payée. Facture {id}.</p>
</section>"#,
        id = escape(&id),
        amount = escape(&euros(cents)),
    );
    page(&shared, "Facture · Démo", &body)
}

async fn deliver_completed(shared: &Shared, session: Session, invoice: String) {
    let mut object = session.json;
    object["invoice"] = json!(invoice);
    object["payment_status"] = json!("paid");
    object["status"] = json!("complete");
    object["payment_intent"] = json!(format!("pi_demo_{}", uuid::Uuid::new_v4().simple()));
    let event = json!({
        "id": format!("evt_demo_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "type": "checkout.session.completed",
        "data": { "object": object },
    });
    let body = event.to_string();
    let url = format!("{}/api/webhooks/stripe", shared.creditd_url);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let now = chrono::Utc::now().timestamp();
        let Some(signature) = signature(&shared.stripe_webhook_secret, now, &body) else {
            tracing::error!("demo webhook: cannot sign");
            return;
        };
        let sent = shared
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("Stripe-Signature", signature)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => {
                tracing::warn!(status = %response.status(), attempt, "demo webhook refused")
            }
            Err(error) => tracing::warn!(%error, attempt, "demo webhook not delivered"),
        }
        actix_web::rt::time::sleep(Duration::from_secs(u64::from(attempt))).await;
    }
}
