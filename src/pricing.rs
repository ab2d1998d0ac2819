//! The price table: provider list prices in USD, one FX rate and one margin,
//! turned once at startup into integer micros of the ledger currency per
//! million tokens (rounded up), so that a request's cost is integer math.
//! Each model also names the provider's public tokenizer, where there is
//! one (OpenAI's tiktoken encodings), so its tokens can be counted as the
//! provider counts them.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::config::{ModelPriceSettings, PricingSettings};
use crate::money::{Decimal, Micros};

pub use crate::config::{Encoding, Provider};

/// Tokens of one request, as the provider reported them, split by price class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

/// One model's prices in micros of the ledger currency per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelPrice {
    pub provider: Provider,
    pub input_micros_per_million: i64,
    pub output_micros_per_million: i64,
    pub cache_read_micros_per_million: i64,
    pub cache_write_micros_per_million: i64,
    /// The provider's public tokenizer for the model; `None`: none is public.
    pub encoding: Option<Encoding>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("unknown model `{0}`: it has no price in the price table")]
    UnknownModel(String),
    #[error("the cost of this request overflows the range of micros")]
    Overflow,
}

#[derive(Debug, Clone)]
pub struct PriceTable {
    models: BTreeMap<String, ModelPrice>,
    default_model: String,
}

const TOKENS_PER_MILLION: i128 = 1_000_000;
const BASIS_POINTS: i128 = 10_000;

impl PriceTable {
    /// Converts the configured USD list prices once. Errors name the config key.
    pub fn from_settings(settings: &PricingSettings) -> Result<Self, String> {
        let usd_per_eur = Decimal::parse(&settings.usd_per_eur)
            .map_err(|e| format!("pricing.usd_per_eur: {e}"))?;
        if usd_per_eur.numerator <= 0 {
            return Err("pricing.usd_per_eur: must be greater than zero".into());
        }
        let mut models = BTreeMap::new();
        for (name, model) in &settings.models {
            let price = convert_model(model, usd_per_eur, settings.margin_bps)
                .map_err(|e| format!("pricing.models.\"{name}\".{e}"))?;
            models.insert(name.clone(), price);
        }
        if !models.contains_key(&settings.default_model) {
            return Err(format!(
                "pricing.default_model: `{}` is not in pricing.models",
                settings.default_model
            ));
        }
        Ok(PriceTable {
            models,
            default_model: settings.default_model.clone(),
        })
    }

    pub fn price(&self, model: &str) -> Result<&ModelPrice, PricingError> {
        self.models
            .get(model)
            .ok_or_else(|| PricingError::UnknownModel(model.to_owned()))
    }

    pub fn default_model(&self) -> &str {
        &self.default_model
    }

    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.models
            .iter()
            .map(|(name, price)| (name.as_str(), price))
    }

    /// `ceil(sum(tokens_k * price_k) / 1_000_000)` micros: one round-up per request.
    pub fn cost(&self, model: &str, usage: &TokenUsage) -> Result<Micros, PricingError> {
        self.price(model)?.cost(usage)
    }
}

impl ModelPrice {
    pub fn cost(&self, usage: &TokenUsage) -> Result<Micros, PricingError> {
        let terms = [
            (usage.input_tokens, self.input_micros_per_million),
            (usage.output_tokens, self.output_micros_per_million),
            (usage.cache_read_tokens, self.cache_read_micros_per_million),
            (
                usage.cache_write_tokens,
                self.cache_write_micros_per_million,
            ),
        ];
        // u64 tokens times i64 prices: each product fits in i128 with room to add four.
        let total: i128 = terms
            .iter()
            .map(|&(tokens, price)| i128::from(tokens) * i128::from(price))
            .sum();
        let micros = div_ceil(total, TOKENS_PER_MILLION);
        i64::try_from(micros)
            .map(Micros::new)
            .map_err(|_| PricingError::Overflow)
    }
}

fn convert_model(
    model: &ModelPriceSettings,
    usd_per_eur: Decimal,
    margin_bps: u32,
) -> Result<ModelPrice, String> {
    let convert = |key: &str, usd: &str| -> Result<i64, String> {
        let usd = Decimal::parse(usd).map_err(|e| format!("{key}: {e}"))?;
        if usd.numerator < 0 {
            return Err(format!("{key}: a price cannot be negative"));
        }
        // eur_micros = usd * 1e6 * (1 + margin) / usd_per_eur, rounded up.
        let numerator = usd.numerator
            * i128::from(crate::money::MICROS_PER_UNIT)
            * (BASIS_POINTS + i128::from(margin_bps))
            * usd_per_eur.denominator;
        let denominator = usd.denominator * BASIS_POINTS * usd_per_eur.numerator;
        i64::try_from(div_ceil(numerator, denominator)).map_err(|_| format!("{key}: too large"))
    };
    if model.encoding.is_some() && model.provider != Provider::Openai {
        return Err(format!(
            "encoding: {} publishes no tokenizer; only OpenAI models name one",
            model.provider.as_str()
        ));
    }
    Ok(ModelPrice {
        provider: model.provider,
        encoding: model.encoding,
        input_micros_per_million: convert("input_usd", &model.input_usd)?,
        output_micros_per_million: convert("output_usd", &model.output_usd)?,
        cache_read_micros_per_million: convert("cache_read_usd", &model.cache_read_usd)?,
        cache_write_micros_per_million: convert("cache_write_usd", &model.cache_write_usd)?,
    })
}

/// Ceiling division for a non-negative numerator and a positive denominator.
fn div_ceil(numerator: i128, denominator: i128) -> i128 {
    debug_assert!(numerator >= 0 && denominator > 0);
    (numerator + denominator - 1) / denominator
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn table() -> PriceTable {
        let settings = Settings::default_file().expect("the committed config.toml parses");
        PriceTable::from_settings(&settings.pricing).expect("the default price table converts")
    }

    fn usage(input: u64, output: u64, cache_read: u64, cache_write: u64) -> TokenUsage {
        TokenUsage {
            input_tokens: input,
            output_tokens: output,
            cache_read_tokens: cache_read,
            cache_write_tokens: cache_write,
        }
    }

    #[test]
    fn seed_model_prices_convert_with_margin_and_fx_rounding_up() {
        let price = *table().price("claude-sonnet-4-20250514").unwrap();
        // 3.00 USD * 1.05 / 1.08 = 2.9166666.. EUR, 15.00 USD -> 14.5833333.. EUR
        assert_eq!(price.input_micros_per_million, 2_916_667);
        assert_eq!(price.output_micros_per_million, 14_583_334);
        // 0.30 USD -> 0.2916666.. EUR, 3.75 USD -> 3.6458333.. EUR
        assert_eq!(price.cache_read_micros_per_million, 291_667);
        assert_eq!(price.cache_write_micros_per_million, 3_645_834);
    }

    #[test]
    fn the_seed_typical_request_costs_an_exact_number_of_micros() {
        // 500 * 2_916_667 + 2_000 * 14_583_334 = 30_625_001_500 -> ceil / 1e6
        let cost = table()
            .cost("claude-sonnet-4-20250514", &usage(500, 2_000, 0, 0))
            .unwrap();
        assert_eq!(cost, Micros::new(30_626));
    }

    #[test]
    fn cache_reads_and_writes_are_priced_by_their_own_rates() {
        // 1_000 * 291_667 + 2_000 * 3_645_834 = 7_583_335_000 -> 7_584
        let cost = table()
            .cost("claude-sonnet-4-20250514", &usage(0, 0, 1_000, 2_000))
            .unwrap();
        assert_eq!(cost, Micros::new(7_584));
        // gpt-4o cached input: 1.25 USD * 1.05 / 1.08 = 1.2152777.. -> 1_215_278
        let price = *table().price("gpt-4o").unwrap();
        assert_eq!(price.cache_read_micros_per_million, 1_215_278);
    }

    #[test]
    fn one_token_rounds_up_to_one_micro() {
        let cost = table().cost("gpt-4o-mini", &usage(1, 0, 0, 0)).unwrap();
        assert_eq!(cost, Micros::new(1));
    }

    #[test]
    fn zero_tokens_cost_nothing() {
        let cost = table().cost("claude-opus-4-5", &usage(0, 0, 0, 0)).unwrap();
        assert_eq!(cost, Micros::ZERO);
    }

    #[test]
    fn a_huge_token_count_is_an_overflow_error_not_a_wrap() {
        let max = u64::MAX;
        let result = table().cost("claude-opus-4-5", &usage(max, max, max, max));
        assert_eq!(result, Err(PricingError::Overflow));
        // a billion output tokens still fits: 1e9 * 24_305_556 / 1e6
        let cost = table()
            .cost("claude-opus-4-5", &usage(0, 1_000_000_000, 0, 0))
            .unwrap();
        assert_eq!(cost, Micros::new(24_305_556_000));
    }

    #[test]
    fn an_unknown_model_is_refused_not_priced_as_another() {
        let result = table().cost("gpt-2", &usage(10, 10, 0, 0));
        assert_eq!(result, Err(PricingError::UnknownModel("gpt-2".into())));
    }

    #[test]
    fn openai_models_name_their_tiktoken_encoding_and_anthropic_models_none() {
        let table = table();
        for model in ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini"] {
            let price = table.price(model).unwrap();
            assert_eq!(price.encoding, Some(Encoding::O200kBase), "{model}");
        }
        for model in ["claude-sonnet-4-5", "claude-opus-4-5", "claude-haiku-4-5"] {
            assert_eq!(table.price(model).unwrap().encoding, None, "{model}");
        }
    }

    #[test]
    fn an_encoding_on_a_model_whose_provider_publishes_no_tokenizer_is_refused_by_name() {
        let mut settings = Settings::default_file().unwrap().pricing;
        let model = settings.models.get_mut("claude-haiku-4-5").unwrap();
        model.encoding = Some(Encoding::Cl100kBase);
        let error = PriceTable::from_settings(&settings).unwrap_err();
        assert!(
            error.starts_with("pricing.models.\"claude-haiku-4-5\".encoding"),
            "{error}"
        );
    }

    #[test]
    fn encodings_are_read_by_their_tiktoken_names() {
        let model = |encoding: &str| {
            toml::from_str::<ModelPriceSettings>(&format!(
                "provider = \"openai\"\ninput_usd = \"1\"\noutput_usd = \"1\"\n\
                 cache_read_usd = \"1\"\ncache_write_usd = \"1\"\nencoding = \"{encoding}\""
            ))
        };
        assert_eq!(
            model("cl100k_base").unwrap().encoding,
            Some(Encoding::Cl100kBase)
        );
        assert_eq!(
            model("o200k_base").unwrap().encoding,
            Some(Encoding::O200kBase)
        );
        assert!(model("p50k_base").is_err());
    }

    #[test]
    fn the_default_table_holds_current_and_seed_models() {
        let table = table();
        for model in [
            "claude-sonnet-4-5",
            "claude-opus-4-5",
            "claude-haiku-4-5",
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "claude-sonnet-4-20250514",
        ] {
            assert!(table.price(model).is_ok(), "{model} is priced");
        }
        assert_eq!(table.default_model(), "claude-sonnet-4-5");
    }
}
