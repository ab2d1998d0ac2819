//! How the account's actor answers each message (see `messages`): the
//! operations that need a PostgreSQL lookup first (an unknown key, hold or
//! clawed-back charge) look it up with the mailbox held, then apply.

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::messages::*;
use super::{durable, ready, AccountActor, Backend, Pending, Phase, Reply};
use crate::ledger::auto_recharge;
use crate::ledger::journal::wait_resolved;
use crate::ledger::spend;
use crate::ledger::state::{AccountState, Applied};
use crate::ledger::store;
use crate::ledger::types::*;
use crate::money::Micros;

impl Handler<Evict> for AccountActor {
    type Result = ();

    fn handle(&mut self, _msg: Evict, ctx: &mut Context<Self>) {
        if matches!(self.phase, Phase::Ready(_)) && self.is_stale() {
            self.stop(ctx);
        }
    }
}

impl Handler<AwaitApplied> for AccountActor {
    type Result = Reply<()>;

    fn handle(&mut self, _msg: AwaitApplied, _ctx: &mut Context<Self>) -> Self::Result {
        // Loading, stopping, or failed: nothing of this incarnation will
        // still commit.
        if self.durable_rx.borrow().failed || !matches!(self.phase, Phase::Ready(_)) {
            return ready(Ok(()));
        }
        // A held-back hold entry is one of them: it leaves now rather than
        // make the caller wait out its delay.
        self.flush_pending();
        let Some(applied) = self.state().map(|state| state.seq) else {
            return ready(Ok(()));
        };
        Reply::later(wait_resolved(self.durable_rx.clone(), applied))
    }
}

impl Handler<SetAutoRecharge> for AccountActor {
    type Result = Result<(), LedgerError>;

    fn handle(&mut self, msg: SetAutoRecharge, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.recharge.config = msg.config;
        Ok(())
    }
}

impl Handler<AutoRechargeEnded> for AccountActor {
    type Result = Result<(), LedgerError>;

    fn handle(&mut self, msg: AutoRechargeEnded, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.recharge.ended(msg.attempt, msg.end);
        Ok(())
    }
}

impl AccountActor {
    fn post(
        &mut self,
        ctx: &mut Context<Self>,
        direction: Direction,
        posting: Posting,
    ) -> Reply<Pending<TransactionRecord>> {
        let known = self.state().is_some_and(|s| s.knows_key(&posting.key));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            return self.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d));
        };
        if known {
            return self.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d));
        }
        let account = self.account;
        let key = posting.key.clone();
        let lookup = async move {
            let client = store::client(&pool).await?;
            store::find_transaction(&**client, account, &key).await
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            match found {
                Ok(Some(record)) => {
                    let durable = actor.durable_seq();
                    if let Phase::Ready(state) = &mut actor.phase {
                        state.remember_key(record, durable);
                    }
                }
                Ok(None) => {}
                Err(error) => return ready(Err(error)),
            }
            actor.apply(ctx, move |s, now, d| s.post(direction, &posting, now, d))
        })
    }

    /// Settle and release on a hold the actor doesn't know look it up first.
    fn finish<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        hold_id: HoldId,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>
            + 'static,
    ) -> Reply<Pending<T>> {
        let known = self.state().is_some_and(|s| s.knows_hold(&hold_id));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            return self.apply(ctx, operation);
        };
        if known {
            return self.apply(ctx, operation);
        }
        let account = self.account;
        let lookup = async move {
            let client = store::client(&pool).await?;
            store::find_finished_hold(&**client, account, hold_id).await
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            match found {
                Ok(Some(finished)) => {
                    let durable = actor.durable_seq();
                    if let Phase::Ready(state) = &mut actor.phase {
                        state.remember_finished(hold_id, finished, durable);
                    }
                }
                Ok(None) => {}
                Err(error) => return ready(Err(error)),
            }
            actor.apply(ctx, operation)
        })
    }
}

impl Handler<Credit> for AccountActor {
    type Result = Reply<Pending<TransactionRecord>>;

    fn handle(&mut self, msg: Credit, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        let mut posting = msg.posting;
        if let Some(attempt) = msg.attempt {
            auto_recharge::mark_attempt(&mut posting.metadata, attempt);
        }
        self.post(ctx, Direction::Credit, posting)
    }
}

impl Handler<Debit> for AccountActor {
    type Result = Reply<Pending<TransactionRecord>>;

    fn handle(&mut self, msg: Debit, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        self.post(ctx, Direction::Debit, msg.posting)
    }
}

impl Handler<Reserve> for AccountActor {
    type Result = Reply<Pending<HoldRecord>>;

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) -> Self::Result {
        // Expired holds give their amount back before a new one is judged.
        for reply in self.expire_due(ctx, self.settings.clock.now()) {
            drop(reply);
        }
        self.expire_grants_due(ctx);
        let ttl = self.settings.hold_ttl;
        let reply = self.apply_answering(ctx, msg.answer, move |state, now, _| {
            state.reserve(msg.hold_id, msg.amount, msg.key, now, now + ttl)
        });
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<Clawback> for AccountActor {
    type Result = Reply<Pending<Option<TransactionRecord>>>;

    fn handle(&mut self, msg: Clawback, ctx: &mut Context<Self>) -> Self::Result {
        self.expire_grants_due(ctx);
        let request = msg.request;
        let known = self
            .state()
            .is_some_and(|s| s.knows_clawbacks(&request.object) && s.knows_key(&request.key));
        let Backend::Postgres { pool, .. } = self.backend.clone() else {
            if let Phase::Ready(state) = &mut self.phase {
                state.remember_clawbacks(request.object.clone(), Micros::ZERO);
            }
            return self.apply(ctx, move |s, now, d| s.clawback(&request, now, d));
        };
        if known {
            return self.apply(ctx, move |s, now, d| s.clawback(&request, now, d));
        }
        let account = self.account;
        let (object, key) = (request.object.clone(), request.key.clone());
        let lookup = async move {
            let client = store::client(&pool).await?;
            let taken = store::clawed_back(&**client, account, &object).await?;
            let first = store::find_transaction(&**client, account, &key).await?;
            Ok::<_, LedgerError>((taken, first))
        };
        self.after_lookup(ctx, lookup, move |actor, ctx, found| {
            let (taken, first) = match found {
                Ok(found) => found,
                Err(error) => return ready(Err(error)),
            };
            let durable = actor.durable_seq();
            if let Phase::Ready(state) = &mut actor.phase {
                state.remember_clawbacks(request.object.clone(), taken);
                if let Some(record) = first {
                    state.remember_key(record, durable);
                }
            }
            actor.apply(ctx, move |s, now, d| s.clawback(&request, now, d))
        })
    }
}

impl Handler<Settle> for AccountActor {
    type Result = Reply<Pending<UsageRecord>>;

    fn handle(&mut self, msg: Settle, ctx: &mut Context<Self>) -> Self::Result {
        let hold_id = msg.hold_id;
        self.expire_grants_due(ctx);
        let reply = self.finish(ctx, hold_id, move |state, now, durable| {
            state.settle(hold_id, &msg.charge, now, durable)
        });
        // What the hold kept of an expired grant and did not spend expires.
        self.expire_grants_due(ctx);
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<Release> for AccountActor {
    type Result = Reply<Pending<ReleaseRecord>>;

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) -> Self::Result {
        let hold_id = msg.hold_id;
        let reply = self.finish(ctx, hold_id, move |state, now, durable| {
            state.release(hold_id, HoldStatus::Released, now, durable)
        });
        self.expire_grants_due(ctx);
        if matches!(self.phase, Phase::Ready(_)) {
            self.schedule(ctx);
        }
        reply
    }
}

impl Handler<ExpireHolds> for AccountActor {
    type Result = Reply<Vec<ReleaseRecord>>;

    fn handle(&mut self, msg: ExpireHolds, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let replies = self.expire_due(ctx, msg.now);
        // What expired holds kept of expired grants expires with them.
        self.expire_grants_due(ctx);
        Reply::later(async move {
            let mut released = Vec::with_capacity(replies.len());
            for reply in replies {
                released.push(durable(reply).await?.record);
            }
            Ok(released)
        })
    }
}

impl Handler<ExpireGrants> for AccountActor {
    type Result = Reply<Vec<TransactionRecord>>;

    fn handle(&mut self, msg: ExpireGrants, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let replies = self.expire_grants(ctx, msg.now);
        Reply::later(async move {
            let mut expired = Vec::with_capacity(replies.len());
            for reply in replies {
                if let Some(record) = durable(reply).await?.record {
                    expired.push(record);
                }
            }
            Ok(expired)
        })
    }
}

impl Handler<GetBalance> for AccountActor {
    type Result = Result<BalanceSnapshot, LedgerError>;

    fn handle(&mut self, _msg: GetBalance, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        self.state()
            .map(AccountState::snapshot)
            .ok_or(LedgerError::Reset)
    }
}

impl Handler<SetLimits> for AccountActor {
    type Result = Reply<SpendingSnapshot>;

    fn handle(&mut self, msg: SetLimits, ctx: &mut Context<Self>) -> Self::Result {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        let Some(state) = self.state() else {
            return ready(Err(LedgerError::Reset));
        };
        let limits = match spend::apply_change(&state.limits, msg.change) {
            Ok(limits) => limits,
            Err(error) => return ready(Err(error)),
        };
        let now = self.settings.clock.now();
        let Backend::Postgres { pool, instance } = self.backend.clone() else {
            return ready(match &mut self.phase {
                Phase::Ready(state) => {
                    state.limits = limits;
                    Ok(state.spending(now))
                }
                _ => Err(LedgerError::Reset),
            });
        };
        let account = self.account;
        // Stored with the mailbox held: no hold is judged between the
        // change and its write, and none after it on the old limits. The
        // other instances' copies, which judge on the old limits, are
        // dropped at the commit.
        let write = async move {
            let mut client = store::client(&pool).await?;
            let tx = client.transaction().await.map_err(store::database_error)?;
            spend::store(&*tx, account, &limits).await?;
            crate::ledger::cluster::notify_settings_changed(&*tx, &instance, account).await?;
            tx.commit().await.map_err(store::database_error)
        };
        self.after_lookup(ctx, write, move |actor, ctx, written| {
            if let Err(error) = written {
                // The write may have committed all the same: the account
                // reloads its limits from PostgreSQL.
                actor.stop(ctx);
                return ready(Err(error));
            }
            let now = actor.settings.clock.now();
            ready(match &mut actor.phase {
                Phase::Ready(state) => {
                    state.limits = limits;
                    Ok(state.spending(now))
                }
                _ => Err(LedgerError::Reset),
            })
        })
    }
}

impl Handler<GetSpending> for AccountActor {
    type Result = Result<SpendingSnapshot, LedgerError>;

    fn handle(&mut self, _msg: GetSpending, ctx: &mut Context<Self>) -> Self::Result {
        self.gate(ctx)?;
        let now = self.settings.clock.now();
        match &mut self.phase {
            Phase::Ready(state) => Ok(state.spending(now)),
            _ => Err(LedgerError::Reset),
        }
    }
}
