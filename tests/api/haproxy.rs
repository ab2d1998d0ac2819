//! Three real `creditd serve` on one PostgreSQL behind the real HAProxy
//! (Debian's `/usr/sbin/haproxy`) running the shipped `deploy/haproxy.cfg`,
//! its ports and servers rewritten in a copy and nothing else changed but
//! an admin socket and a response header naming the server (to read and
//! drive the ring). A mixed load runs through the balancer for the whole
//! test while instances are restarted, killed and taken out of the ring.
//!
//! Without `haproxy` the test fails, saying to install it: CI installs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::support::stripe::{checkout_session, event, signed_header, WEBHOOK_SECRET};
use crate::support::*;

const HAPROXY: &str = "/usr/sbin/haproxy";
const INSTANCES: usize = 3;
/// Accounts the steady load spreads over.
const ACCOUNTS: usize = 60;
/// Concurrent clients of the steady load.
const CLIENTS: usize = 8;
/// Chats through the balancer during the ring change: `OVERSPEND_FACTOR`
/// times the holds each account's balance covers.
const HOLDS_COVERED: usize = 2;
const OVERSPEND_FACTOR: usize = 4;
const OVERSPEND_ACCOUNTS: usize = 8;

/// The outside services the instances reach by URL.
struct Outside {
    jwks: MockServer,
    anthropic: MockServer,
    stripe: MockServer,
}

/// Clerk's JWKS, an Anthropic answering every chat (streamed or not) with
/// the same usage a little later, and a Stripe API answering nothing known
/// (top-up follow-ups retry later; they are not under test here).
async fn outside() -> Outside {
    let anthropic = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(body_partial_json(json!({ "stream": true })))
        .respond_with(
            sse_response(anthropic_stream(&["cluster", " answer"], 40, 12, 0, 0))
                .set_delay(Duration::from_millis(30)),
        )
        .with_priority(1)
        .mount(&anthropic)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(anthropic_message("cluster answer", 40, 12, 0, 0))
                .set_delay(Duration::from_millis(30)),
        )
        .mount(&anthropic)
        .await;
    Outside {
        jwks: jwks_server().await,
        anthropic,
        stripe: MockServer::start().await,
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

fn token(clerk_id: &str) -> String {
    let now = chrono::Utc::now().timestamp();
    primary_key().sign(&json!({
        "sub": clerk_id, "iss": ISSUER, "iat": now, "nbf": now - 10, "exp": now + 3600,
    }))
}

/// One `creditd serve` process, killed if the test ends while it runs.
struct Instance {
    name: String,
    port: u16,
    child: Option<Child>,
}

impl Instance {
    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self, db: &TestDb, outside: &Outside) {
        let child = Command::new(env!("CARGO_BIN_EXE_creditd"))
            .arg("serve")
            .env("CREDITD__DATABASE__URL", db.url())
            .env("CREDITD__DATABASE__POOL_SIZE", "4")
            .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{}", self.port))
            .env("CREDITD__SERVER__WORKERS", "1")
            .env("CREDITD__ENGINE__ARBITERS", "1")
            .env("CREDITD__CLUSTER__INSTANCE_ID", &self.name)
            .env(
                "CREDITD__CLERK__JWKS_URL",
                format!("{}{JWKS_PATH}", outside.jwks.uri()),
            )
            .env("CREDITD__CLERK__ISSUER", ISSUER)
            .env(
                "CREDITD__PROVIDERS__ANTHROPIC_BASE_URL",
                outside.anthropic.uri(),
            )
            .env(
                "CREDITD__PROVIDERS__ANTHROPIC_API_KEY",
                PLATFORM_ANTHROPIC_KEY,
            )
            .env("CREDITD__STRIPE__API_BASE", outside.stripe.uri())
            .env("CREDITD__STRIPE__SECRET_KEY", "sk_test_creditd_0123456789")
            .env("CREDITD__STRIPE__WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("CREDITD__CREDITS__SIGNUP_BONUS_CENTS", "0")
            .env("CREDITD__RATE_LIMITS__CHATS_IN_FLIGHT_PER_ACCOUNT", "64")
            .env(
                "CREDITD__RATE_LIMITS__UNAUTHENTICATED_PER_IP_PER_SECOND",
                "10000",
            )
            .env("CREDITD__ADMIN__TOKEN", ADMIN_TOKEN)
            .env("CREDITD__LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start creditd");
        self.child = Some(child);
    }

    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("a running instance");
        // SAFETY: a plain signal to a child this test started.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("a running instance");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The HAProxy process, killed when the test ends.
struct Balancer {
    child: Child,
    front: String,
    socket: PathBuf,
    /// HAProxy's own messages, shown when it does not come up.
    log: PathBuf,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Balancer {
    /// One command on the admin socket; its answer.
    async fn command(&self, command: &str) -> std::io::Result<String> {
        let mut stream = tokio::net::UnixStream::connect(&self.socket).await?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    }

    /// HAProxy's view of `server`: `UP`, `DOWN`, `MAINT`, `UP 1/2`…
    async fn status(&self, server: &str) -> String {
        // Not yet listening while HAProxy starts: no status yet.
        let stats = self.command("show stat").await.unwrap_or_default();
        stats
            .lines()
            .map(|line| line.split(',').collect::<Vec<_>>())
            .find(|fields| fields.len() > 17 && fields[0] == "creditd" && fields[1] == server)
            .map(|fields| fields[17].to_owned())
            .unwrap_or_default()
    }

    async fn until_status(&self, server: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status(server).await;
            if status == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy sees {server} {status:?}, not {expected}; haproxy said: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The shipped configuration with the front end on `front`, the servers
/// on `ports`, an admin socket and a header naming the server that
/// answered; every other line as shipped.
fn rewritten_config(front: u16, ports: &[u16], socket: &Path) -> String {
    let shipped = include_str!("../../deploy/haproxy.cfg");
    let mut server = 0;
    let mut config = String::new();
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("maxconn ") {
            // The shipped maxconn needs twice as many descriptors as a
            // test machine may allow: HAProxy would refuse to start.
            config += "    maxconn 4000\n";
        } else if trimmed.starts_with("bind 127.0.0.1:8080") {
            config += &format!("    bind 127.0.0.1:{front}\n");
        } else if trimmed.starts_with("server creditd") {
            server += 1;
            config += &format!(
                "    server creditd{server} 127.0.0.1:{} check\n",
                ports[server - 1]
            );
        } else {
            config += line;
            config += "\n";
        }
        if trimmed == "global" {
            config += &format!("    stats socket {} level admin\n", socket.display());
        }
        if trimmed == "backend creditd" {
            config += "    http-response set-header x-creditd-server %s\n";
        }
    }
    assert_eq!(
        server,
        ports.len(),
        "the shipped config lists three servers"
    );
    config
}

fn start_balancer(ports: &[u16]) -> Balancer {
    assert!(
        Path::new(HAPROXY).exists(),
        "{HAPROXY} is missing: the cluster test needs HAProxy (Debian: `apt-get install haproxy`)"
    );
    let dir = std::env::temp_dir().join(format!(
        "creditd-haproxy-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("haproxy directory");
    let socket = dir.join("admin.sock");
    let front = free_port();
    let config = dir.join("haproxy.cfg");
    std::fs::write(&config, rewritten_config(front, ports, &socket)).expect("write haproxy.cfg");
    let log = dir.join("haproxy.log");
    let child = Command::new(HAPROXY)
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("haproxy log"))
        .spawn()
        .expect("start haproxy");
    Balancer {
        child,
        front: format!("http://127.0.0.1:{front}"),
        socket,
        log,
    }
}

/// What the load saw.
#[derive(Default)]
struct Seen {
    /// Requests through the balancer answered as expected, and the others
    /// (their time and what they got).
    answered: usize,
    failed: Vec<(Instant, String)>,
    /// Admin credits and top-ups acknowledged by an instance: idempotency
    /// key → amount in micros.
    acknowledged: BTreeMap<String, i64>,
    /// Chats answered 200 (streamed: their `done` event arrived), by
    /// message id: the credits their answer showed.
    chats: BTreeMap<String, i64>,
}

/// Shared between the load and the test: who may take direct posts.
struct Load {
    http: reqwest::Client,
    front: String,
    /// Bases of the instances that are up (direct posts go to one of them).
    up: Mutex<Vec<String>>,
    accounts: Vec<(String, i64)>,
    seen: Mutex<Seen>,
    stop: AtomicBool,
}

impl Load {
    fn failed(&self, what: String) {
        lock(&self.seen).failed.push((Instant::now(), what));
    }

    fn random_instance(&self) -> Option<String> {
        let up = lock(&self.up);
        (!up.is_empty()).then(|| up[rand::thread_rng().gen_range(0..up.len())].clone())
    }

    /// Failures since `since`.
    fn failures_since(&self, since: Instant) -> Vec<(Instant, String)> {
        lock(&self.seen)
            .failed
            .iter()
            .filter(|(at, _)| *at >= since)
            .cloned()
            .collect()
    }
}

async fn chat_through(load: &Load, user: &str, message: &str, stream: bool) {
    let sent = load
        .http
        .post(format!("{}/api/chat", load.front))
        .bearer_auth(token(user))
        .json(&json!({
            "messages": [{ "role": "user", "content": "cluster" }],
            "maxTokens": 64,
            "messageId": message,
            "stream": stream,
        }))
        .timeout(Duration::from_secs(20))
        .send()
        .await;
    let response = match sent {
        Ok(response) if response.status() == 200 => response,
        Ok(response) => return load.failed(format!("chat {}", response.status())),
        Err(error) => return load.failed(format!("chat: {error}")),
    };
    let used = if stream {
        match response.text().await {
            Ok(text) => text
                .split("\n\n")
                .find(|frame| frame.starts_with("event: done"))
                .and_then(|frame| frame.lines().find_map(|l| l.strip_prefix("data: ")))
                .and_then(|data| serde_json::from_str::<Value>(data).ok())
                .and_then(|data| data["credits"]["usedMicros"].as_i64()),
            Err(_) => None,
        }
    } else {
        response
            .json::<Value>()
            .await
            .ok()
            .and_then(|body| body["credits"]["usedMicros"].as_i64())
    };
    match used {
        Some(used) => {
            let mut seen = lock(&load.seen);
            seen.answered += 1;
            seen.chats.insert(message.to_owned(), used);
        }
        None => load.failed(format!("chat {message} cut")),
    }
}

async fn balance_through(load: &Load, user: &str) {
    let sent = load
        .http
        .get(format!("{}/api/credits", load.front))
        .bearer_auth(token(user))
        .timeout(Duration::from_secs(10))
        .send()
        .await;
    match sent {
        Ok(response) if response.status() == 200 => lock(&load.seen).answered += 1,
        Ok(response) => load.failed(format!("balance {}", response.status())),
        Err(error) => load.failed(format!("balance: {error}")),
    }
}

/// An admin credit or a paid Checkout's webhook posted to an instance
/// directly; recorded only when acknowledged.
async fn post_direct(load: &Load, account: i64, user: &str, tag: &str, top_up: bool) {
    let Some(base) = load.random_instance() else {
        return;
    };
    let (request, key, amount) = if top_up {
        let session = format!("cs_{tag}");
        let body = event(
            &format!("evt_{tag}"),
            "checkout.session.completed",
            checkout_session(&session, account, 500, "paid"),
        )
        .to_string();
        let request = load
            .http
            .post(format!("{base}/api/webhooks/stripe"))
            .header("content-type", "application/json")
            .header("Stripe-Signature", signed_header(&body))
            .body(body);
        (request, format!("stripe:checkout:{session}"), 5_000_000)
    } else {
        let request = load
            .http
            .post(format!("{base}/admin/accounts/{user}/credits"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"amountMicros": 10_000, "key": tag, "reason": "cluster load"}));
        (request, format!("admin:{tag}"), 10_000)
    };
    let sent = request.timeout(Duration::from_secs(10)).send().await;
    if matches!(sent.map(|r| r.status().as_u16()), Ok(200 | 201)) {
        lock(&load.seen).acknowledged.insert(key, amount);
    }
}

/// One client of the steady load until told to stop.
async fn client(load: Arc<Load>, client: usize) {
    for n in 0.. {
        if load.stop.load(Ordering::Relaxed) {
            return;
        }
        let pick = rand::thread_rng().gen_range(0..load.accounts.len());
        let (user, account) = load.accounts[pick].clone();
        let tag = format!("load-{client}-{n}");
        match n % 10 {
            0..=2 => chat_through(&load, &user, &tag, false).await,
            3..=5 => chat_through(&load, &user, &tag, true).await,
            6 | 7 => balance_through(&load, &user).await,
            8 => post_direct(&load, account, &user, &tag, false).await,
            _ => post_direct(&load, account, &user, &tag, true).await,
        }
    }
}

async fn until_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await {
            if response.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{base} never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn admin_credit(http: &reqwest::Client, base: &str, user: &str, key: &str, amount: i64) {
    let response = http
        .post(format!("{base}/admin/accounts/{user}/credits"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"amountMicros": amount, "key": key, "reason": "cluster test"}))
        .send()
        .await
        .expect("admin credit");
    assert!(
        response.status().is_success(),
        "admin credit {key}: {}",
        response.status()
    );
}

/// A chat through the balancer: its status and the server that answered.
async fn probe_chat(http: &reqwest::Client, front: &str, user: &str) -> (u16, String) {
    let response = http
        .post(format!("{front}/api/chat"))
        .bearer_auth(token(user))
        .json(&json!({ "messages": [{ "role": "user", "content": "cluster" }], "maxTokens": 64 }))
        .send()
        .await
        .expect("chat through the balancer");
    let server = response
        .headers()
        .get("x-creditd-server")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (response.status().as_u16(), server)
}

async fn stored_balances(db: &TestDb, users: &[String]) -> Vec<i64> {
    db.client()
        .await
        .query(
            "SELECT b.balance_micros FROM credit_balances b JOIN users u ON u.id = b.user_id
              WHERE u.clerk_id = ANY($1)",
            &[&users],
        )
        .await
        .expect("stored balances")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[actix::test]
async fn behind_haproxy_three_instances_serve_a_moved_credit_roll_and_crash_without_losing_an_acknowledged_request(
) {
    let db = TestDb::new().await;
    let outside = outside().await;
    let http = reqwest::Client::new();
    let mut instances: Vec<Instance> = (1..=INSTANCES)
        .map(|n| Instance {
            name: format!("creditd{n}"),
            port: free_port(),
            child: None,
        })
        .collect();
    let mut accounts = Vec::new();
    for n in 0..ACCOUNTS {
        let user = format!("user_hp_{n}");
        accounts.push((user.clone(), db.user(&user).await.0));
    }
    for instance in &mut instances {
        instance.start(&db, &outside);
    }
    for instance in &instances {
        until_ready(&http, &instance.base()).await;
    }
    let ports: Vec<u16> = instances.iter().map(|i| i.port).collect();
    let balancer = start_balancer(&ports);
    for instance in &instances {
        balancer.until_status(&instance.name, "UP").await;
    }
    for (user, _) in &accounts {
        admin_credit(
            &http,
            &instances[0].base(),
            user,
            &format!("fund-{user}"),
            1_000_000_000,
        )
        .await;
    }

    let load = Arc::new(Load {
        http: http.clone(),
        front: balancer.front.clone(),
        up: Mutex::new(instances.iter().map(Instance::base).collect()),
        accounts,
        seen: Mutex::default(),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| actix_web::rt::spawn(client(load.clone(), n)))
        .collect();
    let started = Instant::now();
    while lock(&load.seen).answered < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the load never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        load.failures_since(started).is_empty(),
        "a steady ring failed requests: {:?}",
        load.failures_since(started)
    );

    // A credit landing elsewhere: the next chat through the balancer is served.
    let broke = "user_hp_broke";
    db.user(broke).await;
    admin_credit(&http, &instances[0].base(), broke, "broke-fund", 1).await;
    let (refused, owner) = probe_chat(&http, &balancer.front, broke).await;
    assert_eq!(refused, 402, "a chat on 1 µ€ is refused");
    let elsewhere = instances
        .iter()
        .find(|instance| instance.name != owner)
        .expect("another instance");
    admin_credit(&http, &elsewhere.base(), broke, "broke-topup", 5_000_000).await;
    let credited = Instant::now();
    let mut refusals_after_credit = 0;
    loop {
        let (status, _) = probe_chat(&http, &balancer.front, broke).await;
        if status == 200 {
            break;
        }
        refusals_after_credit += 1;
        assert!(
            credited.elapsed() < Duration::from_secs(2),
            "{owner} still refuses ({status}) {refusals_after_credit} chats after 5 € credited on {}",
            elsewhere.name
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let served_after = credited.elapsed();
    // The billing page's read, through the balancer, shows the credit.
    let page: serde_json::Value = http
        .get(format!("{}/api/credits", balancer.front))
        .bearer_auth(token(broke))
        .send()
        .await
        .expect("the balance page's read")
        .json()
        .await
        .expect("its JSON");
    let stored = stored_balances(&db, &[broke.to_owned()]).await[0];
    assert!(stored > 4_000_000, "5 € credited, one chat spent: {stored}");
    assert_eq!(
        page["balanceMicros"], stored,
        "the balance page through the balancer shows the credit made elsewhere"
    );

    // Rolling restart, one at a time: the load sees no failure.
    let rolling = Instant::now();
    for instance in instances.iter_mut() {
        let base = instance.base();
        lock(&load.up).retain(|up| *up != base);
        instance.signal(libc::SIGTERM);
        let status = instance.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "{} drained and exited {status}",
            instance.name
        );
        instance.start(&db, &outside);
        until_ready(&http, &base).await;
        balancer.until_status(&instance.name, "UP").await;
        lock(&load.up).push(base);
    }
    let rolling_took = rolling.elapsed();
    let rolling_failures = load.failures_since(rolling);
    assert!(
        rolling_failures.is_empty(),
        "the rolling restart failed {} requests: {:?}",
        rolling_failures.len(),
        rolling_failures
    );

    // SIGKILL of one instance: count what fails, and for how long.
    let killed = Instant::now();
    let base = instances[1].base();
    lock(&load.up).retain(|up| *up != base);
    instances[1].signal(libc::SIGKILL);
    instances[1].wait_exit(Duration::from_secs(5)).await;
    balancer.until_status(&instances[1].name, "DOWN").await;
    let marked_down = killed.elapsed();
    instances[1].start(&db, &outside);
    until_ready(&http, &base).await;
    balancer.until_status(&instances[1].name, "UP").await;
    lock(&load.up).push(base);
    let kill_failures = load.failures_since(killed);
    let kill_window = match (kill_failures.first(), kill_failures.last()) {
        (Some(first), Some(last)) => last.0 - first.0,
        _ => Duration::ZERO,
    };
    assert!(
        kill_failures
            .iter()
            .all(|(at, _)| *at - killed < marked_down + Duration::from_secs(1)),
        "requests failed after HAProxy marked the killed instance down: {kill_failures:?}"
    );

    // No overspend beyond the bound during a ring change.
    let hold_micros: i64 = db
        .client()
        .await
        .query_one("SELECT max(amount_micros) FROM credit_holds", &[])
        .await
        .expect("a hold amount")
        .get(0);
    let overspenders: Vec<String> = (0..OVERSPEND_ACCOUNTS)
        .map(|n| format!("user_hp_over_{n}"))
        .collect();
    let mut moved = Vec::new();
    for user in &overspenders {
        db.user(user).await;
        let covered = hold_micros * HOLDS_COVERED as i64;
        admin_credit(
            &http,
            &instances[0].base(),
            user,
            &format!("over-{user}"),
            covered,
        )
        .await;
        let response = http
            .get(format!("{}/api/credits", balancer.front))
            .bearer_auth(token(user))
            .send()
            .await
            .expect("balance read");
        if response
            .headers()
            .get("x-creditd-server")
            .and_then(|v| v.to_str().ok())
            == Some("creditd3")
        {
            moved.push(user.clone());
        }
    }
    let watching = Arc::new(AtomicBool::new(true));
    let minimum = {
        let (watching, config, users) = (watching.clone(), db.config.clone(), overspenders.clone());
        actix_web::rt::spawn(async move {
            let client = connect(&config).await.expect("watch connection");
            let mut minimum = i64::MAX;
            while watching.load(Ordering::Relaxed) {
                let rows = client
                    .query(
                        "SELECT min(b.balance_micros) FROM credit_balances b
                           JOIN users u ON u.id = b.user_id WHERE u.clerk_id = ANY($1)",
                        &[&users],
                    )
                    .await
                    .expect("minimum balance");
                if let Some(seen) = rows.first().and_then(|row| row.get::<_, Option<i64>>(0)) {
                    minimum = minimum.min(seen);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            minimum
        })
    };
    let (client_http, front) = (&http, balancer.front.as_str());
    let chats = overspenders.iter().flat_map(|user| {
        (0..HOLDS_COVERED * OVERSPEND_FACTOR)
            .map(move |_| async move { (user, probe_chat(client_http, front, user).await.0) })
    });
    let burst = futures_util::future::join_all(chats);
    let ring_change = async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        balancer
            .command("set server creditd/creditd3 state maint")
            .await
            .expect("take creditd3 out of the ring")
    };
    let (answers, _) = tokio::join!(burst, ring_change);
    balancer
        .command("set server creditd/creditd3 state ready")
        .await
        .expect("put creditd3 back");
    balancer.until_status("creditd3", "UP").await;
    watching.store(false, Ordering::Relaxed);
    let stored_minimum = minimum.await.expect("watcher").min(
        *stored_balances(&db, &overspenders)
            .await
            .iter()
            .min()
            .unwrap_or(&0),
    );
    let mut admitted: BTreeMap<String, usize> = BTreeMap::new();
    for (user, status) in &answers {
        if *status == 200 {
            *admitted.entry((*user).clone()).or_default() += 1;
        }
    }
    let most_admitted = admitted.values().copied().max().unwrap_or(0);
    let bound = -(hold_micros * HOLDS_COVERED as i64);
    assert!(
        stored_minimum >= bound,
        "a stored balance went to {stored_minimum}, below minus the holds of one owner ({bound})"
    );

    // Stop the load; every acknowledged request is stored exactly once.
    load.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("load client");
    }
    let seen = std::mem::take(&mut *lock(&load.seen));
    let client = db.client().await;
    let keys: Vec<String> = seen.acknowledged.keys().cloned().collect();
    let stored: BTreeMap<String, (i64, i64)> = client
        .query(
            "SELECT idempotency_key, count(*), sum(amount_micros)::int8 FROM credit_transactions
              WHERE idempotency_key = ANY($1) GROUP BY idempotency_key",
            &[&keys],
        )
        .await
        .expect("stored transactions")
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    for (key, amount) in &seen.acknowledged {
        assert_eq!(stored.get(key), Some(&(1, *amount)), "acknowledged {key}");
    }
    let messages: Vec<String> = seen.chats.keys().cloned().collect();
    let charged: BTreeMap<String, (i64, i64)> = client
        .query(
            "SELECT message_id, count(*), sum(cost_micros)::int8 FROM credit_usages
              WHERE message_id = ANY($1) GROUP BY message_id",
            &[&messages],
        )
        .await
        .expect("stored usages")
        .iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    for (message, used) in &seen.chats {
        assert_eq!(
            charged.get(message),
            Some(&(1, *used)),
            "answered chat {message}"
        );
    }
    db.reconcile_is_clean().await;
    println!(
        "haproxy cluster: {} requests answered through the balancer, {} chats, {} credits and \
         top-ups acknowledged; a credit elsewhere served after {served_after:?} \
         ({refusals_after_credit} refusals); rolling restart {rolling_took:?}, 0 failed; \
         SIGKILL: {} failed over {kill_window:?}, marked down after {marked_down:?}; \
         ring change: hold {hold_micros} µ€, {HOLDS_COVERED} covered, at most {most_admitted} of \
         {} admitted per account ({} of {OVERSPEND_ACCOUNTS} accounts moved), stored minimum \
         {stored_minimum} µ€ (bound {bound})",
        seen.answered,
        seen.chats.len(),
        seen.acknowledged.len(),
        kill_failures.len(),
        HOLDS_COVERED * OVERSPEND_FACTOR,
        moved.len(),
    );
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
