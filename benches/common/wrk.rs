//! One `wrk` run (the load generator, `apt-get install wrk`) and what it
//! reported, with the CPU the machine spent meanwhile.

use std::path::Path;

/// What one `wrk` run measured.
pub struct Measured {
    pub cpu: super::Cpu,
    pub requests_per_s: f64,
    pub p50: String,
    pub p99: String,
    /// Responses other than 2xx and 3xx.
    pub failures: u64,
}

/// The value after `label` on the first line that starts with it.
fn field<'a>(output: &'a str, label: &str) -> Option<&'a str> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix(label)
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
    })
}

/// `wrk` on `url` for `secs` with `connections` over `threads`, each
/// request made by `script`.
pub async fn run(
    url: &str,
    script: &Path,
    secs: u64,
    connections: usize,
    threads: usize,
) -> Measured {
    let started = std::time::Instant::now();
    let cpu_before = super::Cpu::now(started);
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}): install it with `apt-get install wrk`"));
    let cpu = super::Cpu::now(started).since(cpu_before);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "wrk failed: {text}");
    let failures = field(&text, "Non-2xx or 3xx responses:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Measured {
        cpu,
        requests_per_s: field(&text, "Requests/sec:")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Requests/sec in wrk output: {text}")),
        p50: field(&text, "50%").unwrap_or("?").to_owned(),
        p99: field(&text, "99%").unwrap_or("?").to_owned(),
        failures,
    }
}
