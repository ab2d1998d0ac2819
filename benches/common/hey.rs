//! Fixed-rate load with `hey` (Debian's `hey`, `apt-get install hey`):
//! the offered rate does not follow the server's speed, as a closed loop
//! (`wrk`) does, so the latency measured is what a request meets at that
//! load. Each of several `hey` processes sends as one user (its token in a
//! header) with a few workers, each worker at a fixed rate (`-q`); every
//! request's latency comes back (`-o csv`) and the processes' latencies are
//! merged before the percentiles are taken. With BENCH_CALLGRIND=1 (the
//! bench started under `valgrind --tool=callgrind`), the instructions the
//! server's process executed during each run are counted: they move far
//! less with what else the machine runs than times do.

use std::path::Path;

/// What one fixed-rate run measured.
pub struct Paced {
    pub cpu: super::Cpu,
    /// Requests per second asked for.
    pub offered_per_s: f64,
    /// Requests answered, and per second.
    pub answered: f64,
    pub achieved_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Responses other than 2xx (and requests that got none).
    pub failures: u64,
    /// Context switches of this process (the server's) per request.
    pub switches_per_request: f64,
    /// Instructions per request of this process (user space), when it runs
    /// under callgrind with BENCH_CALLGRIND=1.
    pub instructions_per_request: Option<f64>,
}

/// A fixed-rate load: `rate_per_s` requests per second to `url`, spread
/// over one `hey` process per token with `workers` workers each.
pub struct PacedLoad<'a> {
    /// Names the run (its callgrind dump).
    pub label: &'a str,
    pub url: &'a str,
    pub method: &'a str,
    /// The JSON body's file, if any.
    pub body: Option<&'a Path>,
    /// One session token per `hey` process.
    pub tokens: &'a [String],
    pub workers: usize,
    pub rate_per_s: f64,
    pub secs: u64,
}

/// Context switches of this process so far, over all its threads (the
/// server's thread hand-offs show here).
pub fn context_switches() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0;
    }
    (usage.ru_nvcsw + usage.ru_nivcsw).max(0) as u64
}

/// One `hey` process's requests: (latency in seconds, status), from its
/// CSV (`response-time,DNS+dialup,DNS,Request-write,Response-delay,
/// Response-read,status-code,offset`).
fn requests(csv: &str) -> Vec<(f64, u16)> {
    csv.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            let latency = fields.first()?.trim().parse().ok()?;
            let status = fields.get(6)?.trim().parse().ok()?;
            Some((latency, status))
        })
        .collect()
}

/// The `quantile` (0..1) of sorted `values`, nearest rank.
fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `callgrind_control` with `args` on this process (which runs under
/// `valgrind --tool=callgrind`): what it printed.
async fn callgrind_control(args: &[&str]) -> String {
    let output = tokio::process::Command::new("callgrind_control")
        .args(args)
        .arg(std::process::id().to_string())
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run callgrind_control ({e}): BENCH_CALLGRIND=1 needs valgrind")
        });
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The instructions this process executed since callgrind's counters
/// were last zeroed (its threads' totals, as `callgrind_control -e Ir`
/// reports them).
async fn instructions_since_zero() -> f64 {
    let text = callgrind_control(&["-e", "Ir"]).await;
    let threads: Vec<f64> = text
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("Th")?;
            rest.split_whitespace()
                .nth(1)?
                .replace(',', "")
                .parse()
                .ok()
        })
        .collect();
    assert!(
        !threads.is_empty(),
        "no counters from callgrind_control: {text}"
    );
    threads.iter().sum()
}

/// Runs `load` and waits for every `hey` process.
pub async fn run(load: &PacedLoad<'_>) -> Paced {
    let callgrind = std::env::var("BENCH_CALLGRIND").is_ok_and(|v| v == "1");
    if callgrind {
        callgrind_control(&["--zero"]).await;
    }
    let processes = load.tokens.len().max(1);
    let per_worker = load.rate_per_s / (processes * load.workers.max(1)) as f64;
    let started = std::time::Instant::now();
    let cpu_before = super::Cpu::now(started);
    let switches_before = context_switches();
    let runs = load.tokens.iter().map(|token| {
        let mut command = tokio::process::Command::new("hey");
        command
            .arg("-z")
            .arg(format!("{}s", load.secs))
            .arg("-c")
            .arg(load.workers.max(1).to_string())
            .arg("-q")
            .arg(format!("{per_worker:.3}"))
            .arg("-m")
            .arg(load.method)
            .arg("-o")
            .arg("csv")
            .arg("-T")
            .arg("application/json")
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"));
        if let Some(body) = load.body {
            command.arg("-D").arg(body);
        }
        command.arg(load.url).output()
    });
    let outputs = futures_util::future::join_all(runs).await;
    let instructions = match callgrind {
        // Counted, then dumped under the run's label for `callgrind_annotate`.
        true => {
            let counted = instructions_since_zero().await;
            callgrind_control(&[&format!("--dump={}", load.label)]).await;
            Some(counted)
        }
        false => None,
    };
    let cpu = super::Cpu::now(started).since(cpu_before);
    let switches = context_switches().saturating_sub(switches_before);
    let mut latencies = Vec::new();
    let mut failures = 0u64;
    for output in outputs {
        let output = output.unwrap_or_else(|e| {
            panic!("cannot run hey ({e}): install it with `apt-get install hey`")
        });
        assert!(
            output.status.success(),
            "hey failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for (latency, status) in requests(&String::from_utf8_lossy(&output.stdout)) {
            if !(200..300).contains(&status) {
                failures += 1;
            }
            latencies.push(latency * 1e3);
        }
    }
    latencies.sort_by(f64::total_cmp);
    let answered = latencies.len() as f64;
    Paced {
        cpu,
        offered_per_s: load.rate_per_s,
        answered,
        achieved_per_s: answered / (load.secs as f64).max(1e-9),
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        failures,
        switches_per_request: switches as f64 / answered.max(1.0),
        instructions_per_request: instructions.map(|count| count / answered.max(1.0)),
    }
}
