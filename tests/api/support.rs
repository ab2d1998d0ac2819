//! Test support: one throwaway PostgreSQL cluster per test binary (or the
//! server at `DATABASE_URL`), a migrated template database, and a fresh
//! database per test cloned from it.

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use creditd::config::Settings;
use creditd::db::cluster::{Durability, PrivateCluster};
use creditd::db::{self, Database};
use creditd::ledger::store;
use creditd::ledger::{AccountId, Engine, IdempotencyKey, Posting, TransactionType};
use creditd::money::Micros;
use tokio_postgres::NoTls;

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
    settings
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
        Engine::start(&settings.engine, &settings.journal, database, pool)
    }

    /// A new user (and balance row) named by its Clerk id.
    pub async fn user(&self, clerk_id: &str) -> AccountId {
        let client = self.client().await;
        store::ensure_user(&client, clerk_id)
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
    }
}

/// A signing key of the test's own, published by a local JWKS server as
/// Clerk publishes its keys.
pub struct SigningKey {
    pub kid: String,
    encoding: jsonwebtoken::EncodingKey,
    pub jwk: serde_json::Value,
}

impl SigningKey {
    /// A fresh 2048-bit RSA key (generated once per test binary per `kid`).
    pub fn generate(kid: &str) -> SigningKey {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;

        let mut rng = rand::thread_rng();
        let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key");
        let der = private.to_pkcs1_der().expect("PKCS#1 DER");
        let public = private.to_public_key();
        SigningKey {
            kid: kid.to_owned(),
            encoding: jsonwebtoken::EncodingKey::from_rsa_der(der.as_bytes()),
            jwk: serde_json::json!({
                "kty": "RSA",
                "use": "sig",
                "alg": "RS256",
                "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
        }
    }

    /// Signs `claims` with RS256 under this key's `kid`.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

/// The key every test app trusts first (RSA generation is slow: once per binary).
pub fn primary_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate("test-key-1"))
}

pub const ISSUER: &str = "https://clerk.creditd.test";
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The real service on port 0, on a fresh database, trusting a local JWKS.
pub struct TestApp {
    pub address: String,
    pub db: TestDb,
    pub jwks: wiremock::MockServer,
    pub http: reqwest::Client,
    pub settings: Settings,
    handle: actix_web::dev::ServerHandle,
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
    let (address, handle) = start_app_on_clock(database, &settings, clock).await;
    TestApp {
        address,
        db,
        jwks,
        http: reqwest::Client::new(),
        settings,
        handle,
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
    let mut storage = creditd::app::Storage::on(database, settings)
        .await
        .expect("storage");
    storage.clock = clock;
    let app = creditd::app::Application::with_storage(settings.clone(), storage)
        .await
        .expect("build app");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    actix_web::rt::spawn(async move {
        if let Err(error) = app.run().await {
            eprintln!("test app stopped: {error:#}");
        }
    });
    (address, handle)
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

/// A local JWKS server publishing the primary key.
pub async fn jwks_server() -> wiremock::MockServer {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, ResponseTemplate};

    let jwks = wiremock::MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(JWKS_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "keys": [primary_key().jwk] })),
        )
        .mount(&jwks)
        .await;
    jwks
}

impl TestApp {
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
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// The account id of a Clerk user (created if new).
    pub async fn account(&self, clerk_id: &str) -> AccountId {
        self.db.user(clerk_id).await
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
