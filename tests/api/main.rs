//! Integration tests against a real PostgreSQL (see `support`).

mod clerk_webhooks;
mod credits;
mod ledger;
mod ledger_model;
mod ledger_outage;
mod stripe;
#[allow(dead_code)] // shared helpers; each area uses its own subset
mod support;
