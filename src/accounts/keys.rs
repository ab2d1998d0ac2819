//! Users' own provider keys (BYOK) as stored: sealed (see
//! [`super::cipher`]) in `users.anthropic_key_encrypted` and
//! `users.openai_key_encrypted`.

use tokio_postgres::GenericClient;

use crate::db::{self, DbError, Pool};
use crate::ledger::AccountId;
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
pub async fn load(client: &impl GenericClient, account: AccountId) -> Result<StoredKeys, DbError> {
    let row = client.query_opt(sql::LOAD, &[&account.0]).await?;
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
) -> Result<(), DbError> {
    client
        .execute(sql::SAVE, &[&account.0, &anthropic, &openai])
        .await?;
    Ok(())
}

/// Deletes one stored key.
pub async fn remove(
    client: &impl GenericClient,
    account: AccountId,
    provider: Provider,
) -> Result<(), DbError> {
    let statement = match provider {
        Provider::Anthropic => sql::REMOVE_ANTHROPIC,
        Provider::Openai => sql::REMOVE_OPENAI,
    };
    client.execute(statement, &[&account.0]).await?;
    Ok(())
}

/// The users' sealed provider keys, each read or write on a connection of
/// its own.
#[derive(Clone)]
pub struct ProviderKeys {
    pool: Pool,
}

impl ProviderKeys {
    pub fn new(pool: Pool) -> ProviderKeys {
        ProviderKeys { pool }
    }

    /// The user's sealed keys (none for an unknown account).
    pub async fn load(&self, account: AccountId) -> Result<StoredKeys, DbError> {
        load(&**db::client(&self.pool).await?, account).await
    }

    /// Stores the sealed keys given; a key not given stays as it was.
    pub async fn save(
        &self,
        account: AccountId,
        anthropic: Option<Vec<u8>>,
        openai: Option<Vec<u8>>,
    ) -> Result<(), DbError> {
        save(&**db::client(&self.pool).await?, account, anthropic, openai).await
    }

    /// Deletes one stored key.
    pub async fn remove(&self, account: AccountId, provider: Provider) -> Result<(), DbError> {
        remove(&**db::client(&self.pool).await?, account, provider).await
    }
}
