//! Stripe: the API client (customers, Checkout Sessions), the webhook
//! signature and payloads, top-up sessions, and what each webhook event
//! does to the ledger and the user's plan.

pub mod client;
pub mod events;
pub mod signature;
pub mod topup;
pub mod webhook;

pub use client::{StripeApi, StripeCallError, TopupSession};

/// Why a top-up or a webhook event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    /// The event's payload is not what Stripe sends (answered 400).
    #[error("{0}")]
    Invalid(String),
    /// The top-up a refund or dispute is about is not credited yet: the
    /// event must be retried later (answered 503).
    #[error("{0}")]
    NotCreditedYet(&'static str),
    /// Stripe could not answer a read the effect needs (its own 5xx): the
    /// event must be retried later (answered 503).
    #[error("{0}")]
    ProviderUnavailable(String),
    #[error(transparent)]
    Call(#[from] StripeCallError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

use crate::ledger::LedgerError;
