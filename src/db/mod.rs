//! PostgreSQL: where the database is (configured URL or private cluster),
//! the connection pool, and the migrations in `sql/`.

pub mod cluster;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

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
        let config = tokio_postgres::Config::from_str(settings.url.expose())
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

    pub fn pool(&self, settings: &DatabaseSettings) -> anyhow::Result<Pool> {
        let manager = Manager::from_config(
            self.config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
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
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "database connection closed");
            }
        });
        Ok(client)
    }
}

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
        tx.execute("SELECT pg_advisory_xact_lock(7294001)", &[])
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
