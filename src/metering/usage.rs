//! Usage reports read from the ledger's usage rows: spend per UTC day, for
//! the usage chart of the billing page.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use tokio_postgres::GenericClient;

use crate::db::DbError;
use crate::ledger::AccountId;

/// Longest range of the daily report, in days.
pub const MAX_DAYS: u32 = 90;

/// The named statements of this module.
pub(crate) mod sql {
    /// One row per UTC day that has usages in `[$2, $3)`, oldest first.
    pub const DAILY_USAGE: &str = "
        SELECT (created_at AT TIME ZONE 'UTC')::date AS day,
               sum(cost_micros)::int8, count(*)::int8,
               sum(input_tokens)::int8, sum(output_tokens)::int8
          FROM credit_usages
         WHERE user_id = $1 AND created_at >= $2 AND created_at < $3
         GROUP BY day
         ORDER BY day";
}

/// Why a usage report was not read.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UsageError {
    /// The range asked for is not one the report serves (400, the field named).
    #[error("{0}")]
    InvalidRange(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// One UTC day of usage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyUsage {
    pub date: NaiveDate,
    pub cost_micros: i64,
    pub chats: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

impl DailyUsage {
    fn zero(date: NaiveDate) -> DailyUsage {
        DailyUsage {
            date,
            cost_micros: 0,
            chats: 0,
            input_tokens: 0,
            output_tokens: 0,
        }
    }
}

/// The last `days` UTC days up to and including the day of `now`, oldest
/// first, days without usage included as zeros.
pub async fn daily_usage(
    client: &impl GenericClient,
    account: AccountId,
    days: u32,
    now: DateTime<Utc>,
) -> Result<Vec<DailyUsage>, UsageError> {
    if days == 0 || days > MAX_DAYS {
        return Err(UsageError::InvalidRange(format!(
            "field `days`: must be an integer from 1 to {MAX_DAYS}"
        )));
    }
    let today = now.date_naive();
    let first = today - Duration::days(i64::from(days) - 1);
    let start = first.and_time(chrono::NaiveTime::MIN).and_utc();
    let end = (today + Duration::days(1))
        .and_time(chrono::NaiveTime::MIN)
        .and_utc();
    let rows = client
        .query(sql::DAILY_USAGE, &[&account.0, &start, &end])
        .await
        .map_err(DbError::from)?;
    let mut report: Vec<DailyUsage> = first
        .iter_days()
        .take(days as usize)
        .map(DailyUsage::zero)
        .collect();
    for row in rows {
        let date: NaiveDate = row.get(0);
        let Some(day) = report.iter_mut().find(|day| day.date == date) else {
            continue;
        };
        day.cost_micros = row.get(1);
        day.chats = row.get(2);
        day.input_tokens = row.get(3);
        day.output_tokens = row.get(4);
    }
    Ok(report)
}

/// The usage reports, each read on a connection of its own.
#[derive(Clone)]
pub struct UsageReports {
    pool: crate::db::Pool,
}

impl UsageReports {
    pub fn new(pool: crate::db::Pool) -> UsageReports {
        UsageReports { pool }
    }

    /// Spend per UTC day (see [`daily_usage`]).
    pub async fn daily(
        &self,
        account: AccountId,
        days: u32,
        now: DateTime<Utc>,
    ) -> Result<Vec<DailyUsage>, UsageError> {
        let client = crate::db::client(&self.pool).await?;
        daily_usage(&**client, account, days, now).await
    }
}
