//! What a platform chat is held for before the provider call, and charged
//! for a stream when the provider's counts never came.

use crate::config::ChatSettings;
use crate::money::Micros;
use crate::pricing::{ModelPrice, TokenUsage};
use crate::providers::{ChatMessage, InputUsage, StreamUsage};

/// Bytes of streamed text counted as one output token when the provider's
/// count never came.
const STREAMED_BYTES_PER_TOKEN: u64 = 3;

/// Input tokens of `messages`, never fewer than the provider will count.
pub fn estimate_input_tokens(messages: &[ChatMessage], settings: &ChatSettings) -> u64 {
    messages
        .iter()
        .fold(settings.request_overhead_tokens, |sum, m| {
            sum.saturating_add(m.content.len() as u64)
                .saturating_add(settings.message_overhead_tokens)
        })
}

/// The hold of a call: the input estimate at the dearest input price plus
/// `max_tokens` at the output price.
pub fn hold_amount(price: &ModelPrice, input_tokens: u64, max_tokens: u32) -> Option<Micros> {
    let dearest = price
        .input_micros_per_million
        .max(price.cache_read_micros_per_million)
        .max(price.cache_write_micros_per_million);
    let priced = ModelPrice {
        input_micros_per_million: dearest,
        ..*price
    };
    priced
        .cost(&TokenUsage {
            input_tokens,
            output_tokens: u64::from(max_tokens),
            ..TokenUsage::default()
        })
        .ok()
}

/// The tokens a stream is charged for: the provider's counts where they
/// came; otherwise the input estimate, and `ceil(bytes / 3)` of the text
/// received for the output (at least one token for any text).
pub fn streamed_usage(usage: StreamUsage, text_bytes: u64, input_estimate: u64) -> TokenUsage {
    let input = usage.input.unwrap_or(InputUsage {
        input_tokens: input_estimate,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
    });
    let received = u64::from(text_bytes > 0);
    let output_tokens = match usage.output_tokens {
        Some(reported) => reported.max(received),
        None => text_bytes
            .div_ceil(STREAMED_BYTES_PER_TOKEN)
            .max(usage.output_tokens_so_far),
    };
    TokenUsage {
        input_tokens: input.input_tokens,
        output_tokens,
        cache_read_tokens: input.cache_read_tokens,
        cache_write_tokens: input.cache_write_tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Role;

    fn settings() -> ChatSettings {
        crate::config::Settings::default_file().unwrap().chat
    }

    #[test]
    fn the_input_estimate_counts_bytes_and_overheads() {
        let messages = vec![
            ChatMessage {
                role: Role::System,
                content: "abc".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "é€".into(),
            },
        ];
        // 16 + (3 + 8) + (5 + 8)
        assert_eq!(estimate_input_tokens(&messages, &settings()), 40);
    }

    #[test]
    fn streamed_text_without_a_count_is_charged_by_its_bytes() {
        let usage = streamed_usage(StreamUsage::default(), 10, 100);
        assert_eq!(usage.output_tokens, 4);
        assert_eq!(usage.input_tokens, 100);
        assert_eq!(
            streamed_usage(StreamUsage::default(), 1, 0).output_tokens,
            1
        );
        let reported = StreamUsage {
            output_tokens: Some(0),
            ..StreamUsage::default()
        };
        assert_eq!(streamed_usage(reported, 2, 0).output_tokens, 1);
    }
}
