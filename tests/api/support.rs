//! Test support: one throwaway PostgreSQL cluster per test binary (or the
//! server at `DATABASE_URL`), a migrated template database, and a fresh
//! database per test cloned from it.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use creditd::config::Settings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};
use creditd::ledger::store;
use creditd::ledger::{AccountId, Engine, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;
use tokio_postgres::NoTls;

struct Shared {
    /// Connection settings for the server's maintenance database.
    admin: tokio_postgres::Config,
    template: String,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
static CLUSTER: OnceLock<PrivateCluster> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Removes the data directories of earlier test runs whose process is gone.
fn sweep_stale_clusters() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("creditd-test-") else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        // SAFETY: signal 0 only checks that the process exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start_shared() -> Result<Shared, String> {
    let admin = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            tokio_postgres::Config::from_str(&url).map_err(|e| format!("DATABASE_URL: {e}"))?
        }
        _ => {
            sweep_stale_clusters();
            let dir = std::env::temp_dir().join(format!("creditd-test-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let cluster = PrivateCluster::start(&dir, Durability::Throwaway)
                .map_err(|e| format!("cannot start the test cluster: {e:#}"))?;
            let config = cluster.config("postgres");
            let _ = CLUSTER.set(cluster);
            config
        }
    };
    let template = format!("creditd_template_{}", std::process::id());
    // A runtime of its own: callers may be inside another runtime.
    let setup = {
        let admin = admin.clone();
        let template = template.clone();
        std::thread::spawn(move || -> Result<(), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let client = connect(&admin).await?;
                for statement in [
                    format!("DROP DATABASE IF EXISTS {template}"),
                    format!("CREATE DATABASE {template}"),
                ] {
                    client
                        .batch_execute(&statement)
                        .await
                        .map_err(|e| format!("{statement}: {e:?}"))?;
                }
                let mut config = admin.clone();
                config.dbname(&template);
                let mut client = connect(&config).await?;
                db::migrate(&mut client)
                    .await
                    .map_err(|e| format!("{e:#}"))?;
                Ok(())
            })
        })
    };
    setup
        .join()
        .map_err(|_| "template setup panicked".to_string())??;
    Ok(Shared { admin, template })
}

pub async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| format!("cannot connect to the test database: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

fn shared() -> &'static Shared {
    match SHARED.get_or_init(start_shared) {
        Ok(shared) => shared,
        Err(error) => panic!("test database unavailable: {error}"),
    }
}

/// The settings every test starts from: the shipped defaults.
pub fn settings() -> Settings {
    let mut settings = Settings::default_file().expect("the default config.toml is valid");
    settings.engine.arbiters = 2;
    settings.database.pool_size = 4;
    settings
}

/// A fresh, migrated database of its own.
pub struct TestDb {
    pub config: tokio_postgres::Config,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let shared = shared();
        let name = format!(
            "creditd_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = connect(&shared.admin).await.expect("admin connection");
        client
            .batch_execute(&format!(
                "CREATE DATABASE {name} TEMPLATE {}",
                shared.template
            ))
            .await
            .unwrap_or_else(|e| panic!("create test database {name}: {e:?}"));
        let mut config = shared.admin.clone();
        config.dbname(&name);
        TestDb { config }
    }

    pub fn database(&self, settings: &Settings) -> Database {
        Database {
            config: self.config.clone(),
            cluster: None,
        }
        .with_settings(&settings.database)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.config).await.expect("test connection")
    }

    pub fn engine(&self, settings: &Settings) -> Engine {
        let database = self.database(settings);
        let pool = database.pool(&settings.database).expect("pool");
        Engine::start(&settings.engine, &settings.journal, database, pool)
    }

    /// A new user (and balance row) named by its Clerk id.
    pub async fn user(&self, clerk_id: &str) -> AccountId {
        let client = self.client().await;
        store::ensure_user(&client, clerk_id)
            .await
            .expect("create user")
    }

    pub async fn reconcile_is_clean(&self) {
        let mut client = self.client().await;
        let report = creditd::ledger::reconcile::reconcile(&mut client)
            .await
            .expect("reconcile runs");
        assert!(
            report.clean,
            "reconcile found problems: {:#?}",
            report.problems
        );
    }
}

pub fn micros(value: i64) -> Micros {
    Micros::new(value)
}

pub fn eur(units: i64) -> Micros {
    Micros::new(units * 1_000_000)
}

pub fn key(text: &str) -> IdempotencyKey {
    IdempotencyKey::parse(text).expect("valid key")
}

/// A posting with nothing but a key, a kind and an amount.
pub fn posting(key_text: &str, kind: TransactionType, amount: Micros) -> Posting {
    Posting {
        key: key(key_text),
        kind,
        amount,
        description: None,
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: None,
    }
}
