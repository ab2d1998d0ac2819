//! The one step from settings (plain data) to what the service runs with:
//! the price table and its models' tokenizers, the BYOK cipher, the Clerk
//! webhook signing key, the signup and referral bonuses, each built and
//! checked once at startup, in its own type.

use std::sync::Arc;

use crate::accounts::{KeyCipher, SignupBonus};
use crate::clerk::svix::SigningKey;
use crate::config::Settings;
use crate::metering::tokens::Tokenizers;
use crate::pricing::PriceTable;

/// Settings turned into the values the service uses.
pub struct Runtime {
    pub settings: Settings,
    pub prices: Arc<PriceTable>,
    /// The tokenizers the price table's models name (costly to build).
    pub tokenizers: Tokenizers,
    /// `None` when `byok.encryption_key` is empty.
    pub cipher: Option<KeyCipher>,
    /// `None` when `clerk_webhook.signing_secret` is empty.
    pub clerk_webhook_key: Option<SigningKey>,
    pub signup_bonus: SignupBonus,
    pub referral_bonus: crate::referrals::Bonus,
}

impl Runtime {
    /// Builds every value, or names the configuration key at fault.
    pub fn build(settings: Settings) -> Result<Runtime, String> {
        let prices = PriceTable::from_settings(&settings.pricing)
            .map_err(|e| format!("configuration key `{e}"))?;
        let tokenizers = Tokenizers::load(&prices)?;
        let cipher = KeyCipher::from_settings(&settings.byok)
            .map_err(|e| format!("configuration key `byok.encryption_key`: {e}"))?;
        let secret = &settings.clerk_webhook.signing_secret;
        let clerk_webhook_key = if secret.is_empty() {
            None
        } else {
            Some(SigningKey::from_secret(secret.expose()).map_err(|error| {
                format!("configuration key `clerk_webhook.signing_secret`: {error}")
            })?)
        };
        let signup_bonus = SignupBonus::new(
            settings.credits.signup_bonus_cents,
            settings.credits.signup_bonus_expiry_days,
        )?;
        let referral_bonus = crate::referrals::Bonus {
            amount: crate::money::Micros::from_cents(settings.credits.referral_bonus_cents)
                .map_err(|_| {
                    "configuration key `credits.referral_bonus_cents`: too large".to_owned()
                })?,
            expiry_days: settings.credits.referral_bonus_expiry_days,
            minimum_kept: crate::money::Micros::from_cents(settings.stripe.topup_cents_min)
                .map_err(|_| "configuration key `stripe.topup_cents_min`: too large".to_owned())?,
        };
        Ok(Runtime {
            referral_bonus,
            settings,
            prices: Arc::new(prices),
            tokenizers,
            cipher,
            clerk_webhook_key,
            signup_bonus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn values_that_cannot_be_built_are_refused_by_their_key() {
        let mut settings = Settings::default_file().unwrap();
        settings.byok.encryption_key = Secret::new("c2hvcnQ=");
        let error = Runtime::build(settings).err().unwrap_or_default();
        assert!(error.contains("byok.encryption_key"), "{error}");

        let mut settings = Settings::default_file().unwrap();
        settings.clerk_webhook.signing_secret = Secret::new("whsec_not base64!");
        let error = Runtime::build(settings).err().unwrap_or_default();
        assert!(error.contains("clerk_webhook.signing_secret"), "{error}");

        let mut settings = Settings::default_file().unwrap();
        settings.pricing.default_model = "no-such-model".into();
        let error = Runtime::build(settings).err().unwrap_or_default();
        assert!(error.contains("pricing.default_model"), "{error}");

        let mut settings = Settings::default_file().unwrap();
        settings.credits.signup_bonus_expiry_days = 36_501;
        let error = Runtime::build(settings).err().unwrap_or_default();
        assert!(
            error.contains("credits.signup_bonus_expiry_days"),
            "{error}"
        );

        let mut settings = Settings::default_file().unwrap();
        settings.credits.referral_bonus_cents = i64::MAX;
        let error = Runtime::build(settings).err().unwrap_or_default();
        assert!(error.contains("credits.referral_bonus_cents"), "{error}");

        assert!(Runtime::build(Settings::default_file().unwrap()).is_ok());
    }
}
