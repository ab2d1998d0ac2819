//! What both webhook senders (Stripe, Clerk) share: the [`Inbox`] of event
//! ids already handled (`processed_webhook_events`), how deliveries are
//! counted in `creditd_webhook_events_total`, and the HMAC-SHA256 over
//! dot-joined parts that Stripe, Svix and creditd's own events sign with.
//!
//! An event id is recorded only with or after its effect committed, so a
//! failure (answered 5xx, retried by the sender) is never taken for done.
//! What can only follow the commit (Clerk's signup bonus, which needs the
//! committed user row) is the caller's, run after `Received::Applied` and
//! again after `Received::Duplicate`, idempotent.

use std::future::Future;

use futures_util::future::LocalBoxFuture;
use tokio_postgres::Transaction;

use crate::db::{self, DbError, Pool};

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
pub enum WebhookOutcome {
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

impl WebhookOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookOutcome::Applied => "applied",
            WebhookOutcome::Replayed => "replayed",
            WebhookOutcome::AwaitingPayment => "awaiting_payment",
            WebhookOutcome::CurrencyMismatch => "currency_mismatch",
            WebhookOutcome::UnknownAccount => "unknown_account",
            WebhookOutcome::NotATopup => "not_a_topup",
            WebhookOutcome::NothingToClawBack => "nothing_to_claw_back",
            WebhookOutcome::Superseded => "superseded",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::BonusAlreadyClaimed => "bonus_already_claimed",
            WebhookOutcome::Inquiry => "inquiry",
            WebhookOutcome::AmountMismatch => "amount_mismatch",
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
    metrics::counter!(crate::telemetry::WEBHOOK_EVENTS_TOTAL.name,
        "source" => source.as_str(), "type" => kind, "outcome" => outcome.to_owned())
    .increment(1);
}

/// Counts what became of a delivery (`duplicate`, `failed` or its
/// outcome) and logs it, passing the result on.
pub fn counted<E: std::fmt::Display>(
    delivery: Delivery<'_>,
    handled: &[&'static str],
    result: Result<Received<WebhookOutcome>, E>,
) -> Result<Received<WebhookOutcome>, E> {
    let source = delivery.source;
    match &result {
        Ok(Received::Duplicate) => count(source, delivery.kind, handled, "duplicate"),
        Ok(Received::Applied(outcome)) => {
            count(source, delivery.kind, handled, outcome.as_str());
            tracing::info!(source = source.as_str(), event = %delivery.event_id, kind = %delivery.kind,
                outcome = outcome.as_str(), "webhook event processed");
        }
        Err(error) => {
            count(source, delivery.kind, handled, "failed");
            tracing::warn!(source = source.as_str(), event = %delivery.event_id, kind = %delivery.kind,
                %error, "webhook event not processed");
        }
    }
    result
}

/// One webhook delivery, as the inbox records it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub source: Source,
    pub event_id: &'a str,
    pub kind: &'a str,
}

/// SQL writes that commit in one transaction with the event's inbox row,
/// and tell the event's outcome.
pub type Writes<O, E> =
    Box<dyn for<'t> FnOnce(&'t Transaction<'t>) -> LocalBoxFuture<'t, Result<O, E>>>;

/// What applying an event leaves for the inbox to commit.
pub enum Effect<O, E> {
    /// Done already, through the ledger engine (or with nothing to do):
    /// the engine's postings commit on their own, so they carry
    /// idempotency keys of the event's objects (`stripe:checkout:<session>`,
    /// `stripe:payment_intent:<id>`, …), and a redelivery after a failure
    /// between them and the inbox row finds them done (`replayed`). Only
    /// the inbox row remains to write.
    Applied(O),
    /// The effect's own SQL writes: they and the inbox row commit in one
    /// transaction, or neither does.
    Writes(Writes<O, E>),
}

impl<O: 'static, E: 'static> Effect<O, E> {
    /// The same effect, its failure told in another error type.
    pub fn map_err<F: 'static>(self, convert: fn(E) -> F) -> Effect<O, F> {
        match self {
            Effect::Applied(outcome) => Effect::Applied(outcome),
            Effect::Writes(writes) => Effect::Writes(Box::new(move |tx| {
                Box::pin(async move { writes(tx).await.map_err(convert) })
            })),
        }
    }
}

/// How the inbox answered a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received<O> {
    /// The event id was handled before: nothing was done.
    Duplicate,
    /// The effect applied, and the event id is recorded with it.
    Applied(O),
}

/// The record of webhook events already handled, for both senders.
#[derive(Clone)]
pub struct Inbox {
    pool: Pool,
}

impl Inbox {
    pub fn new(pool: Pool) -> Inbox {
        Inbox { pool }
    }

    /// Applies an event once: a handled id answers `Duplicate`; otherwise
    /// `apply` runs, then its writes (if any) and the event's inbox row
    /// commit in one transaction. A failure anywhere records nothing, so
    /// the sender's redelivery applies the event again.
    pub async fn receive<O, E, F, Fut>(
        &self,
        delivery: Delivery<'_>,
        apply: F,
    ) -> Result<Received<O>, E>
    where
        E: From<DbError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Effect<O, E>, E>>,
    {
        if self.handled(delivery).await? {
            return Ok(Received::Duplicate);
        }
        let effect = apply().await?;
        let mut client = db::client(&self.pool).await?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        let outcome = match effect {
            Effect::Applied(outcome) => outcome,
            Effect::Writes(writes) => writes(&tx).await?,
        };
        tx.execute(
            sql::RECORD_PROCESSED,
            &[
                &delivery.source.as_str(),
                &delivery.event_id,
                &delivery.kind,
            ],
        )
        .await
        .map_err(DbError::from)?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(Received::Applied(outcome))
    }

    /// Whether this event id was already handled (its effect committed).
    async fn handled(&self, delivery: Delivery<'_>) -> Result<bool, DbError> {
        let client = db::client(&self.pool).await?;
        Ok(client
            .query_opt(
                sql::ALREADY_PROCESSED,
                &[&delivery.source.as_str(), &delivery.event_id],
            )
            .await?
            .is_some())
    }
}
