//! How an operation becomes a journal entry: it applies to the state, the
//! candidate state is checked, the events the change makes are decided
//! (balance alerts, then auto-recharge), and the entry leaves for the
//! writer (or is held back, see `holdback`); the reply comes at once, with
//! what its caller waits on until the entry is durable, if it must.

use actix::prelude::*;
use chrono::{DateTime, Utc};
use tokio::sync::mpsc;

use super::{ready, AccountActor, Answer, Pending, Phase, Reply};
use crate::ledger::auto_recharge::{self, AttemptEnd};
use crate::ledger::journal::Entry;
use crate::ledger::outbox;
use crate::ledger::state::{AccountState, Applied};
use crate::ledger::types::*;
use crate::money::Micros;

/// A change an operation applied anew, with the balance row before it
/// (which the writer puts back should the entry fail).
struct Change {
    record: Record,
    balance_before: i64,
    held_before: i64,
}

impl AccountActor {
    /// Applies an operation and queues its entry; the reply comes at once,
    /// and its caller waits until the entry (or, for a replay, the
    /// original) is durable (`Pending::durable`).
    pub(super) fn apply<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>,
    ) -> Reply<Pending<T>> {
        self.apply_answering(ctx, Answer::WhenDurable, operation)
    }

    /// Applies an operation and queues its entry; `answer` says whether its
    /// caller then waits for the entry's commit or is done once it applied.
    pub(super) fn apply_answering<T: 'static>(
        &mut self,
        ctx: &mut Context<Self>,
        answer: Answer,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>,
    ) -> Reply<Pending<T>> {
        if let Err(error) = self.gate(ctx) {
            return ready(Err(error));
        }
        // Entries leave in seq order: a held-back hold goes first.
        self.flush_pending();
        if !matches!(self.phase, Phase::Ready(_)) {
            return ready(Err(LedgerError::Reset));
        }
        let permit = match self.writer.reserve(self.account) {
            Ok(permit) => permit,
            Err(error) => return ready(Err(error)),
        };
        // PostgreSQL keeps microseconds: so does the engine, so a record
        // reads back exactly as it was answered.
        let now = self.settings.clock.now();
        let ((value, seq), change) = match self.operate(operation, now) {
            Ok(operated) => operated,
            Err(error) => return ready(Err(error)),
        };
        let replayed = change.is_none();
        if let Some(change) = change {
            if let Err(error) = self.journal(ctx, answer, permit, change, now) {
                return ready(Err(error));
            }
        }
        self.reply(answer, value, seq, replayed)
    }

    /// Journals a change the state applied: the candidate state is checked
    /// before its entry leaves (a broken invariant fails the account, never
    /// journals), the events it makes are decided, and the entry is sent
    /// (or held back).
    fn journal(
        &mut self,
        ctx: &mut Context<Self>,
        answer: Answer,
        permit: mpsc::OwnedPermit<Entry>,
        change: Change,
        now: DateTime<Utc>,
    ) -> Result<(), LedgerError> {
        if let Err(error) = self.check_invariants() {
            tracing::error!(%error, "ledger invariant broken; the account reloads");
            drop(permit);
            self.stop(ctx);
            return Err(error);
        }
        let mut events = self.alert_events(&change, now);
        events.extend(self.recharge_events(&change.record, now));
        let entry = self.entry(change, events)?;
        let expiring = entry.grants.iter().any(|w| w.grant.expires_at.is_some());
        self.send_or_hold_back(ctx, answer, permit, entry);
        if let Some(state) = self.state() {
            self.published.set(Some(state.view()));
        }
        if expiring {
            // A grant that expires (or an expired one just spent from):
            // the timer wakes the actor when it is due.
            self.schedule(ctx);
        }
        Ok(())
    }

    /// The operation's reply, at once: done, or to be waited for until
    /// `seq` is durable.
    fn reply<T: 'static>(
        &self,
        answer: Answer,
        value: T,
        seq: i64,
        replayed: bool,
    ) -> Reply<Pending<T>> {
        let outcome = Outcome {
            record: value,
            replayed,
        };
        let durable = match answer {
            Answer::WhenApplied => None,
            Answer::WhenDurable => Some((self.durable_rx.clone(), seq)),
        };
        ready(Ok(Pending { outcome, durable }))
    }

    /// Runs `operation` on the state: the value and, when it applied anew,
    /// the change to journal (`None`: a replay, whose value carries its seq).
    #[allow(clippy::type_complexity)]
    fn operate<T>(
        &mut self,
        operation: impl FnOnce(&mut AccountState, DateTime<Utc>, i64) -> Result<Applied<T>, LedgerError>,
        now: DateTime<Utc>,
    ) -> Result<((T, i64), Option<Change>), LedgerError> {
        let durable_seq = self.durable_seq();
        let Phase::Ready(state) = &mut self.phase else {
            return Err(LedgerError::Reset);
        };
        // What the balance row holds before this entry, should the writer
        // have to put it back.
        let (balance_before, held_before) = (state.balance.get(), state.held.get());
        drop(state.take_grant_writes());
        Ok(match operation(state, now, durable_seq)? {
            Applied::New { value, record } => (
                (value, state.seq),
                Some(Change {
                    record,
                    balance_before,
                    held_before,
                }),
            ),
            Applied::Replay { value, seq } => ((value, seq), None),
        })
    }

    fn check_invariants(&self) -> Result<(), LedgerError> {
        self.state()
            .map_or(Err(LedgerError::Reset), AccountState::check_invariants)
    }

    /// The balance alerts `change` fires (moving which were sent).
    fn alert_events(&mut self, change: &Change, now: DateTime<Utc>) -> Vec<OutgoingEvent> {
        let Phase::Ready(state) = &self.phase else {
            return Vec::new();
        };
        let available_before = Micros::new(change.balance_before - change.held_before);
        outbox::events_of(
            &change.record,
            &mut self.alerts,
            &self.settings.alerts,
            state.balance,
            available_before,
            state.available(),
            now,
        )
    }

    /// The auto-recharge event `record` makes: the credit of an
    /// auto-recharge ends its attempt; spending under the threshold may
    /// start the next one, recorded with this change.
    fn recharge_events(&mut self, record: &Record, now: DateTime<Utc>) -> Option<OutgoingEvent> {
        let Phase::Ready(state) = &self.phase else {
            return None;
        };
        if let Record::Transaction(t) = record {
            if let Some(attempt) = auto_recharge::attempt_of(t.metadata.as_ref()) {
                self.recharge.ended(attempt, AttemptEnd::Succeeded);
            }
        }
        self.recharge.observe(
            record,
            self.settings.alerts.recharge_monthly_max_cents,
            state.available(),
            now,
        )
    }

    /// The journal entry of `change`, with the grant rows it wrote.
    fn entry(&mut self, change: Change, events: Vec<OutgoingEvent>) -> Result<Entry, LedgerError> {
        let (account, epoch, durable) = (self.account, self.epoch, self.durable_tx.clone());
        let Phase::Ready(state) = &mut self.phase else {
            return Err(LedgerError::Reset);
        };
        Ok(Entry {
            account,
            epoch,
            seq: state.seq,
            balance_before: change.balance_before,
            held_before: change.held_before,
            balance_after: state.balance.get(),
            held_after: state.held.get(),
            record: change.record,
            events,
            grants: state.take_grant_writes(),
            durable,
        })
    }
}
