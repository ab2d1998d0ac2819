//! Where creditd reads the time: the system clock in production, a clock
//! that only moves when told to in tests (expiries, UTC day and month
//! windows). Timers still run on real time: an actor that wakes reads this
//! clock to decide what is due.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, SubsecRound, Utc};

#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock.
    manual: Option<Arc<Mutex<DateTime<Utc>>>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system"),
            Some(_) => write!(f, "Clock::manual({})", self.now()),
        }
    }
}

impl Clock {
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that reads `start` until it is set or advanced.
    pub fn manual(start: DateTime<Utc>) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(start))),
        }
    }

    /// The current time, to the microsecond (what PostgreSQL stores).
    pub fn now(&self) -> DateTime<Utc> {
        match &self.manual {
            None => Utc::now().trunc_subsecs(6),
            Some(at) => *at.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Moves a manual clock to `at`. The system clock cannot be moved.
    pub fn set(&self, at: DateTime<Utc>) -> Result<(), &'static str> {
        match &self.manual {
            None => Err("the system clock cannot be set"),
            Some(now) => {
                *now.lock().unwrap_or_else(|p| p.into_inner()) = at.trunc_subsecs(6);
                Ok(())
            }
        }
    }

    /// Moves a manual clock forward by `by`.
    pub fn advance(&self, by: Duration) -> Result<(), &'static str> {
        let next = self.now() + by;
        self.set(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told() {
        let start = Utc::now().trunc_subsecs(6);
        let clock = Clock::manual(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::hours(25)).unwrap();
        assert_eq!(clock.now(), start + Duration::hours(25));
        assert!(Clock::system().set(start).is_err());
    }
}
