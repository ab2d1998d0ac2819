//! Delivery of outgoing events. The ledger records each event in the outbox
//! (`outgoing_events`) with the change that caused it; the sender here POSTs
//! them to `events.webhook_url` as JSON `{id, type, createdAt, sequence,
//! data}`, signed as Stripe signs its webhooks (`Creditd-Signature: t=<unix
//! s>,v1=<hex HMAC-SHA256(secret, "t.body")>`).
//!
//! - At least once: an event is marked DELIVERED only after a 2xx answer; a
//!   crash between the answer and the mark delivers it again (receivers
//!   dedupe by `id`).
//! - In order per account: only an account's next PENDING event is ever
//!   sent, so a later one waits until the earlier is DELIVERED or FAILED.
//! - Numbered per account: the first time an event is handed over it takes
//!   its account's next `sequence` (1, 2, 3…, committed before the POST),
//!   and keeps it on every retry and redelivery. Numbers follow the order
//!   events are handed over, so a receiver that keeps the highest number it
//!   applied sees an event that ended FAILED as a gap and its redelivery as
//!   late. Numbering at insert time instead would cost the journal's hot
//!   path a lookup per account per batch, and would number events without
//!   a change of their own (written by other transactions, see
//!   `ledger::Engine::record_events`) in commit order rather than in the
//!   order they are sent.
//! - Retries back off exponentially (`retry_ms_base` doubled per attempt, up
//!   to `retry_ms_max`) for `retry_for_hours`, then the event is FAILED and
//!   the account's next event goes; an operator can redeliver it.
//! - One sender per database: only the instance holding the sender's
//!   advisory lock sends (two senders would break the per-account order);
//!   it checks the lock's connection every `cluster.singleton_check_ms` and
//!   steps down when the check fails (`db::singleton`). Should two send all
//!   the same, `UNIQUE (user_id, sequence)` still gives each number once.
//! - No `webhook_url`: the sender does not start; events are recorded all
//!   the same and wait, PENDING, for a URL.

pub mod store;

use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use hmac::Mac;

use crate::config::EventsSettings;
use crate::db::singleton::{Election, Singleton};
use store::DueEvent;

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Creditd-Signature";

/// `t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let stamp = timestamp.to_string();
    let mac = crate::signatures::hmac_sha256(secret.as_bytes(), &[stamp.as_bytes(), body]);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={timestamp},v1={hex}")
}

/// The JSON body of one delivery: what a receiver gets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = EventEnvelope)]
pub struct Envelope {
    /// The event's id, the same on every delivery of it: dedupe by it.
    pub id: uuid::Uuid,
    /// What happened: `balance.low`, `topup.succeeded`, … (README).
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: chrono::DateTime<Utc>,
    /// The event's place among its account's events: 1, 2, 3… per account,
    /// no gap, the same on every delivery of it. Keep the highest applied:
    /// a lower one is late (a redelivery), a jump past the next is a gap
    /// (an event not delivered yet, or FAILED): wait for it or fetch it.
    pub sequence: i64,
    /// The event's fields, with `userId` (the account owner's Clerk id).
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

impl Envelope {
    /// The envelope of `event` under its number `sequence`.
    pub fn of(event: &DueEvent, sequence: i64) -> Envelope {
        let mut data = event.data.clone();
        if let Some(object) = data.as_object_mut() {
            object.insert("userId".into(), event.clerk_id.clone().into());
        }
        Envelope {
            id: event.id,
            kind: event.kind.clone(),
            created_at: event.created_at,
            sequence,
            data,
        }
    }
}

/// The wait before the attempt after `attempts` failed ones.
pub fn backoff(settings: &EventsSettings, attempts: i32) -> Duration {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
    let delay = settings
        .retry_ms_base
        .saturating_mul(1_u64.checked_shl(shift).unwrap_or(u64::MAX));
    Duration::from_millis(delay.min(settings.retry_ms_max))
}

/// Starts the sender when a webhook URL is configured; `None` otherwise.
pub fn spawn_sender(
    election: Election,
    pool: deadpool_postgres::Pool,
    settings: &EventsSettings,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if settings.webhook_url.is_empty() {
        tracing::info!("events.webhook_url is empty: events are recorded, not sent");
        return Ok(None);
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(settings.timeout_ms))
        .connect_timeout(Duration::from_millis(settings.timeout_ms))
        .build()?;
    let sender = Sender {
        election,
        pool,
        http,
        settings: settings.clone(),
    };
    Ok(Some(tokio::spawn(sender.run())))
}

struct Sender {
    election: Election,
    pool: deadpool_postgres::Pool,
    http: reqwest::Client,
    settings: EventsSettings,
}

impl Sender {
    async fn run(self) {
        self.election
            .run(Singleton::EventSender, || self.rounds())
            .await;
    }

    /// Delivers rounds of events for as long as it is elected.
    async fn rounds(&self) {
        crate::db::singleton::poll_rounds(
            "event delivery",
            Duration::from_millis(self.settings.poll_interval_ms),
            || self.round(),
        )
        .await;
    }

    /// Delivers the due head event of up to `concurrency` accounts; returns
    /// how many it tried.
    async fn round(&self) -> anyhow::Result<usize> {
        let client = self.pool.get().await?;
        if let Ok(pending) = store::pending_count(&**client).await {
            metrics::gauge!(crate::telemetry::EVENTS_PENDING.name).set(pending as f64);
        }
        let limit = i64::try_from(self.settings.concurrency).unwrap_or(i64::MAX);
        let due = store::due_heads(&**client, Utc::now(), limit).await?;
        drop(client);
        let tried = due.len();
        let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(due)
            .map(|event| self.deliver(event))
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        for result in results {
            result?;
        }
        Ok(tried)
    }

    async fn deliver(&self, event: DueEvent) -> anyhow::Result<()> {
        let sequence = match event.sequence {
            Some(sequence) => sequence,
            None => {
                let client = self.pool.get().await?;
                store::assign_sequence(&**client, event.id, event.user_id).await?
            }
        };
        let body = serde_json::to_vec(&Envelope::of(&event, sequence))?;
        let now = Utc::now();
        let header = signature(
            self.settings.signing_secret.expose(),
            now.timestamp(),
            &body,
        );
        let outcome = self
            .http
            .post(&self.settings.webhook_url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, header)
            .body(body)
            .send()
            .await;
        let error = match outcome {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("answered {}", response.status())),
            Err(error) => Some(format!("request failed: {error}")),
        };
        let client = self.pool.get().await?;
        match error {
            None => {
                store::mark_delivered(&**client, event.id, Utc::now()).await?;
                metrics::counter!(crate::telemetry::EVENTS_DELIVERED_TOTAL.name).increment(1);
            }
            Some(error) => {
                let attempts = event.attempts.saturating_add(1);
                let next = now
                    + chrono::Duration::from_std(backoff(&self.settings, attempts))
                        .unwrap_or(chrono::Duration::MAX);
                let give_up_at = event.pending_since
                    + chrono::Duration::hours(
                        i64::try_from(self.settings.retry_for_hours).unwrap_or(i64::MAX / 3600),
                    );
                let failed = next > give_up_at;
                store::mark_attempt_failed(&**client, event.id, next, failed, &error).await?;
                metrics::counter!(crate::telemetry::EVENT_DELIVERY_FAILURES_TOTAL.name)
                    .increment(1);
                if failed {
                    tracing::warn!(event = %event.id, %error, "event not delivered in time; FAILED");
                    metrics::counter!(crate::telemetry::EVENTS_FAILED_TOTAL.name).increment(1);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> EventsSettings {
        EventsSettings {
            webhook_url: String::new(),
            signing_secret: crate::config::Secret::new(""),
            timeout_ms: 1,
            poll_interval_ms: 1,
            retry_ms_base: 1_000,
            retry_ms_max: 60_000,
            retry_for_hours: 72,
            concurrency: 1,
        }
    }

    #[test]
    fn retries_double_from_the_base_and_stop_growing_at_the_maximum() {
        let settings = settings();
        let delays: Vec<u64> = [1, 2, 3, 7, 8, 100]
            .into_iter()
            .map(|attempts| backoff(&settings, attempts).as_millis() as u64)
            .collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 60_000, 60_000, 60_000]);
    }

    #[test]
    fn the_signature_is_the_hmac_of_the_timestamp_a_dot_and_the_body() {
        use hmac::{Hmac, KeyInit};
        use sha2::Sha256;
        // The value Stripe's own signing scheme gives for these inputs.
        let header = signature("whsec_test", 1_700_000_000, b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test").unwrap();
        mac.update(b"1700000000.{}");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(header, format!("t=1700000000,v1={hex}"));
        assert!(crate::stripe::signature::verify(
            Some(&header),
            b"{}",
            "whsec_test",
            5,
            1_700_000_001
        )
        .is_ok());
    }
}
