//! Work that must run on one instance at a time among those sharing the
//! database (the event sender, the auto-recharge worker, the top-up
//! follow-ups, the email sender), elected by a PostgreSQL session advisory lock.
//!
//! - The lock is held by a connection of its own, outside the pool: it
//!   lives exactly as long as that session.
//! - The holder checks the connection with a query (`SELECT 1`) every
//!   `cluster.singleton_check_ms`. A connection can die without closing
//!   (a dropped network, `pg_terminate_backend`): only a query tells, and
//!   once the session is gone another instance may hold the lock.
//! - A new holder waits `TAKEOVER_GRACE_CHECKS` intervals before it works:
//!   a holder whose session died notices within two (the check's period,
//!   then its timeout) and has stopped by then, so two instances never
//!   run the work at once.
//! - When the check fails (an error, or no answer within one interval) the
//!   holder steps down at once: its work is dropped at its next await
//!   point, its connection closed; it tries again after
//!   `STEP_DOWN_PAUSE_CHECKS` intervals, so the others, whose connections
//!   did not just fail, take the lock first. Each worker's effects are
//!   idempotent, so work cut short is done again by the next holder.
//! - The connection is named `creditd-<singleton>@<instance>`
//!   (`application_name`), so operators find the holder in
//!   `pg_stat_activity`.

use std::future::Future;
use std::time::Duration;

use super::Database;

/// The singletons, each with its own lock key (the migrations take
/// `db::MIGRATION_LOCK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Singleton {
    /// Delivers the outbox's events (`events`).
    EventSender,
    /// Pays auto-recharge attempts (`recharge::worker`).
    AutoRecharge,
    /// Saves paid top-ups' cards and invoice links (`stripe::followup`).
    TopUpFollowUps,
    /// Sends the outbox's alert and receipt emails (`email`).
    EmailSender,
}

impl Singleton {
    /// The session advisory lock that elects it.
    pub const fn lock_key(self) -> i64 {
        match self {
            Singleton::EventSender => 7_294_002,
            Singleton::TopUpFollowUps => 7_294_011,
            Singleton::AutoRecharge => 7_294_012,
            Singleton::EmailSender => 7_294_016,
        }
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Singleton::EventSender => "event-sender",
            Singleton::AutoRecharge => "auto-recharge",
            Singleton::TopUpFollowUps => "topup-followups",
            Singleton::EmailSender => "email-sender",
        }
    }

    /// The `application_name` of `instance`'s connection holding the lock.
    pub fn application_name(self, instance: &str) -> String {
        format!("creditd-{}@{instance}", self.as_str())
    }
}

/// Check intervals a new holder waits before it starts working.
pub const TAKEOVER_GRACE_CHECKS: u32 = 2;

/// Check intervals a holder that stepped down waits before it tries the
/// lock again.
pub const STEP_DOWN_PAUSE_CHECKS: u32 = 3;

/// Who runs a singleton and how it watches its lock.
#[derive(Clone)]
pub struct Election {
    pub database: Database,
    /// This instance's name (`cluster.instance_id`).
    pub instance: String,
    /// `cluster.singleton_check_ms`.
    pub check: Duration,
}

/// A singleton's work loop: runs `round` again at once after a round
/// that did something, after `poll` after an idle round or a failed one
/// (logged as `what`'s). Never returns.
pub async fn poll_rounds<F, Fut, E>(what: &str, poll: Duration, mut round: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize, E>>,
    E: std::fmt::Display,
{
    loop {
        match round().await {
            Ok(0) => tokio::time::sleep(poll).await,
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "{what} round failed; retrying");
                tokio::time::sleep(poll).await;
            }
        }
    }
}

impl Election {
    /// Runs `work()` whenever this instance holds `singleton`'s lock, and
    /// only then; never returns. `work` is started anew at each election
    /// and dropped when the lock's connection fails.
    pub async fn run<F, Fut>(&self, singleton: Singleton, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            let lock = match self.take(singleton).await {
                Ok(Some(lock)) => lock,
                Ok(None) => {
                    tokio::time::sleep(self.check).await;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(singleton = singleton.as_str(), %error, "cannot try the singleton lock");
                    tokio::time::sleep(self.check).await;
                    continue;
                }
            };
            tracing::info!(
                singleton = singleton.as_str(),
                "took the singleton lock; running"
            );
            let grace = self.check.saturating_mul(TAKEOVER_GRACE_CHECKS);
            let elected = async {
                tokio::time::sleep(grace).await;
                work().await;
            };
            tokio::select! {
                () = elected => {
                    tracing::error!(singleton = singleton.as_str(), "singleton work ended; stepping down");
                }
                () = self.watch(&lock) => {
                    tracing::warn!(singleton = singleton.as_str(), "the singleton lock's connection failed its check; stepped down");
                }
            }
            drop(lock);
            tokio::time::sleep(self.check.saturating_mul(STEP_DOWN_PAUSE_CHECKS)).await;
        }
    }

    /// A connection holding the lock, or `None` while another session
    /// holds it.
    async fn take(
        &self,
        singleton: Singleton,
    ) -> Result<Option<tokio_postgres::Client>, tokio_postgres::Error> {
        let client = self.database.connect().await?;
        let name = singleton.application_name(&self.instance);
        let taken: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1) FROM set_config('application_name', $2, false)",
                &[&singleton.lock_key(), &name],
            )
            .await?
            .try_get(0)?;
        Ok(taken.then_some(client))
    }

    /// Returns once the lock's connection fails a check.
    async fn watch(&self, lock: &tokio_postgres::Client) {
        let mut check = tokio::time::interval(self.check);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            check.tick().await;
            let answered = tokio::time::timeout(self.check, lock.simple_query("SELECT 1")).await;
            if !matches!(answered, Ok(Ok(_))) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_singleton_has_a_lock_of_its_own_and_none_takes_the_migrations() {
        let all = [
            Singleton::EventSender,
            Singleton::AutoRecharge,
            Singleton::TopUpFollowUps,
            Singleton::EmailSender,
        ];
        let mut keys: Vec<i64> = all.iter().map(|s| s.lock_key()).collect();
        keys.push(crate::db::MIGRATION_LOCK);
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), all.len() + 1);
    }
}
