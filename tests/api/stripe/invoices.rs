//! Invoices: a paid top-up's transaction keeps the invoice Checkout
//! created, and its history row links to Stripe's hosted invoice page once
//! the follow-up worker has read it.

use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use super::top_up;
use crate::support::stripe::*;
use crate::support::*;

/// `GET /v1/invoices/{id}` as Stripe answers it for a Checkout invoice.
fn invoice(id: &str, cents: i64) -> Value {
    json!({
        "id": id,
        "object": "invoice",
        "amount_paid": cents,
        "currency": "eur",
        "customer": "cus_test_1",
        "status": "paid",
        "hosted_invoice_url": format!("https://invoice.stripe.com/i/acct_test/{id}"),
        "invoice_pdf": format!("https://pay.stripe.com/invoice/acct_test/{id}/pdf"),
        "livemode": false,
    })
}

#[actix::test]
async fn a_top_ups_history_row_carries_its_invoice_link_read_once_stripe_answers() {
    let stripe = spawn_stripe_app_with(|s| s.stripe.followup_retry_ms_base = 20).await;
    let account = stripe.app.account("user_invoice").await.0;
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_test_topup"))
        .respond_with(stripe_error(500, "An unknown error occurred"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&stripe.stripe)
        .await;
    Mock::given(method("GET"))
        .and(path("/v1/invoices/in_test_topup"))
        .respond_with(ResponseTemplate::new(200).set_body_json(invoice("in_test_topup", 2_500)))
        .with_priority(2)
        .mount(&stripe.stripe)
        .await;
    let mut session = checkout_session("cs_invoice", account, 2_500, "paid");
    session["invoice"] = json!("in_test_topup");
    let completed = event("evt_cs_invoice", "checkout.session.completed", session);

    let accepted = stripe.deliver(&completed).await;
    let credited = stripe.balance_micros("user_invoice").await;
    let history = history_with_invoice_link(&stripe, "user_invoice").await;
    let reads = stripe
        .stripe
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == "/v1/invoices/in_test_topup")
        .count();

    assert_eq!(accepted, 200, "the credit does not wait for the invoice");
    assert_eq!(credited, 25_000_000, "credited at once");
    assert_eq!(reads, 2, "read again after Stripe's 500");
    let items = history["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{history}");
    assert_eq!(items[0]["type"], "TOP_UP");
    assert_eq!(
        items[0]["invoiceUrl"],
        "https://invoice.stripe.com/i/acct_test/in_test_topup"
    );
    assert_eq!(stripe.balance_micros("user_invoice").await, 25_000_000);
    stripe.app.db.reconcile_is_clean().await;
}

/// The history once its newest row has its invoice link (the follow-up
/// worker reads it after the credit), polled for up to 20 s.
async fn history_with_invoice_link(stripe: &StripeApp, clerk_id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, history) = json_of(
            stripe
                .app
                .get_as(clerk_id, "/api/credits/transactions")
                .await,
        )
        .await;
        assert_eq!(status, 200, "{history}");
        if history["items"][0]["invoiceUrl"].is_string() {
            return history;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the invoice link never came: {history}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[actix::test]
async fn a_top_up_without_an_invoice_has_no_invoice_link() {
    let stripe = spawn_stripe_app().await;
    top_up(&stripe, "user_no_invoice", "cs_no_invoice", 1_000).await;
    let (_, history) = json_of(
        stripe
            .app
            .get_as("user_no_invoice", "/api/credits/transactions")
            .await,
    )
    .await;
    assert_eq!(history["items"][0]["type"], "TOP_UP");
    assert!(history["items"][0]["invoiceUrl"].is_null(), "{history}");
}
