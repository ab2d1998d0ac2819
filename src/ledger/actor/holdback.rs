//! Hold-back batching: an admitted chat's hold entry waits (its queue room
//! already taken) until the account's next operation or `hold_delay`, so
//! that a fast chat's hold and settlement reach the writer together and are
//! written as one finished hold row. A held-back entry always leaves before
//! any later one.

use std::sync::atomic::Ordering;

use actix::prelude::*;
use tokio::sync::mpsc;

use super::{AccountActor, Answer};
use crate::ledger::journal::Entry;
use crate::ledger::types::Record;

impl AccountActor {
    /// Sends the held-back hold entry, if any.
    pub(super) fn flush_pending(&mut self) {
        if let Some((permit, entry)) = self.pending.take() {
            self.send_entry(permit, entry);
        }
    }

    /// Hands an entry to the journal, and says so to whoever replaces this
    /// incarnation.
    pub(super) fn send_entry(&self, permit: mpsc::OwnedPermit<Entry>, entry: Entry) {
        self.sent.store(entry.seq, Ordering::Release);
        permit.send(entry);
    }

    /// Sends `entry` now, or holds it back when it is the hold of a chat
    /// answered as soon as it applied (and holding back is on).
    pub(super) fn send_or_hold_back(
        &mut self,
        ctx: &mut Context<Self>,
        answer: Answer,
        permit: mpsc::OwnedPermit<Entry>,
        entry: Entry,
    ) {
        let hold_delay = self.settings.hold_delay;
        let hold_back = answer == Answer::WhenApplied
            && !hold_delay.is_zero()
            && matches!(entry.record, Record::HoldPlaced(_));
        if !hold_back {
            self.send_entry(permit, entry);
            return;
        }
        let seq = entry.seq;
        self.pending = Some((permit, entry));
        ctx.run_later(hold_delay, move |actor, _| {
            if actor.pending.as_ref().is_some_and(|(_, e)| e.seq == seq) {
                actor.flush_pending();
            }
        });
    }
}
