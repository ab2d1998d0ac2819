//! What the benches share: knobs read from the environment, a private,
//! durable PostgreSQL cluster with one migrated database per side, and the
//! usage every cycle settles. Each bench uses a subset.
#![allow(dead_code)]

pub mod hey;
pub mod users;
pub mod wrk;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use creditd::config::DatabaseSettings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};
use creditd::ledger::UsageCharge;
use creditd::money::Micros;
use creditd::pricing::TokenUsage;

/// The real cost of the seed's typical request (500 input + 2,000 output
/// tokens on claude-sonnet-4-5): what every benchmark cycle settles.
pub const COST_MICROS: i64 = 30_626;

/// The usage a benchmark cycle settles its hold with.
pub fn charge() -> UsageCharge {
    UsageCharge {
        model: "claude-sonnet-4-5".into(),
        tokens: TokenUsage {
            input_tokens: 500,
            output_tokens: 2000,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost: Micros::new(COST_MICROS),
        conversation_id: None,
        message_id: None,
        api_key: None,
    }
}

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

/// CPU time spent so far, in seconds: by this process, by the cluster's
/// `postgres` processes, and by the whole machine (all cores, busy time).
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub bench: f64,
    pub postgres: f64,
    /// `creditd` and `haproxy` processes (the cluster bench's children).
    pub creditd: f64,
    pub haproxy: f64,
    /// Child processes this process waited for (the `wrk` load generator).
    pub children: f64,
    pub machine: f64,
    pub wall: f64,
}

impl Cpu {
    pub fn now(started: std::time::Instant) -> Cpu {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // Name, own CPU and waited-for children's CPU, from a /proc/*/stat line.
        let process = |stat: &str| -> Option<(String, f64, f64)> {
            let (head, tail) = stat.rsplit_once(')')?;
            let name = head.split_once('(')?.1.to_owned();
            let fields: Vec<f64> = tail
                .split_whitespace()
                .skip(11)
                .take(4)
                .filter_map(|n| n.parse().ok())
                .collect();
            let [utime, stime, cutime, cstime] = fields[..] else {
                return None;
            };
            Some((name, (utime + stime) / ticks, (cutime + cstime) / ticks))
        };
        let (bench, children) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| process(&stat))
            .map_or((0.0, 0.0), |(_, own, children)| (own, children));
        let (mut postgres, mut creditd, mut haproxy) = (0.0, 0.0, 0.0);
        let processes = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
            .filter_map(|stat| process(&stat));
        for (name, own, _) in processes {
            match name.as_str() {
                "postgres" => postgres += own,
                "creditd" => creditd += own,
                "haproxy" => haproxy += own,
                _ => {}
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let fields: Vec<f64> = stat
                    .lines()
                    .next()?
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|n| n.parse().ok())
                    .collect();
                let idle = fields.get(3)? + fields.get(4)?;
                Some((fields.iter().take(8).sum::<f64>() - idle) / ticks)
            })
            .unwrap_or(0.0);
        Cpu {
            bench,
            postgres,
            creditd,
            haproxy,
            children,
            machine,
            wall: started.elapsed().as_secs_f64(),
        }
    }

    pub fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            bench: self.bench - earlier.bench,
            postgres: self.postgres - earlier.postgres,
            creditd: self.creditd - earlier.creditd,
            haproxy: self.haproxy - earlier.haproxy,
            children: self.children - earlier.children,
            machine: self.machine - earlier.machine,
            wall: self.wall - earlier.wall,
        }
    }
    /// Cores busy on average outside this process, its children, PostgreSQL,
    /// creditd and HAProxy.
    pub fn others(self) -> f64 {
        (self.machine - self.bench - self.postgres - self.creditd - self.haproxy - self.children)
            .max(0.0)
            / self.wall.max(1e-9)
    }

    /// Cores busy on average in `secs` of CPU time.
    pub fn cores(self, secs: f64) -> f64 {
        secs.max(0.0) / self.wall.max(1e-9)
    }
}
