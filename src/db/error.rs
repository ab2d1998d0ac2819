//! The one database error of creditd, and the pool checkout that returns it.
//!
//! PostgreSQL fails in three ways that callers must tell apart, because
//! the right answer differs:
//! - **unavailable**: the server cannot be reached, is shutting down, or
//!   refused this attempt for a reason that goes away (a serialization
//!   failure, a deadlock, a timeout). The same request succeeds later:
//!   503 with `Retry-After`.
//! - **constraint**: a write broke an integrity constraint (class 23, e.g.
//!   a unique violation 23505). Only the caller knows whether the client
//!   caused it (409) or creditd did (500); retrying changes nothing.
//! - **query**: anything else (a malformed statement, a type that does not
//!   convert): a bug, 500, no retry.
//!
//! The cause (tokio-postgres or deadpool error) is kept as the source, so
//! logs print the whole chain while clients get a clean message.

use std::error::Error as StdError;
use std::sync::Arc;

use deadpool_postgres::{Object, Pool, PoolError};
use tokio_postgres::error::SqlState;

/// A failed database operation, classified by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    /// The database is out of reach for now; the operation may be retried.
    #[error("the database is unavailable")]
    Unavailable(#[source] Cause),
    /// A write broke an integrity constraint (SQLSTATE class 23).
    #[error("constraint `{constraint}` violated ({code})")]
    Constraint {
        /// The constraint's name, as PostgreSQL reports it (empty if none).
        constraint: String,
        /// The SQLSTATE, e.g. `23505` for a unique violation.
        code: String,
        #[source]
        source: Cause,
    },
    /// A query failed for a reason a retry does not fix: a bug.
    #[error("a database query failed")]
    Query(#[source] Cause),
}

/// The driver's or the pool's error, shared so that `DbError` clones (the
/// caches share one failure between the callers that waited on it).
pub type Cause = Arc<dyn StdError + Send + Sync>;

impl DbError {
    /// Whether a retry later may succeed (503 with `Retry-After`).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Unavailable(_))
    }

    /// The constraint's name when this is a unique violation (23505): the
    /// caller decides whether the client caused it.
    pub fn unique_violation(&self) -> Option<&str> {
        match self {
            DbError::Constraint {
                constraint, code, ..
            } if code == SqlState::UNIQUE_VIOLATION.code() => Some(constraint),
            _ => None,
        }
    }

    /// The error and its causes, one line, for logs and engine messages.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = StdError::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

/// SQLSTATEs that mean "not now" rather than "never": the connection or
/// the server went away, or this attempt lost a race a retry can win.
fn is_transient(code: &SqlState) -> bool {
    let transient = [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::QUERY_CANCELED,
        SqlState::LOCK_NOT_AVAILABLE,
    ];
    // Class 08: connection exceptions.
    code.code().starts_with("08") || transient.contains(code)
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> DbError {
        if let Some(database) = error.as_db_error() {
            let code = database.code().clone();
            let constraint = database.constraint().unwrap_or_default().to_owned();
            let cause: Cause = Arc::new(error);
            return if is_transient(&code) {
                DbError::Unavailable(cause)
            } else if code.code().starts_with("23") {
                DbError::Constraint {
                    constraint,
                    code: code.code().to_owned(),
                    source: cause,
                }
            } else {
                DbError::Query(cause)
            };
        }
        // Not the server's answer: a closed connection, an I/O failure or a
        // connect timeout (no source, or an I/O source) is the database out
        // of reach; a conversion or a malformed statement is a bug.
        let lost = error.is_closed()
            || match error.source() {
                None => true,
                Some(source) => source.is::<std::io::Error>(),
            };
        let cause: Cause = Arc::new(error);
        if lost {
            DbError::Unavailable(cause)
        } else {
            DbError::Query(cause)
        }
    }
}

impl From<PoolError> for DbError {
    fn from(error: PoolError) -> DbError {
        // Every pool error means no connection now, perhaps one later: a
        // wait, create or recycle timeout, a closed pool, or the server
        // refusing to open a session (shutting down, not accepting
        // connections, too many clients), which is never a request's fault.
        DbError::Unavailable(Arc::new(error))
    }
}

/// A connection from the pool, or why there is none.
pub async fn client(pool: &Pool) -> Result<Object, DbError> {
    Ok(pool.get().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_each_cause_in_order() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let error = DbError::Unavailable(Arc::new(io));
        assert_eq!(error.chain(), "the database is unavailable: refused");
        assert!(error.is_unavailable());
        assert_eq!(error.unique_violation(), None);
    }

    #[test]
    fn a_unique_violation_names_its_constraint_and_other_constraints_do_not() {
        let cause: Cause = Arc::new(std::fmt::Error);
        let unique = DbError::Constraint {
            constraint: "users_email_key".into(),
            code: "23505".into(),
            source: cause.clone(),
        };
        let check = DbError::Constraint {
            constraint: "amount_positive".into(),
            code: "23514".into(),
            source: cause,
        };
        assert_eq!(unique.unique_violation(), Some("users_email_key"));
        assert_eq!(check.unique_violation(), None);
        assert!(!unique.is_unavailable());
    }

    #[test]
    fn transient_states_are_unavailable_and_others_are_not() {
        for code in [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CONNECTION_FAILURE,
            SqlState::T_R_SERIALIZATION_FAILURE,
        ] {
            assert!(is_transient(&code), "{}", code.code());
        }
        for code in [SqlState::UNIQUE_VIOLATION, SqlState::SYNTAX_ERROR] {
            assert!(!is_transient(&code), "{}", code.code());
        }
    }
}
