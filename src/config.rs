//! Typed settings: `config.toml` (every key documented there), overridden by
//! the environment as `CREDITD__SECTION__KEY`. Unknown keys and invalid values
//! stop startup with a message naming the key. Secrets never print.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The committed defaults, also compiled in so tests and tools share them.
pub const DEFAULT_CONFIG: &str = include_str!("../config.toml");
/// Prefix of environment overrides: `CREDITD__SECTION__KEY`.
pub const ENV_PREFIX: &str = "CREDITD__";

/// Keys renamed so that qualifiers come last (`topup_cents_min`) and rate
/// limits have one name: old name, new name (a whole section when there is
/// no dot). A file or an environment variable still using an old name is
/// refused at start, naming the new one, rather than silently ignored.
pub const RENAMED: &[(&str, &str)] = &[
    ("limits", "rate_limits"),
    ("stripe.min_topup_cents", "stripe.topup_cents_min"),
    ("stripe.max_topup_cents", "stripe.topup_cents_max"),
    (
        "stripe.followup_retry_base_ms",
        "stripe.followup_retry_ms_base",
    ),
    (
        "stripe.followup_retry_max_ms",
        "stripe.followup_retry_ms_max",
    ),
    (
        "stripe.followup_max_attempts",
        "stripe.followup_attempts_max",
    ),
    (
        "credits.auto_recharge_min_amount_cents",
        "credits.auto_recharge_amount_cents_min",
    ),
    (
        "credits.auto_recharge_max_amount_cents",
        "credits.auto_recharge_amount_cents_max",
    ),
    (
        "credits.auto_recharge_min_threshold_cents",
        "credits.auto_recharge_threshold_cents_min",
    ),
    (
        "credits.auto_recharge_max_threshold_cents",
        "credits.auto_recharge_threshold_cents_max",
    ),
    (
        "credits.auto_recharge_monthly_max_cents",
        "credits.auto_recharge_monthly_cents_max",
    ),
    ("chat.default_max_tokens", "chat.max_tokens_default"),
    ("clerk.jwks_min_refresh_s", "clerk.jwks_refresh_s_min"),
    ("events.retry_base_ms", "events.retry_ms_base"),
    ("events.retry_max_ms", "events.retry_ms_max"),
];

/// Which provider's API serves a model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Anthropic,
    Openai,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic",
            Provider::Openai => "openai",
        }
    }
}

/// The public tokenizer (BPE encoding) a provider counts a model's tokens
/// with; only OpenAI publishes its own (tiktoken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// GPT-4o, GPT-4.1, the o-series.
    O200kBase,
    /// GPT-4, GPT-3.5.
    Cl100kBase,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub engine: EngineSettings,
    pub journal: JournalSettings,
    pub credits: CreditsSettings,
    pub recharge: RechargeSettings,
    pub pricing: PricingSettings,
    pub clerk: ClerkSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub stripe: StripeSettings,
    pub clerk_webhook: ClerkWebhookSettings,
    pub providers: ProviderSettings,
    pub chat: ChatSettings,
    pub byok: ByokSettings,
    pub rate_limits: RateLimitsSettings,
    pub metrics: MetricsSettings,
    pub events: EventsSettings,
    pub email: EmailSettings,
    pub cluster: ClusterSettings,
    /// Set by `creditd demo` only (never from a file or the environment):
    /// where the demo's sign-in page is; pages then show the demo banner.
    #[serde(skip)]
    pub demo_sign_in_url: Option<String>,
    /// Set by `creditd demo` only: its "Boîte mail" page, linked from the
    /// demo banner.
    #[serde(skip)]
    pub demo_mailbox_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsSettings {
    pub chats_in_flight_per_account: u32,
    pub topups_per_minute: u32,
    pub unauthenticated_per_ip_per_second: u32,
}

/// Outgoing events (balance alerts, top-ups) and their delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSettings {
    /// Where events are POSTed; empty: the sender is off and events stay
    /// recorded, pending, until a URL is configured.
    pub webhook_url: String,
    /// HMAC-SHA256 key of `Creditd-Signature`; required with a URL.
    pub signing_secret: Secret,
    pub timeout_ms: u64,
    /// How often the sender looks for due events when it has none.
    pub poll_interval_ms: u64,
    /// First retry delay, doubled at each failure up to `retry_ms_max`.
    pub retry_ms_base: u64,
    pub retry_ms_max: u64,
    /// An event still undelivered this long after it was recorded is FAILED.
    pub retry_for_hours: u64,
    /// Accounts whose next event is delivered at once.
    pub concurrency: usize,
}

/// Alert and receipt emails over SMTP, sent from the outbox.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// `smtps://host:465` (TLS), `smtp://host:587?tls=required` (STARTTLS)
    /// or `smtp://host:25` (plain), with `user:password@` when the server
    /// asks (lettre's connection URL); empty: no email is sent.
    pub smtp_url: Secret,
    /// The sender, `Name <address>`.
    pub from: String,
    /// Where answers go; empty: to `from`.
    pub reply_to: String,
    /// The billing page as a person opens it: the "Recharger" link.
    pub billing_url: String,
    /// Each SMTP command's timeout (connection included).
    pub timeout_ms: u64,
    /// How often the sender looks for due emails when it found none.
    pub poll_interval_ms: u64,
    /// First retry delay, doubled at each failure up to `retry_ms_max`.
    pub retry_ms_base: u64,
    pub retry_ms_max: u64,
    /// An email still unsent this long after its event is FAILED.
    pub retry_for_hours: u64,
    /// An event older than this when the sender first sees it is not
    /// mailed (SKIPPED): a low-balance email of last week is noise.
    pub max_age_hours: u64,
    /// How long a top-up's receipt waits for its invoice link.
    pub receipt_invoice_wait_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Bearer token `/metrics` asks for; empty: `/metrics` is open.
    pub token: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub anthropic_base_url: String,
    pub openai_base_url: String,
    pub anthropic_api_key: Secret,
    pub openai_api_key: Secret,
    pub anthropic_version: String,
    pub anthropic_byok_model: String,
    pub openai_byok_model: String,
    pub connect_timeout_ms: u64,
    pub total_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatSettings {
    pub max_tokens_default: u32,
    pub max_tokens_limit: u32,
    pub message_overhead_tokens: u64,
    pub request_overhead_tokens: u64,
    pub pending_settlements_max: usize,
    pub stream_buffer_events: usize,
    pub stream_keep_alive_ms: u64,
    pub stream_write_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByokSettings {
    /// 32 bytes, standard base64; empty: BYOK is not configured.
    pub encryption_key: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClerkSettings {
    pub jwks_url: String,
    pub issuer: String,
    pub authorized_parties: Vec<String>,
    pub leeway_s: u64,
    pub jwks_refresh_s_min: u64,
    pub jwks_refresh_s: u64,
    pub jwks_timeout_ms: u64,
    pub token_cache_entries: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub token: Secret,
    /// Clerk user ids of the people who may use the operator console and
    /// the admin API with their Clerk session.
    pub operator_ids: Vec<String>,
    /// How long an operator console session lasts (the admin token
    /// exchanged for an HttpOnly cookie).
    pub session_ttl_s: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub workers: usize,
    pub shutdown_timeout_s: u64,
    pub body_limit_bytes: usize,
    pub client_request_timeout_ms: u64,
    pub history_cache_entries: usize,
    /// Origins (`scheme://host[:port]`) whose pages may call the API
    /// cross-origin (CORS) and send cookie-authenticated writes.
    pub allowed_origins: Vec<String>,
    /// The balance stream sends at most one event per this many ms (the
    /// latest state; 0: every change at once).
    pub stream_coalesce_ms: u64,
    /// A stream with nothing to send sends a comment this often, so
    /// proxies and browsers keep it open.
    pub stream_keep_alive_ms: u64,
    /// Balance streams one account may hold open on this instance.
    pub streams_per_account_max: usize,
    /// Balance streams this instance holds open in all.
    pub streams_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Empty: start the private cluster in `data_dir`.
    pub url: Secret,
    pub data_dir: PathBuf,
    pub pool_size: usize,
    pub connect_timeout_ms: u64,
    pub pool_wait_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub health_check_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSettings {
    pub arbiters: usize,
    pub mailbox_capacity: usize,
    pub idle_timeout_ms: u64,
    pub hold_ttl_s: u64,
    pub recent_keys: usize,
    pub call_timeout_ms: u64,
}

/// Running several instances on one database (see README, "Running
/// several instances").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// This instance's name in `credit_balances.written_by` and in its
    /// notifications; empty: the host name and the process id.
    pub instance_id: String,
    /// Seconds an instance keeps serving after SIGTERM with `/readyz`
    /// failing, so the balancer moves its accounts before it stops.
    pub drain_s: u64,
    /// How often a singleton (event sender, auto-recharge worker) checks
    /// the connection holding its advisory lock.
    pub singleton_check_ms: u64,
    /// Pause before the notification listener reconnects.
    pub listen_retry_ms: u64,
}

impl ClusterSettings {
    /// `instance_id`, or the host name and process id when it is empty.
    pub fn instance(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        format!("{}-{}", host_name(), std::process::id())
    }
}

/// The machine's host name (`gethostname(2)`); "localhost" if it has none.
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at
    // most that many bytes.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match std::str::from_utf8(&buffer[..end]) {
        Ok(name) if status == 0 && !name.is_empty() => name.to_owned(),
        _ => "localhost".to_owned(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSettings {
    pub writers: usize,
    pub batch_max: usize,
    pub batch_delay_us: u64,
    /// Whether a batch waits `batch_delay_us` for company even with no
    /// other batch of its writer in flight (else it commits at once).
    pub gather_when_idle: bool,
    pub queue_capacity: usize,
    pub stall_after_ms: u64,
    pub pipeline_depth: usize,
    /// How long an admitted hold's entry waits for its settlement.
    pub hold_delay_us: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreditsSettings {
    pub signup_bonus_cents: i64,
    pub low_balance_cents: i64,
    /// `balance.recovered` (re-arming the low alert) at low + this.
    pub low_balance_rearm_cents: i64,
    /// Bounds of an auto-recharge's amount and threshold, as a user sets them.
    pub auto_recharge_amount_cents_min: i64,
    pub auto_recharge_amount_cents_max: i64,
    pub auto_recharge_threshold_cents_min: i64,
    pub auto_recharge_threshold_cents_max: i64,
    /// The most auto-recharges take from one account in a calendar month (UTC).
    pub auto_recharge_monthly_cents_max: i64,
    /// How often the payment worker looks for decided attempts.
    pub auto_recharge_poll_interval_ms: i64,
    /// Days the signup bonus can be spent; 0: it never expires.
    #[serde(default)]
    pub signup_bonus_expiry_days: u32,
    /// Promo credit each side of a referral gets after the referred
    /// user's first paid top-up; 0: no referral bonus.
    pub referral_bonus_cents: i64,
    /// Days a referral bonus lasts; 0: it never expires.
    pub referral_bonus_expiry_days: u32,
}

/// The auto-recharge payment worker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RechargeSettings {
    /// An attempt unconfirmed this long after it was recorded is looked up
    /// on Stripe, never sent again: at most 86400, the least Stripe keeps
    /// an idempotency key.
    pub attempt_timeout_s: u64,
}

/// Stripe keeps an idempotency key at least this long after its first use.
pub const STRIPE_IDEMPOTENCY_WINDOW_S: u64 = 86_400;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingSettings {
    pub usd_per_eur: String,
    pub margin_bps: u32,
    pub default_model: String,
    pub models: BTreeMap<String, ModelPriceSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPriceSettings {
    pub provider: Provider,
    pub input_usd: String,
    pub output_usd: String,
    pub cache_read_usd: String,
    pub cache_write_usd: String,
    /// The provider's public tokenizer for this model; `None`: none is
    /// public, token counts are bounded by bytes.
    #[serde(default)]
    pub encoding: Option<Encoding>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeSettings {
    pub secret_key: Secret,
    pub webhook_secret: Secret,
    pub api_base: String,
    pub timeout_ms: u64,
    pub webhook_tolerance_s: u64,
    pub success_url: String,
    pub cancel_url: String,
    pub product_name: String,
    pub topup_cents_min: i64,
    pub topup_cents_max: i64,
    pub currency: String,
    pub starter_price_id: String,
    pub pro_price_id: String,
    pub team_price_id: String,
    /// How often the follow-up worker looks for due top-up follow-ups
    /// (saving the card, reading the invoice link) when it found none.
    pub followup_poll_interval_ms: u64,
    /// First retry delay of a failed follow-up, doubled at each failure up
    /// to `followup_retry_ms_max`.
    pub followup_retry_ms_base: u64,
    pub followup_retry_ms_max: u64,
    /// Attempts after which a follow-up is FAILED (shown to operators).
    pub followup_attempts_max: u32,
    /// Follow-ups taken per round.
    pub followup_batch: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClerkWebhookSettings {
    pub signing_secret: Secret,
    pub tolerance_s: u64,
}

/// A value that must never reach a log or a response.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Settings {
    /// Reads `path` (or the committed defaults), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Settings, String> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            None => DEFAULT_CONFIG.to_owned(),
        };
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Settings::from_sources(&text, &env)
    }

    /// The committed defaults alone, no environment.
    pub fn default_file() -> Result<Settings, String> {
        Settings::from_sources(DEFAULT_CONFIG, &[])
    }

    pub fn from_sources(text: &str, env: &[(String, String)]) -> Result<Settings, String> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("config file: {e}"))?;
        refuse_renamed_keys(&root)?;
        refuse_renamed_variables(env)?;
        for (key, value) in env {
            apply_override(&mut root, key, value)?;
        }
        let settings: Settings = serde_path_to_error::deserialize(toml::Value::Table(root))
            .map_err(|e| format!("configuration key `{}`: {}", e.path(), e.inner()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), String> {
        let instance = &self.cluster.instance_id;
        if instance.len() > 200
            || instance
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(
                "configuration key `cluster.instance_id`: at most 200 bytes, no spaces".into(),
            );
        }
        for (key, value) in self.must_be_positive() {
            if value == 0 {
                return Err(format!("configuration key `{key}`: must be greater than 0"));
            }
        }
        for (key, value) in [
            (
                "credits.signup_bonus_cents",
                self.credits.signup_bonus_cents,
            ),
            ("credits.low_balance_cents", self.credits.low_balance_cents),
            (
                "credits.referral_bonus_cents",
                self.credits.referral_bonus_cents,
            ),
            (
                "credits.low_balance_rearm_cents",
                self.credits.low_balance_rearm_cents,
            ),
        ] {
            if value < 0 {
                return Err(format!("configuration key `{key}`: cannot be negative"));
            }
        }
        let credits = &self.credits;
        for (key, value) in [
            (
                "credits.auto_recharge_amount_cents_min",
                credits.auto_recharge_amount_cents_min,
            ),
            (
                "credits.auto_recharge_amount_cents_max",
                credits.auto_recharge_amount_cents_max,
            ),
            (
                "credits.auto_recharge_threshold_cents_min",
                credits.auto_recharge_threshold_cents_min,
            ),
            (
                "credits.auto_recharge_threshold_cents_max",
                credits.auto_recharge_threshold_cents_max,
            ),
            (
                "credits.auto_recharge_monthly_cents_max",
                credits.auto_recharge_monthly_cents_max,
            ),
            (
                "credits.auto_recharge_poll_interval_ms",
                credits.auto_recharge_poll_interval_ms,
            ),
        ] {
            if value <= 0 {
                return Err(format!("configuration key `{key}`: must be greater than 0"));
            }
        }
        if credits.auto_recharge_amount_cents_min > credits.auto_recharge_amount_cents_max {
            return Err("configuration key `credits.auto_recharge_amount_cents_min`: above credits.auto_recharge_amount_cents_max".into());
        }
        if credits.auto_recharge_threshold_cents_min > credits.auto_recharge_threshold_cents_max {
            return Err("configuration key `credits.auto_recharge_threshold_cents_min`: above credits.auto_recharge_threshold_cents_max".into());
        }
        if self.credits.referral_bonus_expiry_days > 3650 {
            return Err(
                "configuration key `credits.referral_bonus_expiry_days`: at most 3650 (0: never)"
                    .into(),
            );
        }
        if self.stripe.followup_retry_ms_base > self.stripe.followup_retry_ms_max {
            return Err("configuration key `stripe.followup_retry_ms_base`: above stripe.followup_retry_ms_max".into());
        }
        if self.clerk.leeway_s > 5 {
            return Err("configuration key `clerk.leeway_s`: at most 5".into());
        }
        if self.journal.writers > 64 {
            return Err("configuration key `journal.writers`: at most 64".into());
        }
        if self.journal.pipeline_depth > 16 {
            return Err("configuration key `journal.pipeline_depth`: at most 16".into());
        }
        if self.journal.batch_max > 65_535 {
            return Err("configuration key `journal.batch_max`: at most 65535".into());
        }
        for origin in &self.server.allowed_origins {
            if !is_origin(origin) {
                return Err(format!(
                    "configuration key `server.allowed_origins`: `{origin}` is not an origin such as https://app.example.com (scheme, host, optional port; no path)"
                ));
            }
        }
        self.validate_stripe()?;
        self.validate_recharge()?;
        self.validate_events()?;
        self.validate_email()?;
        self.validate_admin()?;
        self.validate_chat()?;
        Ok(())
    }

    fn validate_chat(&self) -> Result<(), String> {
        if self.chat.max_tokens_default > self.chat.max_tokens_limit {
            return Err(
                "configuration key `chat.max_tokens_default`: at most chat.max_tokens_limit".into(),
            );
        }
        if self.providers.total_timeout_ms / 1000 >= self.engine.hold_ttl_s {
            return Err(
                "configuration key `providers.total_timeout_ms`: must be shorter than engine.hold_ttl_s"
                    .into(),
            );
        }
        for (key, model, provider) in [
            (
                "providers.anthropic_byok_model",
                &self.providers.anthropic_byok_model,
                Provider::Anthropic,
            ),
            (
                "providers.openai_byok_model",
                &self.providers.openai_byok_model,
                Provider::Openai,
            ),
        ] {
            match self.pricing.models.get(model) {
                Some(price) if price.provider == provider => {}
                _ => {
                    return Err(format!(
                        "configuration key `{key}`: `{model}` is not a {provider:?} model of pricing.models"
                    ))
                }
            }
        }
        Ok(())
    }
}

impl Settings {
    /// Every duration, size, count and rate that cannot work at 0, by key
    /// (negative values are refused by their unsigned types, by key too).
    fn must_be_positive(&self) -> Vec<(&'static str, u64)> {
        let wide = |value: usize| value as u64;
        vec![
            ("server.workers", wide(self.server.workers)),
            (
                "cluster.singleton_check_ms",
                self.cluster.singleton_check_ms,
            ),
            ("cluster.listen_retry_ms", self.cluster.listen_retry_ms),
            ("server.shutdown_timeout_s", self.server.shutdown_timeout_s),
            (
                "server.body_limit_bytes",
                wide(self.server.body_limit_bytes),
            ),
            (
                "server.client_request_timeout_ms",
                self.server.client_request_timeout_ms,
            ),
            (
                "server.stream_keep_alive_ms",
                self.server.stream_keep_alive_ms,
            ),
            (
                "server.streams_per_account_max",
                wide(self.server.streams_per_account_max),
            ),
            ("server.streams_max", wide(self.server.streams_max)),
            ("database.pool_size", wide(self.database.pool_size)),
            (
                "database.connect_timeout_ms",
                self.database.connect_timeout_ms,
            ),
            (
                "database.pool_wait_timeout_ms",
                self.database.pool_wait_timeout_ms,
            ),
            (
                "database.statement_timeout_ms",
                self.database.statement_timeout_ms,
            ),
            (
                "database.health_check_interval_ms",
                self.database.health_check_interval_ms,
            ),
            (
                "engine.mailbox_capacity",
                wide(self.engine.mailbox_capacity),
            ),
            ("engine.idle_timeout_ms", self.engine.idle_timeout_ms),
            ("engine.hold_ttl_s", self.engine.hold_ttl_s),
            ("engine.recent_keys", wide(self.engine.recent_keys)),
            ("engine.call_timeout_ms", self.engine.call_timeout_ms),
            ("journal.writers", wide(self.journal.writers)),
            ("journal.batch_max", wide(self.journal.batch_max)),
            ("journal.queue_capacity", wide(self.journal.queue_capacity)),
            ("journal.stall_after_ms", self.journal.stall_after_ms),
            ("journal.pipeline_depth", wide(self.journal.pipeline_depth)),
            ("clerk.jwks_refresh_s_min", self.clerk.jwks_refresh_s_min),
            ("clerk.jwks_refresh_s", self.clerk.jwks_refresh_s),
            ("clerk.jwks_timeout_ms", self.clerk.jwks_timeout_ms),
            ("stripe.timeout_ms", self.stripe.timeout_ms),
            (
                "stripe.followup_poll_interval_ms",
                self.stripe.followup_poll_interval_ms,
            ),
            (
                "stripe.followup_retry_ms_base",
                self.stripe.followup_retry_ms_base,
            ),
            (
                "stripe.followup_retry_ms_max",
                self.stripe.followup_retry_ms_max,
            ),
            (
                "stripe.followup_attempts_max",
                u64::from(self.stripe.followup_attempts_max),
            ),
            (
                "stripe.followup_batch",
                u64::from(self.stripe.followup_batch),
            ),
            (
                "stripe.webhook_tolerance_s",
                self.stripe.webhook_tolerance_s,
            ),
            ("clerk_webhook.tolerance_s", self.clerk_webhook.tolerance_s),
            (
                "providers.connect_timeout_ms",
                self.providers.connect_timeout_ms,
            ),
            (
                "providers.total_timeout_ms",
                self.providers.total_timeout_ms,
            ),
            (
                "chat.max_tokens_default",
                u64::from(self.chat.max_tokens_default),
            ),
            (
                "chat.max_tokens_limit",
                u64::from(self.chat.max_tokens_limit),
            ),
            (
                "chat.pending_settlements_max",
                wide(self.chat.pending_settlements_max),
            ),
            (
                "chat.stream_buffer_events",
                wide(self.chat.stream_buffer_events),
            ),
            ("chat.stream_keep_alive_ms", self.chat.stream_keep_alive_ms),
            (
                "chat.stream_write_timeout_ms",
                self.chat.stream_write_timeout_ms,
            ),
            (
                "rate_limits.chats_in_flight_per_account",
                u64::from(self.rate_limits.chats_in_flight_per_account),
            ),
            (
                "rate_limits.topups_per_minute",
                u64::from(self.rate_limits.topups_per_minute),
            ),
            (
                "rate_limits.unauthenticated_per_ip_per_second",
                u64::from(self.rate_limits.unauthenticated_per_ip_per_second),
            ),
            ("events.timeout_ms", self.events.timeout_ms),
            ("events.poll_interval_ms", self.events.poll_interval_ms),
            ("events.retry_ms_base", self.events.retry_ms_base),
            ("events.retry_ms_max", self.events.retry_ms_max),
            ("events.retry_for_hours", self.events.retry_for_hours),
            ("events.concurrency", wide(self.events.concurrency)),
            ("admin.session_ttl_s", self.admin.session_ttl_s),
            ("email.timeout_ms", self.email.timeout_ms),
            ("email.poll_interval_ms", self.email.poll_interval_ms),
            ("email.retry_ms_base", self.email.retry_ms_base),
            ("email.retry_ms_max", self.email.retry_ms_max),
            ("email.retry_for_hours", self.email.retry_for_hours),
            ("email.max_age_hours", self.email.max_age_hours),
        ]
    }

    fn validate_admin(&self) -> Result<(), String> {
        if self.admin.session_ttl_s > 86_400 {
            return Err("configuration key `admin.session_ttl_s`: at most 86400".into());
        }
        for id in &self.admin.operator_ids {
            if id.is_empty()
                || id.len() > 200
                || id.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(format!(
                    "configuration key `admin.operator_ids`: `{}` is not a Clerk user id such as user_2abc",
                    id.escape_debug()
                ));
            }
        }
        Ok(())
    }

    fn validate_email(&self) -> Result<(), String> {
        let email = &self.email;
        if email.retry_ms_base > email.retry_ms_max {
            return Err(
                "configuration key `email.retry_ms_base`: at most email.retry_ms_max".into(),
            );
        }
        if email.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(format!(
                "configuration key `email.from`: `{}` is not an address such as Crédits AI <credits@example.com>",
                email.from
            ));
        }
        if !email.reply_to.is_empty() && email.reply_to.parse::<lettre::message::Mailbox>().is_err()
        {
            return Err(format!(
                "configuration key `email.reply_to`: `{}` is not an address such as support@example.com",
                email.reply_to
            ));
        }
        if email.smtp_url.is_empty() {
            return Ok(());
        }
        let smtp = reqwest::Url::parse(email.smtp_url.expose());
        if !smtp.is_ok_and(|url| {
            matches!(url.scheme(), "smtp" | "smtps")
                && url.host_str().is_some_and(|h| !h.is_empty())
        }) {
            // The URL may carry a password: never echoed.
            return Err(
                "configuration key `email.smtp_url`: not an smtp:// or smtps:// URL with a host"
                    .into(),
            );
        }
        let billing = reqwest::Url::parse(&email.billing_url);
        if !billing.is_ok_and(|url| matches!(url.scheme(), "https" | "http")) {
            return Err(format!(
                "configuration key `email.billing_url`: required with email.smtp_url, an http(s) URL of the billing page (got `{}`)",
                email.billing_url
            ));
        }
        Ok(())
    }

    fn validate_events(&self) -> Result<(), String> {
        let events = &self.events;
        if events.webhook_url.is_empty() {
            return Ok(());
        }
        if !(events.webhook_url.starts_with("https://")
            || events.webhook_url.starts_with("http://"))
            || reqwest::Url::parse(&events.webhook_url).is_err()
        {
            return Err(format!(
                "configuration key `events.webhook_url`: `{}` is not an http(s) URL",
                events.webhook_url
            ));
        }
        if events.signing_secret.is_empty() {
            return Err(
                "configuration key `events.signing_secret`: required when events.webhook_url is set (set CREDITD__EVENTS__SIGNING_SECRET)"
                    .into(),
            );
        }
        if events.retry_ms_base > events.retry_ms_max {
            return Err(
                "configuration key `events.retry_ms_base`: at most events.retry_ms_max".into(),
            );
        }
        Ok(())
    }

    fn validate_stripe(&self) -> Result<(), String> {
        let stripe = &self.stripe;
        if stripe.topup_cents_max <= 0 {
            return Err(
                "configuration key `stripe.topup_cents_max`: must be greater than 0".into(),
            );
        }
        if stripe.topup_cents_min <= 0 || stripe.topup_cents_min > stripe.topup_cents_max {
            return Err(
                "configuration key `stripe.topup_cents_min`: must be positive and at most stripe.topup_cents_max"
                    .into(),
            );
        }
        if crate::money::Micros::from_cents(stripe.topup_cents_max).is_err() {
            return Err("configuration key `stripe.topup_cents_max`: too large".into());
        }
        if stripe.currency.len() != 3 || !stripe.currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(
                "configuration key `stripe.currency`: a lowercase ISO code such as \"eur\"".into(),
            );
        }
        if !stripe.api_base.starts_with("http://") && !stripe.api_base.starts_with("https://") {
            return Err("configuration key `stripe.api_base`: an http(s) URL".into());
        }
        Ok(())
    }
}

impl Settings {
    /// The attempt timeout keeps every call to Stripe inside the window in
    /// which Stripe remembers the attempt's idempotency key, and leaves
    /// room for at least one call.
    fn validate_recharge(&self) -> Result<(), String> {
        let timeout_s = self.recharge.attempt_timeout_s;
        if timeout_s == 0 || timeout_s > STRIPE_IDEMPOTENCY_WINDOW_S {
            return Err(format!(
                "configuration key `recharge.attempt_timeout_s`: 1 to {STRIPE_IDEMPOTENCY_WINDOW_S} (Stripe may forget an idempotency key after 24 h)"
            ));
        }
        if timeout_s.saturating_mul(1000) <= self.stripe.timeout_ms {
            return Err(
                "configuration key `recharge.attempt_timeout_s`: must be longer than stripe.timeout_ms"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `http(s)://host[:port]`, nothing after.
fn is_origin(text: &str) -> bool {
    let Some(rest) = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// The file's keys that carry an old name of [`RENAMED`], refused by name.
fn refuse_renamed_keys(root: &toml::Table) -> Result<(), String> {
    for (old, new) in RENAMED {
        let present = match old.split_once('.') {
            None => root.contains_key(*old),
            Some((section, key)) => root
                .get(section)
                .and_then(toml::Value::as_table)
                .is_some_and(|table| table.contains_key(key)),
        };
        if present {
            let what = if old.contains('.') { "key" } else { "section" };
            return Err(format!(
                "configuration {what} `{old}` was renamed: write `{new}` instead"
            ));
        }
    }
    Ok(())
}

/// The environment variables that spell an old name of [`RENAMED`] (a key,
/// or any key of a renamed section), refused with the new variable's name.
fn refuse_renamed_variables(env: &[(String, String)]) -> Result<(), String> {
    for (variable, _) in env {
        let Some(rest) = variable.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let path = rest.to_ascii_lowercase();
        let (section, key) = path.split_once("__").unwrap_or((path.as_str(), ""));
        for (old, new) in RENAMED {
            let renamed = match old.split_once('.') {
                None if *old == section => Some(format!("{new}__{key}")),
                Some((old_section, old_key)) if old_section == section && old_key == key => {
                    Some(new.replacen('.', "__", 1))
                }
                _ => None,
            };
            if let Some(renamed) = renamed {
                return Err(format!(
                    "environment variable {variable}: `{old}` was renamed, set {ENV_PREFIX}{} instead",
                    renamed.to_ascii_uppercase()
                ));
            }
        }
    }
    Ok(())
}

/// Sets `section.key` (or deeper: `pricing.models.<name>.input_usd` can't be
/// spelled in an env name, so only two levels) from `CREDITD__SECTION__KEY`.
/// The value keeps the type the file gives that key; a key the file lacks is
/// taken as a string, and unknown keys are refused later by name.
fn apply_override(root: &mut toml::Table, env_key: &str, raw: &str) -> Result<(), String> {
    let path: Vec<String> = env_key[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.len() != 2 || path.iter().any(String::is_empty) {
        return Err(format!(
            "environment variable {env_key}: expected {ENV_PREFIX}SECTION__KEY"
        ));
    }
    let section = root
        .entry(path[0].clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let table = section.as_table_mut().ok_or_else(|| {
        format!(
            "environment variable {env_key}: `{}` is not a section",
            path[0]
        )
    })?;
    let value = match table.get(&path[1]) {
        Some(toml::Value::String(_)) | None => toml::Value::String(raw.to_owned()),
        Some(toml::Value::Array(_)) if !raw.trim_start().starts_with('[') => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        Some(_) => {
            let parsed: toml::Table = format!("v = {raw}").parse().map_err(|_| {
                format!("environment variable {env_key}: `{raw}` is not a valid value")
            })?;
            parsed
                .get("v")
                .cloned()
                .ok_or_else(|| format!("environment variable {env_key}: no value"))?
        }
    };
    table.insert(path[1].clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_committed_config_file_loads() {
        let settings = Settings::default_file().unwrap();
        assert_eq!(settings.server.bind, "127.0.0.1:8080");
        assert!(settings.database.url.is_empty());
    }

    #[test]
    fn environment_overrides_keep_the_type_of_the_key() {
        let settings = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[
                ("CREDITD__SERVER__BIND", "0.0.0.0:9000"),
                ("CREDITD__JOURNAL__BATCH_MAX", "17"),
                ("CREDITD__DATABASE__URL", "postgres://u:p@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.server.bind, "0.0.0.0:9000");
        assert_eq!(settings.journal.batch_max, 17);
        assert_eq!(settings.database.url.expose(), "postgres://u:p@h/db");
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[("CREDITD__SERVER__BINDD", "x")]))
            .unwrap_err();
        assert!(err.contains("bindd"), "{err}");
    }

    #[test]
    fn a_file_using_an_old_key_or_section_is_refused_naming_the_new_one() {
        let old_key = DEFAULT_CONFIG.replace("topup_cents_min", "min_topup_cents");
        let err = Settings::from_sources(&old_key, &[]).unwrap_err();
        assert_eq!(
            err,
            "configuration key `stripe.min_topup_cents` was renamed: write `stripe.topup_cents_min` instead"
        );
        let old_section = DEFAULT_CONFIG.replace("[rate_limits]", "[limits]");
        let err = Settings::from_sources(&old_section, &[]).unwrap_err();
        assert_eq!(
            err,
            "configuration section `limits` was renamed: write `rate_limits` instead"
        );
    }

    #[test]
    fn an_environment_variable_using_an_old_name_is_refused_naming_the_new_one() {
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__CREDITS__AUTO_RECHARGE_MONTHLY_MAX_CENTS", "100")]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "environment variable CREDITD__CREDITS__AUTO_RECHARGE_MONTHLY_MAX_CENTS: `credits.auto_recharge_monthly_max_cents` was renamed, set CREDITD__CREDITS__AUTO_RECHARGE_MONTHLY_CENTS_MAX instead"
        );
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__LIMITS__TOPUPS_PER_MINUTE", "3")]),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "environment variable CREDITD__LIMITS__TOPUPS_PER_MINUTE: `limits` was renamed, set CREDITD__RATE_LIMITS__TOPUPS_PER_MINUTE instead"
        );
        let renamed = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__RATE_LIMITS__TOPUPS_PER_MINUTE", "3")]),
        )
        .unwrap();
        assert_eq!(renamed.rate_limits.topups_per_minute, 3);
    }

    #[test]
    fn an_invalid_value_is_refused_by_name() {
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__JOURNAL__BATCH_MAX", "many")]),
        )
        .unwrap_err();
        assert!(err.contains("CREDITD__JOURNAL__BATCH_MAX"), "{err}");
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__ENGINE__MAILBOX_CAPACITY", "0")]),
        )
        .unwrap_err();
        assert!(err.contains("engine.mailbox_capacity"), "{err}");
    }

    #[test]
    fn an_smtp_url_needs_a_billing_link_and_a_bad_one_is_refused_without_its_password() {
        let smtp = (
            "CREDITD__EMAIL__SMTP_URL",
            "smtps://mailer:hunter2@smtp.example.com:465",
        );
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[smtp])).unwrap_err();
        assert!(err.contains("email.billing_url"), "{err}");
        let billing = (
            "CREDITD__EMAIL__BILLING_URL",
            "https://app.example.com/billing",
        );
        let settings = Settings::from_sources(DEFAULT_CONFIG, &env(&[smtp, billing])).unwrap();
        assert_eq!(format!("{:?}", settings.email.smtp_url), "***");
        let wrong = (
            "CREDITD__EMAIL__SMTP_URL",
            "https://mailer:hunter2@smtp.example.com",
        );
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[wrong, billing])).unwrap_err();
        assert!(
            err.contains("email.smtp_url") && !err.contains("hunter2"),
            "{err}"
        );
        let from = ("CREDITD__EMAIL__FROM", "not an address");
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[from])).unwrap_err();
        assert!(err.contains("email.from"), "{err}");
    }

    #[test]
    fn operator_ids_are_a_list_of_clerk_ids_read_from_the_environment() {
        let listed = ("CREDITD__ADMIN__OPERATOR_IDS", r#"["user_a", "user_b"]"#);
        let settings = Settings::from_sources(DEFAULT_CONFIG, &env(&[listed])).unwrap();
        assert_eq!(settings.admin.operator_ids, ["user_a", "user_b"]);
        let spaced = (
            "CREDITD__ADMIN__OPERATOR_IDS",
            r#"["user_ok", "user with space"]"#,
        );
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[spaced])).unwrap_err();
        assert!(err.contains("admin.operator_ids"), "{err}");
    }

    #[test]
    fn an_events_url_needs_a_signing_secret_and_must_be_http() {
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[(
                "CREDITD__EVENTS__WEBHOOK_URL",
                "https://app.example.com/hooks",
            )]),
        )
        .unwrap_err();
        assert!(err.contains("events.signing_secret"), "{err}");
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[
                (
                    "CREDITD__EVENTS__WEBHOOK_URL",
                    "ftp://app.example.com/hooks",
                ),
                ("CREDITD__EVENTS__SIGNING_SECRET", "whsec_x"),
            ]),
        )
        .unwrap_err();
        assert!(err.contains("events.webhook_url"), "{err}");
        let settings = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[
                (
                    "CREDITD__EVENTS__WEBHOOK_URL",
                    "https://app.example.com/hooks",
                ),
                ("CREDITD__EVENTS__SIGNING_SECRET", "whsec_x"),
            ]),
        )
        .unwrap();
        assert_eq!(settings.events.signing_secret.expose(), "whsec_x");
        assert_eq!(format!("{:?}", settings.events.signing_secret), "***");
    }

    #[test]
    fn an_attempt_timeout_past_stripes_idempotency_window_or_under_one_call_is_refused() {
        for (timeout_s, stripe_timeout_ms) in [("86401", "10000"), ("0", "10000"), ("5", "5000")] {
            let err = Settings::from_sources(
                DEFAULT_CONFIG,
                &env(&[
                    ("CREDITD__RECHARGE__ATTEMPT_TIMEOUT_S", timeout_s),
                    ("CREDITD__STRIPE__TIMEOUT_MS", stripe_timeout_ms),
                ]),
            )
            .unwrap_err();
            assert!(
                err.contains("recharge.attempt_timeout_s"),
                "{timeout_s}: {err}"
            );
        }
        let settings = Settings::default_file().unwrap();
        assert_eq!(settings.recharge.attempt_timeout_s, 86_400);
    }

    #[test]
    fn top_up_limits_that_cannot_hold_are_refused() {
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__STRIPE__TOPUP_CENTS_MIN", "200000")]),
        )
        .unwrap_err();
        assert!(err.contains("stripe.topup_cents_min"), "{err}");
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__STRIPE__CURRENCY", "EURO")]),
        )
        .unwrap_err();
        assert!(err.contains("stripe.currency"), "{err}");
    }

    #[test]
    fn a_referral_bonus_expiry_past_ten_years_is_refused_by_name() {
        let key = "CREDITD__CREDITS__REFERRAL_BONUS_EXPIRY_DAYS";
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[(key, "3651")])).unwrap_err();
        assert!(err.contains("credits.referral_bonus_expiry_days"), "{err}");
        let err = Settings::from_sources(DEFAULT_CONFIG, &env(&[(key, "-1")])).unwrap_err();
        assert!(err.contains("credits.referral_bonus_expiry_days"), "{err}");
        let settings = Settings::from_sources(DEFAULT_CONFIG, &env(&[(key, "30")])).unwrap();
        assert_eq!(settings.credits.referral_bonus_expiry_days, 30);
        assert_eq!(settings.credits.referral_bonus_cents, 500);
    }

    /// Numeric keys whose 0 means something that works.
    const ZERO_MEANS_SOMETHING: &[&str] = &[
        "server.history_cache_entries",       // no cache
        "server.stream_coalesce_ms",          // every change at once
        "engine.arbiters",                    // one per CPU core
        "journal.batch_delay_us",             // commit at once
        "journal.hold_delay_us",              // a hold's entry sent at once
        "credits.signup_bonus_cents",         // no bonus
        "credits.low_balance_cents",          // never flagged low
        "credits.signup_bonus_expiry_days",   // the bonus never expires
        "credits.low_balance_rearm_cents",    // re-armed as soon as back at the threshold
        "credits.referral_bonus_cents",       // no referral bonus
        "credits.referral_bonus_expiry_days", // never expires
        "clerk.leeway_s",                     // no clock leeway
        "clerk.token_cache_entries",          // no cache
        "pricing.margin_bps",                 // sold at cost
        "email.receipt_invoice_wait_s",       // a receipt goes at once
        "chat.message_overhead_tokens",       // estimate from bytes alone
        "chat.request_overhead_tokens",
        "cluster.drain_s", // stop accepting at once (one instance, nobody to drain to)
    ];

    #[test]
    fn every_numeric_key_is_refused_by_name_at_zero_where_it_must_be_positive_and_when_negative() {
        let root: toml::Table = DEFAULT_CONFIG.parse().unwrap();
        let mut walked = 0;
        for (section, table) in &root {
            let Some(table) = table.as_table() else {
                continue;
            };
            for (key, value) in table {
                if !value.is_integer() {
                    continue;
                }
                walked += 1;
                let name = format!("{section}.{key}");
                let variable = format!(
                    "{ENV_PREFIX}{}__{}",
                    section.to_uppercase(),
                    key.to_uppercase()
                );
                let negative = Settings::from_sources(DEFAULT_CONFIG, &env(&[(&variable, "-1")]));
                let err = negative.expect_err(&format!("{name} = -1 was accepted"));
                assert!(
                    err.contains(&name) || err.contains(&variable),
                    "{name} = -1: {err}"
                );
                let zero = Settings::from_sources(DEFAULT_CONFIG, &env(&[(&variable, "0")]));
                if ZERO_MEANS_SOMETHING.contains(&name.as_str()) {
                    assert!(zero.is_ok(), "{name} = 0: {:?}", zero.err());
                } else {
                    let err = zero.expect_err(&format!("{name} = 0 was accepted"));
                    assert!(err.contains(&name), "{name} = 0: {err}");
                }
            }
        }
        assert!(walked >= 45, "only {walked} numeric keys walked");
    }

    #[test]
    fn allowed_origins_are_read_from_a_list_and_checked() {
        let settings = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[(
                "CREDITD__SERVER__ALLOWED_ORIGINS",
                "https://app.example.com, http://localhost:3000",
            )]),
        )
        .unwrap();
        assert_eq!(
            settings.server.allowed_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        let err = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[(
                "CREDITD__SERVER__ALLOWED_ORIGINS",
                "https://app.example.com/",
            )]),
        )
        .unwrap_err();
        assert!(err.contains("server.allowed_origins"), "{err}");
        let file = format!("demo_sign_in_url = \"http://127.0.0.1:1\"\n{DEFAULT_CONFIG}");
        let err = Settings::from_sources(&file, &[]).unwrap_err();
        assert!(
            err.contains("demo_sign_in_url"),
            "the demo is set in code only: {err}"
        );
    }

    #[test]
    fn secrets_print_as_stars() {
        let secret = Secret::new("postgres://user:hunter2@db/credits");
        assert_eq!(format!("{secret:?}"), "***");
        let settings = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[("CREDITD__DATABASE__URL", "postgres://user:hunter2@db/x")]),
        )
        .unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }

    #[test]
    fn chat_provider_and_byok_settings_are_checked_by_name() {
        for (variable, value, key) in [
            (
                "CREDITD__PROVIDERS__TOTAL_TIMEOUT_MS",
                "900000",
                "providers.total_timeout_ms",
            ),
            (
                "CREDITD__PROVIDERS__OPENAI_BYOK_MODEL",
                "claude-haiku-4-5",
                "providers.openai_byok_model",
            ),
            (
                "CREDITD__CHAT__MAX_TOKENS_DEFAULT",
                "20000",
                "chat.max_tokens_default",
            ),
        ] {
            let err =
                Settings::from_sources(DEFAULT_CONFIG, &env(&[(variable, value)])).unwrap_err();
            assert!(err.contains(key), "{variable}: {err}");
        }
        let settings = Settings::from_sources(
            DEFAULT_CONFIG,
            &env(&[(
                "CREDITD__PROVIDERS__ANTHROPIC_API_KEY",
                "sk-ant-secret-value",
            )]),
        )
        .unwrap();
        assert!(!format!("{settings:?}").contains("sk-ant-secret-value"));
    }
}
