//! What Stripe payments do to creditd: top-up sessions (Checkout), what
//! each webhook event does to the ledger and the user's plan, and a paid
//! top-up's follow-ups (its card and invoice link, read from Stripe after
//! the credit). Stripe's own API and formats are `crate::stripe`.

pub mod followup;
pub mod topup;
pub mod webhook;

use crate::ledger::LedgerError;
use crate::stripe::StripeCallError;

/// Why a top-up or a webhook event was not applied.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// The event's payload is not what Stripe sends (answered 400).
    #[error("{0}")]
    Invalid(String),
    /// The top-up a refund or dispute is about is not credited yet: the
    /// event must be retried later (answered 503).
    #[error("{0}")]
    NotCreditedYet(&'static str),
    #[error(transparent)]
    Call(#[from] StripeCallError),
    /// The engine refused or could not post an effect.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A read or write of creditd's own tables failed.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}
