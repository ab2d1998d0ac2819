//! The directory: account id → actor address. Starts an account's actor on
//! its first message, retries a message its actor could no longer take
//! (passivated, reset), and bounds each actor's mailbox. Drops an actor
//! whose account another instance wrote (`evict`): its copy may be stale.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;

use super::actor::*;
use super::journal::{Durable, DurableSender, WriterHandle};
use super::types::*;
use super::watch::Watchers;

const SHARDS: usize = 64;
/// A message that met a resetting actor is retried on a fresh one this often.
const ATTEMPTS: usize = 4;

#[derive(Clone)]
struct Handle {
    addr: Addr<AccountActor>,
    id: u64,
    /// Operations sent and not yet answered: bounds the mailbox.
    inflight: Arc<AtomicUsize>,
    /// The actor's journal durability (a failed write makes its state void).
    durable: DurableSender,
    published: Arc<Published>,
    /// The lowest committed version a current copy of the account has
    /// (raised by other instances' writes): the actor stops below it.
    stale_below: Arc<AtomicI64>,
    /// The seq of the last entry the actor handed to the journal.
    sent: Arc<AtomicI64>,
}

impl Handle {
    fn as_previous(&self) -> Previous {
        Previous {
            durable: self.durable.clone(),
            sent: self.sent.clone(),
        }
    }
}

/// A resident actor's published view, read without a message.
#[derive(Debug, Clone)]
pub struct ResidentView {
    pub view: Arc<AccountView>,
    /// Whether every change the view shows is committed (else it is a few
    /// milliseconds ahead of PostgreSQL).
    pub durable: bool,
    /// The publishing incarnation's durability (none for a view that did
    /// not come from a resident actor).
    commits: Option<tokio::sync::watch::Receiver<Durable>>,
}

impl ResidentView {
    /// Resolves once every change the view shows is committed, or a write
    /// of its incarnation failed (the view is then withdrawn: a new read
    /// shows the durable state).
    pub async fn committed(&mut self) {
        let version = self.view.version;
        if let Some(commits) = &mut self.commits {
            // An error: the incarnation is gone, its view withdrawn.
            let _ = commits
                .wait_for(|durable| durable.failed || durable.seq >= version)
                .await;
        }
    }

    /// A view of an account not read from its resident actor.
    pub(crate) fn detached(view: AccountView) -> ResidentView {
        ResidentView {
            view: Arc::new(view),
            durable: false,
            commits: None,
        }
    }
}

/// Why a resident actor was dropped (`creditd_accounts_evicted_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Another instance wrote the account.
    WrittenElsewhere,
    /// The notification listener lost its connection (or was not yet
    /// listening): any copy may have missed a notification.
    ListenerLost,
}

impl Eviction {
    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::WrittenElsewhere => "written_elsewhere",
            Eviction::ListenerLost => "listener_lost",
        }
    }
}

struct Inner {
    shards: Vec<Mutex<HashMap<AccountId, Handle>>>,
    arbiters: Vec<ArbiterHandle>,
    backend: Backend,
    writer: WriterHandle,
    settings: ActorSettings,
    call_timeout: Duration,
    next_id: AtomicU64,
    resident: AtomicUsize,
    /// Replaced incarnations whose entries were still in flight when they
    /// left the directory: the account's next actor waits for them.
    retired: Mutex<HashMap<AccountId, Previous>>,
    /// The accounts' listeners, woken by every publication.
    watchers: Arc<Watchers>,
}

impl Inner {
    /// Removes the account's entry if it is incarnation `id`; remembers it
    /// while its entries are in flight.
    fn remove(&self, account: AccountId, id: u64) {
        let removed = {
            let mut shard = lock(self.shard(account));
            match shard.get(&account) {
                Some(handle) if handle.id == id => shard.remove(&account),
                _ => None,
            }
        };
        if let Some(handle) = removed {
            self.resident.fetch_sub(1, Ordering::Relaxed);
            self.retire(account, &handle);
        }
    }

    fn retire(&self, account: AccountId, handle: &Handle) {
        let previous = handle.as_previous();
        if previous.in_flight() {
            lock(&self.retired).insert(account, previous);
        }
    }
}

/// Finds or starts the actor of an account and sends it messages.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn shard(&self, account: AccountId) -> &Mutex<HashMap<AccountId, Handle>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        account.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % SHARDS]
    }
}

/// Tells a dropped actor to stop; it refuses everything from now on.
fn dismiss(handle: Handle, reason: Eviction) {
    handle.stale_below.store(i64::MAX, Ordering::Release);
    handle.published.set(None);
    // Not money: a stop request, harmless if the actor already stopped.
    handle.addr.do_send(Evict);
    metrics::counter!(crate::telemetry::ACCOUNTS_EVICTED_TOTAL.name, "reason" => reason.as_str())
        .increment(1);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard lock leaves a valid map behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Directory {
    /// A directory that starts actors on `arbiters`, loading them from
    /// `backend` and sending their entries to `writer`.
    pub(super) fn new(
        arbiters: Vec<ArbiterHandle>,
        backend: Backend,
        writer: WriterHandle,
        settings: ActorSettings,
        call_timeout: Duration,
    ) -> Directory {
        let inner = Inner {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            arbiters,
            backend,
            writer,
            settings,
            call_timeout,
            next_id: AtomicU64::new(1),
            resident: AtomicUsize::new(0),
            retired: Mutex::new(HashMap::new()),
            watchers: Arc::new(Watchers::new()),
        };
        Directory {
            inner: Arc::new(inner),
        }
    }

    /// The account's live actor, started (and loading) if there is none.
    fn handle(&self, account: AccountId) -> Handle {
        let inner = &self.inner;
        let mut shard = lock(inner.shard(account));
        if let Some(handle) = shard.get(&account) {
            if handle.addr.connected() {
                return handle.clone();
            }
            // Replaced in place below: its entries may still be in flight.
            inner.retire(account, handle);
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let arbiter = &inner.arbiters[(account.0.unsigned_abs() as usize) % inner.arbiters.len()];
        let weak = Arc::downgrade(inner);
        let deregister: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.remove(account, id);
            }
        });
        let backend = inner.backend.clone();
        let writer = inner.writer.clone();
        let settings = inner.settings.clone();
        let durable: DurableSender = Arc::new(tokio::sync::watch::channel(Durable::default()).0);
        let published = Arc::new(Published::new(account, inner.watchers.clone()));
        let stale_below = Arc::new(AtomicI64::new(0));
        let sent = Arc::new(AtomicI64::new(0));
        let previous = lock(&inner.retired)
            .remove(&account)
            .filter(Previous::in_flight);
        let links = DirectoryLinks {
            deregister,
            durable: durable.clone(),
            published: published.clone(),
            stale_below: stale_below.clone(),
            sent: sent.clone(),
            previous,
        };
        let addr = AccountActor::start_in_arbiter(arbiter, move |_| {
            AccountActor::new(account, id, backend, writer, settings, links)
        });
        let handle = Handle {
            addr,
            id,
            inflight: Arc::new(AtomicUsize::new(0)),
            durable,
            published,
            stale_below,
            sent,
        };
        if shard.insert(account, handle.clone()).is_none() {
            inner.resident.fetch_add(1, Ordering::Relaxed);
        }
        handle
    }

    fn forget(&self, account: AccountId, id: u64) {
        self.inner.remove(account, id);
    }

    /// Sends `msg` to the account's actor and waits for its answer (a money
    /// operation goes through `call_durable`). Refuses with `Overloaded`
    /// when the account already has `mailbox_capacity` operations in flight.
    pub async fn call<M, R>(&self, account: AccountId, msg: M) -> Result<R, LedgerError>
    where
        M: Message<Result = Result<R, LedgerError>> + Clone + Send + 'static,
        R: Send + 'static,
        AccountActor: Handler<M>,
    {
        self.call_then(account, msg, |answer| async move { Ok(answer) })
            .await
    }

    /// As `call` for a money operation, which the actor answers once
    /// applied: then waits here for its commit, within the same deadline
    /// and mailbox place, woken by the journal writer itself.
    pub(crate) async fn call_durable<M, T>(
        &self,
        account: AccountId,
        msg: M,
    ) -> Result<Outcome<T>, LedgerError>
    where
        M: Message<Result = Result<Pending<T>, LedgerError>> + Clone + Send + 'static,
        T: Send + 'static,
        AccountActor: Handler<M>,
    {
        self.call_then(account, msg, Pending::durable).await
    }

    /// Sends `msg`, retried on a fresh actor when it met a resetting one,
    /// then resolves its answer with `then`, all before one deadline and
    /// holding the operation's place in the account's bound.
    async fn call_then<M, R, T, F>(
        &self,
        account: AccountId,
        msg: M,
        then: impl FnOnce(R) -> F,
    ) -> Result<T, LedgerError>
    where
        M: Message<Result = Result<R, LedgerError>> + Clone + Send + 'static,
        R: Send + 'static,
        F: std::future::Future<Output = Result<T, LedgerError>>,
        AccountActor: Handler<M>,
    {
        let no_answer = || {
            LedgerError::Unavailable(format!(
                "no answer within {} ms; the operation may still apply: retry with the same key",
                self.inner.call_timeout.as_millis()
            ))
        };
        let deadline = tokio::time::Instant::now() + self.inner.call_timeout;
        for _ in 0..ATTEMPTS {
            let handle = self.handle(account);
            let previous = handle.inflight.fetch_add(1, Ordering::AcqRel);
            let _guard = InflightGuard(handle.inflight.clone());
            if previous >= self.inner.settings.mailbox_capacity {
                return Err(LedgerError::Overloaded);
            }
            match tokio::time::timeout_at(deadline, handle.addr.send(msg.clone())).await {
                Err(_) => return Err(no_answer()),
                Ok(Ok(Err(LedgerError::Reset))) | Ok(Err(MailboxError::Closed)) => {
                    self.forget(account, handle.id);
                    continue;
                }
                Ok(Err(MailboxError::Timeout)) => {
                    return Err(LedgerError::Unavailable(
                        "the account actor timed out".into(),
                    ))
                }
                Ok(Ok(Err(error))) => return Err(error),
                Ok(Ok(Ok(answer))) => {
                    return tokio::time::timeout_at(deadline, then(answer))
                        .await
                        .unwrap_or_else(|_| Err(no_answer()))
                }
            }
        }
        Err(LedgerError::Unavailable(
            "the account kept resetting; retry shortly".into(),
        ))
    }

    /// The account's view as its resident actor last published it, with
    /// no message: `None` when the actor is not resident, not loaded, its
    /// copy is stale (another instance wrote the account), or a journal
    /// write of it failed (it must reload first).
    pub fn view(&self, account: AccountId) -> Option<ResidentView> {
        let shard = lock(self.inner.shard(account));
        let handle = shard.get(&account)?;
        let durable = *handle.durable.borrow();
        if !handle.addr.connected()
            || durable.failed
            || durable.seq < handle.stale_below.load(Ordering::Acquire)
        {
            return None;
        }
        let view = handle.published.get()?;
        Some(ResidentView {
            durable: durable.seq >= view.version,
            view,
            commits: Some(handle.durable.subscribe()),
        })
    }

    /// The account's summary as its resident actor last published it (see
    /// `view`).
    pub fn summary(&self, account: AccountId) -> Option<BalanceSummary> {
        self.view(account).map(|resident| resident.view.summary())
    }

    /// The listeners of the accounts' changes.
    pub(crate) fn watchers(&self) -> &Arc<Watchers> {
        &self.inner.watchers
    }

    /// Another instance committed `version` of the account: a resident
    /// copy below it answers nothing more (its queued messages are retried
    /// on a fresh actor, which loads from PostgreSQL) and stops; what it
    /// had sent to the journal commits or fails there, as for a fenced
    /// actor, and its callers hear which. A copy loaded at or after that
    /// version (or still loading and about to) stays. Whether a copy was
    /// found stale.
    pub fn evict(&self, account: AccountId, version: i64, reason: Eviction) -> bool {
        let shard = lock(self.inner.shard(account));
        let Some(handle) = shard.get(&account) else {
            return false;
        };
        handle.stale_below.fetch_max(version, Ordering::AcqRel);
        let stale = handle.durable.borrow().seq < version;
        if stale {
            handle.published.set(None);
            // Not money: a request to stop, ignored by a copy found current.
            handle.addr.do_send(Evict);
            metrics::counter!(crate::telemetry::ACCOUNTS_EVICTED_TOTAL.name, "reason" => reason.as_str())
                .increment(1);
        }
        stale
    }

    /// Drops every resident actor (as `evict`); returns how many.
    pub fn evict_all(&self, reason: Eviction) -> usize {
        let mut dropped = 0;
        for shard in &self.inner.shards {
            let handles: Vec<(AccountId, Handle)> = lock(shard).drain().collect();
            self.inner
                .resident
                .fetch_sub(handles.len(), Ordering::Relaxed);
            dropped += handles.len();
            for (account, handle) in handles {
                self.inner.retire(account, &handle);
                dismiss(handle, reason);
            }
        }
        dropped
    }

    /// Actors currently resident.
    pub fn resident(&self) -> usize {
        self.inner.resident.load(Ordering::Relaxed)
    }
}
