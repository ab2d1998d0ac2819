//! Settlements of platform chats: the record of a charge, which must post.
//!
//! A chat's hold is admission control; its settlement is what charges the
//! account. A delivered answer's settlement is retried with backoff for as
//! long as the process lives, never given up on a database hiccup: the hold
//! id makes every retry idempotent, and the engine posts the usage whatever
//! became of the hold (active, expired, released or lost in a reset).
//!
//! The number of platform chats whose settlement may still be pending is
//! bounded (`chat.pending_settlements_max`): a chat takes a slot before its
//! hold and gives it back once its settlement is durable or its hold is
//! released. With no slot left, new platform chats are refused with
//! `OVERLOADED` instead of piling up answers that cannot be billed yet.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ledger::{AccountId, Engine, HoldId, LedgerError, UsageCharge, UsageRecord};

/// First pause before a settlement is retried; doubled up to `RETRY_PAUSE_MAX`.
const RETRY_PAUSE_FIRST: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);

/// The settlements of this process.
pub struct Settlements {
    slots: Arc<Semaphore>,
    slots_max: usize,
    /// Settlements started and not yet durable.
    pending: AtomicUsize,
}

/// A platform chat's place among the pending settlements; given back on drop.
pub struct SettlementSlot {
    _permit: OwnedSemaphorePermit,
}

struct PendingGuard<'a>(&'a Settlements);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let now = self.0.pending.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!(crate::telemetry::PENDING_SETTLEMENTS.name).set(now as f64);
    }
}

impl Settlements {
    pub fn new(slots_max: usize) -> Settlements {
        Settlements {
            slots: Arc::new(Semaphore::new(slots_max)),
            slots_max,
            pending: AtomicUsize::new(0),
        }
    }

    /// A slot for a new platform chat, or `Overloaded` when
    /// `chat.pending_settlements_max` chats may still have to settle.
    pub fn admit(&self) -> Result<SettlementSlot, LedgerError> {
        self.slots
            .clone()
            .try_acquire_owned()
            .map(|permit| SettlementSlot { _permit: permit })
            .map_err(|_| {
                metrics::counter!(crate::telemetry::CHATS_REFUSED_TOTAL.name, "reason" => "settlements_pending")
                    .increment(1);
                LedgerError::Overloaded
            })
    }

    /// Settlements started and not yet durable.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Platform chats that may still have to settle.
    pub fn in_flight(&self) -> usize {
        self.slots_max - self.slots.available_permits()
    }

    /// Waits until no platform chat may still have to settle (shutdown),
    /// for at most `limit`; `false` when some still may.
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.in_flight() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }

    /// Posts `charge` under `hold` and returns it once durable, retrying
    /// while the ledger is unavailable, overloaded or resetting, for as long
    /// as the process lives. Any other error is a bug (an invalid charge, a
    /// conflicting settlement under the same hold id): it is logged, counted
    /// and returned.
    pub async fn settle(
        &self,
        engine: &Engine,
        account: AccountId,
        hold: HoldId,
        charge: UsageCharge,
    ) -> Result<UsageRecord, LedgerError> {
        let now = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        metrics::gauge!(crate::telemetry::PENDING_SETTLEMENTS.name).set(now as f64);
        let _pending = PendingGuard(self);
        let mut pause = RETRY_PAUSE_FIRST;
        let mut attempts = 0u64;
        loop {
            attempts += 1;
            match engine.settle(account, hold, charge.clone()).await {
                Ok(outcome) => {
                    if attempts > 1 {
                        tracing::info!(%hold, attempts, "settlement committed after retries");
                    }
                    return Ok(outcome.record);
                }
                Err(
                    error @ (LedgerError::Unavailable(_)
                    | LedgerError::Overloaded
                    | LedgerError::Reset),
                ) => {
                    if attempts == 1 {
                        tracing::warn!(%error, %hold, "settlement not committed yet; retrying until it is");
                    }
                    metrics::counter!(crate::telemetry::SETTLEMENT_RETRIES_TOTAL.name).increment(1);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_PAUSE_MAX);
                }
                Err(error) => {
                    tracing::error!(%error, %hold, cost_micros = charge.cost.get(),
                        "a settlement was refused by the ledger");
                    metrics::counter!(crate::telemetry::SETTLEMENTS_REFUSED_TOTAL.name)
                        .increment(1);
                    return Err(error);
                }
            }
        }
    }
}
