//! `creditd demo`: the whole product on one machine, with no outside
//! account. creditd runs as in production (real PostgreSQL in a private
//! cluster, real engine, real token and webhook verification); the outside
//! services are replaced by local stand-ins that speak their real protocols
//! to the real code paths:
//!
//! - [`identity`]: a sign-in page issuing RS256 session tokens from a key
//!   made at start, published as a JWKS that creditd verifies like Clerk's,
//!   and set as Clerk's `__session` cookie;
//! - [`stripe`]: Stripe's customer and Checkout Session API, and a checkout
//!   page whose "Payer" sends creditd a Stripe-signed
//!   `checkout.session.completed`;
//! - [`anthropic`]: Anthropic's Messages API (JSON and SSE) answering with
//!   an echo, for the `demo-echo` model, priced like a real model, so a chat
//!   is held and charged per token;
//! - [`smtp`] and [`mailbox`]: an SMTP server receiving creditd's alert and
//!   receipt emails, and the "Boîte mail" page that shows them (the
//!   sign-in tells creditd each person's address by a Svix-signed
//!   `user.updated`, as Clerk does).
//!
//! Loopback only; every page says it is a demo; refused when a real key or
//! database is configured. The demo's keys and secrets are made at start
//! and live only in memory.

mod anthropic;
mod identity;
mod mailbox;
mod pages;
pub mod smtp;
mod stripe;

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::app::{Application, Storage};
use crate::config::{Secret, Settings};
use crate::db::Database;

/// The model the demo's chat box uses, answered by the echo stand-in.
pub const DEMO_MODEL: &str = "demo-echo";
/// The real model whose prices `demo-echo` takes.
const PRICED_LIKE: &str = "claude-sonnet-4-5";

/// What the stand-ins share: their own URL, creditd's, and the demo's
/// secrets (made at start, never written anywhere).
pub(crate) struct Shared {
    pub stand_ins_url: String,
    pub creditd_url: String,
    pub stripe_secret_key: String,
    pub stripe_webhook_secret: String,
    pub anthropic_api_key: String,
    /// The Clerk webhook secret (`whsec_…`) the sign-in signs with.
    pub clerk_webhook_secret: String,
    pub identity: identity::Issuer,
    /// What the demo's SMTP server received.
    pub mailbox: smtp::Mailbox,
    pub stripe: stripe::Ledger,
    pub http: reqwest::Client,
}

/// A running demo: creditd and its stand-ins.
pub struct Demo {
    pub application: Application,
    /// creditd's base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// The sign-in page.
    pub sign_in_url: String,
    /// The "Boîte mail" page.
    pub mailbox_url: String,
    stand_ins: actix_web::dev::ServerHandle,
    /// The SMTP server creditd mails to (closed when the demo ends).
    smtp: smtp::SmtpServer,
}

/// Refuses settings that reach anything real: the demo must never charge a
/// card, call a paid provider or write into a real database.
pub fn refuse_real_services(settings: &Settings) -> anyhow::Result<()> {
    let configured: Vec<&str> = [
        ("stripe.secret_key", !settings.stripe.secret_key.is_empty()),
        (
            "stripe.webhook_secret",
            !settings.stripe.webhook_secret.is_empty(),
        ),
        (
            "providers.anthropic_api_key",
            !settings.providers.anthropic_api_key.is_empty(),
        ),
        (
            "providers.openai_api_key",
            !settings.providers.openai_api_key.is_empty(),
        ),
        ("clerk.jwks_url", !settings.clerk.jwks_url.is_empty()),
        (
            "clerk_webhook.signing_secret",
            !settings.clerk_webhook.signing_secret.is_empty(),
        ),
        ("database.url", !settings.database.url.is_empty()),
        (
            "events.webhook_url",
            !settings.events.webhook_url.is_empty(),
        ),
        (
            "events.signing_secret",
            !settings.events.signing_secret.is_empty(),
        ),
        // A real mail server would mail the demo's made-up addresses.
        ("email.smtp_url", !settings.email.smtp_url.is_empty()),
    ]
    .into_iter()
    .filter_map(|(key, set)| set.then_some(key))
    .collect();
    if !configured.is_empty() {
        bail!(
            "the demo runs only with local stand-ins, but real services are configured: {} (unset them, e.g. the CREDITD__… environment variables)",
            configured.join(", ")
        );
    }
    Ok(())
}

/// The listener of creditd, on a loopback address only.
fn loopback_listener(bind: &str) -> anyhow::Result<TcpListener> {
    let address: SocketAddr = bind
        .parse()
        .with_context(|| format!("server.bind = {bind}: not an IP address and port"))?;
    if !address.ip().is_loopback() {
        bail!("server.bind = {bind}: the demo listens on a loopback address only (e.g. 127.0.0.1:8080)");
    }
    TcpListener::bind(address).with_context(|| format!("cannot bind server.bind = {bind}"))
}

fn secret(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

impl Demo {
    /// Starts the stand-ins, then creditd on `settings.server.bind`
    /// (loopback; port 0 picks one) over `storage`.
    pub async fn start(mut settings: Settings, storage: Storage) -> anyhow::Result<Demo> {
        refuse_real_services(&settings)?;
        let listener = loopback_listener(&settings.server.bind)?;
        let creditd_url = format!("http://{}", listener.local_addr()?);
        let stand_ins_listener =
            TcpListener::bind("127.0.0.1:0").context("cannot bind the demo's stand-ins")?;
        let stand_ins_url = format!("http://{}", stand_ins_listener.local_addr()?);
        let identity = tokio::task::spawn_blocking({
            let issuer = stand_ins_url.clone();
            move || identity::Issuer::generate(issuer)
        })
        .await
        .context("key generation stopped")??;
        let shared = Arc::new(Shared {
            stand_ins_url: stand_ins_url.clone(),
            creditd_url: creditd_url.clone(),
            stripe_secret_key: secret("sk_test_demo_"),
            stripe_webhook_secret: secret("whsec_demo_"),
            anthropic_api_key: secret("sk-ant-demo-"),
            clerk_webhook_secret: svix_secret(),
            identity,
            mailbox: smtp::Mailbox::default(),
            stripe: stripe::Ledger::default(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()?,
        });
        let smtp = smtp::SmtpServer::start(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            shared.mailbox.clone(),
        )
        .await
        .context("cannot start the demo's SMTP server")?;
        configure(&mut settings, &shared, &smtp)?;
        let stand_ins = serve_stand_ins(shared.clone(), stand_ins_listener)?;
        let application = Application::with_listener(settings, storage, listener).await?;
        Ok(Demo {
            application,
            url: creditd_url,
            sign_in_url: identity::sign_in_url(&shared),
            mailbox_url: mailbox::mailbox_url(&shared),
            stand_ins,
            smtp,
        })
    }

    /// Serves until SIGINT/SIGTERM (or the application's handle stops it).
    pub async fn run(self) -> anyhow::Result<()> {
        let result = self.application.run().await;
        self.stand_ins.stop(true).await;
        self.smtp.stop();
        result
    }
}

/// A Svix signing secret: `whsec_` and 32 random bytes in base64.
fn svix_secret() -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|id| id.as_bytes().to_vec())
        .collect();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Points creditd at the stand-ins, with the demo's secrets.
fn configure(
    settings: &mut Settings,
    shared: &Shared,
    smtp: &smtp::SmtpServer,
) -> anyhow::Result<()> {
    settings.demo_sign_in_url = Some(identity::sign_in_url(shared));
    settings.demo_mailbox_url = Some(mailbox::mailbox_url(shared));
    settings.clerk_webhook.signing_secret = Secret::new(shared.clerk_webhook_secret.clone());
    settings.email.smtp_url = Secret::new(smtp.url());
    settings.email.billing_url = format!("{}/billing", shared.creditd_url);
    // The demo's mail arrives within a second of its event.
    settings.email.poll_interval_ms = 250;
    settings.clerk.jwks_url = format!("{}{}", shared.stand_ins_url, identity::JWKS_PATH);
    settings.clerk.issuer = shared.stand_ins_url.clone();
    settings.clerk.authorized_parties = vec![shared.creditd_url.clone()];
    settings.stripe.secret_key = Secret::new(shared.stripe_secret_key.clone());
    settings.stripe.webhook_secret = Secret::new(shared.stripe_webhook_secret.clone());
    settings.stripe.api_base = shared.stand_ins_url.clone();
    settings.stripe.success_url = format!("{}/billing?topup=success", shared.creditd_url);
    settings.stripe.cancel_url = format!("{}/billing?topup=canceled", shared.creditd_url);
    settings.providers.anthropic_base_url = shared.stand_ins_url.clone();
    settings.providers.anthropic_api_key = Secret::new(shared.anthropic_api_key.clone());
    let priced_like = settings
        .pricing
        .models
        .get(PRICED_LIKE)
        .cloned()
        .with_context(|| {
            format!(
                "pricing.models: the demo prices {DEMO_MODEL} like {PRICED_LIKE}, which is missing"
            )
        })?;
    settings
        .pricing
        .models
        .insert(DEMO_MODEL.to_owned(), priced_like);
    settings.pricing.default_model = DEMO_MODEL.to_owned();
    if !settings
        .server
        .allowed_origins
        .contains(&shared.creditd_url)
    {
        settings
            .server
            .allowed_origins
            .push(shared.creditd_url.clone());
    }
    Ok(())
}

fn serve_stand_ins(
    shared: Arc<Shared>,
    listener: TcpListener,
) -> anyhow::Result<actix_web::dev::ServerHandle> {
    let data = actix_web::web::Data::from(shared);
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            .app_data(actix_web::web::FormConfig::default().limit(64 * 1024))
            .configure(identity::routes)
            .configure(stripe::routes)
            .configure(anthropic::routes)
            .configure(mailbox::routes)
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok(handle)
}

/// `creditd demo`: the demo on `server.bind`, its data in a private cluster
/// of its own (`<database.data_dir>-demo`), until SIGINT/SIGTERM.
pub fn run(mut settings: Settings) -> anyhow::Result<ExitCode> {
    refuse_real_services(&settings)?;
    let mut data_dir = settings.database.data_dir.clone().into_os_string();
    data_dir.push("-demo");
    settings.database.data_dir = data_dir.into();
    actix_web::rt::System::new().block_on(async move {
        let storage = Storage::on(Database::locate(&settings.database)?, &settings).await?;
        let demo = Demo::start(settings, storage).await?;
        println!();
        println!("creditd demo (local stand-ins only: no real payment, no real AI)");
        println!("  open {}  to sign in", demo.sign_in_url);
        println!("  then {}/demo  (chat) and {}/billing", demo.url, demo.url);
        println!("  emails creditd sends arrive in {}", demo.mailbox_url);
        println!("  Ctrl-C stops it; data stays in the demo's own PostgreSQL cluster");
        demo.run().await
    })?;
    Ok(ExitCode::SUCCESS)
}
