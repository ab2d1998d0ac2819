//! Clerk's user events: `user.created` creates the user (or brings a
//! deleted one back) and grants the signup bonus (once per person: see
//! `accounts::bonus`, shared with `claim-bonus`); `user.updated` keeps
//! email and name (and both keep Clerk's signup time, where the referral
//! window starts); `user.deleted` marks the user deleted (its requests are
//! refused from then on), keeps the ledger, and switches auto-recharge off
//! with the saved card forgotten.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::accounts::users::Profile;
use crate::accounts::{bonus, ClerkUserId, SignupBonusClaim, SignupBonuses, Users};
use crate::ledger::LedgerError;
use crate::recharge::store::AutoRecharges;
use crate::webhooks::WebhookOutcome;

/// The event types creditd handles, as counted.
pub const HANDLED: &[&str] = &["user.created", "user.updated", "user.deleted"];

/// Why an event was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EventError {
    /// The event's payload is not what Clerk sends (answered 400).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// A Clerk event: its type and its `data`, read by type once known.
#[derive(Debug, Deserialize)]
pub struct ClerkEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub data: serde_json::Value,
}

/// The events creditd acts on; any other type is `Unknown`.
#[derive(Debug)]
pub enum UserEvent {
    Created(ClerkUser),
    Updated(ClerkUser),
    Deleted(DeletedUser),
    Unknown,
}

impl ClerkEvent {
    fn data<T: DeserializeOwned>(&self) -> Result<T, EventError> {
        serde_json::from_value(self.data.clone())
            .map_err(|e| EventError::Invalid(format!("{} event: data: {e}", self.kind)))
    }

    /// The event by type, every text that would be stored checked.
    pub fn parse(&self) -> Result<UserEvent, EventError> {
        Ok(match self.kind.as_str() {
            "user.created" => UserEvent::Created(self.data::<ClerkUser>()?.checked()?),
            "user.updated" => UserEvent::Updated(self.data::<ClerkUser>()?.checked()?),
            "user.deleted" => {
                let user: DeletedUser = self.data()?;
                check_field("id", &user.id)?;
                UserEvent::Deleted(user)
            }
            _ => UserEvent::Unknown,
        })
    }
}

#[derive(Debug, Deserialize)]
pub struct ClerkUser {
    id: String,
    #[serde(default)]
    email_addresses: Vec<EmailAddress>,
    #[serde(default)]
    primary_email_address_id: Option<String>,
    #[serde(default)]
    first_name: Option<String>,
    #[serde(default)]
    last_name: Option<String>,
    #[serde(default)]
    image_url: Option<String>,
    /// When the user signed up at Clerk, in milliseconds since the epoch:
    /// where the referral window starts.
    #[serde(default)]
    created_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct EmailAddress {
    id: String,
    email_address: String,
    #[serde(default)]
    verification: Option<Verification>,
}

#[derive(Debug, Deserialize)]
struct Verification {
    #[serde(default)]
    status: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct DeletedUser {
    id: String,
}

/// A stored text of a Clerk event, checked: no control nor invisible
/// formatting character, not over-long; else an error naming the field.
fn check_field(field: &str, value: &str) -> Result<(), EventError> {
    match crate::ledger::text_problem(value) {
        Some(problem) => Err(EventError::Invalid(format!(
            "field `data.{field}`: {problem}"
        ))),
        None => Ok(()),
    }
}

impl ClerkUser {
    /// Every text of the user that is stored, checked before anything is.
    fn checked(self) -> Result<ClerkUser, EventError> {
        check_field("id", &self.id)?;
        for address in &self.email_addresses {
            check_field("email_addresses.email_address", &address.email_address)?;
        }
        for (field, value) in [
            ("first_name", &self.first_name),
            ("last_name", &self.last_name),
            ("image_url", &self.image_url),
        ] {
            if let Some(value) = value {
                check_field(field, value)?;
            }
        }
        self.signed_up_at()?;
        Ok(self)
    }

    /// Clerk's `created_at` as a time, if sent; an error naming the field
    /// when it is not a time since the epoch.
    fn signed_up_at(&self) -> Result<Option<DateTime<Utc>>, EventError> {
        let Some(millis) = self.created_at else {
            return Ok(None);
        };
        DateTime::from_timestamp_millis(millis)
            .filter(|_| millis > 0)
            .map(Some)
            .ok_or_else(|| {
                EventError::Invalid(
                    "field `data.created_at`: must be a positive number of milliseconds since the epoch"
                        .into(),
                )
            })
    }

    fn primary_email(&self) -> Option<&str> {
        let primary = self.primary_email_address_id.as_deref()?;
        self.email_addresses
            .iter()
            .find(|address| address.id == primary)
            .map(|address| address.email_address.as_str())
    }

    /// The primary email as the signup bonus knows a person by: verified
    /// (an address Clerk reports as not verified names nobody yet), as its
    /// canonical mailbox, hashed so no address sits in a key.
    fn bonus_email_hash(&self) -> Option<String> {
        let primary = self.primary_email_address_id.as_deref()?;
        let address = self
            .email_addresses
            .iter()
            .find(|address| address.id == primary)?;
        let verified = address
            .verification
            .as_ref()
            .and_then(|verification| verification.status.as_deref())
            .is_none_or(|status| status == "verified");
        verified
            .then(|| bonus::email_hash(&address.email_address))
            .flatten()
    }

    fn name(&self) -> Option<String> {
        let parts: Vec<&str> = [&self.first_name, &self.last_name]
            .into_iter()
            .flatten()
            .map(|part| part.trim())
            .filter(|part| !part.is_empty())
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    /// Creates the user or brings the profile up to date (see
    /// `Users::upsert_profile`).
    async fn upsert(
        &self,
        users: &Users,
        created: bool,
    ) -> Result<crate::ledger::AccountId, LedgerError> {
        let email_hash = self.bonus_email_hash();
        let signed_up_at = self
            .signed_up_at()
            .map_err(|error| LedgerError::InvalidRequest(error.to_string()))?;
        let name = self.name();
        let clerk_id = ClerkUserId::new(self.id.as_str());
        let profile = Profile {
            clerk_id: &clerk_id,
            email: self.primary_email(),
            name: name.as_deref(),
            image_url: self.image_url.as_deref(),
            email_hash: email_hash.as_deref(),
            signed_up_at,
        };
        Ok(users.upsert_profile(profile, created).await?)
    }
}

/// What the effect of a user event needs, built once at startup.
pub struct ClerkEffects {
    pub users: Arc<Users>,
    pub signup_bonuses: SignupBonuses,
    pub auto_recharges: AutoRecharges,
}

impl UserEvent {
    /// Applies the event.
    pub async fn apply(self, effects: &ClerkEffects) -> Result<WebhookOutcome, LedgerError> {
        match self {
            UserEvent::Created(user) => {
                let account = user.upsert(&effects.users, true).await?;
                let granted = effects.signup_bonuses.grant(account).await?;
                Ok(match granted {
                    SignupBonusClaim::Granted(outcome) if outcome.replayed => {
                        WebhookOutcome::Replayed
                    }
                    SignupBonusClaim::Granted(_) => WebhookOutcome::Applied,
                    SignupBonusClaim::TakenByAnotherAccount => WebhookOutcome::BonusAlreadyClaimed,
                })
            }
            UserEvent::Updated(user) => {
                user.upsert(&effects.users, false).await?;
                Ok(WebhookOutcome::Applied)
            }
            UserEvent::Deleted(user) => {
                let clerk_id = ClerkUserId::new(user.id);
                let deleted = effects.users.mark_deleted(&clerk_id).await?;
                // A deleted account's card is charged no more: auto-recharge
                // off, card forgotten (again on a redelivery, harmlessly).
                if let Some(account) = effects.users.existing_account(&clerk_id).await? {
                    effects
                        .auto_recharges
                        .switch_off(account, crate::recharge::OffReason::AccountDeleted)
                        .await?;
                }
                Ok(if deleted {
                    WebhookOutcome::Applied
                } else {
                    WebhookOutcome::Ignored
                })
            }
            UserEvent::Unknown => Ok(WebhookOutcome::Ignored),
        }
    }
}
