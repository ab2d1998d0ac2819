//! The gateway's API keys: what a person's apps present on `/v1/*`.
//!
//! A key is `cd_` and 256 bits of randomness (base64url, 43 characters),
//! shown once when it is made. Only its SHA-256 is stored, with its first
//! characters (`prefix`) as the public name lists show and the index a
//! presented key is found by; the hash is then compared in constant time.
//! Every call looks its key up in PostgreSQL (no cache): a revoked key, an
//! expired one and a deleted user's answer 401 at once. A key's spend
//! limit is enforced by the account's actor with each hold (see
//! `crate::ledger::KeyLimit`); what a key spent is read from the usages
//! that name it.

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::OsRng;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::db::{self, DbError, Pool};
use crate::ledger::{AccountId, ApiKeyId, KeyLimit};
use crate::money::Micros;

/// What every key starts with, so that it is recognised (and found by
/// secret scanners) wherever it leaks.
pub const KEY_PREFIX: &str = "cd_";
/// Random bytes in a key: 256 bits.
const KEY_RANDOM_BYTES: usize = 32;
/// Characters of a key kept in clear (`cd_` and 8 of its random part, 48
/// bits): enough to tell a person's keys apart and to find a row.
const PUBLIC_PREFIX_LEN: usize = KEY_PREFIX.len() + 8;
/// Longest key name, in bytes.
pub const NAME_MAX_BYTES: usize = 100;
/// Most live keys one account may have.
pub const KEYS_PER_ACCOUNT_MAX: i64 = 50;
/// `last_used_at` is written at most this often per key, so a busy key
/// does not write a row on every call.
const LAST_USED_RESOLUTION_S: i64 = 60;

mod sql {
    pub const INSERT: &str = "
        INSERT INTO api_keys (id, user_id, prefix, key_sha256, name, spend_limit_micros, expires_at)
        SELECT $1, $2, $3, $4, $5, $6, $7
         WHERE (SELECT count(*) FROM api_keys
                 WHERE user_id = $2 AND revoked_at IS NULL) < $8
        RETURNING created_at";
    pub const LIST: &str = "
        SELECT k.id, k.prefix, k.name, k.spend_limit_micros, k.expires_at, k.created_at,
               k.last_used_at,
               coalesce((SELECT sum(u.cost_micros) FROM credit_usages u
                          WHERE u.user_id = k.user_id AND u.api_key_id = k.id), 0)::int8
          FROM api_keys k
         WHERE k.user_id = $1 AND k.revoked_at IS NULL
         ORDER BY k.created_at DESC, k.id";
    pub const REVOKE: &str = "
        UPDATE api_keys SET revoked_at = now()
         WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL";
    /// The live keys of a prefix whose user is not deleted.
    pub const FIND: &str = "
        SELECT k.id, k.user_id, k.key_sha256, k.spend_limit_micros, k.expires_at,
               k.last_used_at, u.clerk_id
          FROM api_keys k JOIN users u ON u.id = k.user_id
         WHERE k.prefix = $1 AND k.revoked_at IS NULL AND u.deleted_at IS NULL";
    pub const TOUCH: &str = "UPDATE api_keys SET last_used_at = now() WHERE id = $1";
}

/// A key as asked for: its name (checked text), an optional spend limit
/// and an optional expiry (in the future).
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    pub spend_limit: Option<Micros>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A key just made: the only time its secret exists outside the caller.
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key: ApiKeySummary,
    /// The whole key (`cd_…`), shown once.
    pub secret: String,
}

/// A key as lists show it: never its secret.
#[derive(Debug, Clone)]
pub struct ApiKeySummary {
    pub id: ApiKeyId,
    pub prefix: String,
    pub name: String,
    pub spend_limit: Option<Micros>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// What the key's usages cost so far.
    pub spent: Micros,
}

/// The account a presented key opens, and what its holds must respect.
#[derive(Debug, Clone)]
pub struct KeyHolder {
    pub account: AccountId,
    /// The user's Clerk id (the gateway's BYOK and routing read the account).
    pub clerk_id: String,
    pub limit: KeyLimit,
}

/// Why a key was not made, or a presented one refused.
#[derive(Debug, thiserror::Error)]
pub enum ApiKeyError {
    /// The account already has `KEYS_PER_ACCOUNT_MAX` live keys (409).
    #[error("an account may have at most {KEYS_PER_ACCOUNT_MAX} API keys; revoke one first")]
    TooMany,
    /// No such live key of the account (404).
    #[error("no such API key")]
    NotFound,
    /// Not a key, an unknown, revoked or expired one, or a deleted user's (401).
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A fresh key: `cd_` and 32 random bytes from the operating system
/// (`OsRng`, through the `aead` crate the BYOK cipher already uses).
fn generate() -> String {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    OsRng.fill_bytes(&mut random);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
    )
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Whether `presented` has the shape of a key (it may still be unknown).
pub fn looks_like_key(presented: &str) -> bool {
    presented.starts_with(KEY_PREFIX)
}

/// The users' gateway keys, each read or write on a connection of its own.
#[derive(Clone)]
pub struct ApiKeys {
    pool: Pool,
}

impl ApiKeys {
    pub fn new(pool: Pool) -> ApiKeys {
        ApiKeys { pool }
    }

    /// Makes a key for `account`; its secret is in the answer only.
    pub async fn create(&self, account: AccountId, new: NewKey) -> Result<CreatedKey, ApiKeyError> {
        let secret = generate();
        let id = Uuid::new_v4();
        let prefix = secret[..PUBLIC_PREFIX_LEN].to_owned();
        let client = db::client(&self.pool).await?;
        let row = client
            .query_opt(
                sql::INSERT,
                &[
                    &id,
                    &account.0,
                    &prefix,
                    &digest(&secret),
                    &new.name,
                    &new.spend_limit.map(Micros::get),
                    &new.expires_at,
                    &KEYS_PER_ACCOUNT_MAX,
                ],
            )
            .await
            .map_err(DbError::from)?
            .ok_or(ApiKeyError::TooMany)?;
        Ok(CreatedKey {
            key: ApiKeySummary {
                id: ApiKeyId(id),
                prefix,
                name: new.name,
                spend_limit: new.spend_limit,
                expires_at: new.expires_at,
                created_at: row.get(0),
                last_used_at: None,
                spent: Micros::ZERO,
            },
            secret,
        })
    }

    /// The account's live keys, newest first, with what each spent.
    pub async fn list(&self, account: AccountId) -> Result<Vec<ApiKeySummary>, ApiKeyError> {
        let client = db::client(&self.pool).await?;
        let rows = client
            .query(sql::LIST, &[&account.0])
            .await
            .map_err(DbError::from)?;
        Ok(rows
            .iter()
            .map(|row| ApiKeySummary {
                id: ApiKeyId(row.get(0)),
                prefix: row.get(1),
                name: row.get(2),
                spend_limit: row.get::<_, Option<i64>>(3).map(Micros::new),
                expires_at: row.get(4),
                created_at: row.get(5),
                last_used_at: row.get(6),
                spent: Micros::new(row.get(7)),
            })
            .collect())
    }

    /// Revokes one of the account's keys: the next call with it is refused.
    pub async fn revoke(&self, account: AccountId, id: Uuid) -> Result<(), ApiKeyError> {
        let client = db::client(&self.pool).await?;
        let revoked = client
            .execute(sql::REVOKE, &[&id, &account.0])
            .await
            .map_err(DbError::from)?;
        if revoked == 0 {
            return Err(ApiKeyError::NotFound);
        }
        Ok(())
    }

    /// The account a presented key opens, read from PostgreSQL on every
    /// call, at `now`.
    pub async fn authenticate(
        &self,
        presented: &str,
        now: DateTime<Utc>,
    ) -> Result<KeyHolder, ApiKeyError> {
        const UNKNOWN: &str = "invalid API key (unknown, revoked or expired)";
        if !looks_like_key(presented) || !presented.is_char_boundary(PUBLIC_PREFIX_LEN) {
            return Err(ApiKeyError::Refused(UNKNOWN));
        }
        let prefix = &presented[..PUBLIC_PREFIX_LEN];
        let client = db::client(&self.pool).await?;
        let rows = client
            .query(sql::FIND, &[&prefix])
            .await
            .map_err(DbError::from)?;
        let hash = digest(presented);
        let row = rows
            .iter()
            .find(|row| subtle::ConstantTimeEq::ct_eq(row.get::<_, &[u8]>(2), &hash[..]).into())
            .ok_or(ApiKeyError::Refused(UNKNOWN))?;
        let expires_at: Option<DateTime<Utc>> = row.get(4);
        if expires_at.is_some_and(|at| at <= now) {
            return Err(ApiKeyError::Refused(UNKNOWN));
        }
        let id: Uuid = row.get(0);
        let last_used: Option<DateTime<Utc>> = row.get(5);
        if last_used.is_none_or(|at| (now - at).num_seconds() >= LAST_USED_RESOLUTION_S) {
            touch(&**client, id).await?;
        }
        Ok(KeyHolder {
            account: AccountId(row.get(1)),
            clerk_id: row.get(6),
            limit: KeyLimit {
                key: ApiKeyId(id),
                limit: row.get::<_, Option<i64>>(3).map(Micros::new),
            },
        })
    }
}

async fn touch(client: &impl GenericClient, id: Uuid) -> Result<(), DbError> {
    client.execute(sql::TOUCH, &[&id]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_prefix_and_256_random_bits() {
        let key = generate();
        assert!(key.starts_with("cd_"));
        let random = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&key[3..])
            .unwrap();
        assert_eq!(random.len(), 32);
        assert_ne!(generate(), key);
    }
}
