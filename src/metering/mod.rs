//! Metering: what a chat is held for and costs once delivered, and what
//! was spent.
//!
//! - [`chat`]: a chat from the hold through the provider call to the
//!   settlement, streamed or whole;
//! - [`gateway`]: what the OpenAI- and Anthropic-compatible routes read of
//!   a request they pass through (model, output bound, prompt estimate);
//! - [`route`]: which provider, model and key serve a chat (own key first);
//! - [`estimate`]: the prompt's tokens, the hold amount, a stream's tokens;
//! - [`tokens`]: the providers' public tokenizers (OpenAI's tiktoken), built
//!   once at startup;
//! - [`settlements`]: a platform chat's settlement, retried until it posts,
//!   and the bound on how many may be pending;
//! - [`usage`]: usage reports read from the ledger's usage rows (spend per
//!   UTC day, for the billing page's chart).

pub mod chat;
pub mod estimate;
pub mod gateway;
pub mod route;
pub mod settlements;
pub mod tokens;
pub mod usage;

/// What a chat request is made of, as the providers take it.
pub use crate::providers::{ChatMessage, ProviderError, Role};
pub use chat::{ChatError, ChatOrder, Chats, CompletedChat, GatewayCall, StreamEvent};
pub use route::{RouteError, Router};
pub use settlements::{SettlementSlot, Settlements};
pub use usage::{daily_usage, DailyUsage, UsageError, UsageReports, MAX_DAYS};
