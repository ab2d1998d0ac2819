//! What both webhook senders (Stripe, Clerk) share: the record of event ids
//! already handled (`processed_webhook_events`), and how deliveries are
//! counted in `creditd_webhook_events_total`; and the HMAC-SHA256 over
//! dot-joined parts that Stripe, Svix and creditd's own events sign with.
//!
//! An event id is recorded only after its effect committed, so a failure
//! (answered 5xx, retried by the sender) is never taken for done.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::ledger::LedgerError;

/// The sender of a webhook event: `processed_webhook_events.source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stripe,
    Clerk,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Stripe => "stripe",
            Source::Clerk => "clerk",
        }
    }
}

mod sql {
    pub const ALREADY_PROCESSED: &str =
        "SELECT 1 FROM processed_webhook_events WHERE source = $1 AND event_id = $2";
    pub const RECORD_PROCESSED: &str =
        "INSERT INTO processed_webhook_events (source, event_id, event_type)
         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";
}

/// What a webhook event did, as counted in `creditd_webhook_events_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Replayed,
    AwaitingPayment,
    CurrencyMismatch,
    UnknownAccount,
    NotATopup,
    NothingToClawBack,
    Superseded,
    Ignored,
    BonusAlreadyClaimed,
    Inquiry,
    AmountMismatch,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Replayed => "replayed",
            Outcome::AwaitingPayment => "awaiting_payment",
            Outcome::CurrencyMismatch => "currency_mismatch",
            Outcome::UnknownAccount => "unknown_account",
            Outcome::NotATopup => "not_a_topup",
            Outcome::NothingToClawBack => "nothing_to_claw_back",
            Outcome::Superseded => "superseded",
            Outcome::Ignored => "ignored",
            Outcome::BonusAlreadyClaimed => "bonus_already_claimed",
            Outcome::Inquiry => "inquiry",
            Outcome::AmountMismatch => "amount_mismatch",
        }
    }
}

/// Counts one webhook delivery; event types creditd does not handle
/// (not in `handled`) are counted as `other` so the label stays bounded.
pub fn count(source: Source, kind: &str, handled: &[&'static str], outcome: &str) {
    let kind = handled
        .iter()
        .find(|handled| **handled == kind)
        .copied()
        .unwrap_or("other");
    metrics::counter!("creditd_webhook_events_total",
        "source" => source.as_str(), "type" => kind, "outcome" => outcome.to_owned())
    .increment(1);
}

/// Whether this event id was already handled (its effect committed).
pub async fn already_processed(
    client: &impl GenericClient,
    source: Source,
    event_id: &str,
) -> Result<bool, LedgerError> {
    Ok(client
        .query_opt(sql::ALREADY_PROCESSED, &[&source.as_str(), &event_id])
        .await
        .map_err(DbError::from)?
        .is_some())
}

/// Records an event as handled, after its effect committed. A failure here
/// answers 5xx: the retry finds the effect done by its idempotency key.
pub async fn record_processed(
    client: &impl GenericClient,
    source: Source,
    event_id: &str,
    kind: &str,
) -> Result<(), LedgerError> {
    client
        .execute(sql::RECORD_PROCESSED, &[&source.as_str(), &event_id, &kind])
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// HMAC-SHA256 with `key` over `parts` joined by `.` (`t.body` for Stripe
/// and creditd's events, `id.t.body` for Svix).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b".");
        }
        mac.update(part);
    }
    mac
}

/// Whether `expected` is the HMAC-SHA256 of `parts` under `key`, compared in
/// constant time.
pub fn hmac_sha256_matches(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    hmac_sha256(key, parts).verify_slice(expected).is_ok()
}
