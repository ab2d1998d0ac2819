//! Integration tests against a real PostgreSQL (see `support`).

mod ledger;
mod ledger_model;
mod ledger_outage;
mod support;
