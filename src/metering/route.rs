//! Which provider, model and key serve a chat: the user's own key (BYOK)
//! first, otherwise the platform key of the model's provider. Every way a
//! chat cannot be routed is a [`RouteError`] naming what the caller can do.

use std::sync::Arc;

use crate::accounts::{KeyCipher, StoredKeys};
use crate::config::Secret;
use crate::ledger::AccountId;
use crate::pricing::{ModelPrice, PriceTable, Provider};
use crate::providers::ProviderClient;

/// What routing reads, built once at startup.
pub struct Router {
    pub prices: Arc<PriceTable>,
    pub providers: ProviderClient,
    /// The BYOK key cipher; `None` when `byok.encryption_key` is empty.
    pub cipher: Option<KeyCipher>,
}

/// The provider, model and key that serve a chat.
pub struct Route {
    pub provider: Provider,
    pub model: String,
    /// The model's price, looked up once; `None` on the user's own key
    /// (nothing is held nor charged).
    pub price: Option<ModelPrice>,
    pub key: Secret,
    pub byok: bool,
}

/// Why a chat has no route.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The named model is not in the price table (400).
    #[error("field `model`: unknown model `{model}` (known: {known})")]
    UnknownModel { model: String, known: String },
    /// The user's saved key is for another provider than the named model's (400).
    #[error(
        "field `model`: `{model}` is served by {provider}, and your saved API key is for \
         another provider; omit `model` or add your {provider} key in settings"
    )]
    KeyForAnotherProvider {
        model: String,
        provider: &'static str,
    },
    /// No platform key for the model's provider (400 `NO_API_KEY`).
    #[error("no platform API key for this model's provider")]
    NoPlatformKey,
    /// The user has keys but this server cannot open them (501).
    #[error(
        "Using your own API keys is not configured on this server (byok.encryption_key is empty)."
    )]
    ByokNotConfigured,
    /// A saved key does not open with this server's cipher (500, told).
    #[error(
        "Your saved {provider} API key cannot be decrypted with this server's \
         byok.encryption_key; save the key again in settings."
    )]
    KeyUnreadable { provider: &'static str },
    /// The configured default model has no price: a startup check missed it.
    #[error("default model: {0}")]
    DefaultModel(String),
}

impl Router {
    /// BYOK first (the named model's provider, else Anthropic, else
    /// OpenAI), otherwise the platform key of the model's provider (the
    /// default model's when none is named).
    pub fn route(
        &self,
        account: AccountId,
        model: Option<&str>,
        stored: &StoredKeys,
    ) -> Result<Route, RouteError> {
        let named = match model {
            Some(model) => Some((model, self.price(model)?)),
            None => None,
        };
        if stored.any() {
            return self.own_key(account, named, stored);
        }
        let (model, price) = match named {
            Some((model, price)) => (model.to_owned(), price),
            None => {
                let model = self.prices.default_model().to_owned();
                let price = *self
                    .prices
                    .price(&model)
                    .map_err(|error| RouteError::DefaultModel(error.to_string()))?;
                (model, price)
            }
        };
        let key = self
            .providers
            .platform_key(price.provider)
            .cloned()
            .ok_or(RouteError::NoPlatformKey)?;
        Ok(Route {
            provider: price.provider,
            model,
            price: Some(price),
            key,
            byok: false,
        })
    }

    fn price(&self, model: &str) -> Result<ModelPrice, RouteError> {
        self.prices
            .price(model)
            .copied()
            .map_err(|_| RouteError::UnknownModel {
                model: model.to_owned(),
                known: self
                    .prices
                    .models()
                    .map(|(name, _)| name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The user's own key: the named model's provider, else Anthropic,
    /// else OpenAI; the provider's BYOK model when none is named.
    fn own_key(
        &self,
        account: AccountId,
        named: Option<(&str, ModelPrice)>,
        stored: &StoredKeys,
    ) -> Result<Route, RouteError> {
        let provider = match named {
            Some((model, price)) if stored.get(price.provider).is_none() => {
                return Err(RouteError::KeyForAnotherProvider {
                    model: model.to_owned(),
                    provider: price.provider.as_str(),
                })
            }
            Some((_, price)) => price.provider,
            None if stored.anthropic.is_some() => Provider::Anthropic,
            None => Provider::Openai,
        };
        let sealed = stored.get(provider).unwrap_or_default();
        let cipher = self.cipher.as_ref().ok_or(RouteError::ByokNotConfigured)?;
        let key = cipher
            .open(account, provider, sealed)
            .map(Secret::new)
            .map_err(|error| {
                tracing::error!(%error, account = account.0, provider = provider.as_str(),
                    "a stored BYOK key cannot be opened");
                RouteError::KeyUnreadable {
                    provider: provider.as_str(),
                }
            })?;
        let model = match named {
            Some((model, _)) => model.to_owned(),
            None => self.providers.byok_model(provider).to_owned(),
        };
        Ok(Route {
            provider,
            model,
            price: None,
            key,
            byok: true,
        })
    }
}
