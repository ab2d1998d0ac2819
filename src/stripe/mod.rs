//! Stripe: the API client (customers, Checkout Sessions), the webhook
//! signature and the webhook payloads creditd reads.

pub mod client;
pub mod events;
pub mod signature;

pub use client::{StripeApi, StripeCallError, TopupSession};
