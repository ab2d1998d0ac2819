//! Alert and receipt emails in French over SMTP (lettre, rustls), sent
//! from the outbox: the design's "Alertes : email quand le solde passe
//! sous 2 €", and receipts of the money taken.
//!
//! - Each outbox event of an emailed kind has one row in `email_deliveries`
//!   (inserted by a trigger in the transaction of the event itself), keyed
//!   by the event's id: at most one email per event, and none without it.
//! - A sender of its own, not the webhook sender's: an SMTP server down
//!   holds back no webhook, and nothing here touches the ledger.
//! - In order per account (an account's next delivery waits behind one
//!   being retried), retried with exponential backoff (`retry_ms_base`
//!   doubled up to `retry_ms_max`) for `retry_for_hours`, then FAILED;
//!   every outcome counted in `creditd_emails_total{kind,outcome}`.
//! - At least once, as the webhooks: a crash between the server's answer
//!   and the mark sends it again (the window is one statement).
//! - Not sent, and marked SKIPPED with the reason: an alert the person
//!   switched off (receipts always go), a deleted account, no address, an
//!   event older than `max_age_hours` when first seen.
//! - One sender per database (`db::singleton`), like the webhook sender.
//! - No `smtp_url`: the sender does not start (said at startup); the
//!   deliveries wait, PENDING.

pub mod messages;
pub mod store;

use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

use crate::config::EmailSettings;
use crate::db::singleton::{Election, Singleton};
use messages::{Kind, Links};
use store::DueEmail;

/// Accounts whose next email is looked at per round.
const ROUND_SIZE: i64 = 32;

/// The wait before the attempt after `attempts` failed ones.
pub fn backoff(settings: &EmailSettings, attempts: i32) -> Duration {
    let shift = u32::try_from(attempts.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
    let delay = settings
        .retry_ms_base
        .saturating_mul(1_u64.checked_shl(shift).unwrap_or(u64::MAX));
    Duration::from_millis(delay.min(settings.retry_ms_max))
}

/// Registers the zero-valued series of every kind and outcome.
pub fn describe_metrics() {
    for kind in messages::KINDS {
        for outcome in ["sent", "retried", "failed", "skipped"] {
            metrics::counter!(crate::telemetry::EMAILS_TOTAL.name,
                "kind" => kind.as_str(), "outcome" => outcome)
            .increment(0);
        }
    }
}

/// Counts one outcome of one email.
fn count(kind: &'static str, outcome: &'static str) {
    metrics::counter!(crate::telemetry::EMAILS_TOTAL.name, "kind" => kind, "outcome" => outcome)
        .increment(1);
}

/// Starts the sender when an SMTP URL is configured; `None` otherwise.
pub fn spawn_sender(
    election: Election,
    pool: deadpool_postgres::Pool,
    settings: &EmailSettings,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if settings.smtp_url.is_empty() {
        tracing::info!(
            "email.smtp_url is empty: no alert or receipt email is sent (they wait, pending)"
        );
        return Ok(None);
    }
    let mailer = Mailer::new(settings)?;
    let sender = Sender {
        election,
        pool,
        mailer,
        settings: settings.clone(),
    };
    Ok(Some(tokio::spawn(sender.run())))
}

/// The SMTP transport and the envelope's fixed parts.
struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    reply_to: Option<Mailbox>,
}

impl Mailer {
    fn new(settings: &EmailSettings) -> anyhow::Result<Mailer> {
        // The URL may hold a password: errors name the key, not the value.
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(settings.smtp_url.expose())
            .map_err(|_| anyhow::anyhow!("email.smtp_url: not a usable SMTP URL"))?
            .timeout(Some(Duration::from_millis(settings.timeout_ms)))
            .build();
        let from = settings.from.parse().context("email.from")?;
        let reply_to = if settings.reply_to.is_empty() {
            None
        } else {
            Some(settings.reply_to.parse().context("email.reply_to")?)
        };
        Ok(Mailer {
            transport,
            from,
            reply_to,
        })
    }

    /// Sends `email` to `address`; the error says what failed.
    async fn send(&self, address: &str, email: messages::Email) -> Result<(), String> {
        let to: Mailbox = address
            .parse()
            .map_err(|e| format!("the address is not usable: {e}"))?;
        let mut builder = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject);
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        let message = builder
            .multipart(MultiPart::alternative_plain_html(email.text, email.html))
            .map_err(|e| format!("the message could not be built: {e}"))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|e| format!("SMTP: {e}"))
    }
}

/// What the sender does with one due delivery.
enum Decision {
    Send {
        kind: Kind,
        address: String,
        email: messages::Email,
    },
    Skip {
        kind: Option<Kind>,
        reason: &'static str,
    },
    /// A receipt waiting for its invoice link.
    Wait,
    /// A bug in the event's data: FAILED at once, no retry can help.
    Broken { kind: Kind, error: String },
}

struct Sender {
    election: Election,
    pool: deadpool_postgres::Pool,
    mailer: Mailer,
    settings: EmailSettings,
}

impl Sender {
    async fn run(self) {
        self.election
            .run(Singleton::EmailSender, || self.rounds())
            .await;
    }

    /// Sends rounds of emails for as long as it is elected.
    async fn rounds(&self) {
        crate::db::singleton::poll_rounds(
            "email",
            Duration::from_millis(self.settings.poll_interval_ms),
            || self.round(),
        )
        .await;
    }

    /// Looks at the due head delivery of up to `ROUND_SIZE` accounts, one
    /// after the other; returns how many it handled (a wait is not one).
    async fn round(&self) -> anyhow::Result<usize> {
        let client = self.pool.get().await?;
        let pending = store::pending_count(&**client).await?;
        metrics::gauge!(crate::telemetry::EMAILS_PENDING.name).set(pending as f64);
        let due = store::due_heads(&**client, Utc::now(), ROUND_SIZE).await?;
        drop(client);
        let mut handled = 0;
        for delivery in due {
            if self.handle(delivery).await? {
                handled += 1;
            }
        }
        Ok(handled)
    }

    /// Decides, sends and records one delivery; `false` when it waits.
    async fn handle(&self, delivery: DueEmail) -> anyhow::Result<bool> {
        let decision = self.decide(&delivery).await?;
        let client = self.pool.get().await?;
        let id = delivery.event_id;
        match decision {
            Decision::Wait => {
                let next = Utc::now()
                    + chrono::Duration::milliseconds(
                        i64::try_from(self.settings.poll_interval_ms).unwrap_or(1000),
                    );
                store::defer(&**client, id, next).await?;
                return Ok(false);
            }
            Decision::Skip { kind, reason } => {
                store::mark_skipped(&**client, id, reason).await?;
                count(kind.map_or("other", Kind::as_str), "skipped");
            }
            Decision::Broken { kind, error } => {
                tracing::error!(event = %id, %error, "an event's email cannot be written; FAILED");
                store::mark_attempt_failed(&**client, id, Utc::now(), true, &error).await?;
                count(kind.as_str(), "failed");
            }
            Decision::Send {
                kind,
                address,
                email,
            } => {
                drop(client);
                self.send(&delivery, kind, &address, email).await?;
            }
        }
        Ok(true)
    }

    /// What to do with a delivery, in the order the reasons are checked.
    async fn decide(&self, delivery: &DueEmail) -> anyhow::Result<Decision> {
        let kind = match Kind::of_event(&delivery.kind, &delivery.data) {
            Ok(kind) => kind,
            Err(reason) => {
                // A switch-off its failure's email already told.
                let kind = (delivery.kind == "auto_recharge.disabled")
                    .then_some(Kind::AutoRechargeDisabled);
                return Ok(Decision::Skip { kind, reason });
            }
        };
        let skip = |reason| {
            Ok(Decision::Skip {
                kind: Some(kind),
                reason,
            })
        };
        if delivery.deleted {
            return skip("account_deleted");
        }
        if kind.is_alert() && !delivery.alerts_on {
            return skip("opted_out");
        }
        let Some(address) = delivery.address.clone().filter(|a| !a.trim().is_empty()) else {
            return skip("no_address");
        };
        let age = Utc::now() - delivery.created_at;
        let max_age = chrono::Duration::hours(
            i64::try_from(self.settings.max_age_hours).unwrap_or(i64::MAX / 3600),
        );
        if delivery.attempts == 0 && age > max_age {
            return skip("too_old");
        }
        let invoice = match kind {
            Kind::TopUpReceipt => match self.invoice(delivery).await? {
                Some(invoice) => invoice,
                None => return Ok(Decision::Wait),
            },
            _ => None,
        };
        let links = Links {
            billing: &self.settings.billing_url,
            invoice: invoice.as_deref(),
        };
        Ok(match messages::compose(kind, &delivery.data, links) {
            Ok(email) => Decision::Send {
                kind,
                address,
                email,
            },
            Err(error) => Decision::Broken {
                kind,
                error: error.to_string(),
            },
        })
    }

    /// A top-up's invoice link: `Some(link or none)` once the receipt may
    /// go (the follow-up is done, or `receipt_invoice_wait_s` passed);
    /// `None` while it should wait.
    async fn invoice(&self, delivery: &DueEmail) -> anyhow::Result<Option<Option<String>>> {
        let Some(transaction) = delivery
            .data
            .get("transactionId")
            .and_then(serde_json::Value::as_str)
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
        else {
            return Ok(Some(None));
        };
        let client = self.pool.get().await?;
        let (url, open) = store::invoice_of(&**client, transaction).await?;
        let waited = Utc::now() - delivery.created_at;
        let wait = chrono::Duration::seconds(
            i64::try_from(self.settings.receipt_invoice_wait_s).unwrap_or(i64::MAX / 1000),
        );
        Ok((url.is_some() || !open || waited >= wait).then_some(url))
    }

    /// Sends and records the outcome: SENT, or a failed attempt retried
    /// after its backoff (FAILED past `retry_for_hours`).
    async fn send(
        &self,
        delivery: &DueEmail,
        kind: Kind,
        address: &str,
        email: messages::Email,
    ) -> anyhow::Result<()> {
        let outcome = self.mailer.send(address, email).await;
        let client = self.pool.get().await?;
        let now = Utc::now();
        match outcome {
            Ok(()) => {
                store::mark_sent(&**client, delivery.event_id, address, now).await?;
                count(kind.as_str(), "sent");
            }
            Err(error) => {
                let attempts = delivery.attempts.saturating_add(1);
                let next = now
                    + chrono::Duration::from_std(backoff(&self.settings, attempts))
                        .unwrap_or(chrono::Duration::MAX);
                let give_up_at = delivery.created_at
                    + chrono::Duration::hours(
                        i64::try_from(self.settings.retry_for_hours).unwrap_or(i64::MAX / 3600),
                    );
                let failed = next > give_up_at;
                store::mark_attempt_failed(&**client, delivery.event_id, next, failed, &error)
                    .await?;
                if failed {
                    tracing::warn!(event = %delivery.event_id, %error, "email not sent in time; FAILED");
                    count(kind.as_str(), "failed");
                } else {
                    tracing::info!(event = %delivery.event_id, %error, attempts, "email not sent; retrying");
                    count(kind.as_str(), "retried");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_the_base_and_stop_growing_at_the_maximum() {
        let settings = crate::config::Settings::default_file()
            .expect("config.toml parses")
            .email;
        let delays: Vec<u128> = [1, 2, 3, 20]
            .into_iter()
            .map(|attempts| backoff(&settings, attempts).as_millis())
            .collect();
        assert_eq!(delays, [2_000, 4_000, 8_000, 600_000]);
    }
}
