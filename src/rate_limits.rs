//! Rate limits: platform chats one account runs at once, Checkout
//! Sessions one account opens per minute, and requests per second from one
//! IP address to the routes that need no user token. Over a limit the
//! caller is told when to retry; every refusal is counted in
//! `creditd_rate_limited_total{limit}`.
//!
//! Memory stays bounded: an account's in-flight count exists only while it
//! has chats in flight, and the rate limiters (`governor`, GCRA) forget the
//! keys whose state is back to full once they hold more than
//! `KEYS_BEFORE_SWEEP` keys.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::RateLimitsSettings;
use crate::ledger::AccountId;

/// A rate limiter holding more keys than this sweeps the idle ones (keys
/// whose state is back to a full burst) before it answers.
const KEYS_BEFORE_SWEEP: usize = 10_000;
/// Retry-After of a refused chat: in-flight chats end at their own pace.
const CHAT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Which limit refused a request, as labelled in the metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    ChatsInFlight,
    Topups,
    Unauthenticated,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ChatsInFlight => "chats_in_flight",
            Limit::Topups => "topups",
            Limit::Unauthenticated => "unauthenticated",
        }
    }
}

/// A refusal: which limit, and how long before a retry can pass.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl Refused {
    fn counted(limit: Limit, retry_after: Duration) -> Refused {
        metrics::counter!(crate::telemetry::RATE_LIMITED_TOTAL.name, "limit" => limit.as_str())
            .increment(1);
        Refused { limit, retry_after }
    }

    /// Whole seconds for `Retry-After`, at least 1.
    pub fn retry_after_s(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// The rate limits of this process.
pub struct RateLimits {
    chats: ChatsInFlight,
    topups: Keyed<AccountId>,
    unauthenticated: Keyed<IpAddr>,
}

impl RateLimits {
    pub fn new(settings: &RateLimitsSettings) -> RateLimits {
        let nonzero = |value: u32| NonZeroU32::new(value).unwrap_or(NonZeroU32::MIN);
        RateLimits {
            chats: ChatsInFlight {
                max: settings.chats_in_flight_per_account,
                counts: Arc::new(Mutex::new(HashMap::new())),
            },
            topups: Keyed::new(Quota::per_minute(nonzero(settings.topups_per_minute))),
            unauthenticated: Keyed::new(Quota::per_second(nonzero(
                settings.unauthenticated_per_ip_per_second,
            ))),
        }
    }

    /// A place for one more platform chat of `account`, given back on drop.
    pub fn chat(&self, account: AccountId) -> Result<ChatPermit, Refused> {
        self.chats.acquire(account)
    }

    /// One more Checkout Session for `account`.
    pub fn topup(&self, account: AccountId) -> Result<(), Refused> {
        self.topups.check(&account, Limit::Topups)
    }

    /// One more unauthenticated request from `ip`.
    pub fn unauthenticated(&self, ip: IpAddr) -> Result<(), Refused> {
        self.unauthenticated.check(&ip, Limit::Unauthenticated)
    }

    /// Accounts with platform chats in flight (tests, metrics).
    pub fn accounts_with_chats_in_flight(&self) -> usize {
        self.chats.lock().len()
    }
}

/// A GCRA rate limiter per key.
struct Keyed<K: Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    clock: DefaultClock,
    /// Keys held before the next sweep: twice what the last sweep left (at
    /// least `KEYS_BEFORE_SWEEP`), so sweeping stays amortized O(1) per
    /// request even when most keys are recent.
    sweep_at: std::sync::atomic::AtomicUsize,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(quota: Quota) -> Keyed<K> {
        Keyed {
            limiter: RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            sweep_at: std::sync::atomic::AtomicUsize::new(KEYS_BEFORE_SWEEP),
        }
    }

    fn check(&self, key: &K, limit: Limit) -> Result<(), Refused> {
        use std::sync::atomic::Ordering;
        if self.limiter.len() > self.sweep_at.load(Ordering::Relaxed) {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
            let left = self.limiter.len();
            self.sweep_at.store(
                left.saturating_mul(2).max(KEYS_BEFORE_SWEEP),
                Ordering::Relaxed,
            );
        }
        self.limiter.check_key(key).map_err(|not_until| {
            Refused::counted(limit, not_until.wait_time_from(self.clock.now()))
        })
    }
}

type Counts = Arc<Mutex<HashMap<AccountId, u32>>>;

/// Platform chats in flight per account; an account's entry lives only
/// while it has some.
struct ChatsInFlight {
    max: u32,
    counts: Counts,
}

impl ChatsInFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AccountId, u32>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn acquire(&self, account: AccountId) -> Result<ChatPermit, Refused> {
        let mut counts = self.lock();
        let count = counts.entry(account).or_insert(0);
        if *count >= self.max {
            return Err(Refused::counted(Limit::ChatsInFlight, CHAT_RETRY_AFTER));
        }
        *count += 1;
        Ok(ChatPermit {
            counts: self.counts.clone(),
            account,
        })
    }
}

/// One platform chat in flight; dropping it (the call ended, however)
/// gives the place back.
pub struct ChatPermit {
    counts: Counts,
    account: AccountId,
}

impl Drop for ChatPermit {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.account) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(chats: u32, topups: u32, per_ip: u32) -> RateLimits {
        RateLimits::new(&RateLimitsSettings {
            chats_in_flight_per_account: chats,
            topups_per_minute: topups,
            unauthenticated_per_ip_per_second: per_ip,
        })
    }

    #[test]
    fn chats_in_flight_are_counted_per_account_and_forgotten_at_zero() {
        let limits = limits(2, 1, 1);
        let a = limits.chat(AccountId(1)).unwrap();
        let b = limits.chat(AccountId(1)).unwrap();
        assert!(limits.chat(AccountId(1)).is_err());
        let other = limits.chat(AccountId(2)).unwrap();
        drop(a);
        let c = limits.chat(AccountId(1)).unwrap();
        drop((b, c, other));
        assert_eq!(limits.accounts_with_chats_in_flight(), 0);
    }

    #[test]
    fn a_refused_top_up_says_when_to_retry() {
        let limits = limits(1, 5, 1);
        for _ in 0..5 {
            limits.topup(AccountId(7)).unwrap();
        }
        let refused = limits.topup(AccountId(7)).unwrap_err();
        assert_eq!(refused.limit, Limit::Topups);
        assert!((1..=12).contains(&refused.retry_after_s()), "{refused:?}");
        limits.topup(AccountId(8)).unwrap();
    }
}
