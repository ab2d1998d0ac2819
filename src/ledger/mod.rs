//! The ledger engine: one actor per credit account serializes its operations
//! in memory, a journal writer group-commits their entries to PostgreSQL, and
//! a caller hears "ok" only once its entry committed.
//!
//! ```text
//! caller ──msg──▶ Directory ──▶ AccountActor ──entry──▶ JournalWriter ──batch──▶ Postgres
//!    ▲                               │                        │
//!    └──── answer once durable ──────┴──── durable seq ◀──────┘
//! ```

mod actor;
pub mod auto_recharge;
pub mod cluster;
mod directory;
mod engine;
mod journal;
mod load;
pub mod outbox;
pub mod reconcile;
pub mod spend;
mod state;
pub use state::{check_text, text_problem, TEXT_MAX_BYTES};
mod store;
mod types;
mod watch;

pub use actor::{
    AccountActor, Answer, AutoRechargeEnded, AwaitApplied, Clawback, Credit, Debit, ExpireGrants,
    ExpireHolds, GetBalance, GetSpending, Release, Reserve, SetAutoRecharge, SetLimits, Settle,
};
pub use directory::{Directory, Eviction, ResidentView};
pub use engine::{Engine, EngineStats};
pub use journal::{JournalHealth, JournalStats, WriterHandle};
/// The journal writer's session and statements, for the checks of their plans.
pub use store::sql::{Journal, JOURNAL, WRITER_SESSION};
/// The read API of the ledger's history: by account, newest first, either
/// on its own connection ([`LedgerHistory`]) or on a caller's connection
/// beside other reads of one page (the `_page` functions).
pub use store::{transactions_page, usages_page, LedgerHistory, Versioned};
pub use types::*;
pub use watch::{BalanceWatch, WatchLimits, WatchRefused};
