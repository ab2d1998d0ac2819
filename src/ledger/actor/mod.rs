//! `AccountActor`: one per resident account. It serializes the account's
//! operations, applies each to its in-memory state at once, hands the
//! journal entry to the writer and answers the caller at once with what to
//! wait on (`Pending`): the caller hears "ok" only when the writer marks
//! the entry durable, woken by the writer itself. The actor never waits,
//! so a hot account pipelines many operations into each commit.
//!
//! This file is the actor's lifecycle (load, gate, stop); `messages` lists
//! what it is sent, `handlers` answers each, `apply` turns an operation
//! into a journal entry, `holdback` batches a chat's hold with its
//! settlement, and `expiry` is its timer (due holds and grants, idling).

mod apply;
mod expiry;
mod handlers;
mod holdback;
mod messages;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use super::auto_recharge::RechargeState;
use super::journal::{wait_durable, Durable, DurableSender, Entry, WriterHandle};
use super::load::{self, LoadContext, Loaded};
use super::outbox::{AlertState, AlertThresholds};
use super::state::AccountState;
use super::types::*;
use crate::clock::Clock;
use crate::money::Micros;

pub use messages::*;

/// Where accounts load from.
#[derive(Clone)]
pub(crate) enum Backend {
    /// PostgreSQL, shared with the other instances; `instance` is this one.
    Postgres {
        pool: deadpool_postgres::Pool,
        instance: super::cluster::InstanceId,
    },
    /// Persistence stubbed (benchmarks): every account opens with this balance.
    Memory { opening_balance: Micros },
}

/// Engine settings an actor needs.
#[derive(Clone)]
pub(crate) struct ActorSettings {
    pub mailbox_capacity: usize,
    pub idle_timeout: Duration,
    pub hold_ttl: chrono::Duration,
    pub recent_keys: usize,
    /// How long an admitted hold's entry waits for its settlement.
    pub hold_delay: Duration,
    /// What the actor reads the time from (expiries, windows).
    pub clock: Clock,
    /// When the account's balance alerts fire.
    pub alerts: AlertThresholds,
}

/// When an operation's reply comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Once its entry committed: acknowledged means durable.
    WhenDurable,
    /// As soon as the actor applied it: for a chat's hold, which is
    /// admission control and not the record of a charge (its settlement
    /// is, and waits for its own commit, which this entry's precedes).
    WhenApplied,
}

/// An actor's answer to a message: now, from the handler (no task of its
/// own), or once a future resolves (spawned on the actor's arbiter, so the
/// mailbox goes on meanwhile).
pub enum Reply<T> {
    Now(Result<T, LedgerError>),
    Later(Pin<Box<dyn Future<Output = Result<T, LedgerError>>>>),
}

impl<T: 'static> Reply<T> {
    fn later(future: impl Future<Output = Result<T, LedgerError>> + 'static) -> Reply<T> {
        Reply::Later(Box::pin(future))
    }

    /// The answer, for a caller inside the actor's own thread.
    async fn resolve(self) -> Result<T, LedgerError> {
        match self {
            Reply::Now(result) => result,
            Reply::Later(future) => future.await,
        }
    }
}

impl<A, M, T> MessageResponse<A, M> for Reply<T>
where
    A: Actor,
    M: Message<Result = Result<T, LedgerError>>,
    T: 'static,
{
    fn handle(self, _: &mut A::Context, tx: Option<OneshotSender<M::Result>>) {
        let Some(tx) = tx else {
            return;
        };
        match self {
            Reply::Now(result) => {
                let _ = tx.send(result);
            }
            Reply::Later(future) => {
                actix::spawn(async move {
                    let _ = tx.send(future.await);
                });
            }
        }
    }
}

fn ready<T: 'static>(result: Result<T, LedgerError>) -> Reply<T> {
    Reply::Now(result)
}

/// An operation's outcome once durable, for the actor's own follow-ups
/// (expiries) that no caller waits on.
async fn durable<T: 'static>(reply: Reply<Pending<T>>) -> Result<Outcome<T>, LedgerError> {
    reply.resolve().await?.durable().await
}

/// An operation the account's actor applied, answered at once: its caller
/// then waits for the entry's commit itself, woken by the journal writer
/// directly rather than through the actor's thread (one thread hand-off
/// less between a settlement's commit and the chat's answer).
pub struct Pending<T> {
    outcome: Outcome<T>,
    /// The watch the writer moves and the seq to wait for; `None` when the
    /// operation is answered as soon as it applied.
    durable: Option<(watch::Receiver<Durable>, i64)>,
}

impl<T> Pending<T> {
    /// The outcome, once its entry (or, for a replay, the original) is
    /// durable; an error when it never will be.
    pub(crate) async fn durable(self) -> Result<Outcome<T>, LedgerError> {
        if let Some((durable, seq)) = self.durable {
            wait_durable(durable, seq).await?;
        }
        Ok(self.outcome)
    }
}

enum Phase {
    Loading,
    Ready(Box<AccountState>),
    /// Loading failed: every queued message gets this error, then the actor stops.
    Failed(LedgerError),
    /// Passivating or reset: messages are answered `Reset` and retried elsewhere.
    Stopping,
}

pub struct AccountActor {
    account: AccountId,
    epoch: u64,
    backend: Backend,
    writer: WriterHandle,
    settings: ActorSettings,
    phase: Phase,
    durable_tx: DurableSender,
    durable_rx: watch::Receiver<Durable>,
    last_activity: Instant,
    timer: Option<(SpawnHandle, Instant)>,
    /// Removes this actor from the directory (if it is still the registered one).
    deregister: Arc<dyn Fn() + Send + Sync>,
    published: Arc<Published>,
    /// Set by the directory: a copy of the account whose committed
    /// version is below this is stale (another instance wrote it, or the
    /// listener that would have said so was lost), and stops.
    stale_below: Arc<AtomicI64>,
    /// The seq of the last entry handed to the journal (see `Previous`).
    sent: Arc<AtomicI64>,
    /// The incarnation this one replaces, waited for before loading.
    previous: Option<Previous>,
    /// An admitted hold's entry, held back (its queue room already taken)
    /// until the account's next operation or `hold_delay`, so that a fast
    /// chat's hold and settlement go to the writer together and are written
    /// as one finished hold row. Always sent before any later entry.
    pending: Option<(mpsc::OwnedPermit<Entry>, Entry)>,
    /// Which balance alerts were sent since the last recovery (loaded with
    /// the account, moved by every change as its entry is made).
    alerts: AlertState,
    /// The account's auto-recharge: its settings, its attempt in flight and
    /// this month's total (loaded with the account).
    recharge: RechargeState,
}

/// What an actor shares with the directory entry that started it.
pub(crate) struct DirectoryLinks {
    /// Removes the entry (if it is still this actor's).
    pub deregister: Arc<dyn Fn() + Send + Sync>,
    /// The actor's durability, written by the journal writer.
    pub durable: DurableSender,
    pub published: Arc<Published>,
    /// The version below which the actor's copy is stale.
    pub stale_below: Arc<AtomicI64>,
    /// The seq of the last entry the actor handed to the journal.
    pub sent: Arc<AtomicI64>,
    /// The incarnation this one replaces, while entries of it may still be
    /// in flight: the account loads once they committed or failed.
    pub previous: Option<Previous>,
}

/// How long a new incarnation waits for its predecessor's entries before
/// it loads all the same (fencing then catches what it missed).
const PREVIOUS_SETTLE_MAX: Duration = Duration::from_secs(10);

/// A replaced incarnation of an account's actor (reset, evicted) and the
/// entries it handed to the journal. Its entries commit or fail after it
/// stopped: a copy loaded before they did would miss a committed change
/// (and serve a version PostgreSQL has passed), so the next incarnation
/// loads only once they settled.
#[derive(Clone)]
pub(crate) struct Previous {
    pub durable: DurableSender,
    pub sent: Arc<AtomicI64>,
}

impl Previous {
    /// Whether entries it sent are neither committed nor failed.
    pub fn in_flight(&self) -> bool {
        let durable = *self.durable.borrow();
        !durable.failed && durable.seq < self.sent.load(Ordering::Acquire)
    }

    /// Resolves once every entry it sent committed or failed (or after
    /// `PREVIOUS_SETTLE_MAX`).
    async fn settled(self) {
        let sent = self.sent.load(Ordering::Acquire);
        let mut durable = self.durable.subscribe();
        let settled = durable.wait_for(|d| d.failed || d.seq >= sent);
        if tokio::time::timeout(PREVIOUS_SETTLE_MAX, settled)
            .await
            .is_err()
        {
            tracing::warn!(
                "the account's previous actor still has entries in flight; loading all the same"
            );
        }
    }
}

/// The account's view as of its last applied operation, for reads that
/// skip the mailbox: written by the actor only (after each applied
/// operation and at load), cleared when it stops or is evicted; readers
/// load it lock-free. Every publication wakes the account's listeners. A
/// reader must also check the actor's durable watch: a state whose write
/// failed is not to be shown (`Directory::view`).
pub(crate) struct Published {
    account: AccountId,
    current: arc_swap::ArcSwapOption<AccountView>,
    watchers: Arc<super::watch::Watchers>,
}

impl Published {
    pub fn new(account: AccountId, watchers: Arc<super::watch::Watchers>) -> Published {
        Published {
            account,
            current: arc_swap::ArcSwapOption::empty(),
            watchers,
        }
    }

    pub fn get(&self) -> Option<Arc<AccountView>> {
        self.current.load_full()
    }

    pub(crate) fn set(&self, view: Option<AccountView>) {
        self.current.store(view.map(Arc::new));
        self.watchers.changed(self.account);
    }
}

impl AccountActor {
    pub(crate) fn new(
        account: AccountId,
        epoch: u64,
        backend: Backend,
        writer: WriterHandle,
        settings: ActorSettings,
        links: DirectoryLinks,
    ) -> AccountActor {
        let DirectoryLinks {
            deregister,
            durable,
            published,
            stale_below,
            sent,
            previous,
        } = links;
        let rx = durable.subscribe();
        AccountActor {
            account,
            epoch,
            backend,
            writer,
            settings,
            phase: Phase::Loading,
            durable_tx: durable,
            durable_rx: rx,
            last_activity: Instant::now(),
            timer: None,
            deregister,
            published,
            stale_below,
            sent,
            previous,
            pending: None,
            alerts: AlertState::default(),
            recharge: RechargeState::default(),
        }
    }

    /// Checks the actor can serve; stops it when it must not.
    fn gate(&mut self, ctx: &mut Context<Self>) -> Result<(), LedgerError> {
        self.last_activity = Instant::now();
        if self.is_stale() {
            // Written elsewhere since it loaded: a fresh actor serves it.
            self.stop(ctx);
            return Err(LedgerError::Reset);
        }
        match &self.phase {
            Phase::Ready(_) if self.durable_rx.borrow().failed => {
                // A journal write of this incarnation failed: its state is
                // speculative past the durable seq. Reload from PostgreSQL.
                tracing::debug!(
                    account = self.account.0,
                    "journal write failed; resetting actor"
                );
                self.stop(ctx);
                Err(LedgerError::Reset)
            }
            Phase::Ready(_) => Ok(()),
            Phase::Failed(error) => {
                let error = error.clone();
                self.stop(ctx);
                Err(error)
            }
            Phase::Stopping | Phase::Loading => Err(LedgerError::Reset),
        }
    }

    /// Another instance committed a version this copy has not: it must
    /// not answer (only meaningful once loaded).
    fn is_stale(&self) -> bool {
        self.durable_seq() < self.stale_below.load(Ordering::Acquire)
    }

    fn stop(&mut self, ctx: &mut Context<Self>) {
        // A held-back entry of a failed or stopping incarnation is void.
        self.pending = None;
        if !matches!(self.phase, Phase::Stopping) {
            self.published.set(None);
            (self.deregister)();
            self.phase = Phase::Stopping;
            ctx.stop();
        }
    }

    fn durable_seq(&self) -> i64 {
        self.durable_rx.borrow().seq
    }

    /// Runs `lookup` (a PostgreSQL read) with the mailbox held, so no other
    /// operation of this account interleaves, then continues with `then`.
    fn after_lookup<L, T>(
        &mut self,
        ctx: &mut Context<Self>,
        lookup: L,
        then: impl FnOnce(&mut Self, &mut Context<Self>, L::Output) -> Reply<T> + 'static,
    ) -> Reply<T>
    where
        L: Future + 'static,
        T: 'static,
    {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let (tx, rx) = oneshot::channel();
        ctx.wait(lookup.into_actor(self).map(move |found, actor, ctx| {
            let _ = tx.send(then(actor, ctx, found));
        }));
        Reply::later(async move {
            match rx.await {
                Ok(reply) => reply.resolve().await,
                Err(_) => Err(LedgerError::Reset),
            }
        })
    }

    fn state(&self) -> Option<&AccountState> {
        match &self.phase {
            Phase::Ready(state) => Some(state),
            _ => None,
        }
    }

    fn loaded(&mut self, ctx: &mut Context<Self>, loaded: Loaded) {
        let Loaded {
            state,
            alerts,
            recharge,
        } = loaded;
        self.alerts = alerts;
        self.recharge = recharge;
        self.durable_tx
            .send_modify(|durable| durable.seq = state.seq);
        self.published.set(Some(state.view()));
        self.phase = Phase::Ready(Box::new(state));
        self.stop_when_a_write_fails(ctx);
        // Holds that expired while the account was not resident go first.
        self.tick(ctx);
    }
}

impl AccountActor {
    /// A failed journal write voids this incarnation's state past its
    /// durable seq: it stops at once, so its published view is withdrawn
    /// (and the account's listeners woken to read the reloaded one) when
    /// the failure is known, not at the account's next operation.
    fn stop_when_a_write_fails(&mut self, ctx: &mut Context<Self>) {
        let mut durable = self.durable_rx.clone();
        let failed = async move { durable.wait_for(|d| d.failed).await.is_ok() };
        ctx.spawn(failed.into_actor(self).map(|failed, actor, ctx| {
            if failed {
                tracing::debug!(
                    account = actor.account.0,
                    "journal write failed; resetting actor"
                );
                actor.stop(ctx);
            }
        }));
    }
}

impl Actor for AccountActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.settings.mailbox_capacity);
        let account = self.account;
        let backend = self.backend.clone();
        let clock = self.settings.clock.clone();
        let recent_keys = self.settings.recent_keys;
        let previous = self.previous.take();
        let load = async move {
            if let Some(previous) = previous {
                previous.settled().await;
            }
            match backend {
                Backend::Postgres { pool, instance } => {
                    let context = LoadContext {
                        pool,
                        instance,
                        clock,
                        recent_keys,
                    };
                    load::load(&context, account).await
                }
                Backend::Memory { opening_balance } => {
                    let grants = opening_grant(opening_balance, clock.now());
                    let state = AccountState::new(
                        account,
                        opening_balance,
                        Micros::ZERO,
                        0,
                        Vec::new(),
                        grants,
                        recent_keys,
                    );
                    Ok(Loaded {
                        state,
                        alerts: AlertState::default(),
                        recharge: RechargeState::default(),
                    })
                }
            }
        };
        ctx.wait(
            load.into_actor(self)
                .map(|result, actor, ctx| match result {
                    Ok(loaded) => actor.loaded(ctx, loaded),
                    Err(error) => {
                        tracing::debug!(account = actor.account.0, %error, "account load failed");
                        actor.phase = Phase::Failed(error);
                    }
                }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        (self.deregister)();
    }
}

/// The one paid grant holding a stubbed account's opening balance.
fn opening_grant(balance: Micros, now: DateTime<Utc>) -> Vec<GrantRecord> {
    if !balance.is_positive() {
        return Vec::new();
    }
    vec![GrantRecord {
        id: crate::ledger::row_id(),
        kind: GrantKind::Paid,
        amount_micros: balance,
        remaining_micros: balance,
        expires_at: None,
        source: "opening".into(),
        stripe_payment_id: None,
        transaction_id: None,
        seq: 0,
        created_at: now,
    }]
}
