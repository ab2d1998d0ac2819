//! Accounts: the `users` table and what hangs on it.
//!
//! - [`users`]: Clerk id → account (created on first sight, cached),
//!   deletion, the profile Clerk sends, the Stripe customer and plan;
//! - [`bonus`]: the signup-bonus rule (once per person, by email);
//! - [`mailbox`]: the canonical mailbox a person is known by;
//! - [`keys`]: users' own provider keys (BYOK) as stored;
//! - [`cipher`]: how those keys are sealed at rest.
//!
//! Every database failure here is `LedgerError::Unavailable`, as in the
//! ledger: one mapping to 503 `UNAVAILABLE` at the HTTP edge.

pub mod bonus;
pub mod cipher;
pub mod keys;
pub mod mailbox;
pub mod users;

pub use bonus::{grant_signup_bonus, SignupBonus, SignupBonusClaim};
pub use cipher::KeyCipher;
pub use keys::StoredKeys;
pub use users::{AccountError, ClerkUserId, Users};
