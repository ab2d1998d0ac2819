//! The people who run the platform: who an operator is (the name given
//! when the admin token opened a console session, or a Clerk user listed
//! in `admin.operator_ids`), and the record of every change they make
//! (`operator_actions`), read back by the console.
//!
//! An action is recorded once it took effect: every action the admin API
//! offers is idempotent (a key, or a state set), so should the record fail,
//! the operator's retry replays the action and records it then.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::DbError;

/// Who acts, as recorded: `token:<name>` or `clerk:<Clerk user id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorId(String);

impl OperatorId {
    /// An operator who signed in with the admin token under `name`.
    pub fn token(name: &str) -> OperatorId {
        OperatorId(format!("token:{name}"))
    }

    /// An operator signed in with Clerk.
    pub fn clerk(clerk_id: &str) -> OperatorId {
        OperatorId(format!("clerk:{clerk_id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One action, as the console lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperatorAction {
    pub at: DateTime<Utc>,
    /// `token:<name>` or `clerk:<Clerk user id>`.
    pub operator: String,
    /// `credit`, `debit`, `limits`, `redeliver`, `session`.
    pub action: String,
    /// The account acted on (Clerk id).
    pub user_id: Option<String>,
    pub reason: Option<String>,
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

/// What an operator did, for the record.
pub struct Action<'a> {
    pub action: &'static str,
    pub user_id: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub detail: serde_json::Value,
}

/// The operators' record, each call on a connection of its own.
#[derive(Clone)]
pub struct OperatorLog {
    pool: crate::db::Pool,
}

impl OperatorLog {
    pub fn new(pool: crate::db::Pool) -> OperatorLog {
        OperatorLog { pool }
    }

    /// Records `action` by `operator` (and logs it).
    pub async fn record(&self, operator: &OperatorId, action: Action<'_>) -> Result<(), DbError> {
        tracing::info!(
            operator = operator.as_str(),
            action = action.action,
            user = action.user_id,
            reason = action.reason,
            "operator action"
        );
        let client = crate::db::client(&self.pool).await?;
        client
            .execute(
                "INSERT INTO operator_actions (operator, action, clerk_id, reason, detail)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &operator.as_str(),
                    &action.action,
                    &action.user_id,
                    &action.reason,
                    &action.detail,
                ],
            )
            .await?;
        Ok(())
    }

    /// The newest actions, of one account or of all.
    pub async fn recent(
        &self,
        user_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<OperatorAction>, DbError> {
        let client = crate::db::client(&self.pool).await?;
        let rows = client
            .query(
                "SELECT at, operator, action, clerk_id, reason, detail FROM operator_actions
                  WHERE $1::text IS NULL OR clerk_id = $1
                  ORDER BY at DESC, id DESC LIMIT $2",
                &[&user_id, &limit],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(OperatorAction {
                    at: row.try_get(0)?,
                    operator: row.try_get(1)?,
                    action: row.try_get(2)?,
                    user_id: row.try_get(3)?,
                    reason: row.try_get(4)?,
                    detail: row.try_get(5)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(DbError::from)
    }
}
