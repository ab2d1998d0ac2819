//! Stripe, as an outside service: the API client (customers, Checkout
//! Sessions, PaymentIntents, Search), the webhook signature, the payloads
//! of its events and the metadata creditd writes on its objects. What the
//! payments mean to creditd is `crate::payments`.

pub mod client;
pub mod events;
pub mod metadata;
pub mod signature;

pub use client::{StripeApi, StripeCallError, TopupSession};
