//! HTTP throughput of the real server: `GET /api/credits` (Clerk token
//! verified, balance from the account's actor, last transactions and usages
//! from PostgreSQL or the page cache) and `POST /api/chat` on the platform
//! key (a hold applied without waiting for its commit, a call to a local fake
//! Anthropic server that answers at once, a settlement waited for: one
//! durable commit in the chat's path) next to the same chat body sent by
//! users who saved their own key (BYOK: no hold, no charge), which measures
//! the metering overhead; the gateway's `POST /v1/chat/completions` the
//! same way (platform key and BYOK, a local fake OpenAI answering at once,
//! the users' session tokens); and the no-op `GET /healthz` and `GET
//! /readyz` (one `SELECT 1`), driven by `wrk`.
//!
//! `benches/run http` installs `wrk` when it is missing, or
//! `cargo bench --bench http` with `wrk` on PATH (`apt-get install wrk`).
//! Knobs (environment): BENCH_SECS (each run, default 5), BENCH_WRK_THREADS
//! (default 2), BENCH_USERS (distinct users, each with its own session token,
//! default 1000; as many BYOK users), BENCH_HISTORY (reserve+settle cycles in
//! each user's history, default 20), BENCH_RUNS (the runs, in order, each
//! `connections:route` where route is a path, `byok:/api/chat`,
//! `byok:/v1/chat/completions`, or
//! `etag:/api/credits` (the page's read sent with `If-None-Match` of the
//! user's current ETag, answered `304`); default in `DEFAULT_RUNS`;
//! `none`: no `wrk` run).
//!
//! Then the fixed-rate latency of platform and BYOK chats, driven by `hey`
//! (`benches/run http` installs it too): at each rate, a platform run then
//! a BYOK run of the same body, p50 / p99 side by side and their
//! difference (what metering adds to a chat at that load). Knobs:
//! BENCH_RATES (chats/s, default `1000,3000`; `none`: no fixed-rate run),
//! BENCH_RATE_USERS (users sending, one `hey` process each, default 25),
//! BENCH_RATE_WORKERS (workers per process, default 2), BENCH_RATE_SECS
//! (each run, default BENCH_SECS), BENCH_CALLGRIND (`1`: count the server's
//! instructions per chat, the bench running under callgrind, and dump each
//! run's profile; see `common::hey`). The server's settings are the
//! committed `config.toml` with any `CREDITD__SECTION__KEY` override from
//! the environment, as the service reads them. Last, a summary of the ratios the
//! targets of BENCHMARKS.md quote, each from two rows of this run.
//!
//! Starts the app in-process on a private durable cluster under
//! `target/bench-http-postgres` and a local JWKS server publishing the key
//! that signs the tokens.

mod common;

use std::path::Path;

use common::users::{clerk_id, seed_history, write_script, SigningKey, ISSUER, JWKS_PATH};
use creditd::config::Settings;

fn byok_clerk_id(user: usize) -> String {
    format!("user_bench_byok_{user}")
}

/// The runs when BENCH_RUNS is not set: the page and the no-op routes at 64
/// connections, then platform and BYOK chats side by side at 64 and at 256.
const DEFAULT_RUNS: &str = "64:/healthz,64:/api/credits,64:etag:/api/credits,64:/readyz,\
    64:/api/chat,64:byok:/api/chat,256:/api/chat,256:byok:/api/chat,\
    64:/api/chat,64:byok:/api/chat,256:/api/chat,256:byok:/api/chat,\
    64:/v1/chat/completions,64:byok:/v1/chat/completions,\
    256:/v1/chat/completions,256:byok:/v1/chat/completions,64:/healthz";

/// A 32-byte key (base64) for the BYOK users' saved keys.
const BENCH_BYOK_ENCRYPTION_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// Saves an Anthropic and an OpenAI key for every BYOK user, through the
/// real route (`/api/chat` names a Claude model, the gateway an OpenAI one).
async fn save_byok_keys(base: &str, key: &SigningKey, users: usize) {
    let http = reqwest::Client::new();
    for chunk in (0..users).collect::<Vec<_>>().chunks(64) {
        let saves = chunk.iter().map(|&user| {
            let http = http.clone();
            let token = key.token(&byok_clerk_id(user));
            async move {
                let response = http
                    .put(format!("{base}/api/settings/api-keys"))
                    .bearer_auth(token)
                    .json(&serde_json::json!({
                        "anthropicKey": "sk-ant-bench-user-own-key-0123456789",
                        "openaiKey": "sk-bench-user-own-key-0123456789",
                    }))
                    .send()
                    .await
                    .expect("save a BYOK key");
                assert!(response.status().is_success(), "{}", response.status());
            }
        });
        futures_util::future::join_all(saves).await;
    }
}

/// The chat every `POST /api/chat` of the bench sends.
const CHAT_BODY: &str = r#"{"messages":[{"role":"user","content":"Add a login page"}],"model":"claude-haiku-4-5","maxTokens":256}"#;

/// What the fake Anthropic server answers: the Messages API's shape.
const ANTHROPIC_REPLY: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"Done."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":40,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":20}}"#;

/// The call every `POST /v1/chat/completions` of the bench sends.
const GATEWAY_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Add a login page"}],"max_tokens":256}"#;

/// What the fake OpenAI server answers: a chat completion's shape.
const OPENAI_REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1741570283,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Done."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":20,"total_tokens":32,"prompt_tokens_details":{"cached_tokens":0}}}"#;

fn method_of(path: &str) -> &'static str {
    if path.ends_with("/api/chat") || path.ends_with("/v1/chat/completions") {
        "POST"
    } else {
        "GET"
    }
}

/// The URL path of a run's route (`byok:/api/chat` is `/api/chat`,
/// `etag:/api/credits` is `/api/credits`).
fn url_path(route: &str) -> &str {
    route
        .strip_prefix("byok:")
        .or_else(|| route.strip_prefix("etag:"))
        .unwrap_or(route)
}

/// Each user's current `ETag` of `GET /api/credits`, in user order.
async fn etags(base: &str, key: &SigningKey, users: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut etags = Vec::with_capacity(users);
    for user in 0..users {
        let response = http
            .get(format!("{base}/api/credits"))
            .bearer_auth(key.token(&clerk_id(user)))
            .send()
            .await
            .expect("read the balance");
        assert!(response.status().is_success(), "{}", response.status());
        let etag = response
            .headers()
            .get("etag")
            .and_then(|value| value.to_str().ok())
            .expect("GET /api/credits carries an ETag once the account is settled");
        etags.push(etag.replace('"', "\\\""));
    }
    etags
}

/// A `wrk` script sending each user's `GET` with `If-None-Match` of the
/// ETag `etags` holds for that user.
fn write_etag_script(path: &Path, key: &SigningKey, etags: &[String]) {
    let pairs: Vec<String> = etags
        .iter()
        .enumerate()
        .map(|(user, etag)| {
            format!(
                "  {{ \"Bearer {}\", \"{etag}\" }},",
                key.token(&clerk_id(user))
            )
        })
        .collect();
    let script = format!(
        "local users = {{\n{}\n}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
         local user = users[(i % #users) + 1]\n  \
         return wrk.format(\"GET\", nil, {{ [\"Authorization\"] = user[1], \
         [\"If-None-Match\"] = user[2] }}, nil)\nend\n",
        pairs.join("\n")
    );
    std::fs::write(path, script).expect("write the wrk script");
}

/// A local Anthropic Messages API and OpenAI Chat Completions that
/// answer every call at once.
fn fake_provider() -> (String, actix_web::dev::Server) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/v1/messages",
                web::post().to(|| async {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(ANTHROPIC_REPLY)
                }),
            )
            .route(
                "/v1/chat/completions",
                web::post().to(|| async {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(OPENAI_REPLY)
                }),
            )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .expect("bind the fake provider");
    let address = format!("http://{}", server.addrs()[0]);
    (address, server.run())
}

struct WrkRun {
    path: &'static str,
    connections: usize,
    cpu: common::Cpu,
    requests_per_s: f64,
    p50: String,
    p99: String,
    failures: u64,
}

async fn wrk(
    base: &str,
    path: &'static str,
    script: &Path,
    secs: u64,
    connections: usize,
    threads: usize,
) -> WrkRun {
    let url = format!("{base}{}", url_path(path));
    let measured = common::wrk::run(&url, script, secs, connections, threads).await;
    WrkRun {
        path,
        connections,
        cpu: measured.cpu,
        requests_per_s: measured.requests_per_s,
        p50: measured.p50,
        p99: measured.p99,
        failures: measured.failures,
    }
}

/// One fixed-rate run: a platform or a BYOK chat at `offered` chats/s.
struct RateRun {
    byok: bool,
    measured: common::hey::Paced,
    journal: Journal,
}

/// The journal's own counters over a run (from `/metrics`).
#[derive(Clone, Copy, Default)]
struct Journal {
    commits: f64,
    commit_seconds: f64,
    entries: f64,
    /// Batches PostgreSQL refused at once, written again statement by statement.
    rewritten: f64,
}

impl Journal {
    /// The sum, over its label sets, of the metric `name` in `text`.
    fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn read(http: &reqwest::Client, base: &str) -> Journal {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics text");
        Journal {
            commits: Journal::metric(&text, "creditd_journal_commit_seconds_count"),
            commit_seconds: Journal::metric(&text, "creditd_journal_commit_seconds_sum"),
            entries: Journal::metric(&text, "creditd_journal_batch_size_sum"),
            rewritten: Journal::metric(&text, "creditd_journal_batches_rewritten_total"),
        }
    }

    fn since(self, earlier: Journal) -> Journal {
        Journal {
            commits: self.commits - earlier.commits,
            commit_seconds: self.commit_seconds - earlier.commit_seconds,
            entries: self.entries - earlier.entries,
            rewritten: self.rewritten - earlier.rewritten,
        }
    }
}

/// How the fixed-rate runs are sent.
struct Rates {
    rates: Vec<f64>,
    users: usize,
    workers: usize,
    secs: u64,
}

impl Rates {
    fn from_env(secs: u64) -> Rates {
        let rates: String = common::env_or("BENCH_RATES", "1000,3000".to_owned());
        let rates = if rates == "none" {
            Vec::new()
        } else {
            rates
                .split(',')
                .map(|rate| {
                    rate.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("BENCH_RATES: `{rate}` is not a number"))
                })
                .collect()
        };
        Rates {
            rates,
            users: common::env_or("BENCH_RATE_USERS", 25),
            workers: common::env_or("BENCH_RATE_WORKERS", 2),
            secs: common::env_or("BENCH_RATE_SECS", secs),
        }
    }
}

/// At each rate, platform chats then BYOK chats, from `rates.users` users
/// of each kind.
async fn paced_chats(base: &str, key: &SigningKey, body: &Path, rates: &Rates) -> Vec<RateRun> {
    let url = format!("{base}/api/chat");
    let platform: Vec<String> = (0..rates.users).map(|u| key.token(&clerk_id(u))).collect();
    let byok: Vec<String> = (0..rates.users)
        .map(|u| key.token(&byok_clerk_id(u)))
        .collect();
    let http = reqwest::Client::new();
    let mut runs = Vec::new();
    for &rate in &rates.rates {
        for (is_byok, tokens) in [(false, &platform), (true, &byok)] {
            let label = format!("{}-{rate}", if is_byok { "byok" } else { "platform" });
            let load = common::hey::PacedLoad {
                label: &label,
                url: &url,
                method: "POST",
                body: Some(body),
                tokens,
                workers: rates.workers,
                rate_per_s: rate,
                secs: rates.secs,
            };
            let before = Journal::read(&http, base).await;
            let measured = common::hey::run(&load).await;
            let journal = Journal::read(&http, base).await.since(before);
            eprintln!(
                "{} chats at {rate}/s: {:.0} answered/s, p50 {:.2} ms, p99 {:.2} ms, failures {}",
                if is_byok { "BYOK" } else { "platform" },
                measured.achieved_per_s,
                measured.p50_ms,
                measured.p99_ms,
                measured.failures
            );
            runs.push(RateRun {
                byok: is_byok,
                measured,
                journal,
            });
        }
    }
    runs
}

fn main() {
    let secs: u64 = common::env_or("BENCH_SECS", 5);
    let threads: usize = common::env_or("BENCH_WRK_THREADS", 2);
    let users: usize = common::env_or("BENCH_USERS", 1000);
    let history: usize = common::env_or("BENCH_HISTORY", 20);
    let rates = Rates::from_env(secs);
    let plan: &'static str = common::env_or("BENCH_RUNS", DEFAULT_RUNS.to_owned()).leak();
    let plan: Vec<(usize, &'static str)> = plan
        .split(',')
        .filter(|run| *run != "none")
        .map(|run| {
            let (connections, route) = run
                .trim()
                .split_once(':')
                .unwrap_or_else(|| panic!("BENCH_RUNS: `{run}` is not `connections:route`"));
            let connections = connections
                .parse()
                .unwrap_or_else(|_| panic!("BENCH_RUNS: `{connections}` is not a number"));
            (connections, route)
        })
        .collect();
    let connections = plan.iter().map(|(c, _)| *c).max().unwrap_or(64);
    // The committed config.toml, with any `CREDITD__SECTION__KEY` override
    // (e.g. CREDITD__JOURNAL__HOLD_DELAY_US=0) as the service takes them.
    let overrides: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| name.starts_with(creditd::config::ENV_PREFIX))
        .collect();
    let mut settings = Settings::from_sources(creditd::config::DEFAULT_CONFIG, &overrides)
        .unwrap_or_else(|e| panic!("config: {e}"));
    settings.log.level = "warn".into();
    let system = actix_web::rt::System::new();
    let (runs, rate_runs) = system.block_on(async move {
        let cluster = common::start_cluster("bench-http-postgres").await;
        let database = common::create_database(&cluster, "bench_http", &settings.database).await;
        seed_history(&database, &settings, users, history).await;

        let key = SigningKey::generate();
        let jwks = key.serve().await;
        let (provider, provider_server) = fake_provider();
        actix_web::rt::spawn(provider_server);
        settings.providers.anthropic_base_url = provider.clone();
        settings.providers.anthropic_api_key = creditd::config::Secret::new("bench-platform-key");
        settings.providers.openai_base_url = provider;
        settings.providers.openai_api_key = creditd::config::Secret::new("bench-platform-key");
        settings.server.bind = "127.0.0.1:0".into();
        settings.clerk.jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
        settings.clerk.issuer = ISSUER.into();
        settings.byok.encryption_key = creditd::config::Secret::new(BENCH_BYOK_ENCRYPTION_KEY);
        // wrk is one address: the per-IP limit of token-less routes would
        // answer most no-op requests 429 and measure the limiter instead.
        settings.rate_limits.unauthenticated_per_ip_per_second = 100_000_000;
        let storage = creditd::app::Storage::on(database, &settings)
            .await
            .expect("storage");
        let app = creditd::app::Application::with_storage(settings.clone(), storage)
            .await
            .expect("build the app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        let server = actix_web::rt::spawn(app.run());

        save_byok_keys(&base, &key, users).await;
        let dir = common::bench_dir("bench-http-postgres");
        let (get_script, post_script, byok_script, etag_script) = (
            dir.join("get.lua"),
            dir.join("post.lua"),
            dir.join("byok.lua"),
            dir.join("etag.lua"),
        );
        let chat_body = dir.join("chat.json");
        std::fs::write(&chat_body, CHAT_BODY).expect("write the chat body");
        let (gateway_script, gateway_byok_script) =
            (dir.join("gateway.lua"), dir.join("gateway-byok.lua"));
        write_script(&gateway_script, &key, users, "POST", Some(GATEWAY_BODY), clerk_id);
        write_script(
            &gateway_byok_script,
            &key,
            users,
            "POST",
            Some(GATEWAY_BODY),
            byok_clerk_id,
        );
        write_script(&get_script, &key, users, "GET", None, clerk_id);
        write_script(&post_script, &key, users, "POST", Some(CHAT_BODY), clerk_id);
        write_script(
            &byok_script,
            &key,
            users,
            "POST",
            Some(CHAT_BODY),
            byok_clerk_id,
        );
        let script = |path: &str| {
            if path == "byok:/v1/chat/completions" {
                gateway_byok_script.clone()
            } else if path == "/v1/chat/completions" {
                gateway_script.clone()
            } else if path.starts_with("byok:") {
                byok_script.clone()
            } else if path.starts_with("etag:") {
                etag_script.clone()
            } else if method_of(path) == "POST" {
                post_script.clone()
            } else {
                get_script.clone()
            }
        };
        eprintln!(
            "server: {} workers, pool_size {}; wrk: {threads} threads, {users} users and {users} BYOK users",
            settings.server.workers, settings.database.pool_size
        );
        // Warm-up: every user's token verified once and every actor loaded.
        wrk(&base, "/api/credits", &script("/api/credits"), 2, connections, threads).await;
        wrk(&base, "byok:/api/chat", &script("byok:/api/chat"), 2, connections, threads).await;
        write_etag_script(&etag_script, &key, &etags(&base, &key, users).await);
        let mut runs = Vec::new();
        for &(connections, path) in &plan {
            let run = wrk(&base, path, &script(path), secs, connections, threads).await;
            eprintln!(
                "{path} at {connections}: {:.0} requests/s, p50 {}, p99 {}, failures {}",
                run.requests_per_s, run.p50, run.p99, run.failures
            );
            runs.push(run);
        }
        let rate_runs = paced_chats(&base, &key, &chat_body, &rates).await;
        handle.stop(true).await;
        server
            .await
            .expect("server task")
            .expect("server stopped cleanly");
        cluster.stop();
        (runs, rate_runs)
    });
    print(&runs);
    print_rates(&rate_runs);
    print_targets(&runs, &rate_runs);
}

fn label(path: &str) -> String {
    if let Some(path) = path.strip_prefix("byok:") {
        return format!("POST {path} (BYOK)");
    }
    if let Some(path) = path.strip_prefix("etag:") {
        return format!("GET {path} (If-None-Match: 304)");
    }
    format!("{} {path}", method_of(path))
}

fn print(runs: &[WrkRun]) {
    let best = |path: &str| {
        runs.iter()
            .filter(|run| run.path == path)
            .map(|run| run.requests_per_s)
            .fold(0.0, f64::max)
    };
    let noop = best("/healthz");
    let of_noop = |requests_per_s: f64| {
        if noop > 0.0 {
            format!("{:.0}%", requests_per_s / noop * 100.0)
        } else {
            "n/a".to_owned()
        }
    };
    println!();
    println!("| route | connections | requests/s | p50 | p99 | non-2xx | of /healthz |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            label(run.path),
            run.connections,
            run.requests_per_s,
            run.p50,
            run.p99,
            run.failures,
            of_noop(run.requests_per_s)
        );
    }
    println!();
    println!(
        "CPU during each run (cores busy on average; the machine has {} cores):",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| route | connections | server process | postgres | wrk | others | CPU µs per request (server + postgres) |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for run in runs {
        let cpu = run.cpu;
        let requests = run.requests_per_s * cpu.wall;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            label(run.path),
            run.connections,
            cpu.cores(cpu.bench),
            cpu.cores(cpu.postgres),
            cpu.cores(cpu.children),
            cpu.others(),
            (cpu.bench + cpu.postgres) * 1e6 / requests.max(1.0)
        );
    }
    println!();
    println!(
        "best GET /api/credits / best GET /healthz: {}",
        of_noop(best("/api/credits"))
    );
    println!("best POST /api/chat: {:.0} chats/s", best("/api/chat"));
    println!();
    println!("Metering overhead: platform chats against BYOK chats of the same body, same run:");
    println!();
    println!("| route, connections | platform chats/s | BYOK chats/s | platform of BYOK | platform p50 / p99 | BYOK p50 / p99 |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut pairs = runs.iter().zip(runs.iter().skip(1));
    for (platform, byok) in pairs.by_ref() {
        if byok.path.strip_prefix("byok:") == Some(platform.path)
            && platform.connections == byok.connections
        {
            println!(
                "| {} {} | {:.0} | {:.0} | {:.0}% | {} / {} | {} / {} |",
                platform.path,
                platform.connections,
                platform.requests_per_s,
                byok.requests_per_s,
                platform.requests_per_s / byok.requests_per_s.max(1.0) * 100.0,
                platform.p50,
                platform.p99,
                byok.p50,
                byok.p99
            );
        }
    }
}

/// Platform and BYOK chats at each fixed rate, side by side.
fn print_rates(runs: &[RateRun]) {
    if runs.is_empty() {
        return;
    }
    println!();
    println!("Fixed-rate chats (hey): platform against BYOK at each rate, same run:");
    println!();
    println!("| chats/s offered | answered/s platform / BYOK | platform p50 / p99 | BYOK p50 / p99 | added p50 / p99 | non-2xx | CPU µs per chat (server + postgres) platform / BYOK | context switches per chat platform / BYOK |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (platform, byok) in rate_pairs(runs) {
        let (p, b) = (&platform.measured, &byok.measured);
        println!(
            "| {:.0} | {:.0} / {:.0} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:+.2} / {:+.2} ms | {} | {:.0} / {:.0} | {:.1} / {:.1} |",
            p.offered_per_s,
            p.achieved_per_s,
            b.achieved_per_s,
            p.p50_ms,
            p.p99_ms,
            b.p50_ms,
            b.p99_ms,
            p.p50_ms - b.p50_ms,
            p.p99_ms - b.p99_ms,
            p.failures + b.failures,
            cpu_per_chat(p),
            cpu_per_chat(b),
            p.switches_per_request,
            b.switches_per_request
        );
    }
    println!();
    println!("The journal during the platform runs (its own counters, `/metrics`):");
    println!();
    println!("| chats/s offered | commits per chat | entries per commit | mean commit time | batches written again |");
    println!("|---:|---:|---:|---:|---:|");
    for (platform, _) in rate_pairs(runs) {
        let (journal, chats) = (platform.journal, platform.measured.answered);
        println!(
            "| {:.0} | {:.2} | {:.1} | {:.2} ms | {:.1}% |",
            platform.measured.offered_per_s,
            journal.commits / chats.max(1.0),
            journal.entries / journal.commits.max(1.0),
            journal.commit_seconds * 1e3 / journal.commits.max(1.0),
            journal.rewritten * 100.0 / journal.commits.max(1.0)
        );
    }
    let counted: Vec<_> = rate_pairs(runs)
        .filter_map(|(p, b)| {
            Some((
                p.measured.offered_per_s,
                p.measured.instructions_per_request?,
                b.measured.instructions_per_request?,
            ))
        })
        .collect();
    if counted.is_empty() {
        return;
    }
    println!();
    println!("Instructions per chat of the server's process (callgrind, user space), same runs:");
    println!();
    println!("| chats/s offered | platform | BYOK | added by metering |");
    println!("|---:|---:|---:|---:|");
    for (rate, platform, byok) in counted {
        println!(
            "| {rate:.0} | {:.0}k | {:.0}k | {:.0}k |",
            platform / 1e3,
            byok / 1e3,
            (platform - byok) / 1e3
        );
    }
}

/// Server and PostgreSQL CPU per answered chat, in µs.
fn cpu_per_chat(run: &common::hey::Paced) -> f64 {
    (run.cpu.bench + run.cpu.postgres) * 1e6 / run.answered.max(1.0)
}

/// Each platform run with the BYOK run that follows it at the same rate.
fn rate_pairs(runs: &[RateRun]) -> impl Iterator<Item = (&RateRun, &RateRun)> {
    runs.iter()
        .zip(runs.iter().skip(1))
        .filter(|(platform, byok)| {
            !platform.byok
                && byok.byok
                && platform.measured.offered_per_s == byok.measured.offered_per_s
        })
}

/// The ratios the targets of BENCHMARKS.md quote, each from two rows of
/// this run.
fn print_targets(runs: &[WrkRun], rate_runs: &[RateRun]) {
    println!();
    println!("Targets, each the ratio of two rows of this run:");
    let noop = runs.iter().find(|run| run.path == "/healthz");
    for (route, what) in [
        ("/api/credits", "GET /api/credits"),
        (
            "etag:/api/credits",
            "GET /api/credits with If-None-Match (304)",
        ),
    ] {
        let credits = runs.iter().find(|run| run.path == route);
        if let (Some(credits), Some(noop)) = (credits, noop) {
            println!(
                "- {what} of GET /healthz (first rows): {:.0}% ({:.0} vs {:.0} requests/s)",
                credits.requests_per_s / noop.requests_per_s.max(1.0) * 100.0,
                credits.requests_per_s,
                noop.requests_per_s
            );
        }
    }
    for (platform, byok) in runs.iter().zip(runs.iter().skip(1)) {
        if platform.path == "/api/chat"
            && byok.path == "byok:/api/chat"
            && platform.connections == byok.connections
        {
            println!(
                "- platform chats of BYOK chats at {} connections: {:.0}% ({:.0} vs {:.0} chats/s)",
                platform.connections,
                platform.requests_per_s / byok.requests_per_s.max(1.0) * 100.0,
                platform.requests_per_s,
                byok.requests_per_s
            );
        }
    }
    for (platform, byok) in rate_pairs(rate_runs) {
        let (p, b) = (&platform.measured, &byok.measured);
        println!(
            "- added latency of a platform chat at {:.0} chats/s: {:+.2} / {:+.2} ms at p50 / p99 ({:.2} / {:.2} vs BYOK {:.2} / {:.2} ms)",
            p.offered_per_s,
            p.p50_ms - b.p50_ms,
            p.p99_ms - b.p99_ms,
            p.p50_ms,
            p.p99_ms,
            b.p50_ms,
            b.p99_ms
        );
    }
}
