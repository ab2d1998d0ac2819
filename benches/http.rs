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
//! `connections:route` where route is a path, `byok:/api/chat` or
//! `byok:/v1/chat/completions`; default
//! in `DEFAULT_RUNS`). Starts the app
//! in-process on a private durable cluster under `target/bench-http-postgres`
//! and a local JWKS server publishing the key that signs the tokens.

mod common;

use std::path::Path;

use common::users::{clerk_id, seed_history, write_script, SigningKey, ISSUER, JWKS_PATH};
use creditd::config::Settings;

fn byok_clerk_id(user: usize) -> String {
    format!("user_bench_byok_{user}")
}

/// The runs when BENCH_RUNS is not set: the page and the no-op routes at 64
/// connections, then platform and BYOK chats side by side at 64 and at 256.
const DEFAULT_RUNS: &str = "64:/healthz,64:/api/credits,64:/readyz,\
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

/// The URL path of a run's route (`byok:/api/chat` is `/api/chat`).
fn url_path(route: &str) -> &str {
    route.strip_prefix("byok:").unwrap_or(route)
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

fn main() {
    let secs: u64 = common::env_or("BENCH_SECS", 5);
    let threads: usize = common::env_or("BENCH_WRK_THREADS", 2);
    let users: usize = common::env_or("BENCH_USERS", 1000);
    let history: usize = common::env_or("BENCH_HISTORY", 20);
    let plan: &'static str = common::env_or("BENCH_RUNS", DEFAULT_RUNS.to_owned()).leak();
    let plan: Vec<(usize, &'static str)> = plan
        .split(',')
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
    let mut settings = Settings::default_file().expect("default config");
    settings.log.level = "warn".into();
    let system = actix_web::rt::System::new();
    let runs = system.block_on(async move {
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
        let (get_script, post_script, byok_script) = (
            dir.join("get.lua"),
            dir.join("post.lua"),
            dir.join("byok.lua"),
        );
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
        let mut runs = Vec::new();
        for &(connections, path) in &plan {
            let run = wrk(&base, path, &script(path), secs, connections, threads).await;
            eprintln!(
                "{path} at {connections}: {:.0} requests/s, p50 {}, p99 {}, failures {}",
                run.requests_per_s, run.p50, run.p99, run.failures
            );
            runs.push(run);
        }
        handle.stop(true).await;
        server
            .await
            .expect("server task")
            .expect("server stopped cleanly");
        cluster.stop();
        runs
    });
    print(&runs);
}

fn label(path: &str) -> String {
    match path.strip_prefix("byok:") {
        Some(path) => format!("POST {path} (BYOK)"),
        None => format!("{} {path}", method_of(path)),
    }
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
