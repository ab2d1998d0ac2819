//! HTTP throughput of the real server: `GET /api/credits` (Clerk token
//! verified, balance from the account's actor, last transactions and usages
//! from PostgreSQL or the page cache) and `POST /api/chat` on the platform
//! key (a hold, a call to a local fake Anthropic server that answers at once,
//! a settlement: two durable journal entries), next to the no-op
//! `GET /healthz` and `GET /readyz` (one `SELECT 1`), at the same
//! concurrency, driven by `wrk`.
//!
//! `benches/run http` installs `wrk` when it is missing, or
//! `cargo bench --bench http` with `wrk` on PATH (`apt-get install wrk`).
//! Knobs (environment): BENCH_SECS (each run, default 5), BENCH_CONNECTIONS
//! (default 64), BENCH_WRK_THREADS (default 2), BENCH_USERS (distinct users,
//! each with its own session token, default 1000), BENCH_HISTORY (reserve+
//! settle cycles in each user's history, default 20), BENCH_ROUTES (the runs,
//! in order, default `/healthz,/api/credits,/api/chat,/readyz,/healthz,/api/credits,/api/chat`). Starts the app
//! in-process on a private durable cluster under `target/bench-http-postgres`
//! and a local JWKS server publishing the key that signs the tokens.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use creditd::config::Settings;
use creditd::db::Database;
use creditd::ledger::{store, AccountId, Engine, HoldId, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;

const ISSUER: &str = "https://clerk.creditd.bench";
const JWKS_PATH: &str = "/.well-known/jwks.json";
const KID: &str = "bench-key-1";

/// An RSA key of the bench's own, published by the local JWKS server as
/// Clerk publishes its keys.
struct SigningKey {
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl SigningKey {
    fn generate() -> SigningKey {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;

        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public = private.to_public_key();
        SigningKey {
            encoding: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: serde_json::json!({
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": KID,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    }

    /// A session token for `clerk_id`, valid for an hour.
    fn token(&self, clerk_id: &str) -> String {
        let now = chrono::Utc::now().timestamp();
        let claims = serde_json::json!({
            "sub": clerk_id,
            "iss": ISSUER,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 3600,
            "azp": "http://localhost:3000",
            "sid": "sess_bench",
        });
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(KID.to_owned());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("sign token")
    }
}

fn clerk_id(user: usize) -> String {
    format!("user_bench_{user}")
}

/// Every user with a top-up and `cycles` settled usages, written through an
/// engine of its own that is shut down before the app starts.
async fn seed_history(database: &Database, settings: &Settings, users: usize, cycles: usize) {
    let client = database.connect().await.expect("connect");
    let pool = database.pool(&settings.database).expect("pool");
    let engine = Arc::new(Engine::start(
        &settings.engine,
        &settings.journal,
        database.clone(),
        pool,
    ));
    let mut accounts = Vec::with_capacity(users);
    for user in 0..users {
        accounts.push(
            store::ensure_user(&client, &clerk_id(user))
                .await
                .expect("user"),
        );
    }
    for chunk in accounts.chunks(256) {
        let work = chunk.iter().map(|&account: &AccountId| {
            let engine = engine.clone();
            async move {
                let posting = Posting {
                    key: IdempotencyKey::parse(format!("bench-topup-{}", account.0)).expect("key"),
                    kind: TransactionType::TopUp,
                    amount: Micros::new(100_000_000),
                    description: None,
                    stripe_session_id: None,
                    stripe_payment_id: None,
                    metadata: None,
                };
                engine.credit(account, posting).await.expect("top-up");
                for _ in 0..cycles {
                    let hold = HoldId::generate();
                    engine
                        .reserve(account, hold, Micros::new(100_000))
                        .await
                        .expect("reserve");
                    engine
                        .settle(account, hold, common::charge())
                        .await
                        .expect("settle");
                }
            }
        });
        futures_util::future::join_all(work).await;
    }
    assert!(
        engine.shutdown(Duration::from_secs(30)).await,
        "seeding journal drained"
    );
}

/// The chat every `POST /api/chat` of the bench sends.
const CHAT_BODY: &str = r#"{"messages":[{"role":"user","content":"Add a login page"}],"model":"claude-haiku-4-5","maxTokens":256}"#;

/// What the fake Anthropic server answers: the Messages API's shape.
const ANTHROPIC_REPLY: &str = r#"{"id":"msg_bench","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"Done."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":40,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":20}}"#;

/// A wrk script sending each request with the next user's token; `POST`
/// routes send the chat body.
fn write_script(path: &Path, key: &SigningKey, users: usize, method: &str) {
    let tokens: Vec<String> = (0..users)
        .map(|user| format!("  \"{}\",", key.token(&clerk_id(user))))
        .collect();
    let body = if method == "POST" {
        format!("[[{CHAT_BODY}]]")
    } else {
        "nil".to_owned()
    };
    let script = format!(
        "local tokens = {{\n{}\n}}\nlocal i = 0\nrequest = function()\n  i = i + 1\n  \
         return wrk.format(\"{method}\", nil, {{ [\"Authorization\"] = \"Bearer \" .. tokens[(i % #tokens) + 1], \
         [\"Content-Type\"] = \"application/json\" }}, {body})\nend\n",
        tokens.join("\n")
    );
    std::fs::write(path, script).expect("write the wrk script");
}

fn method_of(path: &str) -> &'static str {
    if path == "/api/chat" {
        "POST"
    } else {
        "GET"
    }
}

/// A local Anthropic Messages API that answers every call at once.
fn fake_anthropic() -> (String, actix_web::dev::Server) {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let server = HttpServer::new(|| {
        App::new().route(
            "/v1/messages",
            web::post().to(|| async {
                HttpResponse::Ok()
                    .content_type("application/json")
                    .body(ANTHROPIC_REPLY)
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
    cpu: common::Cpu,
    requests_per_s: f64,
    p50: String,
    p99: String,
    failures: u64,
}

/// The value after `label` on the first line that starts with it.
fn field<'a>(output: &'a str, label: &str) -> Option<&'a str> {
    output.lines().find_map(|line| {
        line.trim()
            .strip_prefix(label)
            .map(|rest| rest.split_whitespace().next().unwrap_or(""))
    })
}

async fn wrk(
    base: &str,
    path: &'static str,
    script: &Path,
    secs: u64,
    connections: usize,
    threads: usize,
) -> WrkRun {
    let started = std::time::Instant::now();
    let cpu_before = common::Cpu::now(started);
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(format!("{base}{path}"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}): install it with `apt-get install wrk`"));
    let cpu = common::Cpu::now(started).since(cpu_before);
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "wrk failed: {text}");
    let failures = field(&text, "Non-2xx or 3xx responses:")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    WrkRun {
        path,
        cpu,
        requests_per_s: field(&text, "Requests/sec:")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no Requests/sec in wrk output: {text}")),
        p50: field(&text, "50%").unwrap_or("?").to_owned(),
        p99: field(&text, "99%").unwrap_or("?").to_owned(),
        failures,
    }
}

fn main() {
    let secs: u64 = common::env_or("BENCH_SECS", 5);
    let connections: usize = common::env_or("BENCH_CONNECTIONS", 64);
    let threads: usize = common::env_or("BENCH_WRK_THREADS", 2);
    let users: usize = common::env_or("BENCH_USERS", 1000);
    let history: usize = common::env_or("BENCH_HISTORY", 20);
    let routes: &'static str = common::env_or(
        "BENCH_ROUTES",
        "/healthz,/api/credits,/api/chat,/readyz,/healthz,/api/credits,/api/chat".to_owned(),
    )
    .leak();
    let mut settings = Settings::default_file().expect("default config");
    settings.log.level = "warn".into();
    let system = actix_web::rt::System::new();
    let runs = system.block_on(async move {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, ResponseTemplate};

        let cluster = common::start_cluster("bench-http-postgres").await;
        let database = common::create_database(&cluster, "bench_http", &settings.database).await;
        seed_history(&database, &settings, users, history).await;

        let key = SigningKey::generate();
        let jwks = wiremock::MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(JWKS_PATH))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(serde_json::json!({ "keys": [key.jwk] })),
            )
            .mount(&jwks)
            .await;
        let (provider, provider_server) = fake_anthropic();
        actix_web::rt::spawn(provider_server);
        settings.providers.anthropic_base_url = provider;
        settings.providers.anthropic_api_key = creditd::config::Secret::new("bench-platform-key");
        settings.server.bind = "127.0.0.1:0".into();
        settings.clerk.jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
        settings.clerk.issuer = ISSUER.into();
        let storage = creditd::app::Storage::on(database, &settings)
            .await
            .expect("storage");
        let app = creditd::app::Application::with_storage(settings.clone(), storage)
            .await
            .expect("build the app");
        let base = format!("http://127.0.0.1:{}", app.port());
        let handle = app.handle();
        let server = actix_web::rt::spawn(app.run());

        let dir = common::bench_dir("bench-http-postgres");
        let (get_script, post_script) = (dir.join("get.lua"), dir.join("post.lua"));
        write_script(&get_script, &key, users, "GET");
        write_script(&post_script, &key, users, "POST");
        let script = |path: &str| {
            if method_of(path) == "POST" {
                post_script.clone()
            } else {
                get_script.clone()
            }
        };
        eprintln!(
            "server: {} workers, pool_size {}; wrk: {threads} threads, {connections} connections, {users} users",
            settings.server.workers, settings.database.pool_size
        );
        // Warm-up: every user's token verified once and every actor loaded.
        wrk(&base, "/api/credits", &script("/api/credits"), 2, connections, threads).await;
        let mut runs = Vec::new();
        for path in routes.split(',') {
            let run = wrk(&base, path, &script(path), secs, connections, threads).await;
            eprintln!(
                "{path}: {:.0} requests/s, p50 {}, p99 {}, failures {}",
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
    print(&runs, connections);
}

fn print(runs: &[WrkRun], connections: usize) {
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
            "| {} {} | {} | {:.0} | {} | {} | {} | {} |",
            method_of(run.path),
            run.path,
            connections,
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
    println!("| route | server process | postgres | wrk | others | CPU µs per request (server + postgres) |");
    println!("|---|---:|---:|---:|---:|---:|");
    for run in runs {
        let cpu = run.cpu;
        let requests = run.requests_per_s * cpu.wall;
        println!(
            "| {} {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} |",
            method_of(run.path),
            run.path,
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
}
