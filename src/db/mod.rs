//! PostgreSQL: where the database is (configured URL or private cluster),
//! the connection pool, client checkout, the one database error
//! ([`DbError`]), and the migrations in `sql/`.

pub mod cluster;
mod error;
pub mod singleton;

pub use deadpool_postgres::{Object as Client, Pool};
pub use error::{client, Cause, DbError};

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, RecyclingMethod, Runtime};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::DatabaseSettings;
use cluster::{Durability, PrivateCluster};

/// Numbered migrations, applied in order, each once.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "ledger", include_str!("../../sql/0001_ledger.sql")),
    (2, "stripe", include_str!("../../sql/0002_stripe.sql")),
    (
        3,
        "usage_by_day",
        include_str!("../../sql/0003_usage_by_day.sql"),
    ),
    (
        4,
        "signup_bonus_claims",
        include_str!("../../sql/0004_signup_bonus_claims.sql"),
    ),
    (5, "grants", include_str!("../../sql/0005_grants.sql")),
    (
        6,
        "outgoing_events",
        include_str!("../../sql/0006_outgoing_events.sql"),
    ),
    (
        7,
        "spend_limits",
        include_str!("../../sql/0007_spend_limits.sql"),
    ),
    (8, "referrals", include_str!("../../sql/0008_referrals.sql")),
    (
        9,
        "auto_recharge",
        include_str!("../../sql/0009_auto_recharge.sql"),
    ),
    (
        10,
        "auto_recharge_safety",
        include_str!("../../sql/0010_auto_recharge_safety.sql"),
    ),
    (
        11,
        "topup_followups",
        include_str!("../../sql/0011_topup_followups.sql"),
    ),
    (
        12,
        "referral_reversals_and_mailboxes",
        include_str!("../../sql/0012_referral_reversals_and_mailboxes.sql"),
    ),
    (
        13,
        "event_sequences",
        include_str!("../../sql/0013_event_sequences.sql"),
    ),
    (14, "cluster", include_str!("../../sql/0014_cluster.sql")),
    (15, "api_keys", include_str!("../../sql/0015_api_keys.sql")),
    (
        16,
        "email_deliveries",
        include_str!("../../sql/0016_email_deliveries.sql"),
    ),
    (
        17,
        "activity_by_time",
        include_str!("../../sql/0017_activity_by_time.sql"),
    ),
    (
        18,
        "grants_updated_in_place",
        include_str!("../../sql/0018_grants_updated_in_place.sql"),
    ),
    (
        19,
        "journal_at_once",
        include_str!("../../sql/0019_journal_at_once.sql"),
    ),
];

/// Where to connect, and the private cluster kept alive while we use it.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    pub cluster: Option<Arc<PrivateCluster>>,
}

impl Database {
    /// The configured URL, or the private cluster in `data_dir` (started here).
    pub fn locate(settings: &DatabaseSettings) -> anyhow::Result<Database> {
        if settings.url.is_empty() {
            let cluster = PrivateCluster::start(&settings.data_dir, Durability::Durable)?;
            let database = Database {
                config: cluster.config("postgres"),
                cluster: Some(Arc::new(cluster)),
            };
            return Ok(database.with_settings(settings));
        }
        let config =
            tokio_postgres::Config::from_str(&verified_tls_as_require(settings.url.expose()))
                .context("database.url is not a valid PostgreSQL connection string")?;
        Ok(Database {
            config,
            cluster: None,
        }
        .with_settings(settings))
    }

    /// Applies timeouts from the settings to the connection config.
    pub fn with_settings(mut self, settings: &DatabaseSettings) -> Database {
        self.config
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={}",
                settings.statement_timeout_ms, settings.statement_timeout_ms
            ));
        self
    }

    /// TLS (rustls, the server's certificate verified against the webpki
    /// roots, its name against the host) when the URL asks for it with
    /// `sslmode=require`, `verify-ca` or `verify-full`; plain otherwise
    /// (no `sslmode`, `disable`, `prefer`, the private cluster's socket).
    pub fn tls(&self) -> Option<MakeRustlsConnect> {
        (self.config.get_ssl_mode() == SslMode::Require).then(rustls_connector)
    }

    pub fn pool(&self, settings: &DatabaseSettings) -> anyhow::Result<Pool> {
        let recycling = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match self.tls() {
            Some(tls) => Manager::from_config(self.config.clone(), tls, recycling),
            None => Manager::from_config(self.config.clone(), NoTls, recycling),
        };
        let wait = Duration::from_millis(settings.pool_wait_timeout_ms);
        Pool::builder(manager)
            .max_size(settings.pool_size)
            .wait_timeout(Some(wait))
            .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)))
            .recycle_timeout(Some(wait))
            .runtime(Runtime::Tokio1)
            .build()
            .context("cannot build the connection pool")
    }

    /// Opens one connection outside the pool; its driver runs on a spawned task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match self.tls() {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls).await?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(drive(connection));
                Ok(client)
            }
        }
    }

    /// Opens one connection outside the pool whose notifications
    /// (`LISTEN`) arrive, as their payloads, on the returned channel; the
    /// channel closes when the connection ends.
    pub async fn connect_listening(
        &self,
    ) -> Result<(tokio_postgres::Client, mpsc::Receiver<String>), tokio_postgres::Error> {
        let (tx, rx) = mpsc::channel(NOTIFICATIONS_QUEUED_MAX);
        match self.tls() {
            Some(tls) => {
                let (client, connection) = self.config.connect(tls).await?;
                tokio::spawn(drive_listening(connection, tx));
                Ok((client, rx))
            }
            None => {
                let (client, connection) = self.config.connect(NoTls).await?;
                tokio::spawn(drive_listening(connection, tx));
                Ok((client, rx))
            }
        }
    }
}

/// Notifications read off a listening connection and not yet handled; the
/// connection waits (PostgreSQL queues them) while it is full.
const NOTIFICATIONS_QUEUED_MAX: usize = 1024;

async fn drive_listening<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: mpsc::Sender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message {
            Ok(AsyncMessage::Notification(notification)) => {
                if tx.send(notification.payload().to_owned()).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%error, "listening connection closed");
                return;
            }
        }
    }
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(error) = connection.await {
        tracing::debug!(%error, "database connection closed");
    }
}

/// libpq's `sslmode=verify-ca` and `verify-full`, which tokio-postgres does
/// not parse, as `require`: creditd's TLS always verifies the certificate
/// and the host name, so `require` already means `verify-full` here.
fn verified_tls_as_require(url: &str) -> String {
    url.replace("sslmode=verify-full", "sslmode=require")
        .replace("sslmode=verify-ca", "sslmode=require")
}

/// One rustls client configuration for the process: ring, TLS 1.2 and 1.3,
/// Mozilla's roots (webpki-roots).
fn rustls_connector() -> MakeRustlsConnect {
    static CONNECTOR: OnceLock<MakeRustlsConnect> = OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            // Ring has cipher suites for TLS 1.2 and 1.3: this cannot fail.
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("the ring provider supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            MakeRustlsConnect::new(config)
        })
        .clone()
}

/// The advisory lock concurrent starts take to migrate one at a time (the
/// singletons' keys are in `singleton::Singleton`).
pub const MIGRATION_LOCK: i64 = 7_294_001;

/// Applies every migration not yet applied, each in its own transaction,
/// under an advisory lock so concurrent starts do not race.
pub async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<i32>> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    INTEGER PRIMARY KEY,
                name       TEXT NOT NULL,
                applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .context("cannot create schema_migrations")?;
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = client.transaction().await.context("begin migration")?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .context("migration lock")?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM schema_migrations WHERE version = $1",
                &[&version],
            )
            .await
            .context("read schema_migrations")?
            .is_some();
        if !done {
            tx.batch_execute(sql)
                .await
                .with_context(|| format!("migration {version:04}_{name} failed"))?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .await
            .context("record migration")?;
            applied.push(version);
        }
        tx.commit().await.context("commit migration")?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn located(url: &str) -> Database {
        let mut settings = crate::config::Settings::default_file().unwrap().database;
        settings.url = crate::config::Secret::new(url);
        Database::locate(&settings).unwrap()
    }

    #[test]
    fn a_url_that_asks_for_tls_gets_a_rustls_connector_and_others_stay_plain() {
        for url in [
            "postgres://creditd@db.example.com/credits?sslmode=require",
            "postgres://creditd@db.example.com/credits?sslmode=verify-full",
            "host=db.example.com user=creditd sslmode=verify-ca",
        ] {
            assert!(located(url).tls().is_some(), "{url}");
        }
        for url in [
            "postgres://creditd@db.example.com/credits",
            "postgres://creditd@db.example.com/credits?sslmode=disable",
            "postgres://creditd@db.example.com/credits?sslmode=prefer",
        ] {
            assert!(located(url).tls().is_none(), "{url}");
        }
    }
}
