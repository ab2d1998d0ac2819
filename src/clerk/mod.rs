//! Clerk: the signature of its webhooks (Svix) and the user events they
//! carry (creation, profile updates, deletion).

pub mod svix;
pub mod tokens;
pub mod users;

pub use users::{ClerkEvent, EventError};
