//! Several instances on one database. Each journal batch records which
//! instance wrote each account (`credit_balances.written_by`); a batch
//! that changes an account's writer notifies, in its transaction, the
//! channel `creditd_accounts`. Every instance listens on one dedicated
//! connection and drops its resident actor for an account another instance
//! wrote: the next request reloads it from PostgreSQL. Fencing (the
//! balance row's version) stays the safety net for a write that races the
//! notification.
//!
//! An instance that loads an account it is not the writer of first clears
//! `written_by` (`store::sql::CLAIM_READER`), so the writer's next batch
//! notifies it too: a copy that only reads is never left stale.
//!
//! Settings written outside the journal (spending limits, auto-recharge)
//! move no version: their transaction notifies the account with
//! `EVERY_VERSION` (`notify_settings_changed`), and every other instance
//! drops its copy whatever version it loaded.
//!
//! A listener that lost its connection may have missed notifications: it
//! drops every resident actor, then again once it listens anew (copies
//! loaded in between were not covered), and `/readyz` fails meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::GenericClient;

use super::directory::{Directory, Eviction};
use super::store::database_error;
use super::types::{AccountId, LedgerError};
use crate::db::Database;

/// The channel the journal notifies (`store::sql::NOTIFY_ACCOUNTS`).
pub const ACCOUNTS_CHANNEL: &str = "creditd_accounts";

/// The listener's `application_name`, so operators see it in
/// `pg_stat_activity`.
pub const LISTENER_NAME: &str = "creditd-listener";

/// PostgreSQL refuses a notification payload of 8000 bytes or more.
const PAYLOAD_MAX_BYTES: usize = 7900;

/// This instance's name among the instances sharing the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceId(Arc<str>);

impl InstanceId {
    /// An instance id; a space would break the notification payload, so
    /// it is refused by the config check (`cluster.instance_id`).
    pub fn new(id: &str) -> InstanceId {
        InstanceId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How an engine takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterRole {
    pub instance: InstanceId,
    /// Pause before the listener reconnects.
    pub listen_retry: Duration,
    /// How often the listener checks its connection with a query.
    pub check_interval: Duration,
}

impl ClusterRole {
    /// From the `[cluster]` settings.
    pub fn from_settings(settings: &crate::config::ClusterSettings) -> ClusterRole {
        ClusterRole {
            instance: InstanceId::new(&settings.instance()),
            listen_retry: Duration::from_millis(settings.listen_retry_ms),
            check_interval: Duration::from_millis(settings.singleton_check_ms),
        }
    }
}

/// The notifications telling that `instance` committed these versions of
/// these accounts: `"<instance> <id>:<version>,…"`, split to fit
/// PostgreSQL's payload limit.
pub fn payloads(instance: &InstanceId, written: &[(AccountId, i64)]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut current = String::new();
    for (account, version) in written {
        let item = format!("{}:{version}", account.0);
        if !current.is_empty() && current.len() + item.len() + 1 > PAYLOAD_MAX_BYTES {
            payloads.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(instance.as_str());
            current.push(' ');
        } else {
            current.push(',');
        }
        current.push_str(&item);
    }
    if !current.is_empty() {
        payloads.push(current);
    }
    payloads
}

/// The version a settings change notifies: every resident copy of the
/// account is older, so every other instance drops its copy (one needless
/// reload at worst for a copy loaded after the change).
pub const EVERY_VERSION: i64 = i64::MAX;

/// Tells the other instances, at the commit of the transaction `client`
/// is in, that `instance` changed `account`'s settings outside the
/// journal: their copies keep the old settings, and must reload.
pub async fn notify_settings_changed(
    client: &impl GenericClient,
    instance: &InstanceId,
    account: AccountId,
) -> Result<(), LedgerError> {
    for payload in payloads(instance, &[(account, EVERY_VERSION)]) {
        client
            .execute(super::store::sql::NOTIFY_ACCOUNTS, &[&payload])
            .await
            .map_err(database_error)?;
    }
    Ok(())
}

/// The writer and the versions of a notification; `None` for a payload
/// this code never sends.
pub fn parse_payload(payload: &str) -> Option<(&str, Vec<(AccountId, i64)>)> {
    let (instance, items) = payload.split_once(' ')?;
    let written = items
        .split(',')
        .map(|item| {
            let (id, version) = item.split_once(':')?;
            Some((AccountId(id.parse().ok()?), version.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((instance, written))
}

/// Whether the listener is listening (for `/readyz`).
#[derive(Debug, Clone, Default)]
pub struct ListenerStatus(Arc<AtomicBool>);

impl ListenerStatus {
    pub fn listening(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, listening: bool) {
        self.0.store(listening, Ordering::Release);
    }
}

/// Starts the listener on `arbiter`: it runs until the arbiter stops.
pub(crate) fn spawn_listener(
    arbiter: &actix::ArbiterHandle,
    database: Database,
    directory: Directory,
    role: ClusterRole,
) -> ListenerStatus {
    let status = ListenerStatus::default();
    let running = status.clone();
    arbiter.spawn(async move {
        loop {
            listen(&database, &directory, &role, &running).await;
            running.set(false);
            let dropped = directory.evict_all(Eviction::ListenerLost);
            tracing::warn!(
                dropped,
                "account notifications lost; every resident account dropped"
            );
            tokio::time::sleep(role.listen_retry).await;
        }
    });
    status
}

/// Listens until the connection fails.
async fn listen(
    database: &Database,
    directory: &Directory,
    role: &ClusterRole,
    status: &ListenerStatus,
) {
    let (client, mut notifications) = match database.connect_listening().await {
        Ok(connected) => connected,
        Err(error) => {
            tracing::warn!(%error, "cannot connect the account listener");
            return;
        }
    };
    if let Err(error) = client
        .batch_execute(&format!(
            "SET application_name = '{LISTENER_NAME}'; LISTEN {ACCOUNTS_CHANNEL}"
        ))
        .await
    {
        tracing::warn!(%error, "cannot LISTEN for account notifications");
        return;
    }
    // Copies loaded while nobody listened may have missed a notification.
    directory.evict_all(Eviction::ListenerLost);
    status.set(true);
    let mut check = tokio::time::interval(role.check_interval);
    loop {
        tokio::select! {
            notification = notifications.recv() => match notification {
                Some(payload) => evict_written(directory, role, &payload),
                None => return,
            },
            _ = check.tick() => {
                // A connection can die without closing (a dropped network):
                // only a query tells.
                let alive = tokio::time::timeout(role.check_interval, client.simple_query("SELECT 1")).await;
                if !matches!(alive, Ok(Ok(_))) {
                    tracing::warn!("the account listener's connection stopped answering");
                    return;
                }
            }
        }
    }
}

fn evict_written(directory: &Directory, role: &ClusterRole, payload: &str) {
    match parse_payload(payload) {
        Some((writer, _)) if writer == role.instance.as_str() => {}
        Some((_, written)) => {
            for (account, version) in written {
                directory.evict(account, version, Eviction::WrittenElsewhere);
            }
        }
        None => tracing::error!(payload, "unreadable account notification ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_names_its_writer_and_every_account_it_wrote() {
        let instance = InstanceId::new("host-42");
        let written: Vec<(AccountId, i64)> = (1..=3000).map(|id| (AccountId(id), id * 7)).collect();
        let sent = payloads(&instance, &written);
        assert!(sent.len() > 1, "3000 ids need more than one payload");
        let mut read = Vec::new();
        for payload in &sent {
            assert!(payload.len() < 8000, "{} bytes", payload.len());
            let (writer, ids) = parse_payload(payload).unwrap();
            assert_eq!(writer, "host-42");
            read.extend(ids);
        }
        assert_eq!(read, written);
        assert!(payloads(&instance, &[]).is_empty());
        assert_eq!(parse_payload("host-42 1:2,3"), None);
    }

    #[test]
    fn every_statement_that_notifies_the_other_instances_names_the_channel_they_listen_on() {
        let quoted = format!("pg_notify('{ACCOUNTS_CHANNEL}'");
        for statement in [
            crate::ledger::store::sql::NOTIFY_ACCOUNTS,
            crate::ledger::store::sql::UPDATE_BALANCES_AT_ONCE,
        ] {
            assert!(statement.contains(&quoted), "{statement}");
        }
    }
}
