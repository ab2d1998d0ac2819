//! Svix webhook signatures, as Clerk sends them: headers `svix-id`,
//! `svix-timestamp` and `svix-signature` (space-separated `v1,<base64>`
//! items); each signature is HMAC-SHA256 over `"{id}.{timestamp}.{body}"`
//! keyed with the base64-decoded part of the secret after `whsec_`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Why a Svix-signed request was refused, in the order checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvixError {
    #[error("the webhook signing secret is not whsec_ followed by base64")]
    BadSecret,
    #[error("svix-id, svix-timestamp or svix-signature header missing")]
    MissingHeaders,
    #[error("svix-timestamp is not a unix timestamp")]
    BadTimestamp,
    #[error("svix-timestamp outside the tolerance")]
    TimestampOutsideTolerance,
    #[error("no svix-signature v1 signature matches the payload")]
    NoMatch,
}

/// The headers of one delivery.
#[derive(Debug, Clone, Copy)]
pub struct SvixHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// The signing key: the base64-decoded part of the secret after `whsec_`,
/// decoded once at startup.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SigningKey(***)")
    }
}

impl SigningKey {
    pub fn from_secret(secret: &str) -> Result<SigningKey, SvixError> {
        STANDARD
            .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
            .map(SigningKey)
            .map_err(|_| SvixError::BadSecret)
    }
}

/// Checks a delivery signed with `secret` at time `now` (unix s).
pub fn verify(
    secret: &str,
    headers: SvixHeaders<'_>,
    body: &[u8],
    tolerance_s: u64,
    now: i64,
) -> Result<(), SvixError> {
    verify_with(
        &SigningKey::from_secret(secret)?,
        headers,
        body,
        tolerance_s,
        now,
    )
}

/// Checks a delivery signed with `key` at time `now` (unix s).
pub fn verify_with(
    signing_key: &SigningKey,
    headers: SvixHeaders<'_>,
    body: &[u8],
    tolerance_s: u64,
    now: i64,
) -> Result<(), SvixError> {
    let key = &signing_key.0;
    let (Some(id), Some(timestamp_text), Some(signatures)) =
        (headers.id, headers.timestamp, headers.signature)
    else {
        return Err(SvixError::MissingHeaders);
    };
    let timestamp: i64 = timestamp_text
        .trim()
        .parse()
        .map_err(|_| SvixError::BadTimestamp)?;
    if now.abs_diff(timestamp) > tolerance_s {
        return Err(SvixError::TimestampOutsideTolerance);
    }
    let matches = signatures.split(' ').any(|item| {
        let Some(("v1", encoded)) = item.split_once(',') else {
            return false;
        };
        let Ok(expected) = STANDARD.decode(encoded) else {
            return false;
        };
        crate::signatures::hmac_sha256_matches(
            key,
            &[id.as_bytes(), timestamp_text.as_bytes(), body],
            &expected,
        )
    });
    if matches {
        Ok(())
    } else {
        Err(SvixError::NoMatch)
    }
}
