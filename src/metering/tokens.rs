//! Tokens counted as the provider counts them, with its public tokenizer:
//! OpenAI's tiktoken encodings (the `tiktoken-rs` crate, whose BPE ranks
//! ship inside it, so nothing is fetched at run time). Anthropic publishes
//! no tokenizer: its models have none, and their tokens stay bounded by
//! bytes (`super::estimate`).
//!
//! Building an encoding decodes and indexes a few hundred thousand ranks
//! (a fraction of a second): each encoding the price table names is built
//! once per process, at startup, never on a request.
//!
//! Text is counted in pieces of at most [`PIECE_MAX_BYTES`], cut where the
//! encodings' pre-tokenizer cuts anyway (before a space that follows a
//! non-space), so the count is the same as in one go; the bound keeps each
//! regex match short (the backtracking regex gives up past a million
//! steps) and lets a stream's text be counted as it comes, in bounded memory.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::pricing::{Encoding, ModelPrice, PriceTable};
use crate::providers::ChatMessage;

/// Tokens OpenAI adds around each message of a chat (`<|start|>`, the role's
/// end, `<|end|>`), on top of the role's and the content's own tokens.
const MESSAGE_FRAMING_TOKENS: u64 = 3;
/// Tokens that open the reply (`<|start|>assistant<|message|>`), once per chat.
const REPLY_PRIMING_TOKENS: u64 = 3;
/// Longest text counted in one call of the encoder.
pub const PIECE_MAX_BYTES: usize = 4 * 1024;

/// The tokenizers of the price table's models, built at startup.
#[derive(Clone, Copy, Default)]
pub struct Tokenizers {
    o200k_base: Option<Tokenizer>,
    cl100k_base: Option<Tokenizer>,
}

impl Tokenizers {
    /// Builds every encoding a model of `prices` names (none: nothing built).
    pub fn load(prices: &PriceTable) -> Result<Tokenizers, String> {
        let mut tokenizers = Tokenizers::default();
        for (_, price) in prices.models() {
            if let Some(encoding) = price.encoding {
                let tokenizer = Some(Tokenizer::build(encoding)?);
                match encoding {
                    Encoding::O200kBase => tokenizers.o200k_base = tokenizer,
                    Encoding::Cl100kBase => tokenizers.cl100k_base = tokenizer,
                }
            }
        }
        Ok(tokenizers)
    }

    /// The tokenizer of a model; `None` when its provider publishes none.
    pub fn for_model(&self, price: &ModelPrice) -> Option<Tokenizer> {
        match price.encoding? {
            Encoding::O200kBase => self.o200k_base,
            Encoding::Cl100kBase => self.cl100k_base,
        }
    }
}

/// One encoding, built once per process and shared.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    encoding: Encoding,
    bpe: &'static CoreBPE,
}

impl Tokenizer {
    /// The encoding, built on the first call in this process.
    pub fn build(encoding: Encoding) -> Result<Tokenizer, String> {
        static O200K_BASE: OnceLock<Result<CoreBPE, String>> = OnceLock::new();
        static CL100K_BASE: OnceLock<Result<CoreBPE, String>> = OnceLock::new();
        let (cell, build): (_, fn() -> anyhow::Result<CoreBPE>) = match encoding {
            Encoding::O200kBase => (&O200K_BASE, tiktoken_rs::o200k_base),
            Encoding::Cl100kBase => (&CL100K_BASE, tiktoken_rs::cl100k_base),
        };
        let bpe = cell
            .get_or_init(|| build().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| format!("the {} tokenizer cannot be built: {e}", encoding.as_str()))?;
        Ok(Tokenizer { encoding, bpe })
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The tokens of `text` as plain text (a special token's spelling in it
    /// is text, as the provider takes it).
    pub fn count(&self, text: &str) -> u64 {
        let mut rest = text;
        let mut tokens = 0u64;
        while !rest.is_empty() {
            let end = piece_end(rest, PIECE_MAX_BYTES);
            tokens = tokens.saturating_add(self.count_piece(&rest[..end]));
            rest = &rest[end..];
        }
        tokens
    }

    /// A piece short enough for the encoder. Should the encoder fail on it
    /// all the same (it panics where it would return an error), the piece
    /// is bounded by its bytes, never under its tokens, and the bug logged.
    fn count_piece(&self, piece: &str) -> u64 {
        match catch_unwind(AssertUnwindSafe(|| self.bpe.count_ordinary(piece))) {
            Ok(tokens) => tokens as u64,
            Err(_) => {
                tracing::error!(
                    encoding = self.encoding.as_str(),
                    bytes = piece.len(),
                    "the tokenizer failed on a piece of text; it is counted as one token per byte"
                );
                piece.len() as u64
            }
        }
    }

    /// The prompt tokens of a chat as OpenAI frames it: each message's role
    /// and content plus [`MESSAGE_FRAMING_TOKENS`], and the reply's priming.
    pub fn count_prompt(&self, messages: &[ChatMessage]) -> u64 {
        messages.iter().fold(REPLY_PRIMING_TOKENS, |sum, message| {
            sum.saturating_add(MESSAGE_FRAMING_TOKENS)
                .saturating_add(self.count(message.role.as_str()))
                .saturating_add(self.count(&message.content))
        })
    }
}

/// Where the first piece of `text` ends: all of it if short enough, else
/// the last cut the pre-tokenizer makes anyway within `max_bytes` (before
/// a space that follows a non-space: no token of these encodings spans
/// it), else the last character boundary (a run of one class of character
/// that long, where the count may differ by a token).
pub fn piece_end(text: &str, max_bytes: usize) -> usize {
    if text.len() <= max_bytes {
        return text.len();
    }
    let bytes = text.as_bytes();
    let safe = (1..=max_bytes)
        .rev()
        .find(|&i| bytes[i] == b' ' && !ends_with_whitespace(&text[..i]));
    safe.unwrap_or_else(|| {
        (1..=max_bytes)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len())
    })
}

fn ends_with_whitespace(text: &str) -> bool {
    text.chars().next_back().is_some_and(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::Role;

    fn o200k() -> Tokenizer {
        Tokenizer::build(Encoding::O200kBase).unwrap()
    }

    #[test]
    fn known_strings_count_as_openai_counts_them() {
        let o200k = o200k();
        assert_eq!(o200k.count("hello world"), 2);
        assert_eq!(o200k.count(""), 0);
        let cl100k = Tokenizer::build(Encoding::Cl100kBase).unwrap();
        // tiktoken's own example: "tiktoken is great!" is 6 tokens in cl100k_base.
        assert_eq!(cl100k.count("tiktoken is great!"), 6);
        // A special token's spelling is plain text, several tokens.
        assert!(o200k.count("<|endoftext|>") > 1);
    }

    #[test]
    fn a_chat_prompt_counts_as_the_openai_cookbook_frames_it() {
        let messages = vec![
            ChatMessage {
                role: Role::System,
                content: "You write apps.".into(),
            },
            ChatMessage {
                role: Role::User,
                content: "Build me a todo app.".into(),
            },
        ];
        let ours = o200k().count_prompt(&messages);
        let cookbook: Vec<tiktoken_rs::ChatCompletionRequestMessage> = messages
            .iter()
            .map(|m| tiktoken_rs::ChatCompletionRequestMessage {
                role: m.role.as_str().into(),
                content: Some(m.content.clone()),
                ..Default::default()
            })
            .collect();
        let expected = tiktoken_rs::num_tokens_from_messages("gpt-4o", &cookbook).unwrap();
        assert_eq!(ours, expected as u64);
        // 3 + (3 + 1 + 4) + (3 + 1 + 6)
        assert_eq!(ours, 21);
    }

    #[test]
    fn long_text_counted_in_pieces_counts_as_in_one_go() {
        let o200k = o200k();
        let text =
            "Le renard brun saute par-dessus le chien paresseux, encore et encore. ".repeat(1_000);
        assert!(text.len() > 4 * PIECE_MAX_BYTES);
        assert_eq!(o200k.count(&text), o200k.bpe.count_ordinary(&text) as u64);
        // No space to cut at: cut between characters, a token off at most per cut.
        let text = "日本語のテキスト、".repeat(2_000);
        let cuts = text.len().div_ceil(PIECE_MAX_BYTES) as u64 - 1;
        let whole = o200k.bpe.count_ordinary(&text) as u64;
        assert!((whole..=whole + cuts).contains(&o200k.count(&text)));
    }

    #[test]
    fn pieces_end_before_a_space_after_a_word_or_on_a_character() {
        assert_eq!(piece_end("short", 10), 5);
        assert_eq!(piece_end("one two three", 10), 7);
        assert_eq!(piece_end("one  two three", 6), 3);
        // No such space: the last character boundary within the bound.
        assert_eq!(piece_end("ééééé", 5), 4);
    }

    #[test]
    fn runs_that_make_the_backtracking_regex_give_up_are_counted_in_pieces_it_can_take() {
        let o200k = o200k();
        // A million spaces in one go: fancy-regex gives up and tiktoken-rs
        // panics; the other runs are long single matches too.
        let runs = [
            (" ", 1_000_000),
            ("^", 100_000),
            ("\n", 100_000),
            ("a", 100_000),
        ];
        for (run, times) in runs {
            let text = run.repeat(times);
            let tokens = o200k.count(&text);
            // Counted, not bounded by bytes: a token spans several of these.
            assert!(
                tokens > 0 && tokens <= times as u64 / 2,
                "{run:?}: {tokens}"
            );
        }
    }

    #[test]
    fn only_the_encodings_the_price_table_names_are_built() {
        let settings = crate::config::Settings::default_file().unwrap();
        let table = PriceTable::from_settings(&settings.pricing).unwrap();
        let tokenizers = Tokenizers::load(&table).unwrap();
        let gpt = tokenizers
            .for_model(table.price("gpt-4o").unwrap())
            .unwrap();
        assert_eq!(gpt.encoding(), Encoding::O200kBase);
        assert!(tokenizers
            .for_model(table.price("claude-sonnet-4-5").unwrap())
            .is_none());
        assert!(tokenizers.cl100k_base.is_none());
    }
}
