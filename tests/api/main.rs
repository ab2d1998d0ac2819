//! Integration tests against a real PostgreSQL (see `support`).

mod admin;
mod auth;
mod auto_recharge;
mod balance_reads;
mod browser;
mod byok;
mod chat;
mod chat_stream;
mod clerk_webhooks;
mod cli;
mod cluster;
mod console;
mod credits;
mod database_errors;
mod drills;
mod email;
mod events;
mod grants;
mod haproxy;
mod history;
mod identifiers;
mod identities;
mod ledger;
mod ledger_model;
mod ledger_outage;
mod observability;
mod openapi;
mod ops;
mod rate_limits;
mod reconcile;
mod referrals;
mod singletons;
mod spend_limits;
mod stripe;
#[allow(dead_code)] // shared helpers; each area uses its own subset
mod support;
