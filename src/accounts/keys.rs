//! Users' own provider keys (BYOK) as stored: sealed (see
//! [`super::cipher`]) in `users.anthropic_key_encrypted` and
//! `users.openai_key_encrypted`.

use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::ledger::{AccountId, LedgerError};
use crate::pricing::Provider;

mod sql {
    pub const LOAD: &str =
        "SELECT anthropic_key_encrypted, openai_key_encrypted FROM users WHERE id = $1";
    pub const SAVE: &str = "UPDATE users
            SET anthropic_key_encrypted = COALESCE($2, anthropic_key_encrypted),
                openai_key_encrypted = COALESCE($3, openai_key_encrypted),
                updated_at = now()
          WHERE id = $1";
    pub const REMOVE_ANTHROPIC: &str =
        "UPDATE users SET anthropic_key_encrypted = NULL, updated_at = now() WHERE id = $1";
    pub const REMOVE_OPENAI: &str =
        "UPDATE users SET openai_key_encrypted = NULL, updated_at = now() WHERE id = $1";
}

/// A user's sealed keys as stored.
#[derive(Debug, Default)]
pub struct StoredKeys {
    pub anthropic: Option<Vec<u8>>,
    pub openai: Option<Vec<u8>>,
}

impl StoredKeys {
    pub fn get(&self, provider: Provider) -> Option<&[u8]> {
        match provider {
            Provider::Anthropic => self.anthropic.as_deref(),
            Provider::Openai => self.openai.as_deref(),
        }
    }

    pub fn any(&self) -> bool {
        self.anthropic.is_some() || self.openai.is_some()
    }
}

/// The user's sealed keys (none for an unknown account).
pub async fn load(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<StoredKeys, LedgerError> {
    let row = client
        .query_opt(sql::LOAD, &[&account.0])
        .await
        .map_err(DbError::from)?;
    Ok(row.map_or_else(StoredKeys::default, |row| StoredKeys {
        anthropic: row.get(0),
        openai: row.get(1),
    }))
}

/// Stores the sealed keys given; a key not given stays as it was.
pub async fn save(
    client: &impl GenericClient,
    account: AccountId,
    anthropic: Option<Vec<u8>>,
    openai: Option<Vec<u8>>,
) -> Result<(), LedgerError> {
    client
        .execute(sql::SAVE, &[&account.0, &anthropic, &openai])
        .await
        .map_err(DbError::from)?;
    Ok(())
}

/// Deletes one stored key.
pub async fn remove(
    client: &impl GenericClient,
    account: AccountId,
    provider: Provider,
) -> Result<(), LedgerError> {
    let statement = match provider {
        Provider::Anthropic => sql::REMOVE_ANTHROPIC,
        Provider::Openai => sql::REMOVE_OPENAI,
    };
    client
        .execute(statement, &[&account.0])
        .await
        .map_err(DbError::from)?;
    Ok(())
}
