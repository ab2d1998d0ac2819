//! What every handler shares: the application state built once at
//! startup, and the per-account caches of what the pages read.

use std::sync::Arc;

use actix_web::web;
use metrics_exporter_prometheus::PrometheusHandle;
use moka::future::Cache;

use super::error::{ApiError, Code};
use super::views::History;
use crate::accounts::{KeyCipher, StoredKeys};
use crate::clerk::tokens::{ClerkUserId, ClerkVerifier};
use crate::config::{Secret, Settings};
use crate::ledger::{AccountId, Engine};
use crate::pricing::{PriceTable, Provider};

/// The services the handlers call, each built once at startup (in
/// `app.rs`): the edge translates requests into their calls and holds no
/// database pool of its own.
pub struct Services {
    pub settings: Settings,
    pub engine: Arc<Engine>,
    pub prices: Arc<PriceTable>,
    pub metrics: PrometheusHandle,
    pub clerk: Arc<ClerkVerifier>,
    /// `None` when `stripe.secret_key` is not set.
    pub stripe: Option<Arc<crate::stripe::StripeApi>>,
    pub providers: crate::providers::ProviderClient,
    /// The BYOK key cipher; `None` when `byok.encryption_key` is empty.
    pub byok: Option<crate::accounts::KeyCipher>,
    /// `None` when `clerk_webhook.signing_secret` is empty.
    pub clerk_webhook_key: Option<crate::clerk::svix::SigningKey>,
    /// `credits.referral_bonus_cents` (in micros) and its expiry.
    pub referral_bonus: crate::referrals::Bonus,
    /// Platform chats whose settlement may still be pending.
    pub settlements: Arc<crate::metering::Settlements>,
    pub rate_limits: Arc<crate::rate_limits::RateLimits>,
    /// Chats: hold, provider call, settlement.
    pub chats: Arc<crate::metering::Chats>,
    /// The database's health, refreshed in the background.
    pub health: Arc<crate::health::Health>,
    /// Clerk id → account, created on first sight.
    pub users: Arc<crate::accounts::Users>,
    /// Webhook event ids already handled, for Stripe and Clerk.
    pub inbox: crate::webhooks::Inbox,
    /// The accounts' committed history (transactions, usages), and the
    /// operators' reconcile.
    pub history: crate::ledger::LedgerHistory,
    /// Referral codes and their redemption.
    pub referrals: crate::referrals::Referrals,
    /// Users' sealed provider keys (BYOK).
    pub provider_keys: crate::accounts::ProviderKeys,
    /// The gateway's API keys (`/v1/*`).
    pub api_keys: crate::api_keys::ApiKeys,
    /// The signup bonus, once per person.
    pub signup_bonuses: crate::accounts::SignupBonuses,
    /// Top-ups' Checkout Sessions and follow-ups.
    pub topups: crate::payments::topup::TopUps,
    /// The outbox as operators list and redeliver it.
    pub events: crate::events::store::Events,
    /// Alert and receipt emails: the people's choices, the deliveries.
    pub emails: crate::email::store::Emails,
    /// What operators did, with who did it.
    pub operators: crate::operators::OperatorLog,
    /// Users' auto-recharge settings.
    pub auto_recharges: crate::recharge::store::AutoRecharges,
    /// Spend per day.
    pub usage_reports: crate::metering::UsageReports,
    /// What Stripe's events do.
    pub stripe_effects: Arc<crate::payments::webhook::StripeEffects>,
    /// What Clerk's user events do.
    pub clerk_effects: Arc<crate::accounts::clerk_events::ClerkEffects>,
}

/// What every handler shares: the services, and the per-account caches of
/// what the pages read.
pub struct AppState {
    services: Services,
    /// The balance page's history per account (`server.history_cache_entries`).
    histories: Cache<AccountId, Arc<History>>,
    /// The sealed provider keys per account, until they change.
    sealed_keys: Cache<AccountId, Arc<StoredKeys>>,
}

/// Handlers name a service as a field of the state (`state.engine`).
impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.services
    }
}

pub type State = web::Data<AppState>;

impl AppState {
    /// The state over `services`, with empty caches.
    pub fn new(services: Services) -> AppState {
        let cache_entries = services.settings.server.history_cache_entries as u64;
        AppState {
            services,
            histories: Cache::new(cache_entries),
            sealed_keys: Cache::new(cache_entries),
        }
    }

    /// The Clerk user a request is authenticated as (401 otherwise).
    pub async fn authenticate(
        &self,
        request: &actix_web::HttpRequest,
    ) -> Result<ClerkUserId, ApiError> {
        super::auth::authenticate(&self.clerk, request).await
    }

    /// The account of a Clerk user, created on first sight. A deleted
    /// user is refused (401 `ACCOUNT_DELETED`).
    pub async fn account(&self, clerk_id: &ClerkUserId) -> Result<AccountId, ApiError> {
        Ok(self.users.account(clerk_id).await?)
    }

    /// The account of a Clerk user for an operator: created on first sight,
    /// deleted or not (a deleted user's ledger stays and can be adjusted).
    pub async fn any_account(&self, clerk_id: &ClerkUserId) -> Result<AccountId, ApiError> {
        Ok(self.users.any_account(clerk_id).await?)
    }

    /// The account of a Clerk user who exists (deleted or not); 404 when
    /// creditd never saw the user.
    pub async fn existing_account(&self, clerk_id: &ClerkUserId) -> Result<AccountId, ApiError> {
        self.users
            .existing_account(clerk_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no user with Clerk id `{clerk_id}`")))
    }

    /// The user's sealed keys, from memory until they change (every platform
    /// chat asks whether the user has keys of their own).
    pub async fn stored_keys(&self, account: AccountId) -> Result<Arc<StoredKeys>, ApiError> {
        // Concurrent first reads of one account share one query.
        let load = async {
            Ok::<_, crate::db::DbError>(Arc::new(self.provider_keys.load(account).await?))
        };
        if self.settings.server.history_cache_entries == 0 {
            return Ok(load.await?);
        }
        self.sealed_keys
            .try_get_with(account, load)
            .await
            .map_err(|error| ApiError::from((*error).clone()))
    }

    /// The BYOK cipher, or 501 `BYOK_NOT_CONFIGURED`.
    pub fn cipher(&self) -> Result<&KeyCipher, ApiError> {
        self.byok.as_ref().ok_or_else(|| {
            ApiError::new(
                Code::ByokNotConfigured,
                "Using your own API keys is not configured on this server \
                 (byok.encryption_key is empty).",
            )
        })
    }

    /// Opens a stored key; a key that does not open is a clear error, not garbage.
    pub fn open_key(
        &self,
        account: AccountId,
        provider: Provider,
        sealed: &[u8],
    ) -> Result<Secret, ApiError> {
        self.cipher()?
            .open(account, provider, sealed)
            .map(Secret::new)
            .map_err(|error| {
                tracing::error!(%error, account = account.0, provider = provider.as_str(),
                    "a stored BYOK key cannot be opened");
                ApiError::new(
                    Code::Internal,
                    format!(
                        "Your saved {} API key cannot be decrypted with this server's \
                         byok.encryption_key; save the key again in settings.",
                        provider.as_str()
                    ),
                )
            })
    }

    pub async fn cached_history(&self, account: AccountId) -> Option<Arc<History>> {
        self.histories.get(&account).await
    }

    pub async fn cache_history(&self, account: AccountId, history: Arc<History>) {
        if self.settings.server.history_cache_entries > 0 {
            self.histories.insert(account, history).await;
        }
    }

    /// Forgets what is cached from a user row whose provider keys changed:
    /// the sealed keys and the balance page's `hasByok`.
    pub async fn user_keys_changed(&self, account: AccountId) {
        self.sealed_keys.invalidate(&account).await;
        self.histories.invalidate(&account).await;
    }
}
