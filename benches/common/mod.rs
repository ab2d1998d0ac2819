//! What the side-by-side benches share: knobs read from the environment and
//! a private, durable PostgreSQL cluster with one migrated database per side.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use creditd::config::DatabaseSettings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};

/// `name` from the environment, or `default` when unset; a value that does
/// not parse stops the bench with a message naming the variable.
pub fn env_or<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) if !text.is_empty() => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text} is not a valid value")),
        _ => default,
    }
}

/// A directory under `target/` for the bench's cluster and files.
pub fn bench_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name)
}

/// Starts a fresh durable cluster (fsync and synchronous_commit on, as in
/// production) in `target/<name>`.
pub async fn start_cluster(name: &str) -> PrivateCluster {
    let dir = bench_dir(name);
    let _ = std::fs::remove_dir_all(&dir);
    tokio::task::spawn_blocking(move || {
        PrivateCluster::start(&dir, Durability::Durable).expect("start the bench cluster")
    })
    .await
    .expect("cluster start task")
}

/// A new, migrated database `name` in `cluster`.
pub async fn create_database(
    cluster: &PrivateCluster,
    name: &str,
    settings: &DatabaseSettings,
) -> Database {
    let admin = Database {
        config: cluster.config("postgres"),
        cluster: None,
    };
    let client = admin.connect().await.expect("connect to the cluster");
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .expect("drop the old bench database");
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create the bench database");
    let database = Database {
        config: cluster.config(name),
        cluster: None,
    }
    .with_settings(settings);
    let mut client = database
        .connect()
        .await
        .expect("connect to the bench database");
    db::migrate(&mut client).await.expect("migrate");
    database
}
