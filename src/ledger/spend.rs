//! Spending limits: what an account's UTC day and UTC month windows count,
//! the rule a hold must pass, and the SQL that loads and stores the limits.
//!
//! The account's actor owns the counters: settled usage in each window,
//! loaded with the account from `credit_usages` and moved by every
//! settlement it applies. A hold passes when the window's settled spend,
//! the account's active holds and the new hold together stay within the
//! limit, so parallel chats can never pass a limit together.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use tokio_postgres::GenericClient;

use super::store::database_error;
use super::types::*;
use crate::money::Micros;

/// The UTC day and month a time falls in.
fn day_of(at: DateTime<Utc>) -> NaiveDate {
    at.date_naive()
}

fn month_of(at: DateTime<Utc>) -> (i32, u32) {
    (at.year(), at.month())
}

/// Midnight UTC starting `day`.
fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// The start of the UTC day of `at`.
pub fn day_start(at: DateTime<Utc>) -> DateTime<Utc> {
    midnight(day_of(at))
}

/// The start of the UTC month of `at`.
pub fn month_start(at: DateTime<Utc>) -> DateTime<Utc> {
    midnight(day_of(at).with_day(1).unwrap_or(day_of(at)))
}

/// When the window of `at` ends.
pub fn resets_at(window: LimitWindow, at: DateTime<Utc>) -> DateTime<Utc> {
    match window {
        LimitWindow::Daily => day_start(at) + Duration::days(1),
        LimitWindow::Monthly => {
            let (year, month) = month_of(at);
            let (year, month) = if month == 12 {
                (year + 1, 1)
            } else {
                (year, month + 1)
            };
            NaiveDate::from_ymd_opt(year, month, 1).map_or(at, midnight)
        }
    }
}

/// Settled usage in the current day and month of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendCounters {
    day: NaiveDate,
    month: (i32, u32),
    spent_today: Micros,
    spent_this_month: Micros,
}

impl SpendCounters {
    pub fn new(now: DateTime<Utc>, spent_today: Micros, spent_this_month: Micros) -> Self {
        SpendCounters {
            day: day_of(now),
            month: month_of(now),
            spent_today,
            spent_this_month,
        }
    }

    /// Starts a new window from zero when `now` is past the current one.
    /// A clock that moved back keeps the later window.
    fn roll(&mut self, now: DateTime<Utc>) {
        if day_of(now) > self.day {
            self.day = day_of(now);
            self.spent_today = Micros::ZERO;
        }
        if month_of(now) > self.month {
            self.month = month_of(now);
            self.spent_this_month = Micros::ZERO;
        }
    }

    /// Counts a settlement posted at `now`.
    pub fn record(&mut self, cost: Micros, now: DateTime<Utc>) {
        self.roll(now);
        // Saturating: a counter past i64 is over every limit anyway.
        self.spent_today = Micros::new(self.spent_today.get().saturating_add(cost.get()));
        self.spent_this_month = Micros::new(self.spent_this_month.get().saturating_add(cost.get()));
    }

    /// Settled spend in `window` as of `now`.
    pub fn spent(&mut self, window: LimitWindow, now: DateTime<Utc>) -> Micros {
        self.roll(now);
        match window {
            LimitWindow::Daily => self.spent_today,
            LimitWindow::Monthly => self.spent_this_month,
        }
    }

    /// Refuses a hold of `required` when, with `held` already held, it
    /// would take a window past its limit (the daily window first).
    pub fn admit(
        &mut self,
        limits: &SpendLimits,
        held: Micros,
        required: Micros,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        for window in [LimitWindow::Daily, LimitWindow::Monthly] {
            let Some(limit) = limits.effective(window) else {
                continue;
            };
            let spent = self.spent(window, now);
            let total =
                i128::from(spent.get()) + i128::from(held.get()) + i128::from(required.get());
            if total > i128::from(limit.get()) {
                let resets_at = resets_at(window, now);
                let wait = (resets_at - now).num_microseconds().unwrap_or(i64::MAX);
                let retry_after_s = u64::try_from(wait).unwrap_or(0).div_ceil(1_000_000);
                return Err(LedgerError::SpendLimitReached {
                    window,
                    limit,
                    spent,
                    held,
                    required,
                    resets_at,
                    retry_after_s,
                });
            }
        }
        Ok(())
    }

    pub fn window(
        &mut self,
        limits: &SpendLimits,
        window: LimitWindow,
        now: DateTime<Utc>,
    ) -> WindowSpend {
        WindowSpend {
            limit_micros: limits.effective(window),
            spent_micros: self.spent(window, now),
            resets_at: resets_at(window, now),
        }
    }
}

/// An account's limits and the settled spend of its current windows, as
/// PostgreSQL has them at `now`.
pub async fn load(
    client: &impl GenericClient,
    account: AccountId,
    now: DateTime<Utc>,
) -> Result<(SpendLimits, SpendCounters), LedgerError> {
    let limits = client
        .query_opt(
            "SELECT daily_micros, monthly_micros, daily_ceiling_micros, monthly_ceiling_micros
               FROM credit_limits WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .map_err(database_error)?
        .map_or_else(SpendLimits::default, |row| {
            let micros = |index: usize| row.get::<_, Option<i64>>(index).map(Micros::new);
            SpendLimits {
                daily_micros: micros(0),
                monthly_micros: micros(1),
                daily_ceiling_micros: micros(2),
                monthly_ceiling_micros: micros(3),
            }
        });
    // A day never starts before its month: the month's rows hold the day's.
    let (day, month) = (day_start(now), month_start(now));
    let row = client
        .query_one(
            "SELECT coalesce(sum(cost_micros) FILTER (WHERE created_at >= $2), 0)::int8,
                    coalesce(sum(cost_micros), 0)::int8
               FROM credit_usages WHERE user_id = $1 AND created_at >= $3",
            &[&account.0, &day, &month],
        )
        .await
        .map_err(database_error)?;
    let counters = SpendCounters::new(now, Micros::new(row.get(0)), Micros::new(row.get(1)));
    Ok((limits, counters))
}

/// What each gateway API key of the account spent, from its usages.
pub async fn load_key_spend(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<std::collections::HashMap<ApiKeyId, Micros>, LedgerError> {
    let rows = client
        .query(
            "SELECT api_key_id, sum(cost_micros)::int8 FROM credit_usages
              WHERE user_id = $1 AND api_key_id IS NOT NULL GROUP BY api_key_id",
            &[&account.0],
        )
        .await
        .map_err(database_error)?;
    Ok(rows
        .iter()
        .map(|row| (ApiKeyId(row.get(0)), Micros::new(row.get(1))))
        .collect())
}

/// Stores an account's limits (its actor calls it before acknowledging).
pub async fn store(
    client: &impl GenericClient,
    account: AccountId,
    limits: &SpendLimits,
) -> Result<(), LedgerError> {
    let value = |limit: Option<Micros>| limit.map(Micros::get);
    client
        .execute(
            "INSERT INTO credit_limits (user_id, daily_micros, monthly_micros,
                    daily_ceiling_micros, monthly_ceiling_micros)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (user_id) DO UPDATE
                SET daily_micros = EXCLUDED.daily_micros,
                    monthly_micros = EXCLUDED.monthly_micros,
                    daily_ceiling_micros = EXCLUDED.daily_ceiling_micros,
                    monthly_ceiling_micros = EXCLUDED.monthly_ceiling_micros,
                    updated_at = now()",
            &[
                &account.0,
                &value(limits.daily_micros),
                &value(limits.monthly_micros),
                &value(limits.daily_ceiling_micros),
                &value(limits.monthly_ceiling_micros),
            ],
        )
        .await
        .map_err(database_error)?;
    Ok(())
}

/// The limits after `change`, or why the owner may not make it (a limit
/// above an administrator's ceiling: 409, naming the field).
pub fn apply_change(
    current: &SpendLimits,
    change: LimitsChange,
) -> Result<SpendLimits, LedgerError> {
    match change {
        LimitsChange::Admin(limits) => Ok(limits),
        LimitsChange::Owner {
            daily_micros,
            monthly_micros,
        } => {
            for (field, window, asked) in [
                ("dailyMicros", LimitWindow::Daily, daily_micros),
                ("monthlyMicros", LimitWindow::Monthly, monthly_micros),
            ] {
                if let (Some(asked), Some(ceiling)) = (asked, current.ceiling(window)) {
                    if asked > ceiling {
                        return Err(LedgerError::Conflict(format!(
                            "field `{field}`: {} micros is above the {} ceiling of {} micros an administrator set",
                            asked.get(),
                            window.as_str(),
                            ceiling.get()
                        )));
                    }
                }
            }
            Ok(SpendLimits {
                daily_micros,
                monthly_micros,
                ..*current
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn windows_end_at_utc_midnight_and_at_the_first_of_the_next_month() {
        let now = at("2026-12-31T23:59:59.5Z");
        assert_eq!(
            resets_at(LimitWindow::Daily, now),
            at("2027-01-01T00:00:00Z")
        );
        assert_eq!(
            resets_at(LimitWindow::Monthly, now),
            at("2027-01-01T00:00:00Z")
        );
        let now = at("2026-02-10T08:00:00Z");
        assert_eq!(
            resets_at(LimitWindow::Monthly, now),
            at("2026-03-01T00:00:00Z")
        );
        assert_eq!(month_start(now), at("2026-02-01T00:00:00Z"));
    }

    #[test]
    fn a_hold_that_would_pass_the_daily_limit_is_refused_until_midnight() {
        let now = at("2026-03-10T23:00:00Z");
        let limits = SpendLimits {
            daily_micros: Some(Micros::new(100)),
            ..SpendLimits::default()
        };
        let mut counters = SpendCounters::new(now, Micros::new(60), Micros::new(60));
        assert!(counters
            .admit(&limits, Micros::new(30), Micros::new(10), now)
            .is_ok());
        let refused = counters.admit(&limits, Micros::new(30), Micros::new(11), now);
        match refused {
            Err(LedgerError::SpendLimitReached {
                window: LimitWindow::Daily,
                retry_after_s: 3600,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        let tomorrow = at("2026-03-11T00:00:00Z");
        assert!(counters
            .admit(&limits, Micros::new(30), Micros::new(70), tomorrow)
            .is_ok());
    }

    #[test]
    fn an_owner_cannot_set_a_limit_above_the_ceiling() {
        let current = SpendLimits {
            daily_ceiling_micros: Some(Micros::new(100)),
            ..SpendLimits::default()
        };
        let change = LimitsChange::Owner {
            daily_micros: Some(Micros::new(101)),
            monthly_micros: None,
        };
        let refused = apply_change(&current, change).unwrap_err();
        assert!(refused.to_string().contains("dailyMicros"), "{refused}");
        assert_eq!(
            current.effective(LimitWindow::Daily),
            Some(Micros::new(100))
        );
    }
}
