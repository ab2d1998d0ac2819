//! Who listens for an account's changes: the balance streams. Every
//! publication of the account's view (after each applied operation, at
//! load, at stop and eviction: `Published::set`) wakes the account's
//! listeners; a wake carries no state, each listener reads the published
//! view itself, so one that falls behind skips to the latest. Listeners
//! are bounded per account and per instance, and all end at once when the
//! instance drains (`Watchers::close`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::types::AccountId;

const SHARDS: usize = 64;

/// How many listeners may be open at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchLimits {
    pub per_account: usize,
    pub total: usize,
}

/// Why a listener was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchRefused {
    /// The account already has `per_account` listeners.
    AccountFull,
    /// The instance already has `total` listeners.
    InstanceFull,
    /// The instance is draining: the client should listen elsewhere.
    Closing,
}

/// The listeners of every account of this instance.
pub(crate) struct Watchers {
    /// Account → its wake-up channel (the value counts publications); an
    /// account is here only while it has listeners.
    shards: Vec<Mutex<HashMap<AccountId, watch::Sender<u64>>>>,
    /// Listeners open on the instance; 0 lets a publication skip the lock.
    total: AtomicUsize,
    /// Set once when the instance drains: every listener ends.
    closed: watch::Sender<bool>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a shard lock leaves a valid map behind.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Watchers {
    pub fn new() -> Watchers {
        Watchers {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            total: AtomicUsize::new(0),
            closed: watch::channel(false).0,
        }
    }

    fn shard(&self, account: AccountId) -> &Mutex<HashMap<AccountId, watch::Sender<u64>>> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        account.hash(&mut hasher);
        &self.shards[(hasher.finish() as usize) % SHARDS]
    }

    /// Wakes the account's listeners (the account's view was published).
    pub fn changed(&self, account: AccountId) {
        if self.total.load(Ordering::Acquire) == 0 {
            return;
        }
        if let Some(sender) = lock(self.shard(account)).get(&account) {
            sender.send_modify(|count| *count = count.wrapping_add(1));
        }
    }

    /// A new listener of `account`, within `limits`; refused while the
    /// instance drains.
    pub fn subscribe(
        self: &Arc<Self>,
        account: AccountId,
        limits: WatchLimits,
    ) -> Result<BalanceWatch, WatchRefused> {
        if *self.closed.borrow() {
            return Err(WatchRefused::Closing);
        }
        let mut shard = lock(self.shard(account));
        // The account's bound first: a ninth tab is refused for its own reason.
        if shard
            .get(&account)
            .is_some_and(|sender| sender.receiver_count() >= limits.per_account)
        {
            return Err(WatchRefused::AccountFull);
        }
        // Taken before it is checked, so concurrent listeners of other
        // accounts (other shards) cannot pass the bound together.
        if self.total.fetch_add(1, Ordering::AcqRel) >= limits.total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(WatchRefused::InstanceFull);
        }
        let sender = shard.entry(account).or_insert_with(|| watch::channel(0).0);
        let changes = sender.subscribe();
        Ok(BalanceWatch {
            changes,
            closed: self.closed.subscribe(),
            account,
            watchers: self.clone(),
        })
    }

    /// Ends every listener and refuses new ones (the instance drains).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Listeners open on the instance.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// One listener of an account's changes; gives its place back on drop.
pub struct BalanceWatch {
    changes: watch::Receiver<u64>,
    closed: watch::Receiver<bool>,
    account: AccountId,
    watchers: Arc<Watchers>,
}

impl BalanceWatch {
    /// Waits for the account's next publication (one wake for any number
    /// of publications since the last); `false` once the instance closes
    /// its listeners.
    pub async fn changed(&mut self) -> bool {
        if *self.closed.borrow() {
            return false;
        }
        let changed = tokio::select! {
            changed = self.changes.changed() => changed.is_ok(),
            () = until_closed(&mut self.closed) => false,
        };
        changed && !*self.closed.borrow()
    }

    /// Resolves once the instance closes its listeners.
    pub async fn closed(&mut self) {
        until_closed(&mut self.closed).await;
    }

    /// Forgets the publications seen so far (a read follows at once).
    pub fn seen(&mut self) {
        self.changes.mark_unchanged();
    }
}

/// Resolves once `closed` turns true (or its registry is gone: closed as well).
async fn until_closed(closed: &mut watch::Receiver<bool>) {
    let _ = closed.wait_for(|closed| *closed).await;
}

impl Drop for BalanceWatch {
    fn drop(&mut self) {
        let watchers = &self.watchers;
        watchers.total.fetch_sub(1, Ordering::AcqRel);
        let mut shard = lock(watchers.shard(self.account));
        // This listener's receiver is still alive here: the last one counts 1.
        if shard
            .get(&self.account)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            shard.remove(&self.account);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: WatchLimits = WatchLimits {
        per_account: 2,
        total: 3,
    };

    #[test]
    fn listeners_are_bounded_per_account_and_per_instance_and_give_their_place_back() {
        let watchers = Arc::new(Watchers::new());
        let first = watchers.subscribe(AccountId(1), LIMITS).unwrap();
        let _second = watchers.subscribe(AccountId(1), LIMITS).unwrap();
        assert_eq!(
            watchers.subscribe(AccountId(1), LIMITS).err(),
            Some(WatchRefused::AccountFull)
        );
        let _third = watchers.subscribe(AccountId(2), LIMITS).unwrap();
        assert_eq!(
            watchers.subscribe(AccountId(3), LIMITS).err(),
            Some(WatchRefused::InstanceFull)
        );
        drop(first);
        assert_eq!(watchers.open(), 2);
        assert!(watchers.subscribe(AccountId(1), LIMITS).is_ok());
    }

    #[tokio::test]
    async fn a_publication_wakes_the_accounts_listeners_and_closing_ends_them() {
        let watchers = Arc::new(Watchers::new());
        let mut watch = watchers.subscribe(AccountId(1), LIMITS).unwrap();
        watchers.changed(AccountId(2));
        watchers.changed(AccountId(1));
        assert!(watch.changed().await);
        watchers.close();
        assert!(!watch.changed().await);
        assert_eq!(
            watchers.subscribe(AccountId(1), LIMITS).err(),
            Some(WatchRefused::Closing)
        );
    }
}
