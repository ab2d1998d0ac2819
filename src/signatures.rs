//! HMAC-SHA256 over dot-joined parts, shared by the signatures creditd
//! checks (Stripe's, Svix's for Clerk) and the one it sends on its own
//! events.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// HMAC-SHA256 with `key` over `parts` joined by `.` (`t.body` for Stripe
/// and creditd's events, `id.t.body` for Svix).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            mac.update(b".");
        }
        mac.update(part);
    }
    mac
}

/// Whether `expected` is the HMAC-SHA256 of `parts` under `key`, compared in
/// constant time.
pub fn hmac_sha256_matches(key: &[u8], parts: &[&[u8]], expected: &[u8]) -> bool {
    hmac_sha256(key, parts).verify_slice(expected).is_ok()
}
