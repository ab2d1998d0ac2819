//! Integration tests against a real PostgreSQL (see `support`).

mod byok;
mod chat;
mod chat_stream;
mod credits;
mod ledger;
mod ledger_model;
mod ledger_outage;
#[allow(dead_code)] // shared helpers; each area uses its own subset
mod support;
