//! What HAProxy and more instances change: `GET /healthz` (no work) and
//! `GET /api/credits` (a Clerk token verified, the balance from the
//! account's actor, the last transactions and usages) driven by `wrk`
//! directly against one `creditd serve`, through HAProxy in front of that
//! one instance, and through HAProxy in front of three, same run.
//!
//! Each instance is the real binary (`creditd serve`, configured with
//! `CREDITD__…` variables) on one private durable PostgreSQL under
//! `target/bench-cluster-postgres`; the balancer is Debian's HAProxy
//! running the shipped `deploy/haproxy.cfg` with its ports and servers
//! rewritten and nothing else changed but `maxconn` (the shipped value
//! needs more descriptors than a bench machine may allow). Every user has
//! a token of their own, so the consistent hash spreads accounts over the
//! instances as in production.
//!
//! `benches/run cluster` installs `wrk` and `haproxy` when missing, or
//! `cargo bench --bench cluster` with both installed. Knobs (environment):
//! BENCH_SECS (each run, default 5), BENCH_WRK_THREADS (default 2),
//! BENCH_CONNECTIONS (default 64), BENCH_USERS (distinct users, each with
//! its own session token, default 1000), BENCH_HISTORY (reserve+settle
//! cycles in each user's history, default 20), BENCH_INSTANCES (instances
//! behind the balancer in the widest run, default 3).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::users::{clerk_id, seed_history, write_script, SigningKey, ISSUER, JWKS_PATH};
use creditd::config::Settings;

const HAPROXY: &str = "/usr/sbin/haproxy";

/// One `creditd serve` child process, killed when the bench ends.
struct Instance {
    port: u16,
    child: Child,
}

impl Instance {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HAProxy process, killed when the bench ends.
struct Balancer {
    front: u16,
    child: Child,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// A key=value connection string for `config`, for the child processes.
fn database_url(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
        Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config.get_dbname().unwrap_or("postgres");
    let user = config.get_user().unwrap_or("postgres");
    format!("host={host} port={port} dbname={dbname} user={user}")
}

/// Starts `creditd serve` number `index` on a port of its own.
fn start_instance(index: usize, database_url: &str, jwks_url: &str) -> Instance {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CREDITD__DATABASE__URL", database_url)
        .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("CREDITD__CLUSTER__INSTANCE_ID", format!("bench-{index}"))
        .env("CREDITD__CLERK__JWKS_URL", jwks_url)
        .env("CREDITD__CLERK__ISSUER", ISSUER)
        // wrk is one address: the per-IP limit of token-less routes would
        // answer most no-op requests 429 and measure the limiter instead.
        .env(
            "CREDITD__RATE_LIMITS__UNAUTHENTICATED_PER_IP_PER_SECOND",
            "100000000",
        )
        .env("CREDITD__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start creditd serve");
    Instance { port, child }
}

/// Polls `url` until it answers 200; stops the bench after 60 s.
async fn until_ok(http: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = http.get(url).send().await.map(|response| response.status());
        if matches!(status, Ok(status) if status.is_success()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer 200 within 60 s (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The shipped configuration with the front end on `front` and one server
/// line per port in `ports`; every other line as shipped but `maxconn`.
fn rewritten_config(front: u16, ports: &[u16]) -> String {
    let shipped = include_str!("../deploy/haproxy.cfg");
    let mut config = String::new();
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("maxconn ") {
            // The shipped maxconn needs twice as many descriptors as a
            // bench machine may allow: HAProxy would refuse to start.
            config += "    maxconn 4000\n";
        } else if trimmed.starts_with("bind 127.0.0.1:8080") {
            config += &format!("    bind 127.0.0.1:{front}\n");
        } else if trimmed.starts_with("server creditd1 ") {
            for (index, port) in ports.iter().enumerate() {
                config += &format!("    server creditd{} 127.0.0.1:{port} check\n", index + 1);
            }
        } else if !trimmed.starts_with("server creditd") {
            config += line;
            config += "\n";
        }
    }
    config
}

/// HAProxy in front of `instances`, its configuration written in `dir`.
fn start_balancer(dir: &Path, instances: &[Instance]) -> Balancer {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: install it with `apt-get install haproxy`"
    );
    let front = free_port();
    let ports: Vec<u16> = instances.iter().map(|instance| instance.port).collect();
    let config = dir.join(format!("haproxy-{}.cfg", ports.len()));
    std::fs::write(&config, rewritten_config(front, &ports)).expect("write haproxy.cfg");
    let child = Command::new(HAPROXY)
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start haproxy");
    Balancer { front, child }
}

/// Where a run sends its requests.
struct Target {
    label: String,
    base: String,
}

struct Run {
    target: usize,
    route: &'static str,
    measured: common::wrk::Measured,
}

/// The machine's load averages (1, 5 and 15 minutes), as `uptime` shows them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn main() {
    let secs: u64 = common::env_or("BENCH_SECS", 5);
    let threads: usize = common::env_or("BENCH_WRK_THREADS", 2);
    let connections: usize = common::env_or("BENCH_CONNECTIONS", 64);
    let users: usize = common::env_or("BENCH_USERS", 1000);
    let history: usize = common::env_or("BENCH_HISTORY", 20);
    let count: usize = common::env_or("BENCH_INSTANCES", 3);
    assert!(count >= 1, "BENCH_INSTANCES must be at least 1");
    let settings = Settings::default_file().expect("default config");
    // The seeding engine's account actors need an actix system.
    let system = actix_web::rt::System::new();
    let (targets, runs, loads) = system.block_on(async move {
        let cluster = common::start_cluster("bench-cluster-postgres").await;
        let database = common::create_database(&cluster, "bench_cluster", &settings.database).await;
        seed_history(&database, &settings, users, history).await;
        let key = SigningKey::generate();
        let jwks = key.serve().await;
        let jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
        let url = database_url(&database.config);
        let instances: Vec<Instance> = (1..=count)
            .map(|index| start_instance(index, &url, &jwks_url))
            .collect();
        let dir = common::bench_dir("bench-cluster-postgres");
        let one = start_balancer(&dir, &instances[..1]);
        let all = start_balancer(&dir, &instances);
        let targets = vec![
            Target {
                label: "direct, 1 instance".to_owned(),
                base: instances[0].base(),
            },
            Target {
                label: "HAProxy, 1 instance".to_owned(),
                base: format!("http://127.0.0.1:{}", one.front),
            },
            Target {
                label: format!("HAProxy, {count} instances"),
                base: format!("http://127.0.0.1:{}", all.front),
            },
        ];
        let http = reqwest::Client::new();
        for instance in &instances {
            until_ok(&http, &format!("{}/readyz", instance.base())).await;
        }
        for target in &targets {
            until_ok(&http, &format!("{}/healthz", target.base)).await;
        }
        let credits = dir.join("credits.lua");
        write_script(&credits, &key, users, "GET", None, clerk_id);
        let plain = dir.join("plain.lua");
        std::fs::write(&plain, "-- every request as wrk makes it\n").expect("write plain.lua");
        eprintln!(
            "{count} instances of {} workers, pool_size {}; wrk: {threads} threads, \
             {connections} connections, {users} users",
            settings.server.workers, settings.database.pool_size
        );
        // Warm-up: every token verified and every account loaded on the
        // first instance (the direct runs and the one-instance balancer)
        // and on the instance the ring gives it.
        for target in [&targets[0], &targets[2]] {
            let url = format!("{}/api/credits", target.base);
            common::wrk::run(&url, &credits, 2, connections, threads).await;
        }
        let mut loads = vec![load_average()];
        let mut runs = Vec::new();
        for route in ["/healthz", "/api/credits"] {
            let script = if route == "/healthz" {
                &plain
            } else {
                &credits
            };
            for (index, target) in targets.iter().enumerate() {
                let url = format!("{}{route}", target.base);
                let measured = common::wrk::run(&url, script, secs, connections, threads).await;
                eprintln!(
                    "{route} {}: {:.0} requests/s, p50 {}, p99 {}, non-2xx {}",
                    target.label,
                    measured.requests_per_s,
                    measured.p50,
                    measured.p99,
                    measured.failures
                );
                runs.push(Run {
                    target: index,
                    route,
                    measured,
                });
            }
        }
        loads.push(load_average());
        drop((one, all, instances));
        cluster.stop();
        (targets, runs, loads)
    });
    print(&targets, &runs, &loads, connections);
}

fn print(targets: &[Target], runs: &[Run], loads: &[String], connections: usize) {
    println!();
    println!(
        "{connections} connections each; load average (1, 5, 15 min) before the runs {}, after {}; \
         the machine has {} cores.",
        loads.first().map_or("?", String::as_str),
        loads.last().map_or("?", String::as_str),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| route | path | requests/s | of direct | p50 | p99 | non-2xx | creditd | HAProxy | postgres | wrk | others |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        let direct = runs
            .iter()
            .find(|other| other.route == run.route && other.target == 0)
            .map_or(0.0, |other| other.measured.requests_per_s);
        let measured = &run.measured;
        let cpu = measured.cpu;
        println!(
            "| GET {} | {} | {:.0} | {:.0}% | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            run.route,
            targets[run.target].label,
            measured.requests_per_s,
            measured.requests_per_s / direct.max(1.0) * 100.0,
            measured.p50,
            measured.p99,
            measured.failures,
            cpu.cores(cpu.creditd),
            cpu.cores(cpu.haproxy),
            cpu.cores(cpu.postgres),
            cpu.cores(cpu.children),
            cpu.others()
        );
    }
    println!();
    println!(
        "CPU columns: cores busy on average during the run (creditd: all instances together)."
    );
    println!();
    for route in ["/healthz", "/api/credits"] {
        let of = |target: usize| {
            runs.iter()
                .find(|run| run.route == route && run.target == target)
                .map_or(0.0, |run| run.measured.requests_per_s)
        };
        let (direct, one) = (of(0), of(1));
        let haproxy_cpu = runs
            .iter()
            .find(|run| run.route == route && run.target == 1)
            .map_or(0.0, |run| {
                let cpu = run.measured.cpu;
                cpu.haproxy * 1e6 / (run.measured.requests_per_s * cpu.wall).max(1.0)
            });
        if direct > 0.0 && one > 0.0 {
            println!(
                "GET {route}: HAProxy spends {haproxy_cpu:.0} µs of CPU per request (one instance)"
            );
            // Little's law: each connection waits connections ÷ throughput.
            println!(
                "GET {route}: mean time per request {:.0} µs through HAProxy, {:.0} µs direct \
                 ({connections} connections, one instance)",
                1e6 / one * connections as f64,
                1e6 / direct * connections as f64,
            );
        }
    }
}
