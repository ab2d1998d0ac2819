//! The parts of Stripe's webhook payloads creditd reads, parsed with serde
//! into small structs: an event envelope and the objects it carries.

use std::collections::HashMap;

use serde::Deserialize;

/// The texts of a payload that creditd may store (ids kept in the ledger,
/// on the user, in the record of handled events), by field: each is
/// checked as stored text (`crate::text`) before anything is written.
pub trait StoredText {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)>;
}

impl StoredText for Event {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![("id", Some(&self.id)), ("type", Some(&self.kind))]
    }
}

impl StoredText for CheckoutSession {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("data.object.id", Some(&self.id)),
            ("data.object.payment_intent", self.payment_intent.as_deref()),
            ("data.object.invoice", self.invoice.as_deref()),
        ]
    }
}

impl StoredText for PaymentIntent {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("data.object.id", Some(&self.id)),
            (
                "data.object.last_payment_error.code",
                self.last_payment_error
                    .as_ref()
                    .and_then(|error| error.code.as_deref()),
            ),
        ]
    }
}

impl StoredText for Subscription {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("data.object.id", Some(&self.id)),
            ("data.object.customer", Some(&self.customer)),
        ]
    }
}

impl StoredText for Charge {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("data.object.id", Some(&self.id)),
            ("data.object.payment_intent", self.payment_intent.as_deref()),
        ]
    }
}

impl StoredText for Dispute {
    fn stored_text(&self) -> Vec<(&'static str, Option<&str>)> {
        vec![
            ("data.object.id", Some(&self.id)),
            ("data.object.charge", Some(&self.charge)),
            ("data.object.payment_intent", self.payment_intent.as_deref()),
        ]
    }
}

/// A webhook event; `data.object` is parsed by type once the type is known.
#[derive(Debug, Deserialize)]
pub struct Event {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds; Stripe does not deliver events in this order.
    pub created: i64,
    pub data: EventData,
}

#[derive(Debug, Deserialize)]
pub struct EventData {
    pub object: serde_json::Value,
}

/// `checkout.session.*`: a Checkout Session.
#[derive(Debug, Deserialize)]
pub struct CheckoutSession {
    pub id: String,
    #[serde(default)]
    pub amount_total: Option<i64>,
    #[serde(default)]
    pub currency: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    #[serde(default)]
    pub payment_intent: Option<String>,
    /// The invoice Checkout created (`invoice_creation[enabled]=true`).
    #[serde(default)]
    pub invoice: Option<String>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

/// `payment_intent.succeeded` / `payment_intent.payment_failed`: a
/// PaymentIntent (creditd acts only on its auto-recharges').
#[derive(Debug, Deserialize)]
pub struct PaymentIntent {
    pub id: String,
    pub amount: i64,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub metadata: HashMap<String, String>,
    #[serde(default)]
    pub last_payment_error: Option<LastPaymentError>,
}

/// Why a payment failed (`last_payment_error`).
#[derive(Debug, Deserialize)]
pub struct LastPaymentError {
    #[serde(default)]
    pub code: Option<String>,
}

/// An Invoice (`GET /v1/invoices/{id}`): where the customer reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct Invoice {
    pub id: String,
    /// The hosted invoice page; absent until the invoice is finalized.
    #[serde(default)]
    pub hosted_invoice_url: Option<String>,
    #[serde(default)]
    pub invoice_pdf: Option<String>,
}

/// `customer.subscription.*`: a Subscription.
#[derive(Debug, Deserialize)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    /// `active`, `trialing`, `past_due`, `canceled`, `unpaid`, …
    pub status: String,
    pub items: List<SubscriptionItem>,
}

#[derive(Debug, Deserialize)]
pub struct List<T> {
    pub data: Vec<T>,
}

#[derive(Debug, Deserialize)]
pub struct SubscriptionItem {
    pub price: Price,
}

#[derive(Debug, Deserialize)]
pub struct Price {
    pub id: String,
}

/// `charge.refunded`: a Charge; `amount_refunded` is cumulative.
#[derive(Debug, Deserialize)]
pub struct Charge {
    pub id: String,
    pub amount_refunded: i64,
    pub currency: String,
    #[serde(default)]
    pub payment_intent: Option<String>,
    /// Copied from the payment intent: `type=credit_topup` on top-ups.
    #[serde(default)]
    pub metadata: HashMap<String, String>,
}

/// `charge.dispute.*`: a Dispute.
#[derive(Debug, Deserialize)]
pub struct Dispute {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub charge: String,
    #[serde(default)]
    pub payment_intent: Option<String>,
    /// `warning_needs_response`, `warning_under_review`, `warning_closed`
    /// (an inquiry: no funds move), `needs_response`, `under_review`,
    /// `won`, `lost`, …
    #[serde(default)]
    pub status: String,
}
