//! Accounts: the `users` table and what hangs on it.
//!
//! - [`users`]: Clerk id → account (created on first sight, cached),
//!   deletion, the profile Clerk sends, the Stripe customer and plan;
//! - [`clerk_events`]: what Clerk's user events do (create, update, delete);
//! - [`bonus`]: the signup-bonus rule (once per person, by email);
//! - [`mailbox`]: the canonical mailbox a person is known by;
//! - [`keys`]: users' own provider keys (BYOK) as stored;
//! - [`cipher`]: how those keys are sealed at rest.
//!
//! Database failures are `db::DbError`, classified (out of reach, a
//! constraint, a bug); where they meet the ledger's own errors they become
//! `LedgerError` (`Unavailable` only when the database is out of reach).

pub mod bonus;
pub mod cipher;
pub mod clerk_events;
pub mod keys;
pub mod mailbox;
pub mod users;

pub use bonus::{grant_signup_bonus, SignupBonus, SignupBonusClaim, SignupBonuses};
pub use cipher::KeyCipher;
pub use clerk_events::{ClerkEvent, EventError};
pub use keys::{ProviderKeys, StoredKeys};
pub use users::{AccountError, ClerkUserId, FoundUser, Users};
