//! Test support: one throwaway PostgreSQL cluster per test binary (or the
//! server at `DATABASE_URL`), a migrated template database, and a fresh
//! database per test cloned from it.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use creditd::config::Settings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::singleton::Election;
use creditd::db::{self, Database};
use creditd::ledger::{AccountId, Engine, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;
use tokio_postgres::NoTls;

mod clerk;
pub mod providers;
pub mod stripe;
mod svix;

pub use clerk::*;
pub use providers::*;
pub use svix::*;

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
        let Ok(pid) = pid.split('-').next().unwrap_or_default().parse::<i32>() else {
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
    // Singletons start within a fraction of a second (after their grace).
    settings.cluster.singleton_check_ms = 100;
    settings
}

/// `engine` once its account listener listens. Its first LISTEN drops
/// every resident account (copies loaded before it may have missed a
/// notification), so a test that ran operations before it would, on a
/// loaded machine, see its actors dropped under it. The listener runs on
/// the engine's own thread: this one may wait for it blocking.
pub(crate) fn listening(engine: Engine) -> Engine {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !engine.listening() {
        assert!(
            std::time::Instant::now() < deadline,
            "the engine's account listener did not listen within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    engine
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
        listening(Engine::start(
            &settings.engine,
            &settings.journal,
            database,
            pool,
        ))
    }

    /// An engine reading the time from `clock`.
    pub fn engine_with_clock(&self, settings: &Settings, clock: creditd::clock::Clock) -> Engine {
        let database = self.database(settings);
        let pool = database.pool(&settings.database).expect("pool");
        listening(Engine::start_with_clock(
            &settings.engine,
            &settings.journal,
            database,
            pool,
            clock,
        ))
    }

    /// How the instance `instance` elects its singletons on this database.
    pub fn election(&self, settings: &Settings, instance: &str) -> Election {
        Election {
            database: self.database(settings),
            instance: instance.into(),
            check: std::time::Duration::from_millis(settings.cluster.singleton_check_ms),
        }
    }

    /// An engine that is the instance `instance` among those sharing
    /// this database (two in one test: two instances).
    pub fn engine_as(&self, settings: &Settings, instance: &str) -> Engine {
        let database = self.database(settings);
        let pool = database.pool(&settings.database).expect("pool");
        let mut cluster = settings.cluster.clone();
        cluster.instance_id = instance.into();
        listening(Engine::start_in_cluster(
            &settings.engine,
            &settings.journal,
            (database, pool),
            (
                creditd::clock::Clock::system(),
                creditd::app::alert_thresholds(&settings.credits),
            ),
            creditd::ledger::cluster::ClusterRole::from_settings(&cluster),
        ))
    }

    /// A new user (and balance row) named by its Clerk id.
    pub async fn user(&self, clerk_id: &str) -> AccountId {
        let client = self.client().await;
        creditd::accounts::users::ensure_user(&client, clerk_id)
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
        expires_at: None,
    }
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// The real service on port 0, on a fresh database, trusting a local JWKS.
pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub jwks: wiremock::MockServer,
    pub http: reqwest::Client,
    pub settings: Settings,
    handle: actix_web::dev::ServerHandle,
    /// What SIGTERM starts: `/readyz` fails, the balance streams end, the
    /// server stops gracefully.
    pub drain: creditd::app::Drain,
}

/// Starts the app with the test settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the app after `adjust` changed the test settings.
pub async fn spawn_app_with(adjust: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_on_clock(creditd::clock::Clock::system(), adjust).await
}

/// As `spawn_app_with`, the engine reading the time from `clock`.
pub async fn spawn_app_on_clock(
    clock: creditd::clock::Clock,
    adjust: impl FnOnce(&mut Settings),
) -> TestApp {
    let db = TestDb::new().await;
    let jwks = jwks_server().await;
    let mut settings = settings();
    settings.server.bind = "127.0.0.1:0".into();
    settings.server.workers = 2;
    settings.clerk.jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
    settings.clerk.issuer = ISSUER.into();
    settings.admin.token = creditd::config::Secret::new(ADMIN_TOKEN);
    adjust(&mut settings);
    let database = db.database(&settings);
    let (address, handle, drain) = start_app_draining(database, &settings, clock).await;
    TestApp {
        address,
        db,
        jwks,
        http: reqwest::Client::new(),
        settings,
        handle,
        drain,
    }
}

/// Runs the real app on `database`; returns its base URL.
pub async fn start_app(
    database: Database,
    settings: &Settings,
) -> (String, actix_web::dev::ServerHandle) {
    start_app_on_clock(database, settings, creditd::clock::Clock::system()).await
}

/// As `start_app`, the engine reading the time from `clock`.
pub async fn start_app_on_clock(
    database: Database,
    settings: &Settings,
    clock: creditd::clock::Clock,
) -> (String, actix_web::dev::ServerHandle) {
    let (address, handle, _) = start_app_draining(database, settings, clock).await;
    (address, handle)
}

/// As `start_app_on_clock`, with the app's drain (what SIGTERM starts).
pub async fn start_app_draining(
    database: Database,
    settings: &Settings,
    clock: creditd::clock::Clock,
) -> (String, actix_web::dev::ServerHandle, creditd::app::Drain) {
    let mut storage = creditd::app::Storage::on(database, settings)
        .await
        .expect("storage");
    storage.clock = clock;
    let app = creditd::app::Application::with_storage(settings.clone(), storage)
        .await
        .expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let drain = app.drain();
    let engine = app.engine();
    actix_web::rt::spawn(async move {
        if let Err(error) = app.run().await {
            eprintln!("test app stopped: {error:#}");
        }
    });
    until_listening(&engine).await;
    (address, handle, drain)
}

/// Waits until the app's account listener listens, as a balancer waits
/// for `/readyz` before sending an instance traffic: its first LISTEN
/// drops every resident account, and a test's first operations must not
/// race it on a loaded machine.
async fn until_listening(engine: &Engine) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !engine.listening() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the app's account listener did not listen within 20 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// A PostgreSQL cluster of a test's own, for tests that stop the database.
pub async fn own_cluster(name: &str) -> PrivateCluster {
    let dir = std::env::temp_dir().join(format!("creditd-test-{}-{name}", std::process::id()));
    tokio::task::spawn_blocking(move || PrivateCluster::start(&dir, Durability::Throwaway))
        .await
        .expect("start task")
        .expect("the cluster starts")
}

/// Settings for an app on a test's own cluster that fails fast when it stops.
pub fn outage_settings(jwks: &wiremock::MockServer) -> Settings {
    let mut settings = settings();
    settings.server.bind = "127.0.0.1:0".into();
    settings.clerk.jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
    settings.clerk.issuer = ISSUER.into();
    settings.admin.token = creditd::config::Secret::new(ADMIN_TOKEN);
    settings.database.connect_timeout_ms = 500;
    settings.database.pool_wait_timeout_ms = 500;
    settings.database.health_check_interval_ms = 200;
    settings.engine.call_timeout_ms = 1_500;
    settings
}

impl TestApp {
    /// The Prometheus text `/metrics` answers.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics");
        assert_eq!(response.status(), 200);
        response.text().await.expect("metrics text")
    }

    /// A valid session token for `clerk_id`, signed by the primary key.
    pub fn token(&self, clerk_id: &str) -> String {
        primary_key().sign(&self.claims(clerk_id))
    }

    /// Claims of a token valid now for five minutes.
    pub fn claims(&self, clerk_id: &str) -> serde_json::Value {
        let now = chrono::Utc::now().timestamp();
        serde_json::json!({
            "sub": clerk_id,
            "iss": ISSUER,
            "iat": now,
            "nbf": now - 10,
            "exp": now + 300,
            "azp": "http://localhost:3000",
            "sid": "sess_test",
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// `GET path` as `clerk_id`.
    pub async fn get_as(&self, clerk_id: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(self.token(clerk_id))
            .send()
            .await
            .expect("request")
    }

    /// `POST path` with a JSON body as `clerk_id`.
    pub async fn post_as(
        &self,
        clerk_id: &str,
        path: &str,
        body: &serde_json::Value,
    ) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(self.token(clerk_id))
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// A request with the admin token.
    /// An operator's 1 € debit of `clerk_id` (key `debt`), which puts a new
    /// account into debt: its low-balance and depleted events; asserts 201.
    pub async fn operator_debt(&self, clerk_id: &str) {
        let response = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/accounts/{clerk_id}/credits"),
            )
            .json(&serde_json::json!({"amountMicros": -1_000_000, "key": "debt", "reason": "chargeback"}))
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        assert_eq!(status, 201, "{}", response.text().await.unwrap_or_default());
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// The account id of a Clerk user (created if new).
    pub async fn account(&self, clerk_id: &str) -> AccountId {
        self.db.user(clerk_id).await
    }

    /// Another instance of the app, named `instance`, on this app's
    /// database and settings (its own JWKS stand-in serving the same keys).
    pub async fn peer(&self, instance: &str) -> TestApp {
        let db = TestDb {
            config: self.db.config.clone(),
        };
        let jwks = jwks_server().await;
        let mut settings = self.settings.clone();
        settings.cluster.instance_id = instance.into();
        settings.clerk.jwks_url = format!("{}{JWKS_PATH}", jwks.uri());
        let (address, handle, drain) = start_app_draining(
            db.database(&settings),
            &settings,
            creditd::clock::Clock::system(),
        )
        .await;
        TestApp {
            address,
            db,
            jwks,
            http: reqwest::Client::new(),
            settings,
            handle,
            drain,
        }
    }

    /// Stops the server and flushes its journal.
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }
}

/// The JSON body of a response, with its status.
pub async fn json_of(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("body is not JSON (status {status}): {text}"));
    (status, value)
}

impl TestDb {
    /// A key=value connection string for this database, for child processes.
    pub fn url(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Unix(path)) => path.display().to_string(),
            Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let mut url = format!(
            "host={host} port={port} dbname={}",
            self.config.get_dbname().unwrap_or("postgres")
        );
        if let Some(user) = self.config.get_user() {
            url.push_str(&format!(" user={user}"));
        }
        if let Some(password) = self.config.get_password() {
            url.push_str(&format!(" password={}", String::from_utf8_lossy(password)));
        }
        url
    }
}

/// The tables `count` counts rows of, each with its own query.
const COUNTS: [(&str, &str); 2] = [
    (
        "credit_holds",
        "SELECT count(*) FROM credit_holds t JOIN users u ON u.id = t.user_id WHERE u.clerk_id = $1",
    ),
    (
        "credit_usages",
        "SELECT count(*) FROM credit_usages t JOIN users u ON u.id = t.user_id WHERE u.clerk_id = $1",
    ),
];

/// Rows of a table for one account.
pub async fn count(app: &TestApp, table: &str, clerk_id: &str) -> i64 {
    let (_, sql) = COUNTS
        .iter()
        .find(|(name, _)| *name == table)
        .unwrap_or_else(|| panic!("no count query for table `{table}`"));
    let client = app.db.client().await;
    client
        .query_one(*sql, &[&clerk_id])
        .await
        .expect("count rows")
        .get(0)
}

/// A database cut off from its app by `cut_database`, until `restore`.
pub struct Cut {
    admin: tokio_postgres::Client,
    database: String,
}

impl Cut {
    /// Lets connections to the database back in.
    pub async fn restore(&self) {
        self.admin
            .execute(
                "UPDATE pg_database SET datallowconn = true WHERE datname = $1",
                &[&self.database],
            )
            .await
            .expect("let connections back");
    }
}

/// Cuts the app's database off (no new connections, every backend ended).
pub async fn cut_database(app: &TestApp) -> Cut {
    let database = app.db.config.get_dbname().unwrap().to_owned();
    let mut maintenance = app.db.config.clone();
    maintenance.dbname("postgres");
    let admin = connect(&maintenance).await.unwrap();
    // `ALTER DATABASE … ALLOW_CONNECTIONS false`, with the name as a parameter.
    admin
        .execute(
            "UPDATE pg_database SET datallowconn = false WHERE datname = $1",
            &[&database],
        )
        .await
        .expect("refuse new connections");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&database],
        )
        .await
        .expect("end every connection");
    Cut { admin, database }
}

/// Waits until `sql` (a count) answers `expected`, polling the database.
pub async fn wait_for_count(app: &TestApp, sql: &str, expected: i64) {
    let client = app.db.client().await;
    for _ in 0..500 {
        let found: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if found == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("`{sql}` never reached {expected}");
}
