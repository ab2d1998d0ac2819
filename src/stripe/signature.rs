//! Stripe's webhook signature: `Stripe-Signature: t=<unix s>,v1=<hex>,…`,
//! where each `v1` is HMAC-SHA256 over `"{t}.{raw body}"` keyed with the
//! whole endpoint secret (`whsec_…` included). Any `v1` may match (secret
//! rolling sends several); `v0` and unknown schemes are ignored; the
//! timestamp must be within the tolerance of now, either way.

/// Why a `Stripe-Signature` header was refused, in the order checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("Stripe-Signature header missing")]
    Missing,
    #[error("Stripe-Signature header malformed: no timestamp")]
    Malformed,
    #[error("Stripe-Signature header has no v1 signature")]
    NoV1Signature,
    #[error("Stripe-Signature timestamp outside the tolerance")]
    TimestampOutsideTolerance,
    #[error("no Stripe-Signature v1 signature matches the payload")]
    NoMatch,
}

/// Checks `header` against `body` signed with `secret`, at time `now` (unix s).
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    tolerance_s: u64,
    now: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<&str> = None;
    let mut signatures = Vec::new();
    for item in header.split(',') {
        let Some((scheme, value)) = item.trim().split_once('=') else {
            continue;
        };
        match scheme {
            "t" => timestamp = Some(value),
            "v1" => signatures.push(value),
            _ => {}
        }
    }
    let timestamp_text = timestamp.ok_or(SignatureError::Malformed)?;
    let timestamp: i64 = timestamp_text
        .parse()
        .map_err(|_| SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::NoV1Signature);
    }
    if now.abs_diff(timestamp) > tolerance_s {
        return Err(SignatureError::TimestampOutsideTolerance);
    }
    let matches = signatures.iter().any(|signature| {
        let Some(expected) = decode_hex(signature) else {
            return false;
        };
        crate::signatures::hmac_sha256_matches(
            secret.as_bytes(),
            &[timestamp_text.as_bytes(), body],
            &expected,
        )
    });
    if matches {
        Ok(())
    } else {
        Err(SignatureError::NoMatch)
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
