//! Clerk, as an outside service: its session tokens (verified against the
//! instance's JWKS) and the signature of its webhooks (Svix). What its user
//! events do to accounts is `accounts::clerk_events`.

pub mod svix;
pub mod tokens;
