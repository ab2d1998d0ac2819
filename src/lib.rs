//! creditd: the prepaid AI-credits ledger of an AI app builder.
//!
//! - [`money`]: exact amounts in integer micros;
//! - [`text`]: the characters no stored text may hold (controls, invisible formatting);
//! - [`pricing`]: the model price table and per-request cost;
//! - [`config`]: settings from `config.toml` and `CREDITD__SECTION__KEY` (plain data);
//! - [`runtime`]: settings turned once into the price table, cipher, keys;
//! - [`db`]: PostgreSQL (configured or private cluster), the pool, one `DbError`, migrations;
//! - [`ledger`]: the engine (account actors, journal writer, reconcile);
//! - [`events`]: delivery of the outbox's events (alerts, top-ups), signed;
//! - [`email`]: the outbox's alerts and receipts as French emails over SMTP;
//! - [`stripe`]: Stripe's API client, webhook signature, payloads and metadata;
//! - [`payments`]: top-up sessions, each Stripe event's effect, a top-up's follow-ups;
//! - [`clerk`]: Clerk's session tokens (JWKS) and webhook signature (Svix);
//! - [`signatures`]: the HMAC-SHA256 behind every webhook signature;
//! - [`webhooks`]: the inbox of Stripe's and Clerk's events (ids recorded with their effect);
//! - [`metering`]: chat settlements retried until they post; usage reports;
//! - [`rate_limits`]: chats in flight, top-ups per minute, per-IP request rate;
//! - [`health`]: the database's health, checked in the background;
//! - [`demo`]: `creditd demo`, with local stand-ins for Clerk, Stripe and Anthropic;
//! - [`providers`]: the Anthropic and OpenAI clients behind `/api/chat`.
//! - [`accounts`]: users, Clerk's user events, deletion, the signup bonus, own provider keys;
//! - [`referrals`]: referral codes and the bonus after a referred user's first top-up;
//! - [`api_keys`]: the gateway's API keys (`/v1/*`): made, listed, revoked, presented.
//! - [`operators`]: who an operator is, and the record of what operators did.

/// The allocator of every binary built on this crate (the service, its
/// tests and benches): requests, actors and the journal writer allocate
/// on one thread and free on another, which glibc's allocator pays for
/// in locks and consolidation (the chat path's profile, BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod accounts;
pub mod api_keys;
pub mod app;
pub mod clerk;
pub mod clock;
pub mod config;
pub mod db;
pub mod demo;
pub mod email;
pub mod events;
pub mod health;
pub mod http;
pub mod ledger;
pub mod metering;
pub mod money;
pub mod operators;
pub mod payments;
pub mod pricing;
pub mod providers;
pub mod rate_limits;
pub mod recharge;
pub mod referrals;
pub mod runtime;
pub mod signatures;
pub mod stripe;
pub mod telemetry;
pub mod text;
pub mod webhooks;
