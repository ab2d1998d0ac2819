//! What a platform chat is held for before the provider call, and charged
//! for a stream when the provider's counts never came.
//!
//! Where the model's provider publishes its tokenizer (OpenAI), the prompt
//! and a stream's text are counted with it (`super::tokens`), as the
//! provider counts them. Where it does not (Anthropic), they are bounded by
//! bytes: a BPE token covers at least one byte, so bytes (plus overheads)
//! are never under the provider's count of a prompt; a stream's text is
//! charged `ceil(bytes / 3)`.

use super::tokens::{piece_end, Tokenizer, PIECE_MAX_BYTES};
use crate::config::ChatSettings;
use crate::money::Micros;
use crate::pricing::{ModelPrice, TokenUsage};
use crate::providers::{ChatMessage, InputUsage, StreamUsage};

/// Bytes of streamed text counted as one output token when the provider's
/// count never came and its tokenizer is not public.
const STREAMED_BYTES_PER_TOKEN: u64 = 3;

/// The input tokens of a call, before the provider says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prompt {
    pub tokens: u64,
    /// Counted with the provider's tokenizer (else bounded by bytes): the
    /// provider bills them once it accepted the call, before any output.
    pub counted: bool,
}

/// The prompt of `messages`: counted with `tokenizer`, else its byte bound.
pub fn prompt_tokens(
    messages: &[ChatMessage],
    tokenizer: Option<Tokenizer>,
    settings: &ChatSettings,
) -> Prompt {
    match tokenizer {
        Some(tokenizer) => Prompt {
            tokens: tokenizer.count_prompt(messages),
            counted: true,
        },
        None => Prompt {
            tokens: estimate_input_tokens(messages, settings),
            counted: false,
        },
    }
}

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

/// The text a stream produced, as far as its charge needs it: its bytes
/// and, with the provider's tokenizer, its tokens. The text is kept only
/// until a piece of it can be counted (bounded memory, however long the
/// stream), and counted only if the provider's own count never comes.
pub struct StreamedText {
    tokenizer: Option<Tokenizer>,
    bytes: u64,
    /// Text not counted yet.
    pending: String,
    counted_tokens: u64,
}

impl StreamedText {
    pub fn new(tokenizer: Option<Tokenizer>) -> StreamedText {
        StreamedText {
            tokenizer,
            bytes: 0,
            pending: String::new(),
            counted_tokens: 0,
        }
    }

    pub fn push(&mut self, text: &str) {
        self.bytes = self.bytes.saturating_add(text.len() as u64);
        let Some(tokenizer) = self.tokenizer else {
            return;
        };
        self.pending.push_str(text);
        // Counted a piece at a time, cut where a token cannot span, once
        // the pending text is twice a piece: the rest waits for its cut.
        while self.pending.len() >= 2 * PIECE_MAX_BYTES {
            let end = piece_end(&self.pending, PIECE_MAX_BYTES);
            let tokens = tokenizer.count(&self.pending[..end]);
            self.counted_tokens = self.counted_tokens.saturating_add(tokens);
            self.pending.drain(..end);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The output tokens of the text: counted with the tokenizer, else
    /// `ceil(bytes / 3)`; at least one for any text.
    pub fn tokens(&self) -> u64 {
        let tokens = match self.tokenizer {
            Some(tokenizer) => self
                .counted_tokens
                .saturating_add(tokenizer.count(&self.pending)),
            None => self.bytes.div_ceil(STREAMED_BYTES_PER_TOKEN),
        };
        tokens.max(u64::from(!self.is_empty()))
    }
}

/// The tokens a stream is charged for: the provider's counts where they
/// came; otherwise the prompt for the input, and the text produced for the
/// output (never fewer than the provider's provisional count).
pub fn streamed_usage(usage: StreamUsage, text: &StreamedText, prompt: Prompt) -> TokenUsage {
    let input = usage.input.unwrap_or(InputUsage {
        input_tokens: prompt.tokens,
        cache_read_tokens: 0,
        cache_write_tokens: 0,
    });
    let received = u64::from(!text.is_empty());
    let output_tokens = match usage.output_tokens {
        Some(reported) => reported.max(received),
        None => text.tokens().max(usage.output_tokens_so_far),
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

    fn text(tokenizer: Option<Tokenizer>, pieces: &[&str]) -> StreamedText {
        let mut text = StreamedText::new(tokenizer);
        for piece in pieces {
            text.push(piece);
        }
        text
    }

    fn o200k() -> Option<Tokenizer> {
        Some(Tokenizer::build(crate::pricing::Encoding::O200kBase).unwrap())
    }

    const BYTE_BOUND: Prompt = Prompt {
        tokens: 100,
        counted: false,
    };

    #[test]
    fn streamed_text_without_a_count_or_a_tokenizer_is_charged_by_its_bytes() {
        let usage = streamed_usage(
            StreamUsage::default(),
            &text(None, &["0123456789"]),
            BYTE_BOUND,
        );
        assert_eq!(usage.output_tokens, 4);
        assert_eq!(usage.input_tokens, 100);
        let one_byte = text(None, &["x"]);
        assert_eq!(
            streamed_usage(StreamUsage::default(), &one_byte, BYTE_BOUND).output_tokens,
            1
        );
        let reported = StreamUsage {
            output_tokens: Some(0),
            ..StreamUsage::default()
        };
        assert_eq!(
            streamed_usage(reported, &text(None, &["ab"]), BYTE_BOUND).output_tokens,
            1
        );
    }

    #[test]
    fn streamed_text_without_a_count_is_counted_with_the_tokenizer() {
        // "Hello, world! How are you today?" is 9 tokens in o200k_base.
        let deltas = [
            "Hello", ",", " world", "!", " How", " are", " you", " today", "?",
        ];
        let counted = Prompt {
            tokens: 12_000,
            counted: true,
        };
        let usage = streamed_usage(StreamUsage::default(), &text(o200k(), &deltas), counted);
        assert_eq!(usage.output_tokens, 9);
        assert_eq!(usage.input_tokens, 12_000);
        let nothing = streamed_usage(StreamUsage::default(), &text(o200k(), &[]), counted);
        assert_eq!(nothing.output_tokens, 0);
        assert_eq!(nothing.input_tokens, 12_000);
    }

    #[test]
    fn a_long_stream_is_counted_as_it_comes_and_as_its_whole_text_would_be() {
        let tokenizer = o200k();
        let delta = "Une phrase de plus, avec des mots et des chiffres 12345. ";
        let deltas = vec![delta; 3_000];
        let streamed = text(tokenizer, &deltas);
        assert!(streamed.pending.len() < 2 * PIECE_MAX_BYTES);
        let whole = tokenizer.unwrap().count(&delta.repeat(3_000));
        assert_eq!(streamed.tokens(), whole);
    }

    #[test]
    fn the_reported_usage_wins_over_the_counts() {
        let reported = StreamUsage {
            input: Some(InputUsage {
                input_tokens: 40,
                cache_read_tokens: 60,
                cache_write_tokens: 0,
            }),
            output_tokens: Some(7),
            output_tokens_so_far: 0,
        };
        let counted = Prompt {
            tokens: 500,
            counted: true,
        };
        let usage = streamed_usage(
            reported,
            &text(o200k(), &["a b c d e f g h i j k"]),
            counted,
        );
        assert_eq!(
            usage,
            TokenUsage {
                input_tokens: 40,
                output_tokens: 7,
                cache_read_tokens: 60,
                cache_write_tokens: 0
            }
        );
    }

    #[test]
    fn a_prompt_is_counted_with_the_tokenizer_where_there_is_one() {
        let messages = vec![ChatMessage {
            role: Role::User,
            content: "hello world ".repeat(1_000),
        }];
        let counted = prompt_tokens(&messages, o200k(), &settings());
        // The reply's priming (3), the message's framing (3) and role (1).
        let content = o200k().unwrap().count(&messages[0].content);
        assert_eq!(
            counted,
            Prompt {
                tokens: 7 + content,
                counted: true
            }
        );
        assert!(content < 2_100, "{content}");
        let bounded = prompt_tokens(&messages, None, &settings());
        assert_eq!(
            bounded,
            Prompt {
                tokens: 16 + 12_000 + 8,
                counted: false
            }
        );
    }
}
