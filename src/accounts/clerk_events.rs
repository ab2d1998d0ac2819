//! Clerk's user events: `user.created` creates the user (or brings a
//! deleted one back) and grants the signup bonus (once per person: see
//! `accounts::bonus`, shared with `claim-bonus`); `user.updated` keeps
//! email and name (and both keep Clerk's signup time, where the referral
//! window starts); `user.deleted` marks the user deleted (its requests are
//! refused from then on), keeps the ledger, and switches auto-recharge off
//! with the saved card forgotten.
//!
//! The user-row writes of an event commit in the webhook inbox's
//! transaction, with the event id ([`UserEvent::effect`]); what cannot be
//! in it follows the commit ([`FollowUp`]): the cache, the signup bonus,
//! the account actor's auto-recharge.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use tokio_postgres::Transaction;

use crate::accounts::users::{self, Profile};
use crate::accounts::{bonus, ClerkUserId, SignupBonusClaim, SignupBonuses, Users};
use crate::ledger::LedgerError;
use crate::recharge::store::AutoRecharges;
use crate::recharge::OffReason;
use crate::webhooks::{Effect, WebhookOutcome};

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

    /// Creates the user or brings the profile up to date, on the inbox's
    /// transaction (see `users::upsert_profile`).
    async fn upsert(
        &self,
        tx: &Transaction<'_>,
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
        Ok(users::upsert_profile(tx, profile, created).await?)
    }
}

/// What the effect of a user event needs, built once at startup.
pub struct ClerkEffects {
    pub users: Arc<Users>,
    pub signup_bonuses: SignupBonuses,
    pub auto_recharges: AutoRecharges,
}

impl UserEvent {
    /// The event's writes of the user's row, for the inbox to commit with
    /// the event id; they tell the [`FollowUp`] to run once committed.
    pub fn effect(self, effects: Arc<ClerkEffects>) -> Effect<FollowUp, LedgerError> {
        if let UserEvent::Unknown = self {
            return Effect::Applied(FollowUp::nothing());
        }
        Effect::Writes(Box::new(move |tx| {
            Box::pin(async move { self.write(tx, &effects).await })
        }))
    }

    async fn write(
        self,
        tx: &Transaction<'_>,
        effects: &ClerkEffects,
    ) -> Result<FollowUp, LedgerError> {
        match self {
            UserEvent::Created(user) => {
                user.upsert(tx, true).await?;
                Ok(FollowUp::written(
                    &user.id,
                    WebhookOutcome::Applied,
                    Step::SignupBonus,
                ))
            }
            UserEvent::Updated(user) => {
                user.upsert(tx, false).await?;
                Ok(FollowUp::written(
                    &user.id,
                    WebhookOutcome::Applied,
                    Step::Nothing,
                ))
            }
            UserEvent::Deleted(user) => delete(tx, effects, ClerkUserId::new(user.id)).await,
            UserEvent::Unknown => Ok(FollowUp::nothing()),
        }
    }

    /// What a redelivery whose event id is already recorded still does:
    /// the steps after the commit, which a failure (or a crash) between
    /// the commit and them may have left undone. Each is idempotent.
    pub fn redelivered(&self) -> FollowUp {
        let (clerk_id, step) = match self {
            UserEvent::Created(user) => (&user.id, Step::SignupBonus),
            UserEvent::Deleted(user) => (&user.id, Step::AutoRechargeOff { was_on: false }),
            UserEvent::Updated(_) | UserEvent::Unknown => return FollowUp::nothing(),
        };
        FollowUp {
            clerk_id: Some(ClerkUserId::new(clerk_id.as_str())),
            outcome: WebhookOutcome::Replayed,
            written: false,
            step,
        }
    }
}

/// Switches auto-recharge off with the saved card forgotten (again on a
/// redelivery, harmlessly: a deleted account's card is charged no more) and
/// marks the user deleted, both on the inbox's transaction: the switch-off
/// writes the same `users` row, so on a connection of its own it would
/// wait for this transaction's lock.
///
/// The switch-off comes first: it waits for the account's journal writes
/// in flight (`Engine::record_events`), and those insert events that
/// reference the `users` row, which the deletion locks against them (it
/// clears the unique `email`). Deleting first, each would wait for the other.
async fn delete(
    tx: &Transaction<'_>,
    effects: &ClerkEffects,
    clerk_id: ClerkUserId,
) -> Result<FollowUp, LedgerError> {
    let was_on = match users::find_user(tx, clerk_id.as_str()).await? {
        Some(account) => {
            effects
                .auto_recharges
                .switch_off_on(tx, account, OffReason::AccountDeleted)
                .await?
        }
        None => false,
    };
    let deleted = users::mark_deleted(tx, &clerk_id).await?;
    let outcome = match deleted {
        Some(_) => WebhookOutcome::Applied,
        None => WebhookOutcome::Ignored,
    };
    Ok(FollowUp::written(
        clerk_id.as_str(),
        outcome,
        Step::AutoRechargeOff { was_on },
    ))
}

/// What a user event leaves for after its writes committed with its event
/// id, or for a redelivery that found the id recorded
/// ([`UserEvent::redelivered`]).
///
/// The signup bonus cannot be in the inbox's transaction: it goes through
/// the ledger engine, which commits on its own and can only credit an
/// account whose user and balance rows are committed. So it follows the
/// commit, keyed `bonus:signup:<account>` (see `accounts::bonus`): a
/// failure or a crash between the commit and the bonus answers no 2xx, and
/// Clerk's redelivery, though answered as a duplicate, grants it then; a
/// bonus already granted is replayed, never paid twice. Likewise the
/// account's actor learns that a deleted user's auto-recharge is off only
/// once that committed, and again on a redelivery.
pub struct FollowUp {
    /// The user the event is about; `None`: nothing to do.
    clerk_id: Option<ClerkUserId>,
    outcome: WebhookOutcome,
    /// This delivery's writes changed the user's row: the cache forgets it.
    written: bool,
    step: Step,
}

/// The step of a [`FollowUp`] beyond the cache.
enum Step {
    Nothing,
    /// `user.created`: the signup bonus, once per person, to a live user.
    SignupBonus,
    /// `user.deleted`: the deleted user's actor learns auto-recharge is off
    /// (`was_on`: this delivery switched it off).
    AutoRechargeOff {
        was_on: bool,
    },
}

impl FollowUp {
    fn nothing() -> FollowUp {
        FollowUp {
            clerk_id: None,
            outcome: WebhookOutcome::Ignored,
            written: false,
            step: Step::Nothing,
        }
    }

    fn written(clerk_id: &str, outcome: WebhookOutcome, step: Step) -> FollowUp {
        FollowUp {
            clerk_id: Some(ClerkUserId::new(clerk_id)),
            outcome,
            written: true,
            step,
        }
    }

    /// Runs the steps after the commit; the event's outcome, as counted.
    pub async fn run(self, effects: &ClerkEffects) -> Result<WebhookOutcome, LedgerError> {
        let Some(clerk_id) = self.clerk_id else {
            return Ok(self.outcome);
        };
        if self.written {
            effects.users.forget(&clerk_id).await;
        }
        if let Step::Nothing = self.step {
            return Ok(self.outcome);
        }
        match (self.step, effects.users.stored(&clerk_id).await?) {
            // A user deleted since gets no bonus; a user brought back since
            // keeps auto-recharge as it is.
            (Step::SignupBonus, Some((account, false))) => {
                let granted = effects.signup_bonuses.grant(account).await?;
                Ok(bonus_outcome(granted))
            }
            (Step::AutoRechargeOff { was_on }, Some((account, true))) => {
                effects
                    .auto_recharges
                    .switched_off(account, OffReason::AccountDeleted, was_on)
                    .await?;
                Ok(self.outcome)
            }
            _ => Ok(self.outcome),
        }
    }
}

fn bonus_outcome(granted: SignupBonusClaim) -> WebhookOutcome {
    match granted {
        SignupBonusClaim::Granted(outcome) if outcome.replayed => WebhookOutcome::Replayed,
        SignupBonusClaim::Granted(_) => WebhookOutcome::Applied,
        SignupBonusClaim::TakenByAnotherAccount => WebhookOutcome::BonusAlreadyClaimed,
    }
}
