//! Metering: what a chat costs once delivered, and what was spent.
//!
//! - [`settlements`]: a platform chat's settlement, retried until it posts,
//!   and the bound on how many may be pending;
//! - [`usage`]: usage reports read from the ledger's usage rows (spend per
//!   UTC day, for the billing page's chart).

pub mod settlements;
pub mod usage;

pub use settlements::{SettlementSlot, Settlements};
pub use usage::{daily_usage, DailyUsage, MAX_DAYS};
