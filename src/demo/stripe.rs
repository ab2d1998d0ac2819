//! The demo's Stripe: the API calls creditd makes (customers, Checkout
//! Sessions, form-encoded, bearer key, idempotency keys honoured; invoices
//! read back) and the hosted checkout and invoice pages. "Payer" answers
//! like Stripe: the session's invoice is finalized, the browser goes back
//! to the success URL at once, and the `checkout.session.completed` event
//! (naming its `invoice`) follows as a signed webhook, a moment later
//! (webhooks lag). The card chosen on the checkout page is saved for
//! off-session payments (Stripe's test cards: `pm_card_visa` pays,
//! `pm_card_chargeDeclined` is declined, `pm_card_authenticationRequired`
//! asks for authentication), and `POST /v1/payment_intents` charges it as
//! Stripe does: a refused card answers Stripe's 402 card error, a paid
//! intent is followed by the signed `payment_intent.succeeded` event.
//! `GET /v1/payment_intents/search` finds them by a metadata clause
//! (`metadata['attemptId']:'…'`), as Stripe's Search API does.

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
        .route("/v1/payment_intents", web::post().to(create_payment_intent))
        // Before `{id}`, which "search" would match.
        .route(
            "/v1/payment_intents/search",
            web::get().to(search_payment_intents),
        )
        .route(
            "/v1/payment_intents/{id}",
            web::get().to(retrieve_payment_intent),
        )
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
    /// PaymentIntents (of paid sessions, and off-session ones), by id.
    payment_intents: Mutex<HashMap<String, Value>>,
    /// Off-session PaymentIntents' answers (status, body) by idempotency key.
    intent_answers: Mutex<HashMap<String, (u16, Value)>>,
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
<label>Carte (gardée pour les recharges automatiques)
<select name="card" class="checkout__card">
<option value="pm_card_visa">Visa qui paie</option>
<option value="pm_card_chargeDeclined">Visa refusée aux paiements suivants</option>
<option value="pm_card_authenticationRequired">Visa qui demande une authentification</option>
</select></label>
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
async fn pay(shared: web::Data<Shared>, id: web::Path<String>, body: web::Bytes) -> HttpResponse {
    let card = form(&body)
        .remove("card")
        .filter(|card| CARDS.contains(&card.as_str()))
        .unwrap_or_else(|| CARDS[0].to_owned());
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
        deliver_completed(&shared, session, invoice, card).await;
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

async fn deliver_completed(shared: &Shared, session: Session, invoice: String, card: String) {
    let mut object = session.json;
    let payment_intent = format!("pi_demo_{}", uuid::Uuid::new_v4().simple());
    lock(&shared.stripe.payment_intents).insert(
        payment_intent.clone(),
        json!({
            "id": payment_intent,
            "object": "payment_intent",
            "amount": session.amount_cents,
            "currency": object["currency"],
            "customer": object["customer"],
            "metadata": object["metadata"],
            "payment_method": card,
            "setup_future_usage": "off_session",
            "status": "succeeded",
        }),
    );
    object["invoice"] = json!(invoice);
    object["payment_status"] = json!("paid");
    object["status"] = json!("complete");
    object["payment_intent"] = json!(payment_intent);
    deliver_event(shared, "checkout.session.completed", object).await;
}

/// The demo's test cards, the first one paying.
const CARDS: [&str; 3] = [
    "pm_card_visa",
    "pm_card_chargeDeclined",
    "pm_card_authenticationRequired",
];

/// `GET /v1/payment_intents/{id}`: a read, so the secret key only.
async fn retrieve_payment_intent(
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
    match lock(&shared.stripe.payment_intents).get(id.as_str()) {
        Some(intent) => HttpResponse::Ok().json(intent.clone()),
        None => stripe_error(
            404,
            "invalid_request_error",
            &format!("No such payment_intent: '{id}'"),
        ),
    }
}

/// `metadata['key']:'value'` (or double quotes) as (key, value): the one
/// clause of Stripe's search query language creditd sends.
fn metadata_clause(query: &str) -> Option<(&str, &str)> {
    let rest = query.trim().strip_prefix("metadata[")?;
    let quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let (key, rest) = rest[1..].split_once(quote)?;
    let rest = rest.strip_prefix("]:")?;
    let value_quote = rest.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let value = rest[1..].strip_suffix(value_quote)?;
    (!value.contains(value_quote)).then_some((key, value))
}

/// `GET /v1/payment_intents/search?query=metadata['key']:'value'`: the
/// PaymentIntents with that metadata, as Stripe's `search_result`; a query
/// it cannot read is Stripe's 400.
async fn search_payment_intents(
    shared: web::Data<Shared>,
    request: HttpRequest,
    query: web::Query<HashMap<String, String>>,
) -> HttpResponse {
    let expected = format!("Bearer {}", shared.stripe_secret_key);
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if presented != Some(expected.as_str()) {
        return Refusal::InvalidApiKey.response();
    }
    let Some(text) = query.get("query") else {
        return stripe_error(
            400,
            "invalid_request_error",
            "Missing required param: query.",
        );
    };
    let Some((key, value)) = metadata_clause(text) else {
        return stripe_error(
            400,
            "invalid_request_error",
            &format!("Invalid search query: {text}"),
        );
    };
    let data: Vec<Value> = lock(&shared.stripe.payment_intents)
        .values()
        .filter(|intent| intent["metadata"][key].as_str() == Some(value))
        .cloned()
        .collect();
    HttpResponse::Ok().json(json!({
        "object": "search_result",
        "url": "/v1/payment_intents/search",
        "has_more": false,
        "data": data,
        "next_page": null,
    }))
}

/// `POST /v1/payment_intents`, confirmed off session: the saved card pays
/// (then `payment_intent.succeeded` follows) or is refused with Stripe's
/// 402 card error; the same idempotency key gets the same answer.
async fn create_payment_intent(
    shared: web::Data<Shared>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let key = match authorize(&shared, &request) {
        Ok(key) => key,
        Err(refusal) => return refusal.response(),
    };
    let answer = |(status, body): &(u16, Value)| {
        HttpResponse::build(
            actix_web::http::StatusCode::from_u16(*status)
                .unwrap_or(actix_web::http::StatusCode::OK),
        )
        .json(body.clone())
    };
    if let Some(answered) = lock(&shared.stripe.intent_answers).get(&key) {
        return answer(answered);
    }
    let fields = form(&body);
    let field = |name: &str| fields.get(name).cloned();
    let Some(amount) = field("amount")
        .and_then(|a| a.parse::<i64>().ok())
        .filter(|a| *a > 0)
    else {
        return stripe_error(
            400,
            "invalid_request_error",
            "Missing required param: amount.",
        );
    };
    let (Some(currency), Some(customer), Some(card)) = (
        field("currency"),
        field("customer"),
        field("payment_method"),
    ) else {
        return stripe_error(
            400,
            "invalid_request_error",
            "Missing required param: currency, customer or payment_method.",
        );
    };
    let metadata: serde_json::Map<String, Value> = fields
        .iter()
        .filter_map(|(name, value)| {
            let name = name.strip_prefix("metadata[")?.strip_suffix(']')?;
            Some((name.to_owned(), Value::String(value.clone())))
        })
        .collect();
    let id = format!("pi_demo_{}", uuid::Uuid::new_v4().simple());
    let mut intent = json!({
        "id": id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_received": amount,
        "capture_method": "automatic_async",
        "confirmation_method": "automatic",
        "created": chrono::Utc::now().timestamp(),
        "currency": currency,
        "customer": customer,
        "livemode": false,
        "metadata": metadata,
        "payment_method": card,
        "payment_method_types": ["card"],
        "status": "succeeded",
    });
    let refusal = match card.as_str() {
        "pm_card_chargeDeclined" => Some(("card_declined", "Your card was declined.")),
        "pm_card_authenticationRequired" => Some((
            "authentication_required",
            "Your card was declined. This transaction requires authentication.",
        )),
        _ => None,
    };
    let answered = match refusal {
        None => (200, intent.clone()),
        Some((code, message)) => {
            intent["status"] = json!("requires_payment_method");
            intent["amount_received"] = json!(0);
            intent["last_payment_error"] =
                json!({ "type": "card_error", "code": code, "message": message });
            (
                402,
                json!({ "error": {
                    "type": "card_error",
                    "code": code,
                    "doc_url": format!("https://stripe.com/docs/error-codes/{code}"),
                    "message": message,
                    "payment_intent": intent,
                }}),
            )
        }
    };
    lock(&shared.stripe.payment_intents).insert(id, intent.clone());
    lock(&shared.stripe.intent_answers).insert(key, answered.clone());
    if answered.0 == 200 {
        let shared = shared.into_inner();
        actix_web::rt::spawn(async move {
            actix_web::rt::time::sleep(WEBHOOK_DELAY).await;
            deliver_event(&shared, "payment_intent.succeeded", intent).await;
        });
    }
    answer(&answered)
}

/// Sends `object` as a signed event of `kind`, retried a few times.
async fn deliver_event(shared: &Shared, kind: &str, object: Value) {
    let event = json!({
        "id": format!("evt_demo_{}", uuid::Uuid::new_v4().simple()),
        "object": "event",
        "api_version": "2025-03-31.basil",
        "created": chrono::Utc::now().timestamp(),
        "livemode": false,
        "type": kind,
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

#[cfg(test)]
mod tests {
    use super::metadata_clause;

    #[test]
    fn the_search_reads_a_metadata_clause_in_either_quotes_and_nothing_else() {
        assert_eq!(
            metadata_clause("metadata['attemptId']:'4b5c'"),
            Some(("attemptId", "4b5c"))
        );
        assert_eq!(
            metadata_clause(r#"metadata["type"]:"auto_recharge""#),
            Some(("type", "auto_recharge"))
        );
        for unreadable in [
            "metadata['attemptId']:4b5c",
            "metadata['attemptId']='4b5c'",
            "amount:1000",
            "metadata['a']:'b' AND status:'succeeded'",
        ] {
            assert_eq!(metadata_clause(unreadable), None, "{unreadable}");
        }
    }
}
