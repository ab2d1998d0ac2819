//! Wiring: logging, the services a command needs, the HTTP application and
//! the command-line operations.

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::config::{LogFormat, LogSettings, Settings};
use crate::db::{self, Database};
use crate::http;
use crate::ledger::cluster::ClusterRole;
use crate::ledger::outbox::AlertThresholds;
use crate::ledger::{self, Engine, IdempotencyKey, Posting, TransactionType};
use crate::money::Micros;
use crate::runtime::Runtime;

pub fn init_logging(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The process-wide Prometheus recorder (installed once).
pub fn metrics_handle() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .and_then(|builder| builder.install_recorder())
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))
}

/// The database, migrated, with its pool.
pub struct Storage {
    pub database: Database,
    pub pool: deadpool_postgres::Pool,
    /// The engine's clock: the system's, unless a test sets its own.
    pub clock: crate::clock::Clock,
}

impl Storage {
    /// The configured database, or the private cluster.
    pub async fn open(settings: &Settings) -> anyhow::Result<Storage> {
        Storage::on(Database::locate(&settings.database)?, settings).await
    }

    /// Migrates `database` and opens its pool.
    pub async fn on(database: Database, settings: &Settings) -> anyhow::Result<Storage> {
        let mut client = database
            .connect()
            .await
            .context("cannot connect to PostgreSQL")?;
        let applied = db::migrate(&mut client).await?;
        if !applied.is_empty() {
            tracing::info!(?applied, "migrations applied");
        }
        let pool = database.pool(&settings.database)?;
        Ok(Storage {
            database,
            pool,
            clock: crate::clock::Clock::system(),
        })
    }

    pub fn engine(&self, settings: &Settings) -> Engine {
        Engine::start_in_cluster(
            &settings.engine,
            &settings.journal,
            (self.database.clone(), self.pool.clone()),
            (self.clock.clone(), alert_thresholds(&settings.credits)),
            ClusterRole::from_settings(&settings.cluster),
        )
    }
}

/// The balance alerts' thresholds, from cents in the settings.
pub fn alert_thresholds(credits: &crate::config::CreditsSettings) -> AlertThresholds {
    let micros = |cents: i64| Micros::new(cents.saturating_mul(crate::money::MICROS_PER_CENT));
    AlertThresholds {
        low: micros(credits.low_balance_cents),
        rearm: micros(credits.low_balance_rearm_cents),
        recharge_monthly_max_cents: credits.auto_recharge_monthly_cents_max,
    }
}

/// The auto-recharge payment worker's settings.
fn recharge_worker_settings(settings: &Settings) -> crate::recharge::WorkerSettings {
    crate::recharge::WorkerSettings {
        interval: Duration::from_millis(
            u64::try_from(settings.credits.auto_recharge_poll_interval_ms).unwrap_or(1000),
        ),
        monthly_max_cents: settings.credits.auto_recharge_monthly_cents_max,
        attempt_timeout: Duration::from_secs(settings.recharge.attempt_timeout_s),
        call_timeout: Duration::from_millis(settings.stripe.timeout_ms),
    }
}

/// How this instance's singletons are elected (`cluster.*`).
fn election(storage: &Storage, settings: &Settings) -> crate::db::singleton::Election {
    crate::db::singleton::Election {
        database: storage.database.clone(),
        instance: settings.cluster.instance(),
        check: Duration::from_millis(settings.cluster.singleton_check_ms),
    }
}

/// Every service the handlers call, each built once: the edge receives
/// them and holds no pool of its own.
fn services(
    runtime: Runtime,
    engine: &Arc<Engine>,
    pool: &db::Pool,
    stripe: Option<Arc<crate::stripe::StripeApi>>,
    metrics: PrometheusHandle,
) -> anyhow::Result<http::Services> {
    let Runtime {
        settings,
        prices,
        tokenizers,
        cipher: byok,
        clerk_webhook_key,
        signup_bonus,
        referral_bonus,
    } = runtime;
    let clerk = Arc::new(crate::clerk::tokens::ClerkVerifier::new(
        settings.clerk.clone(),
    )?);
    let providers = crate::providers::ProviderClient::new(&settings.providers)?;
    let settlements = Arc::new(crate::metering::Settlements::new(
        settings.chat.pending_settlements_max,
    ));
    let rate_limits = Arc::new(crate::rate_limits::RateLimits::new(&settings.rate_limits));
    let chats = Arc::new(crate::metering::Chats {
        engine: engine.clone(),
        providers: providers.clone(),
        router: crate::metering::Router {
            prices: prices.clone(),
            providers: providers.clone(),
            cipher: byok.clone(),
        },
        settlements: settlements.clone(),
        rate_limits: rate_limits.clone(),
        tokenizers,
        settings: settings.chat.clone(),
    });
    let health = Arc::new(crate::health::Health::new(Duration::from_millis(
        settings.database.health_check_interval_ms,
    )));
    let users = Arc::new(crate::accounts::Users::new(pool.clone()));
    let signup_bonuses =
        crate::accounts::SignupBonuses::new(engine.clone(), pool.clone(), signup_bonus);
    let auto_recharges = crate::recharge::store::AutoRecharges::new(pool.clone(), engine.clone());
    let stripe_effects = Arc::new(crate::payments::webhook::StripeEffects {
        settings: settings.stripe.clone(),
        referral_bonus,
        engine: engine.clone(),
        pool: pool.clone(),
        api: stripe.clone(),
    });
    let clerk_effects = Arc::new(crate::accounts::clerk_events::ClerkEffects {
        users: users.clone(),
        signup_bonuses: signup_bonuses.clone(),
        auto_recharges: auto_recharges.clone(),
    });
    Ok(http::Services {
        engine: engine.clone(),
        prices,
        metrics,
        clerk,
        stripe,
        providers,
        byok,
        clerk_webhook_key,
        referral_bonus,
        settlements,
        rate_limits,
        chats,
        health,
        users,
        inbox: crate::webhooks::Inbox::new(pool.clone()),
        history: ledger::LedgerHistory::new(pool.clone()),
        referrals: crate::referrals::Referrals::new(pool.clone()),
        provider_keys: crate::accounts::ProviderKeys::new(pool.clone()),
        api_keys: crate::api_keys::ApiKeys::new(pool.clone()),
        signup_bonuses,
        topups: crate::payments::topup::TopUps::new(pool.clone()),
        events: crate::events::store::Events::new(pool.clone()),
        emails: crate::email::store::Emails::new(pool.clone()),
        operators: crate::operators::OperatorLog::new(pool.clone()),
        auto_recharges,
        usage_reports: crate::metering::UsageReports::new(pool.clone()),
        stripe_effects,
        clerk_effects,
        settings,
    })
}

/// The HTTP service bound to its listener, ready to run.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    engine: Arc<Engine>,
    settlements: Arc<crate::metering::Settlements>,
    storage: Storage,
    shutdown_timeout: Duration,
    /// Delivers the outbox's events (none without `events.webhook_url`).
    sender: Option<tokio::task::JoinHandle<()>>,
    /// Sends the outbox's alert and receipt emails (none without
    /// `email.smtp_url`).
    mailer: Option<tokio::task::JoinHandle<()>>,
    /// Pays the auto-recharge attempts (none without Stripe).
    recharge: Option<tokio::task::JoinHandle<()>>,
    /// Saves paid top-ups' cards and reads their invoice links (none
    /// without Stripe).
    followups: Option<tokio::task::JoinHandle<()>>,
    /// `/readyz`'s state, failed on SIGTERM.
    health: Arc<crate::health::Health>,
    /// How long to keep serving after SIGTERM (`cluster.drain_s`).
    drain: Duration,
}

impl Application {
    /// Opens the database, starts the engine and binds `server.bind`
    /// (port 0 picks a free port).
    pub async fn build(runtime: Runtime) -> anyhow::Result<Application> {
        let storage = Storage::open(&runtime.settings).await?;
        let listener = bind(&runtime.settings)?;
        Application::with_runtime(runtime, storage, listener).await
    }

    /// As `build`, on a database chosen by the caller (tests).
    pub async fn with_storage(settings: Settings, storage: Storage) -> anyhow::Result<Application> {
        let listener = bind(&settings)?;
        Application::with_listener(settings, storage, listener).await
    }

    /// As `with_storage`, on a listener the caller bound (the demo needs
    /// its address before the settings are final).
    pub async fn with_listener(
        settings: Settings,
        storage: Storage,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        let runtime = Runtime::build(settings).map_err(anyhow::Error::msg)?;
        Application::with_runtime(runtime, storage, listener).await
    }

    /// As `with_listener`, with the settings already built into their
    /// values (`Runtime`, once at startup).
    pub async fn with_runtime(
        runtime: Runtime,
        storage: Storage,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        let settings = runtime.settings.clone();
        let metrics = metrics_handle()?;
        let engine = Arc::new(storage.engine(&settings));
        let credited = crate::ledger::TransactionType::CREDITS.map(|kind| kind.as_str());
        crate::telemetry::describe(&runtime.prices, &credited);
        crate::email::describe_metrics();
        let port = listener.local_addr()?.port();
        // One Stripe client for the handlers and both Stripe workers.
        let stripe = crate::stripe::StripeApi::new(&settings.stripe)?.map(Arc::new);
        let services = services(runtime, &engine, &storage.pool, stripe.clone(), metrics)?;
        let state = http::AppState::new(services);
        let settlements = state.settlements.clone();
        let health = state.health.clone();
        crate::health::start(storage.database.clone(), &state.health).await;
        crate::clerk::tokens::spawn_jwks_refresh(&state.clerk);
        let election = election(&storage, &settings);
        let sender =
            crate::events::spawn_sender(election.clone(), storage.pool.clone(), &settings.events)?;
        let mailer =
            crate::email::spawn_sender(election.clone(), storage.pool.clone(), &settings.email)?;
        let recharge = stripe.clone().map(|api| {
            crate::recharge::spawn_worker(
                election.clone(),
                storage.pool.clone(),
                engine.clone(),
                api,
                recharge_worker_settings(&settings),
            )
        });
        let followups = stripe.map(|api| {
            crate::payments::followup::spawn_worker(
                election.clone(),
                storage.pool.clone(),
                api,
                &settings.stripe,
            )
        });
        let server = http::server(state, listener, &settings)?;
        Ok(Application {
            port,
            server,
            engine,
            settlements,
            storage,
            shutdown_timeout: Duration::from_secs(settings.server.shutdown_timeout_s),
            sender,
            mailer,
            recharge,
            followups,
            health,
            drain: Duration::from_secs(settings.cluster.drain_s),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The ledger engine the service runs on (for a caller that waits
    /// until its account listener listens, as `/readyz` does).
    pub fn engine(&self) -> Arc<Engine> {
        self.engine.clone()
    }

    /// Stops the server gracefully (as SIGTERM does).
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// What SIGTERM starts, to start without the signal.
    pub fn drain(&self) -> Drain {
        Drain {
            server: self.server.handle(),
            health: self.health.clone(),
            engine: self.engine.clone(),
            wait: self.drain,
        }
    }

    /// Serves until SIGINT/SIGTERM or `handle().stop(true)`: then stops
    /// accepting, finishes in-flight requests, flushes the journal and
    /// stops the private PostgreSQL.
    pub async fn run(self) -> anyhow::Result<()> {
        let drain = actix_web::rt::spawn(drain_on_signal(self.drain()));
        let served = self.server.await;
        drain.abort();
        served.context("HTTP server failed")?;
        tracing::info!("server stopped; settling the chats still in flight");
        if !self.settlements.drain(self.shutdown_timeout).await {
            tracing::error!(
                in_flight = self.settlements.in_flight(),
                "platform chats still unsettled at the shutdown timeout"
            );
        }
        if let Some(recharge) = &self.recharge {
            recharge.abort();
        }
        if let Some(followups) = &self.followups {
            // Open follow-ups stay in their rows for the next start.
            followups.abort();
        }
        if let Some(sender) = &self.sender {
            // Undelivered events stay in the outbox for the next start.
            sender.abort();
        }
        if let Some(mailer) = &self.mailer {
            // Unsent emails stay pending for the next start.
            mailer.abort();
        }
        tracing::info!("flushing the journal");
        if !self.engine.shutdown(self.shutdown_timeout).await {
            tracing::error!("the journal did not drain before the shutdown timeout");
        }
        if let Some(cluster) = &self.storage.database.cluster {
            cluster.stop();
        }
        Ok(())
    }
}

/// An instance's drain: fails `/readyz` at once, keeps serving for
/// `cluster.drain_s` while the balancer moves this instance's accounts
/// elsewhere, ends the balance streams (their clients reconnect, through
/// the balancer, to another instance; the graceful stop does not wait for
/// them), then stops the server gracefully (no new connections, requests
/// in flight finished).
#[derive(Clone)]
pub struct Drain {
    server: actix_web::dev::ServerHandle,
    health: Arc<crate::health::Health>,
    engine: Arc<Engine>,
    wait: Duration,
}

impl Drain {
    /// Runs the drain to its end: the server stopped.
    pub async fn run(self) {
        self.health.start_draining();
        tracing::info!(
            drain_s = self.wait.as_secs(),
            "stopping: /readyz fails, serving while the balancer moves accounts"
        );
        tokio::time::sleep(self.wait).await;
        self.engine.close_watches();
        self.server.stop(true).await;
    }
}

/// Drains on SIGTERM (or SIGINT).
async fn drain_on_signal(drain: Drain) {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(terminate) => terminate,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
                drain.engine.close_watches();
                drain.server.stop(true).await;
                return;
            }
        };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drain.run().await;
}

/// Binds `server.bind` (port 0 picks a free port).
fn bind(settings: &Settings) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&settings.server.bind)
        .with_context(|| format!("cannot bind server.bind = {}", settings.server.bind))
}

pub fn serve(runtime: Runtime) -> anyhow::Result<ExitCode> {
    actix_web::rt::System::new().block_on(async move {
        let app = Application::build(runtime).await?;
        tracing::info!(port = app.port(), "creditd listening");
        app.run().await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_migrate(settings: Settings) -> anyhow::Result<ExitCode> {
    actix_web::rt::System::new().block_on(async move {
        let database = Database::locate(&settings.database)?;
        let mut client = database
            .connect()
            .await
            .context("cannot connect to PostgreSQL")?;
        let applied = db::migrate(&mut client).await?;
        if applied.is_empty() {
            println!("schema up to date");
        } else {
            println!("applied migrations {applied:?}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn run_reconcile(settings: Settings) -> anyhow::Result<ExitCode> {
    actix_web::rt::System::new().block_on(async move {
        let storage = Storage::open(&settings).await?;
        let mut client = storage.database.connect().await?;
        let report = ledger::reconcile::reconcile(&mut client).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        Ok(if report.clean {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })
}

pub fn run_grant(
    settings: Settings,
    user: &str,
    amount: &str,
    reason: &str,
    key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let amount = Micros::parse_decimal(amount).map_err(|e| anyhow::anyhow!("--amount: {e}"))?;
    if amount.get() == 0 {
        bail!("--amount: must not be zero");
    }
    let key = key.unwrap_or_else(|| format!("cli:grant:{}", uuid::Uuid::new_v4()));
    let key = IdempotencyKey::parse(key).map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    actix_web::rt::System::new().block_on(async move {
        let storage = Storage::open(&settings).await?;
        let client = storage.pool.get().await?;
        let account = crate::accounts::users::ensure_user(&**client, user).await?;
        let engine = storage.engine(&settings);
        let posting = Posting {
            key,
            kind: TransactionType::Adjustment,
            amount: Micros::new(amount.get().abs()),
            description: Some(reason.to_owned()),
            stripe_session_id: None,
            stripe_payment_id: None,
            metadata: None,
            expires_at: None,
        };
        let outcome = if amount.is_positive() {
            engine.credit(account, posting).await?
        } else {
            engine.debit(account, posting).await?
        };
        engine.shutdown(Duration::from_secs(5)).await;
        println!("{}", serde_json::to_string_pretty(&outcome.record)?);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn run_balance(settings: Settings, user: &str) -> anyhow::Result<ExitCode> {
    actix_web::rt::System::new().block_on(async move {
        let storage = Storage::open(&settings).await?;
        let client = storage.pool.get().await?;
        let Some(account) = crate::accounts::users::find_user(&**client, user).await? else {
            bail!("no user with Clerk id {user}");
        };
        let engine = storage.engine(&settings);
        let snapshot = engine.balance(account).await?;
        engine.shutdown(Duration::from_secs(5)).await;
        println!("{}", serde_json::to_string_pretty(&snapshot)?);
        Ok(ExitCode::SUCCESS)
    })
}
