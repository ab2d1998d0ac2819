//! The actor's timer: holds and grants that fall due expire (journaled
//! like any operation), and an idle account with nothing in flight stops.

use std::time::{Duration, Instant};

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::{durable, AccountActor, Pending, Phase, Reply};
use crate::ledger::state::Applied;
use crate::ledger::types::*;

impl AccountActor {
    /// Releases (as EXPIRED) every hold due by `now`, journaling each.
    /// Returns the replies; nobody needs to wait for them.
    pub(super) fn expire_due(
        &mut self,
        ctx: &mut Context<Self>,
        now: DateTime<Utc>,
    ) -> Vec<Reply<Pending<ReleaseRecord>>> {
        let due = match self.state() {
            Some(state) => state.expired(now),
            None => return Vec::new(),
        };
        let mut replies = Vec::with_capacity(due.len());
        for hold in due {
            replies.push(self.apply(ctx, move |state, at, durable| {
                let expired = state.release(hold, HoldStatus::Expired, at, durable);
                if matches!(expired, Ok(Applied::New { .. })) {
                    metrics::counter!(crate::telemetry::HOLDS_EXPIRED_TOTAL.name).increment(1);
                }
                expired
            }));
        }
        replies
    }

    /// Expires (journaling each) the unheld remainder of every grant past
    /// its expiry by `now`. Returns the replies.
    pub(super) fn expire_grants(
        &mut self,
        ctx: &mut Context<Self>,
        now: DateTime<Utc>,
    ) -> Vec<Reply<Pending<Option<TransactionRecord>>>> {
        let due = match self.state() {
            Some(state) => state.expired_grants(now),
            None => return Vec::new(),
        };
        due.into_iter()
            .map(|grant| {
                self.apply(ctx, move |state, at, durable| {
                    state.expire_grant(grant, at.max(now), durable)
                })
            })
            .collect()
    }

    /// Expires what is due of the grants before an operation spends them
    /// (or after one freed what holds kept of an expired grant); nobody
    /// waits for these: a failure is logged and retried after reload.
    pub(super) fn expire_grants_due(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Ready(_)) {
            return;
        }
        let now = self.settings.clock.now();
        for reply in self.expire_grants(ctx, now) {
            ctx.spawn(
                async move {
                    if let Err(error) = durable(reply).await {
                        tracing::warn!(%error, "grant expiry not committed; retried after reload");
                    }
                }
                .into_actor(self),
            );
        }
    }

    /// Arms the housekeeping timer for the next expiry or the idle deadline.
    pub(super) fn schedule(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let idle_at = self.last_activity + self.settings.idle_timeout;
        let clock_now = self.settings.clock.now();
        let next =
            self.state().and_then(
                |s| match (s.next_expiry(), s.next_grant_expiry(clock_now)) {
                    (Some(hold), Some(grant)) => Some(hold.min(grant)),
                    (hold, grant) => hold.or(grant),
                },
            );
        let expiry_at = next.map(|at| {
            let wait = (at - self.settings.clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO);
            now + wait
        });
        let at = expiry_at
            .map_or(idle_at, |e| e.min(idle_at))
            .max(now + Duration::from_millis(5));
        if let Some((handle, current)) = self.timer {
            if current <= at {
                return;
            }
            ctx.cancel_future(handle);
        }
        let handle = ctx.run_later(at - now, |actor, ctx| {
            actor.timer = None;
            actor.tick(ctx);
        });
        self.timer = Some((handle, at));
    }

    pub(super) fn tick(&mut self, ctx: &mut Context<Self>) {
        if !matches!(self.phase, Phase::Ready(_)) {
            return;
        }
        if self.durable_rx.borrow().failed || self.is_stale() {
            self.stop(ctx);
            return;
        }
        let replies = self.expire_due(ctx, self.settings.clock.now());
        for reply in replies {
            ctx.spawn(
                async move {
                    if let Err(error) = durable(reply).await {
                        tracing::warn!(%error, "hold expiry not committed; retried after reload");
                    }
                }
                .into_actor(self),
            );
        }
        // Grants expire after the holds: an expired hold no longer keeps
        // its part of an expired grant.
        self.expire_grants_due(ctx);
        let quiet = self.state().is_some_and(|state| {
            state.holds.is_empty() && self.durable_rx.borrow().seq >= state.seq
        });
        if quiet && self.last_activity.elapsed() >= self.settings.idle_timeout {
            tracing::trace!(account = self.account.0, "passivating idle account");
            self.stop(ctx);
            return;
        }
        self.schedule(ctx);
    }
}
