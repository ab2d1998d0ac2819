//! The metadata creditd writes on the Stripe objects it creates (Checkout
//! Sessions, their PaymentIntents, auto-recharges' PaymentIntents) and
//! reads back from webhook events: one struct, written and parsed here. The
//! wire format is fixed: Stripe objects already created carry it.

use std::collections::HashMap;

use uuid::Uuid;

/// `metadata.type`: which of creditd's payments an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentKind {
    /// A top-up bought through Checkout (`credit_topup`).
    CreditTopup,
    /// An auto-recharge charged off session (`auto_recharge`).
    AutoRecharge,
}

impl PaymentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PaymentKind::CreditTopup => "credit_topup",
            PaymentKind::AutoRecharge => "auto_recharge",
        }
    }

    /// The kind `metadata` names; `None` for an object creditd did not
    /// create as a payment of its own.
    pub fn of(metadata: &HashMap<String, String>) -> Option<PaymentKind> {
        match metadata.get(TYPE).map(String::as_str) {
            Some("credit_topup") => Some(PaymentKind::CreditTopup),
            Some("auto_recharge") => Some(PaymentKind::AutoRecharge),
            _ => None,
        }
    }
}

const TYPE: &str = "type";
const USER_ID: &str = "userId";
const AMOUNT_CENTS: &str = "amountCents";
const ATTEMPT_ID: &str = "attemptId";

/// What a payment's metadata says: whose it is, what it asked and, for an
/// auto-recharge, the attempt it pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentMetadata {
    pub kind: PaymentKind,
    /// The account's id (`users.id`).
    pub user_id: i64,
    pub amount_cents: i64,
    /// Set on auto-recharges only.
    pub attempt_id: Option<Uuid>,
}

/// A metadata field missing or not what creditd writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata.{0} is missing")]
    Missing(&'static str),
    #[error("metadata.{0} is not valid")]
    Invalid(&'static str),
}

impl MetadataError {
    /// The field at fault, as Stripe shows it.
    pub fn field(&self) -> &'static str {
        match self {
            MetadataError::Missing(field) | MetadataError::Invalid(field) => field,
        }
    }
}

impl PaymentMetadata {
    /// The metadata as Stripe stores it.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let mut metadata = HashMap::from([
            (TYPE.to_owned(), self.kind.as_str().to_owned()),
            (USER_ID.to_owned(), self.user_id.to_string()),
            (AMOUNT_CENTS.to_owned(), self.amount_cents.to_string()),
        ]);
        if let Some(attempt) = self.attempt_id {
            metadata.insert(ATTEMPT_ID.to_owned(), attempt.to_string());
        }
        metadata
    }

    /// Reads the metadata back, checking its fields in order: `type`,
    /// `userId`, `attemptId` (auto-recharges), `amountCents`.
    pub fn parse(metadata: &HashMap<String, String>) -> Result<PaymentMetadata, MetadataError> {
        let kind = match metadata.get(TYPE) {
            None => return Err(MetadataError::Missing(TYPE)),
            Some(_) => PaymentKind::of(metadata).ok_or(MetadataError::Invalid(TYPE))?,
        };
        let user_id = field(metadata, USER_ID, |text| text.parse::<i64>().ok())?;
        let attempt_id = match kind {
            PaymentKind::AutoRecharge => Some(field(metadata, ATTEMPT_ID, |text| {
                Uuid::parse_str(text).ok()
            })?),
            PaymentKind::CreditTopup => None,
        };
        let amount_cents = field(metadata, AMOUNT_CENTS, |text| text.parse::<i64>().ok())?;
        Ok(PaymentMetadata {
            kind,
            user_id,
            amount_cents,
            attempt_id,
        })
    }

    /// The attempt an object's metadata names, if any (a charge copies its
    /// PaymentIntent's metadata).
    pub fn attempt_of(metadata: &HashMap<String, String>) -> Option<Uuid> {
        metadata
            .get(ATTEMPT_ID)
            .and_then(|id| Uuid::parse_str(id).ok())
    }
}

fn field<T>(
    metadata: &HashMap<String, String>,
    name: &'static str,
    read: impl FnOnce(&str) -> Option<T>,
) -> Result<T, MetadataError> {
    let text = metadata.get(name).ok_or(MetadataError::Missing(name))?;
    read(text).ok_or(MetadataError::Invalid(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auto_recharge_metadata_reads_back_as_it_was_written_with_stripes_keys() {
        let written = PaymentMetadata {
            kind: PaymentKind::AutoRecharge,
            user_id: 42,
            amount_cents: 2_000,
            attempt_id: Some(Uuid::new_v4()),
        };
        let metadata = written.to_metadata();
        assert_eq!(
            metadata.get("type").map(String::as_str),
            Some("auto_recharge")
        );
        assert_eq!(metadata.get("userId").map(String::as_str), Some("42"));
        assert_eq!(
            metadata.get("amountCents").map(String::as_str),
            Some("2000")
        );
        assert_eq!(PaymentMetadata::parse(&metadata), Ok(written));
    }

    #[test]
    fn a_topup_metadata_has_no_attempt_and_needs_none() {
        let written = PaymentMetadata {
            kind: PaymentKind::CreditTopup,
            user_id: 7,
            amount_cents: 500,
            attempt_id: None,
        };
        let metadata = written.to_metadata();
        assert!(!metadata.contains_key("attemptId"));
        assert_eq!(PaymentMetadata::parse(&metadata), Ok(written));
    }

    #[test]
    fn a_missing_or_bad_field_is_named_by_the_error() {
        let mut metadata = PaymentMetadata {
            kind: PaymentKind::AutoRecharge,
            user_id: 1,
            amount_cents: 100,
            attempt_id: Some(Uuid::new_v4()),
        }
        .to_metadata();
        metadata.insert("userId".into(), "abc".into());
        assert_eq!(
            PaymentMetadata::parse(&metadata),
            Err(MetadataError::Invalid("userId"))
        );
        metadata.insert("userId".into(), "1".into());
        metadata.remove("attemptId");
        assert_eq!(
            PaymentMetadata::parse(&metadata),
            Err(MetadataError::Missing("attemptId"))
        );
        metadata.insert("type".into(), "other".into());
        assert_eq!(
            PaymentMetadata::parse(&metadata),
            Err(MetadataError::Invalid("type"))
        );
    }
}
