//! `AccountActor`: one per resident account. It serializes the account's
//! operations, applies each to its in-memory state at once, hands the
//! journal entry to the writer and answers the caller when the entry is
//! durable, without waiting itself (a `ResponseFuture` per operation), so a
//! hot account pipelines many operations into each commit.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot, watch};

use super::journal::{
    wait_durable, wait_resolved, Durable, DurableSender, Entry, Record, WriterHandle,
};
use super::load::{self, LoadContext, Loaded};
use super::outbox::{self, AlertState, AlertThresholds};
use super::spend;
use super::state::{AccountState, Applied};
use super::store;
use super::types::*;
use crate::clock::Clock;
use crate::money::Micros;
use crate::recharge::{self, AttemptEnd, RechargeConfig, RechargeState};

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

type Reply<T> = Pin<Box<dyn Future<Output = Result<T, LedgerError>>>>;

fn ready<T: 'static>(result: Result<T, LedgerError>) -> Reply<T> {
    Box::pin(std::future::ready(result))
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

/// The account's summary as of its last operation, for reads that skip the
/// mailbox; written by the actor only, cleared when it stops. A reader must
/// also check the actor's durable watch: a state whose write failed is not
/// to be shown.
#[derive(Default)]
pub(crate) struct Published(std::sync::Mutex<Option<BalanceSummary>>);

impl Published {
    pub fn get(&self) -> Option<BalanceSummary> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set(&self, summary: Option<BalanceSummary>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = summary;
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

    /// Sends the held-back hold entry, if any.
    fn flush_pending(&mut self) {
        if let Some((permit, entry)) = self.pending.take() {
            self.send_entry(permit, entry);
        }
    }

    /// Hands an entry to the journal, and says so to whoever replaces this
    /// incarnation.
    fn send_entry(&self, permit: mpsc::OwnedPermit<Entry>, entry: Entry) {
        self.sent.store(entry.seq, Ordering::Release);
        permit.send(entry);
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

    /// Applies an operation and queues its entry; the reply resolves once
    /// the entry (or, for a replay, the original) is durable.
    fn apply<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>,
    ) -> Reply<Outcome<T>> {
        self.apply_answering(ctx, Answer::WhenDurable, operation)
    }

    /// Applies an operation and queues its entry; `answer` says whether the
    /// reply waits for the entry's commit or comes as soon as it applied.
    fn apply_answering<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        answer: Answer,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>,
    ) -> Reply<Outcome<T>> {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        // Entries leave in seq order: a held-back hold goes first.
        self.flush_pending();
        let durable_seq = self.durable_seq();
        let hold_delay = self.settings.hold_delay;
        let Phase::Ready(state) = &mut self.phase else {
            return ready(Err(LedgerError::Reset));
        };
        let permit = match self.writer.reserve(self.account) {
            Ok(permit) => permit,
            Err(error) => return ready(Err(error)),
        };
        // PostgreSQL keeps microseconds: so does the engine, so a record
        // reads back exactly as it was answered.
        let now = self.settings.clock.now();
        // What the balance row holds before this entry, should the writer
        // have to put it back.
        let (balance_before, held_before) = (state.balance.get(), state.held.get());
        drop(state.take_grant_writes());
        let mut expiring = false;
        let (value, seq, replayed) = match operation(state, now, durable_seq) {
            Ok(Applied::New { value, record }) => {
                // The candidate state is checked before its entry leaves:
                // a broken invariant fails the account, never journals.
                if let Err(error) = state.check_invariants() {
                    tracing::error!(%error, "ledger invariant broken; the account reloads");
                    drop(permit);
                    self.stop(ctx);
                    return ready(Err(error));
                }
                let available_before = Micros::new(balance_before - held_before);
                let mut events = outbox::events_of(
                    &record,
                    &mut self.alerts,
                    &self.settings.alerts,
                    state.balance,
                    available_before,
                    state.available(),
                    now,
                );
                // The credit of an auto-recharge ends its attempt; spending
                // under the threshold may start the next one, recorded with
                // this change.
                if let Record::Transaction(t) = &record {
                    if let Some(attempt) = recharge::attempt_of(t.metadata.as_ref()) {
                        self.recharge.ended(attempt, AttemptEnd::Succeeded);
                    }
                }
                if let Some(event) = self.recharge.observe(
                    &record,
                    self.settings.alerts.recharge_monthly_max_cents,
                    state.available(),
                    now,
                ) {
                    events.push(event);
                }
                let hold_back = answer == Answer::WhenApplied
                    && !hold_delay.is_zero()
                    && matches!(record, Record::HoldPlaced(_));
                let entry = Entry {
                    account: self.account,
                    epoch: self.epoch,
                    seq: state.seq,
                    balance_before,
                    held_before,
                    balance_after: state.balance.get(),
                    held_after: state.held.get(),
                    record,
                    events,
                    grants: state.take_grant_writes(),
                    durable: self.durable_tx.clone(),
                };
                let seq = state.seq;
                expiring = entry.grants.iter().any(|w| w.grant.expires_at.is_some());
                if hold_back {
                    self.pending = Some((permit, entry));
                    ctx.run_later(hold_delay, move |actor, _| {
                        if actor.pending.as_ref().is_some_and(|(_, e)| e.seq == seq) {
                            actor.flush_pending();
                        }
                    });
                } else {
                    self.sent.store(entry.seq, Ordering::Release);
                    permit.send(entry);
                }
                (value, seq, false)
            }
            Ok(Applied::Replay { value, seq }) => (value, seq, true),
            Err(error) => return ready(Err(error)),
        };
        if !replayed {
            self.published.set(Some(state.snapshot_summary()));
        }
        if expiring {
            // A grant that expires (or an expired one just spent from):
            // the timer wakes the actor when it is due.
            self.schedule(ctx);
        }
        if answer == Answer::WhenApplied {
            return ready(Ok(Outcome {
                record: value,
                replayed,
            }));
        }
        let durable = self.durable_rx.clone();
        Box::pin(async move {
            wait_durable(durable, seq).await?;
            Ok(Outcome {
                record: value,
                replayed,
            })
        })
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
        Box::pin(async move {
            match rx.await {
                Ok(reply) => reply.await,
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

    /// Releases (as EXPIRED) every hold due by `now`, journaling each.
    /// Returns the replies; nobody needs to wait for them.
    fn expire_due(
        &mut self,
        ctx: &mut Context<Self>,
        now: DateTime<Utc>,
    ) -> Vec<Reply<Outcome<ReleaseRecord>>> {
        let due = match self.state() {
            Some(state) => state.expired(now),
            None => return Vec::new(),
        };
        let mut replies = Vec::with_capacity(due.len());
        for hold in due {
            replies.push(self.apply(ctx, move |state, at, durable| {
                let expired = state.release(hold, HoldStatus::Expired, at, durable);
                if matches!(expired, Ok(Applied::New { .. })) {
                    metrics::counter!(crate::telemetry::HOLDS_EXPIRED_TOTAL.name).increment(1);
                }
                expired
            }));
        }
        replies
    }

    /// Expires (journaling each) the unheld remainder of every grant past
    /// its expiry by `now`. Returns the replies.
    fn expire_grants(
        &mut self,
        ctx: &mut Context<Self>,
        now: DateTime<Utc>,
    ) -> Vec<Reply<Outcome<Option<TransactionRecord>>>> {
        let due = match self.state() {
            Some(state) => state.expired_grants(now),
            None => return Vec::new(),
        };
        due.into_iter()
            .map(|grant| {
                self.apply(ctx, move |state, at, durable| {
                    state.expire_grant(grant, at.max(now), durable)
                })
            })
            .collect()
    }

    /// Expires what is due of the grants before an operation spends them
    /// (or after one freed what holds kept of an expired grant); nobody
    /// waits for these: a failure is logged and retried after reload.
    fn expire_grants_due(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Ready(_)) {
            return;
        }
        let now = self.settings.clock.now();
        for reply in self.expire_grants(ctx, now) {
            ctx.spawn(
                async move {
                    if let Err(error) = reply.await {
                        tracing::warn!(%error, "grant expiry not committed; retried after reload");
                    }
                }
                .into_actor(self),
            );
        }
    }

    /// Arms the housekeeping timer for the next expiry or the idle deadline.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let idle_at = self.last_activity + self.settings.idle_timeout;
        let clock_now = self.settings.clock.now();
        let next =
            self.state().and_then(
                |s| match (s.next_expiry(), s.next_grant_expiry(clock_now)) {
                    (Some(hold), Some(grant)) => Some(hold.min(grant)),
                    (hold, grant) => hold.or(grant),
                },
            );
        let expiry_at = next.map(|at| {
            let wait = (at - self.settings.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            now + wait
        });
        let at = expiry_at
            .map_or(idle_at, |e| e.min(idle_at))
            .max(now + Duration::from_millis(5));
        if let Some((handle, current)) = self.timer {
            if current <= at {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(at - now, |actor, ctx| {
            actor.timer = None;
            actor.tick(ctx);
        });
        self.timer = Some((handle, at));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Ready(_)) {
            return;
        }
        if self.durable_rx.borrow().failed || self.is_stale() {
            self.stop(ctx);
            return;
        }
        let replies = self.expire_due(ctx, self.settings.clock.now());
        for reply in replies {
            ctx.spawn(
                async move {
                    if let Err(error) = reply.await {
                        tracing::warn!(%error, "hold expiry not committed; retried after reload");
                    }
                }
                .into_actor(self),
            );
        }
        // Grants expire after the holds: an expired hold no longer keeps
        // its part of an expired grant.
        self.expire_grants_due(ctx);
        let quiet = self.state().is_some_and(|state| {
            state.holds.is_empty() && self.durable_rx.borrow().seq >= state.seq
        });
        if quiet && self.last_activity.elapsed() >= self.settings.idle_timeout {
            tracing::trace!(account = self.account.0, "passivating idle account");
            self.stop(ctx);
            return;
        }
        self.schedule(ctx);
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
        self.published.set(Some(state.snapshot_summary()));
        self.phase = Phase::Ready(Box::new(state));
        // Holds that expired while the account was not resident go first.
        self.tick(ctx);
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
        id: uuid::Uuid::new_v4(),
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

/// Credits an account (bonus, top-up, promo, adjustment), idempotent by key.
/// Sent from `Engine::credit` to the account's actor when a signup bonus is
/// granted, a paid top-up or a won dispute is heard from Stripe, or an
/// operator grants credits (admin route, `creditd grant`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<TransactionRecord>, LedgerError>")]
pub struct Credit {
    pub posting: Posting,
}

/// Debits an account (refund, dispute, adjustment); may leave it in debt.
/// Sent from `Engine::debit` to the account's actor when a dispute's funds
/// are withdrawn, a second signup bonus of one person is taken back, or an
/// operator debits the account (admin route, `creditd grant` negative).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<TransactionRecord>, LedgerError>")]
pub struct Debit {
    pub posting: Posting,
}

/// Holds `amount` if available, idempotent by hold id. Sent from
/// `Engine::admit` / `Engine::reserve` to the account's actor when a
/// platform chat is about to call its provider (or a caller reserves).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<HoldRecord>, LedgerError>")]
pub struct Reserve {
    pub hold_id: HoldId,
    pub amount: Micros,
    pub answer: Answer,
}

/// Debits what a Stripe charge refunded beyond what was already clawed back
/// for it. Sent from `Engine::clawback` to the account's actor when Stripe's
/// `charge.refunded` event arrives; the actor serializes it with every
/// other clawback of the charge.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<Option<TransactionRecord>>, LedgerError>")]
pub struct Clawback {
    pub request: ClawbackRequest,
}

/// Ends a hold and posts the real cost as a usage. Sent from
/// `Engine::settle` to the account's actor when a platform chat's provider
/// call delivered (retried by `metering::Settlements` until it posts).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<UsageRecord>, LedgerError>")]
pub struct Settle {
    pub hold_id: HoldId,
    pub charge: UsageCharge,
}

/// Ends a hold without charge. Sent from `Engine::release` to the
/// account's actor when a platform chat's provider call failed before any
/// output, or a stream ended having produced nothing.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Outcome<ReleaseRecord>, LedgerError>")]
pub struct Release {
    pub hold_id: HoldId,
}

/// Expires every hold due at `now`. Sent from `Engine::expire_holds` to
/// the account's actor when a caller (tests, benchmarks) wants expiry now;
/// the actor's own timer does the same when a hold falls due.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<ReleaseRecord>, LedgerError>")]
pub struct ExpireHolds {
    pub now: DateTime<Utc>,
}

/// Expires every grant due at `now` (also done by the actor's own timer
/// and before every operation): the debits it journaled. Sent from
/// `Engine::expire_grants` (tests moving a manual clock).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<Vec<TransactionRecord>, LedgerError>")]
pub struct ExpireGrants {
    pub now: DateTime<Utc>,
}

/// Stops an actor whose copy became stale (its `stale_below` moved past
/// its committed version). Sent from `Directory::evict` when another
/// instance wrote the account (or the listener that would have said so
/// was lost); carries no money.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub struct Evict;

impl Handler<Evict> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Evict, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Ready(_)) && self.is_stale() {
            self.stop(ctx);
        }
    }
}

/// The account as its actor sees it. Sent from `Engine::balance` to the
/// account's actor when a read must see every operation applied so far (a
/// chat refused for its balance, the balance page and its grants, the admin
/// account view, `creditd balance`).
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<BalanceSnapshot, LedgerError>")]
pub struct GetBalance;

/// Sets the account's auto-recharge (`None`: off). Sent from
/// `Engine::set_auto_recharge` when the user saves the settings.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct SetAutoRecharge {
    pub config: Option<RechargeConfig>,
}

/// An auto-recharge attempt ended. Sent from `Engine::auto_recharge_ended`
/// when its payment succeeded (after its credit), failed (after the
/// failure switched auto-recharge off in PostgreSQL) or the payment worker
/// canceled it before paying.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct AutoRechargeEnded {
    pub attempt: uuid::Uuid,
    pub end: AttemptEnd,
}

/// Answers once every change the actor applied before this message is
/// committed or failed: none of them is still in flight. Sent from
/// `Engine::record_events` before an event without a journal entry of its
/// own is recorded, so that it takes its place after those changes.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "Result<(), LedgerError>")]
pub struct AwaitApplied;

impl Handler<AwaitApplied> for AccountActor {
    type Result = ResponseFuture<Result<(), LedgerError>>;

    fn handle(&mut self, _msg: AwaitApplied, _ctx: &mut Context<Self>) -> Self::Result {
        // Loading, stopping, or failed: nothing of this incarnation will
        // still commit.
        if self.durable_rx.borrow().failed || !matches!(self.phase, Phase::Ready(_)) {
            return ready(Ok(()));
        }
        // A held-back hold entry is one of them: it leaves now rather than
        // make the caller wait out its delay.
        self.flush_pending();
        let Some(applied) = self.state().map(|state| state.seq) else {
            return ready(Ok(()));
        };
        Box::pin(wait_resolved(self.durable_rx.clone(), applied))
    }
}

impl Handler<SetAutoRecharge> for AccountActor {
    type Result = Result<(), LedgerError>;

    fn handle(&mut self, msg: SetAutoRecharge, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.recharge.config = msg.config;
        Ok(())
    }
}

impl Handler<AutoRechargeEnded> for AccountActor {
    type Result = Result<(), LedgerError>;

    fn handle(&mut self, msg: AutoRechargeEnded, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.recharge.ended(msg.attempt, msg.end);
        Ok(())
    }
}

/// Changes the account's spending limits; answered once they are stored,
/// and applied to every hold the actor judges after this message. Sent
/// from `Engine::set_limits` to the account's actor when its owner
/// (`PUT /api/credits/limits`) or an operator (`PUT
/// /admin/accounts/{userId}/limits`) changes them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<SpendingSnapshot, LedgerError>")]
pub struct SetLimits {
    pub change: LimitsChange,
}

/// The account's spending limits and what its windows count. Sent from
/// `Engine::spending` to the account's actor when `GET /api/credits/limits`
/// or a test reads them.
#[derive(Debug, Clone, Message)]
#[rtype(result = "Result<SpendingSnapshot, LedgerError>")]
pub struct GetSpending;

impl AccountActor {
    fn post(
        &mut self,
        ctx: &mut Context<Self>,
        direction: Direction,
        posting: Posting,
    ) -> Reply<Outcome<TransactionRecord>> {
        let known = self.state().is_some_and(|s| s.knows_key(&posting.key));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            return self.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d));
        };
        if known {
            return self.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d));
        }
        let account = self.account;
        let key = posting.key.clone();
        let lookup = async move {
            let client = store::client(&pool).await?;
            store::find_transaction(&**client, account, &key).await
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            match found {
                Ok(Some(record)) => {
                    let durable = actor.durable_seq();
                    if let Phase::Ready(state) = &mut actor.phase {
                        state.remember_key(record, durable);
                    }
                }
                Ok(None) => {}
                Err(error) => return ready(Err(error)),
            }
            actor.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d))
        })
    }

    /// Settle and release on a hold the actor doesn't know look it up first.
    fn finish<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        hold_id: HoldId,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>
            + 'static,
    ) -> Reply<Outcome<T>> {
        let known = self.state().is_some_and(|s| s.knows_hold(&hold_id));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            return self.apply(ctx, operation);
        };
        if known {
            return self.apply(ctx, operation);
        }
        let account = self.account;
        let lookup = async move {
            let client = store::client(&pool).await?;
            store::find_finished_hold(&**client, account, hold_id).await
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            match found {
                Ok(Some(finished)) => {
                    let durable = actor.durable_seq();
                    if let Phase::Ready(state) = &mut actor.phase {
                        state.remember_finished(hold_id, finished, durable);
                    }
                }
                Ok(None) => {}
                Err(error) => return ready(Err(error)),
            }
            actor.apply(ctx, operation)
        })
    }
}

impl Handler<Credit> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<TransactionRecord>, LedgerError>>;

    fn handle(&mut self, msg: Credit, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        self.post(ctx, Direction::Credit, msg.posting)
    }
}

impl Handler<Debit> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<TransactionRecord>, LedgerError>>;

    fn handle(&mut self, msg: Debit, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        self.post(ctx, Direction::Debit, msg.posting)
    }
}

impl Handler<Reserve> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<HoldRecord>, LedgerError>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        // Expired holds give their amount back before a new one is judged.
        for reply in self.expire_due(ctx, self.settings.clock.now()) {
            drop(reply);
        }
        self.expire_grants_due(ctx);
        let ttl = self.settings.hold_ttl;
        let reply = self.apply_answering(ctx, msg.answer, move |state, now, _| {
            state.reserve(msg.hold_id, msg.amount, now, now + ttl)
        });
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<Clawback> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<Option<TransactionRecord>>, LedgerError>>;

    fn handle(&mut self, msg: Clawback, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        let request = msg.request;
        let known = self
            .state()
            .is_some_and(|s| s.knows_clawbacks(&request.object) && s.knows_key(&request.key));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            if let Phase::Ready(state) = &mut self.phase {
                state.remember_clawbacks(request.object.clone(), Micros::ZERO);
            }
            return self.apply(ctx, move |s, now, d| s.clawback(&request, now, d));
        };
        if known {
            return self.apply(ctx, move |s, now, d| s.clawback(&request, now, d));
        }
        let account = self.account;
        let (object, key) = (request.object.clone(), request.key.clone());
        let lookup = async move {
            let client = store::client(&pool).await?;
            let taken = store::clawed_back(&**client, account, &object).await?;
            let first = store::find_transaction(&**client, account, &key).await?;
            Ok::<_, LedgerError>((taken, first))
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            let (taken, first) = match found {
                Ok(found) => found,
                Err(error) => return ready(Err(error)),
            };
            let durable = actor.durable_seq();
            if let Phase::Ready(state) = &mut actor.phase {
                state.remember_clawbacks(request.object.clone(), taken);
                if let Some(record) = first {
                    state.remember_key(record, durable);
                }
            }
            actor.apply(ctx, move |s, now, d| s.clawback(&request, now, d))
        })
    }
}

impl Handler<Settle> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<UsageRecord>, LedgerError>>;

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let hold_id = msg.hold_id;
        self.expire_grants_due(ctx);
        let reply = self.finish(ctx, hold_id, move |state, now, durable| {
            state.settle(hold_id, &msg.charge, now, durable)
        });
        // What the hold kept of an expired grant and did not spend expires.
        self.expire_grants_due(ctx);
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<Release> for AccountActor {
    type Result = ResponseFuture<Result<Outcome<ReleaseRecord>, LedgerError>>;

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) -> Self::Result {
        let hold_id = msg.hold_id;
        let reply = self.finish(ctx, hold_id, move |state, now, durable| {
            state.release(hold_id, HoldStatus::Released, now, durable)
        });
        self.expire_grants_due(ctx);
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<ExpireHolds> for AccountActor {
    type Result = ResponseFuture<Result<Vec<ReleaseRecord>, LedgerError>>;

    fn handle(&mut self, msg: ExpireHolds, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let replies = self.expire_due(ctx, msg.now);
        // What expired holds kept of expired grants expires with them.
        self.expire_grants_due(ctx);
        Box::pin(async move {
            let mut released = Vec::with_capacity(replies.len());
            for reply in replies {
                released.push(reply.await?.record);
            }
            Ok(released)
        })
    }
}

impl Handler<ExpireGrants> for AccountActor {
    type Result = ResponseFuture<Result<Vec<TransactionRecord>, LedgerError>>;

    fn handle(&mut self, msg: ExpireGrants, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let replies = self.expire_grants(ctx, msg.now);
        Box::pin(async move {
            let mut expired = Vec::with_capacity(replies.len());
            for reply in replies {
                if let Some(record) = reply.await?.record {
                    expired.push(record);
                }
            }
            Ok(expired)
        })
    }
}

impl Handler<GetBalance> for AccountActor {
    type Result = Result<BalanceSnapshot, LedgerError>;

    fn handle(&mut self, _msg: GetBalance, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.state()
            .map(AccountState::snapshot)
            .ok_or(LedgerError::Reset)
    }
}

impl Handler<SetLimits> for AccountActor {
    type Result = ResponseFuture<Result<SpendingSnapshot, LedgerError>>;

    fn handle(&mut self, msg: SetLimits, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let Some(state) = self.state() else {
            return ready(Err(LedgerError::Reset));
        };
        let limits = match spend::apply_change(&state.limits, msg.change) {
            Ok(limits) => limits,
            Err(error) => return ready(Err(error)),
        };
        let now = self.settings.clock.now();
        let Backend::Postgres { pool, instance } = self.backend.clone() else {
            return ready(match &mut self.phase {
                Phase::Ready(state) => {
                    state.limits = limits;
                    Ok(state.spending(now))
                }
                _ => Err(LedgerError::Reset),
            });
        };
        let account = self.account;
        // Stored with the mailbox held: no hold is judged between the
        // change and its write, and none after it on the old limits. The
        // other instances' copies, which judge on the old limits, are
        // dropped at the commit.
        let write = async move {
            let mut client = store::client(&pool).await?;
            let tx = client.transaction().await.map_err(store::unavailable)?;
            spend::store(&*tx, account, &limits).await?;
            super::cluster::notify_settings_changed(&*tx, &instance, account).await?;
            tx.commit().await.map_err(store::unavailable)
        };
        self.after_lookup(ctx, write, move |actor, ctx, written| {
            if let Err(error) = written {
                // The write may have committed all the same: the account
                // reloads its limits from PostgreSQL.
                actor.stop(ctx);
                return ready(Err(error));
            }
            let now = actor.settings.clock.now();
            ready(match &mut actor.phase {
                Phase::Ready(state) => {
                    state.limits = limits;
                    Ok(state.spending(now))
                }
                _ => Err(LedgerError::Reset),
            })
        })
    }
}

impl Handler<GetSpending> for AccountActor {
    type Result = Result<SpendingSnapshot, LedgerError>;

    fn handle(&mut self, _msg: GetSpending, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        let now = self.settings.clock.now();
        match &mut self.phase {
            Phase::Ready(state) => Ok(state.spending(now)),
            _ => Err(LedgerError::Reset),
        }
    }
}
