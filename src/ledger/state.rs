//! One account's state and the pure rules of every operation. The actor owns
//! an `AccountState`; each successful operation changes it and yields the
//! journal record that makes the change durable.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::spend::SpendCounters;
use super::types::*;
use crate::money::Micros;

/// What an operation produced: a new record to journal, or a replay of an
/// earlier one (answered once the earlier one is durable). Returned once
/// per operation and taken apart at once by the actor: boxing the record
/// would only add an allocation to every operation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Applied<T> {
    New { value: T, record: Record },
    Replay { value: T, seq: i64 },
}

/// A bounded memory of recent keys. Entries newer than the durable seq are
/// never evicted, so a key in flight can't be forgotten and applied twice.
pub(crate) struct Recent<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<(K, i64)>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> Recent<K, V> {
    pub fn new(capacity: usize) -> Self {
        Recent {
            map: HashMap::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    pub fn insert(&mut self, key: K, value: V, seq: i64, durable_seq: i64) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back((key, seq));
        }
        while self.order.len() > self.capacity {
            match self.order.front() {
                Some((_, oldest)) if *oldest <= durable_seq => {
                    if let Some((key, _)) = self.order.pop_front() {
                        self.map.remove(&key);
                    }
                }
                _ => break,
            }
        }
    }
}

/// The active holds, by id and by expiry, so that finding the due ones and
/// the next deadline costs O(log n) on a hot account with many holds.
#[derive(Default)]
pub(crate) struct ActiveHolds {
    by_id: HashMap<HoldId, HoldRecord>,
    by_expiry: BTreeSet<(DateTime<Utc>, HoldId)>,
}

impl ActiveHolds {
    pub fn get(&self, id: &HoldId) -> Option<&HoldRecord> {
        self.by_id.get(id)
    }

    pub fn contains(&self, id: &HoldId) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn values(&self) -> impl Iterator<Item = &HoldRecord> {
        self.by_id.values()
    }

    fn insert(&mut self, hold: HoldRecord) {
        self.by_expiry.insert((hold.expires_at, hold.id));
        if let Some(previous) = self.by_id.insert(hold.id, hold) {
            self.by_expiry.remove(&(previous.expires_at, previous.id));
        }
    }

    fn remove(&mut self, id: &HoldId) -> Option<HoldRecord> {
        let hold = self.by_id.remove(id)?;
        self.by_expiry.remove(&(hold.expires_at, hold.id));
        if self.by_id.is_empty() {
            // An idle account keeps no table: most accounts rest between chats.
            self.by_id = HashMap::new();
        }
        Some(hold)
    }

    /// Holds whose expiry is at or before `now`, earliest first.
    fn due(&self, now: DateTime<Utc>) -> Vec<HoldId> {
        self.by_expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.by_expiry.first().map(|(at, _)| *at)
    }
}

pub(crate) struct AccountState {
    pub account: AccountId,
    pub balance: Micros,
    pub held: Micros,
    /// Seq of the last journal entry applied (committed or in flight).
    pub seq: i64,
    pub holds: ActiveHolds,
    /// Boxed: a transaction is a few hundred bytes and a table has spare slots.
    keys: Recent<IdempotencyKey, Box<TransactionRecord>>,
    finished: Recent<HoldId, FinishedHold>,
    /// Per Stripe object, the total clawed back so far (committed or in
    /// flight) and the seq of its last clawback (0: loaded from PostgreSQL);
    /// an object is loaded on its first clawback. Bounded like the keys:
    /// past `recent_capacity` objects, those with nothing in flight are
    /// forgotten (a later clawback loads them again).
    clawed_back: HashMap<String, (Micros, i64)>,
    recent_capacity: usize,
    /// The account's spending limits (none until loaded).
    pub limits: SpendLimits,
    /// Settled spend of the current UTC day and month.
    windows: SpendCounters,
    /// Grants with money left, in spend order. Σ remaining − balance is
    /// the debt (never negative).
    grants: Vec<GrantRecord>,
    /// Grant rows changed by the last operation, taken by the actor into
    /// that operation's journal entry.
    grant_writes: Vec<GrantWrite>,
    /// Settled spend per gateway API key, loaded with the account from
    /// its usages and moved by every settlement naming a key (each active
    /// hold names its key too).
    key_spent: HashMap<ApiKeyId, Micros>,
}

/// Longest free text stored with an entry (a description, a Stripe id, a
/// model name, a conversation or message id), in bytes.
pub const TEXT_MAX_BYTES: usize = 1000;

/// Free text the journal may store: no control nor invisible formatting
/// character (`crate::text`: PostgreSQL refuses NUL, and people reading
/// the text back must see what it says), at most `TEXT_MAX_BYTES`.
/// Checked before an operation applies, so a bad text never reaches a batch.
pub fn check_text(field: &str, value: &str) -> Result<(), LedgerError> {
    match text_problem(value) {
        Some(problem) => Err(LedgerError::InvalidRequest(format!("{field}: {problem}"))),
        None => Ok(()),
    }
}

/// Why `value` may not be stored, if it may not (see `check_text`).
pub fn text_problem(value: &str) -> Option<String> {
    if value.len() > TEXT_MAX_BYTES {
        return Some(format!("longer than {TEXT_MAX_BYTES} bytes"));
    }
    crate::text::problem(value)
}

fn check_posting_text(posting: &Posting) -> Result<(), LedgerError> {
    for (field, value) in [
        ("description", &posting.description),
        ("stripeSessionId", &posting.stripe_session_id),
        ("stripePaymentId", &posting.stripe_payment_id),
    ] {
        if let Some(value) = value {
            check_text(field, value)?;
        }
    }
    if let Some(metadata) = &posting.metadata {
        check_json_text("metadata", metadata)?;
    }
    Ok(())
}

/// Every key and string of a stored JSON value, checked as stored text.
fn check_json_text(field: &str, value: &serde_json::Value) -> Result<(), LedgerError> {
    use serde_json::Value;
    match value {
        Value::String(text) => check_text(field, text),
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| check_json_text(field, item)),
        Value::Object(fields) => fields.iter().try_for_each(|(key, item)| {
            let named = format!("{field}.{key}");
            check_text(&named, key)?;
            check_json_text(&named, item)
        }),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

fn check_usage_text(charge: &UsageCharge) -> Result<(), LedgerError> {
    check_text("model", &charge.model)?;
    for (field, value) in [
        ("conversationId", &charge.conversation_id),
        ("messageId", &charge.message_id),
    ] {
        if let Some(value) = value {
            check_text(field, value)?;
        }
    }
    Ok(())
}

fn out_of_range() -> LedgerError {
    LedgerError::InvalidRequest("amount out of range: the balance would overflow".into())
}

/// A key already used: the same money is a replay of its first
/// transaction, anything else a conflict.
fn replay_or_conflict(
    first: &TransactionRecord,
    direction: Direction,
    posting: &Posting,
) -> Result<Applied<TransactionRecord>, LedgerError> {
    if first.matches(direction, posting) {
        return Ok(Applied::Replay {
            value: first.clone(),
            seq: first.seq,
        });
    }
    Err(LedgerError::Conflict(format!(
        "idempotency key `{}` was already used for a {} {} of {} micros",
        posting.key.as_str(),
        first.kind.as_str(),
        first.direction.as_str(),
        first.amount_micros.get()
    )))
}

impl AccountState {
    pub fn new(
        account: AccountId,
        balance: Micros,
        held: Micros,
        seq: i64,
        holds: Vec<HoldRecord>,
        grants: Vec<GrantRecord>,
        recent_capacity: usize,
    ) -> Self {
        let mut grants: Vec<GrantRecord> = grants
            .into_iter()
            .filter(|g| g.remaining_micros.is_positive())
            .collect();
        grants.sort_by_key(GrantRecord::spend_rank);
        AccountState {
            grants,
            grant_writes: Vec::new(),
            account,
            balance,
            held,
            seq,
            holds: holds
                .into_iter()
                .fold(ActiveHolds::default(), |mut active, hold| {
                    active.insert(hold);
                    active
                }),
            keys: Recent::new(recent_capacity),
            finished: Recent::new(recent_capacity),
            clawed_back: HashMap::new(),
            recent_capacity,
            limits: SpendLimits::default(),
            windows: SpendCounters::new(DateTime::<Utc>::MIN_UTC, Micros::ZERO, Micros::ZERO),
            key_spent: HashMap::new(),
        }
    }

    /// Sets what each gateway API key spent, loaded with the account.
    pub fn load_key_spend(&mut self, spent: HashMap<ApiKeyId, Micros>) {
        self.key_spent = spent;
    }

    /// Refuses a hold of `required` made with `key` when the key's settled
    /// spend, its active holds and the hold would pass its limit.
    fn admit_key(&self, key: &KeyLimit, required: Micros) -> Result<(), LedgerError> {
        let Some(limit) = key.limit else {
            return Ok(());
        };
        let held = self
            .holds
            .values()
            .filter(|hold| hold.api_key_id == Some(key.key))
            .fold(0i128, |sum, h| sum + i128::from(h.amount_micros.get()));
        let spent = self
            .key_spent
            .get(&key.key)
            .copied()
            .unwrap_or(Micros::ZERO);
        if i128::from(spent.get()) + held + i128::from(required.get()) > i128::from(limit.get()) {
            return Err(LedgerError::KeyLimitReached {
                key: key.key,
                limit,
                spent,
                held: Micros::new(i64::try_from(held).unwrap_or(i64::MAX)),
                required,
            });
        }
        Ok(())
    }

    /// Sets the limits and window counters loaded with the account.
    pub fn load_spending(&mut self, limits: SpendLimits, counters: SpendCounters) {
        self.limits = limits;
        self.windows = counters;
    }

    /// The limits and what each window counts at `now`.
    pub fn spending(&mut self, now: DateTime<Utc>) -> SpendingSnapshot {
        let limits = self.limits;
        SpendingSnapshot {
            limits,
            daily: self.windows.window(&limits, LimitWindow::Daily, now),
            monthly: self.windows.window(&limits, LimitWindow::Monthly, now),
            held_micros: self.held,
        }
    }

    pub fn available(&self) -> Micros {
        Micros::new(self.balance.get() - self.held.get())
    }

    pub fn knows_key(&self, key: &IdempotencyKey) -> bool {
        self.keys.get(key).is_some()
    }

    pub fn knows_hold(&self, hold: &HoldId) -> bool {
        self.holds.contains(hold) || self.finished.get(hold).is_some()
    }

    /// Remembers a committed transaction found in PostgreSQL.
    pub fn remember_key(&mut self, record: TransactionRecord, durable_seq: i64) {
        let seq = record.seq;
        self.keys.insert(
            record.idempotency_key.clone(),
            Box::new(record),
            seq,
            durable_seq,
        );
    }

    /// Remembers a finished hold found in PostgreSQL.
    pub fn remember_finished(&mut self, hold: HoldId, finished: FinishedHold, durable_seq: i64) {
        let seq = match &finished {
            FinishedHold::Settled(usage) => usage.seq,
            FinishedHold::Released(release) => release.seq,
        };
        self.finished.insert(hold, finished, seq, durable_seq);
    }

    /// held = sum of active holds; the grants' remaining amounts are at
    /// least the balance (the difference is debt), and within their amounts.
    /// A failure is a bug.
    pub fn check_invariants(&self) -> Result<(), LedgerError> {
        let sum: i64 = self.holds.values().map(|h| h.amount_micros.get()).sum();
        if sum != self.held.get() {
            return Err(LedgerError::Internal(format!(
                "account {:?}: held {} but holds sum to {sum}",
                self.account,
                self.held.get()
            )));
        }
        let debt = i128::from(self.granted().get()) - i128::from(self.balance.get());
        if debt < 0 {
            return Err(LedgerError::Internal(format!(
                "account {:?}: balance {} exceeds what its grants hold ({})",
                self.account,
                self.balance.get(),
                self.granted().get()
            )));
        }
        if let Some(grant) = self
            .grants
            .iter()
            .find(|g| !g.remaining_micros.is_positive() || g.remaining_micros > g.amount_micros)
        {
            return Err(LedgerError::Internal(format!(
                "account {:?}: grant {} holds {} of {}",
                self.account,
                grant.id,
                grant.remaining_micros.get(),
                grant.amount_micros.get()
            )));
        }
        Ok(())
    }

    /// Σ remaining of the grants (saturating: a sum past i64 is refused
    /// when a credit would make it).
    pub fn granted(&self) -> Micros {
        Micros::new(
            self.grants
                .iter()
                .fold(0_i64, |sum, g| sum.saturating_add(g.remaining_micros.get())),
        )
    }

    /// What the account owes beyond its grants: Σ remaining − balance.
    pub fn debt(&self) -> Micros {
        Micros::new(
            self.granted()
                .get()
                .saturating_sub(self.balance.get())
                .max(0),
        )
    }

    /// The grant rows the last operation changed (for its journal entry).
    pub(crate) fn take_grant_writes(&mut self) -> Vec<GrantWrite> {
        std::mem::take(&mut self.grant_writes)
    }

    /// Takes `amount` from the grants `eligible` allows, in spend order
    /// (`first`: the grant paid by this Stripe payment, taken before the
    /// others), and says which paid what. What they cannot pay is debt.
    fn spend(
        &mut self,
        amount: Micros,
        first: Option<&str>,
        eligible: impl Fn(&GrantRecord) -> bool,
    ) -> Vec<GrantSpend> {
        let mut order: Vec<usize> = (0..self.grants.len())
            .filter(|&i| eligible(&self.grants[i]))
            .collect();
        if let Some(payment) = first {
            if let Some(at) = order
                .iter()
                .position(|&i| self.grants[i].stripe_payment_id.as_deref() == Some(payment))
            {
                let own = order.remove(at);
                order.insert(0, own);
            }
        }
        let mut left = amount.get();
        let mut paid_by = Vec::new();
        for i in order {
            if left <= 0 {
                break;
            }
            let grant = &mut self.grants[i];
            let take = left.min(grant.remaining_micros.get());
            if take <= 0 {
                continue;
            }
            let before = grant.remaining_micros;
            grant.remaining_micros = Micros::new(before.get() - take);
            left -= take;
            paid_by.push(GrantSpend {
                grant_id: grant.id,
                kind: grant.kind,
                amount_micros: Micros::new(take),
            });
            self.grant_writes.push(GrantWrite {
                grant: grant.clone(),
                before: Some(before),
            });
        }
        self.grants.retain(|g| g.remaining_micros.is_positive());
        paid_by
    }

    /// What active holds placed before each expired grant's expiry keep of
    /// it (their settlement may still spend it): the holds are given to the
    /// expired grants in spend order.
    fn protected(&self, now: DateTime<Utc>) -> HashMap<Uuid, i64> {
        let mut protected = HashMap::new();
        let mut used: i64 = 0;
        for grant in self.grants.iter().filter(|g| g.has_expired_at(now)) {
            let Some(expiry) = grant.expires_at else {
                continue;
            };
            let pool: i64 = self
                .holds
                .values()
                .filter(|h| h.created_at < expiry)
                .fold(0_i64, |sum, h| sum.saturating_add(h.amount_micros.get()));
            let keep = grant
                .remaining_micros
                .get()
                .min(pool.saturating_sub(used).max(0));
            used = used.saturating_add(keep);
            protected.insert(grant.id, keep);
        }
        protected
    }

    /// Grants past their expiry with an unheld part left to expire.
    pub fn expired_grants(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        let protected = self.protected(now);
        self.grants
            .iter()
            .filter(|g| g.has_expired_at(now))
            .filter(|g| g.remaining_micros.get() > protected.get(&g.id).copied().unwrap_or(0))
            .map(|g| g.id)
            .collect()
    }

    /// The next moment a grant expiry has work: now when one is due, else
    /// the earliest expiry still to come.
    pub fn next_grant_expiry(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if !self.expired_grants(now).is_empty() {
            return Some(now);
        }
        self.grants
            .iter()
            .filter_map(|g| g.expires_at)
            .filter(|at| *at > now)
            .min()
    }

    /// Debits the unspent, unheld remainder of an expired grant
    /// (`EXPIRED`, key `grant:<id>:expired`; a later remainder, once the
    /// holds that kept part of it finished, `grant:<id>:expired:<seq>`).
    /// `Ok(None)` when nothing is left to expire.
    pub fn expire_grant(
        &mut self,
        grant_id: Uuid,
        now: DateTime<Utc>,
        durable_seq: i64,
    ) -> Result<Applied<Option<TransactionRecord>>, LedgerError> {
        let protected = self.protected(now);
        let Some(index) = self
            .grants
            .iter()
            .position(|g| g.id == grant_id && g.has_expired_at(now))
        else {
            return Ok(Applied::Replay {
                value: None,
                seq: self.seq,
            });
        };
        let keep = protected.get(&grant_id).copied().unwrap_or(0);
        let grant = &mut self.grants[index];
        let amount = grant.remaining_micros.get() - keep;
        if amount <= 0 {
            return Ok(Applied::Replay {
                value: None,
                seq: self.seq,
            });
        }
        let whole = keep == 0;
        let before_remaining = grant.remaining_micros;
        let kind = grant.kind;
        grant.remaining_micros = Micros::new(keep);
        let write = GrantWrite {
            grant: grant.clone(),
            before: Some(before_remaining),
        };
        let amount = Micros::new(amount);
        let before = self.balance;
        let after = before.checked_sub(amount).map_err(|_| out_of_range())?;
        let seq = self.next_seq();
        let key = if whole {
            format!("grant:{grant_id}:expired")
        } else {
            format!("grant:{grant_id}:expired:{seq}")
        };
        let key = IdempotencyKey::parse(key).map_err(LedgerError::Internal)?;
        self.balance = after;
        self.grant_writes.push(write);
        self.grants.retain(|g| g.remaining_micros.is_positive());
        let record = TransactionRecord {
            id: row_id(),
            seq,
            kind: TransactionType::Expired,
            direction: Direction::Debit,
            amount_micros: amount,
            idempotency_key: key.clone(),
            description: Some(format!("Crédits expirés : {amount}")),
            stripe_session_id: None,
            stripe_payment_id: None,
            metadata: Some(serde_json::json!({ "grantId": grant_id })),
            balance_before_micros: before,
            balance_after_micros: after,
            created_at: now,
            paid_by: vec![GrantSpend {
                grant_id,
                kind,
                amount_micros: amount,
            }],
        };
        self.keys
            .insert(key, Box::new(record.clone()), seq, durable_seq);
        metrics::counter!(crate::telemetry::GRANTS_EXPIRED_TOTAL.name).increment(1);
        Ok(Applied::New {
            value: Some(record.clone()),
            record: Record::Transaction(record),
        })
    }

    fn next_seq(&mut self) -> i64 {
        self.seq += 1;
        self.seq
    }

    /// Credits or debits the account under the posting's key: a credit
    /// first repays debt and makes a grant of the rest; a debit takes from
    /// the grants in spend order (a refund or dispute from its own top-up
    /// first) and may leave debt.
    pub fn post(
        &mut self,
        direction: Direction,
        posting: &Posting,
        now: DateTime<Utc>,
        durable_seq: i64,
    ) -> Result<Applied<TransactionRecord>, LedgerError> {
        if !posting.amount.is_positive() {
            return Err(LedgerError::InvalidRequest(
                "amount must be greater than zero".into(),
            ));
        }
        check_posting_text(posting)?;
        if let Some(first) = self.keys.get(&posting.key) {
            return replay_or_conflict(first, direction, posting);
        }
        if direction == Direction::Credit {
            self.check_credit(posting, now)?;
        }
        let before = self.balance;
        let after = match direction {
            Direction::Credit => before.checked_add(posting.amount),
            Direction::Debit => before.checked_sub(posting.amount),
        }
        .map_err(|_| out_of_range())?;
        let id = row_id();
        let seq = self.next_seq();
        let paid_by = match direction {
            Direction::Credit => {
                self.grant(posting, id, seq, now);
                Vec::new()
            }
            Direction::Debit => self.spend_debit(posting, now),
        };
        self.balance = after;
        let record = TransactionRecord {
            paid_by,
            id,
            seq,
            kind: posting.kind,
            direction,
            amount_micros: posting.amount,
            idempotency_key: posting.key.clone(),
            description: posting.description.clone(),
            stripe_session_id: posting.stripe_session_id.clone(),
            stripe_payment_id: posting.stripe_payment_id.clone(),
            metadata: posting.metadata.clone(),
            balance_before_micros: before,
            balance_after_micros: after,
            created_at: now,
        };
        self.keys.insert(
            posting.key.clone(),
            Box::new(record.clone()),
            seq,
            durable_seq,
        );
        Ok(Applied::New {
            value: record.clone(),
            record: Record::Transaction(record),
        })
    }

    /// A credit's expiry must be a promo's and in the future, and the
    /// grants' sum must stay representable.
    fn check_credit(&self, posting: &Posting, now: DateTime<Utc>) -> Result<(), LedgerError> {
        if let Some(expiry) = posting.expires_at {
            if GrantKind::of_credit(posting.kind) == GrantKind::Paid {
                return Err(LedgerError::InvalidRequest(format!(
                    "expiresAt: a {} credit is paid money and never expires",
                    posting.kind.as_str()
                )));
            }
            if expiry <= now {
                return Err(LedgerError::InvalidRequest(
                    "expiresAt: must be in the future".into(),
                ));
            }
        }
        self.granted()
            .checked_add(posting.amount)
            .map_err(|_| out_of_range())?;
        Ok(())
    }

    /// Makes the grant of credit `id`: a credit first repays debt; the
    /// rest is the grant's, placed in spend order.
    fn grant(&mut self, posting: &Posting, id: Uuid, seq: i64, now: DateTime<Utc>) {
        let repaid = self.debt().min(posting.amount);
        let grant = GrantRecord {
            id: row_id(),
            kind: GrantKind::of_credit(posting.kind),
            amount_micros: posting.amount,
            remaining_micros: Micros::new(posting.amount.get() - repaid.get()),
            expires_at: posting.expires_at,
            source: posting
                .stripe_session_id
                .clone()
                .unwrap_or_else(|| posting.key.as_str().to_owned()),
            stripe_payment_id: posting.stripe_payment_id.clone(),
            transaction_id: Some(id),
            seq,
            created_at: now,
        };
        self.grant_writes.push(GrantWrite {
            grant: grant.clone(),
            before: None,
        });
        if grant.remaining_micros.is_positive() {
            let at = self
                .grants
                .partition_point(|g| g.spend_rank() < grant.spend_rank());
            self.grants.insert(at, grant);
        }
    }

    /// Takes a debit from the unexpired grants; a refund or dispute takes
    /// from its own top-up first.
    fn spend_debit(&mut self, posting: &Posting, now: DateTime<Utc>) -> Vec<GrantSpend> {
        let own = match posting.kind {
            TransactionType::Refund | TransactionType::Dispute => {
                posting.stripe_payment_id.as_deref()
            }
            _ => None,
        };
        self.spend(posting.amount, own, |g| !g.has_expired_at(now))
    }

    pub fn reserve(
        &mut self,
        hold_id: HoldId,
        amount: Micros,
        key: Option<KeyLimit>,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Applied<HoldRecord>, LedgerError> {
        if !amount.is_positive() {
            return Err(LedgerError::InvalidRequest(
                "amount must be greater than zero".into(),
            ));
        }
        if let Some(hold) = self.holds.get(&hold_id) {
            if hold.amount_micros == amount {
                return Ok(Applied::Replay {
                    value: *hold,
                    seq: hold.seq,
                });
            }
            return Err(LedgerError::Conflict(format!(
                "hold {hold_id} already exists for {} micros",
                hold.amount_micros.get()
            )));
        }
        if self.finished.get(&hold_id).is_some() {
            return Err(LedgerError::Conflict(format!(
                "hold {hold_id} already finished"
            )));
        }
        let available = self.available();
        if available < amount {
            return Err(LedgerError::InsufficientCredits {
                balance: self.balance,
                available,
                required: amount,
            });
        }
        self.windows.admit(&self.limits, self.held, amount, now)?;
        if let Some(key) = &key {
            self.admit_key(key, amount)?;
        }
        let held = self.held.checked_add(amount).map_err(|_| out_of_range())?;
        let seq = self.next_seq();
        self.held = held;
        let hold = HoldRecord {
            id: hold_id,
            seq,
            amount_micros: amount,
            created_at: now,
            expires_at,
            api_key_id: key.map(|key| key.key),
        };
        self.holds.insert(hold);
        Ok(Applied::New {
            value: hold,
            record: Record::HoldPlaced(hold),
        })
    }

    /// A finished hold answers a repeated settle or release, or conflicts.
    fn finished_answer<T>(
        &self,
        hold_id: HoldId,
        pick: impl FnOnce(&FinishedHold) -> Result<(T, i64), String>,
    ) -> Result<Applied<T>, LedgerError> {
        match self.finished.get(&hold_id) {
            Some(finished) => pick(finished)
                .map(|(value, seq)| Applied::Replay { value, seq })
                .map_err(LedgerError::Conflict),
            None => Err(LedgerError::HoldNotFound(hold_id)),
        }
    }

    /// Posts the real cost of a delivered answer, whatever became of its
    /// hold: an active hold is settled (the usage records what it held); a
    /// hold that expired, was released, or is unknown (never made durable,
    /// or lost when the actor reset) is charged all the same under its id,
    /// holding nothing (`held_micros` 0), and may leave debt, exactly as an
    /// overrun does. Only an already settled hold is a replay (or, with a
    /// different usage, a conflict).
    pub fn settle(
        &mut self,
        hold_id: HoldId,
        charge: &UsageCharge,
        now: DateTime<Utc>,
        durable_seq: i64,
    ) -> Result<Applied<UsageRecord>, LedgerError> {
        if charge.cost.is_negative() {
            return Err(LedgerError::InvalidRequest(
                "cost cannot be negative".into(),
            ));
        }
        check_usage_text(charge)?;
        if let Some(FinishedHold::Settled(usage)) = self.finished.get(&hold_id) {
            if usage.matches(charge) {
                return Ok(Applied::Replay {
                    value: usage.as_ref().clone(),
                    seq: usage.seq,
                });
            }
            return Err(LedgerError::Conflict(format!(
                "hold {hold_id} was already settled for {} micros",
                usage.cost_micros.get()
            )));
        }
        let (held, placed_at) = self
            .holds
            .get(&hold_id)
            .map_or((Micros::ZERO, now), |hold| {
                (hold.amount_micros, hold.created_at)
            });
        let before = self.balance;
        let after = before
            .checked_sub(charge.cost)
            .map_err(|_| out_of_range())?;
        let seq = self.next_seq();
        if self.holds.remove(&hold_id).is_some() {
            self.held = Micros::new(self.held.get() - held.get());
        }
        self.balance = after;
        // A hold placed before a grant expired may still spend what it kept.
        let paid_by = self.spend(charge.cost, None, |g| !g.has_expired_at(placed_at));
        self.windows.record(charge.cost, now);
        if let Some(key) = charge.api_key {
            let spent = self.key_spent.entry(key).or_insert(Micros::ZERO);
            // Saturating: a key past i64 is over every limit anyway.
            *spent = Micros::new(spent.get().saturating_add(charge.cost.get()));
        }
        let usage = UsageRecord {
            paid_by,
            id: row_id(),
            seq,
            hold_id,
            model: charge.model.clone(),
            input_tokens: charge.tokens.input_tokens,
            output_tokens: charge.tokens.output_tokens,
            cache_read_tokens: charge.tokens.cache_read_tokens,
            cache_write_tokens: charge.tokens.cache_write_tokens,
            cost_micros: charge.cost,
            held_micros: held,
            conversation_id: charge.conversation_id.clone(),
            message_id: charge.message_id.clone(),
            balance_before_micros: before,
            balance_after_micros: after,
            created_at: now,
            api_key_id: charge.api_key,
        };
        self.finished.insert(
            hold_id,
            FinishedHold::Settled(Box::new(usage.clone())),
            seq,
            durable_seq,
        );
        let late = !held.is_positive();
        if late {
            metrics::counter!(crate::telemetry::LATE_SETTLEMENTS_TOTAL.name).increment(1);
        }
        Ok(Applied::New {
            value: usage.clone(),
            record: Record::Settled { usage, late },
        })
    }

    /// Debits what a Stripe object (a charge) refunded since the last
    /// clawback: `target` is its cumulative refunded amount, and what this
    /// account already clawed back for it is known here (loaded once from
    /// PostgreSQL, then kept with every clawback applied), so any delivery
    /// order, concurrency or slow commit debits exactly the refunded total.
    /// `Ok(None)` when nothing is left to claw back.
    pub fn clawback(
        &mut self,
        request: &ClawbackRequest,
        now: DateTime<Utc>,
        durable_seq: i64,
    ) -> Result<Applied<Option<TransactionRecord>>, LedgerError> {
        if let Some(first) = self.keys.get(&request.key) {
            return Ok(Applied::Replay {
                value: Some(first.as_ref().clone()),
                seq: first.seq,
            });
        }
        let Some(&(taken, _)) = self.clawed_back.get(&request.object) else {
            return Err(LedgerError::Internal(format!(
                "clawback of {} before its past was loaded",
                request.object
            )));
        };
        let remaining = request
            .target
            .checked_sub(taken)
            .map_err(|_| out_of_range())?;
        if !remaining.is_positive() {
            return Ok(Applied::Replay {
                value: None,
                seq: self.seq,
            });
        }
        let posting = Posting {
            key: request.key.clone(),
            kind: request.kind,
            amount: remaining,
            description: Some((request.describe)(remaining)),
            stripe_session_id: None,
            stripe_payment_id: request.stripe_payment_id.clone(),
            metadata: request.metadata.clone(),
            expires_at: None,
        };
        match self.post(Direction::Debit, &posting, now, durable_seq)? {
            Applied::New { value, record } => {
                let seq = self.seq;
                self.clawed_back
                    .insert(request.object.clone(), (request.target, seq));
                if self.clawed_back.len() > self.recent_capacity {
                    // Keeps the one just applied: its seq is past durable.
                    self.clawed_back.retain(|_, (_, last)| *last > durable_seq);
                }
                Ok(Applied::New {
                    value: Some(value),
                    record,
                })
            }
            Applied::Replay { value, seq } => Ok(Applied::Replay {
                value: Some(value),
                seq,
            }),
        }
    }

    /// Whether the clawbacks already taken for `object` are known.
    pub fn knows_clawbacks(&self, object: &str) -> bool {
        self.clawed_back.contains_key(object)
    }

    /// Records the clawbacks PostgreSQL holds for `object`.
    pub fn remember_clawbacks(&mut self, object: String, taken: Micros) {
        self.clawed_back.entry(object).or_insert((taken, 0));
    }

    pub fn release(
        &mut self,
        hold_id: HoldId,
        status: HoldStatus,
        now: DateTime<Utc>,
        durable_seq: i64,
    ) -> Result<Applied<ReleaseRecord>, LedgerError> {
        let Some(hold) = self.holds.remove(&hold_id) else {
            return self.finished_answer(hold_id, |finished| match finished {
                FinishedHold::Released(release) => Ok((*release, release.seq)),
                FinishedHold::Settled(usage) => Err(format!(
                    "hold {hold_id} was already settled for {} micros",
                    usage.cost_micros.get()
                )),
            });
        };
        let seq = self.next_seq();
        self.held = Micros::new(self.held.get() - hold.amount_micros.get());
        let release = ReleaseRecord {
            hold_id,
            seq,
            amount_micros: hold.amount_micros,
            status,
            finished_at: now,
        };
        self.finished
            .insert(hold_id, FinishedHold::Released(release), seq, durable_seq);
        Ok(Applied::New {
            value: release,
            record: Record::Released(release),
        })
    }

    /// Holds whose expiry is at or before `now`, earliest first.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<HoldId> {
        self.holds.due(now)
    }

    pub fn next_expiry(&self) -> Option<DateTime<Utc>> {
        self.holds.next_expiry()
    }

    /// The account as readers that skip the mailbox see it.
    pub fn view(&self) -> AccountView {
        AccountView {
            balance_micros: self.balance,
            held_micros: self.held,
            available_micros: self.available(),
            debt_micros: self.debt(),
            version: self.seq,
            grants: self.grants.clone(),
        }
    }

    pub fn snapshot(&self) -> BalanceSnapshot {
        let mut holds: Vec<HoldRecord> = self.holds.values().copied().collect();
        holds.sort_by_key(|h| h.seq);
        BalanceSnapshot {
            account: self.account,
            balance_micros: self.balance,
            held_micros: self.held,
            available_micros: self.available(),
            version: self.seq,
            holds,
            grants: self.grants.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::pricing::TokenUsage;

    const CAPACITY: usize = 16;

    fn micros(amount: i64) -> Micros {
        Micros::new(amount)
    }

    fn key(text: &str) -> IdempotencyKey {
        IdempotencyKey::parse(text).unwrap()
    }

    fn posting(text: &str, kind: TransactionType, amount: i64) -> Posting {
        Posting {
            key: key(text),
            kind,
            amount: micros(amount),
            description: None,
            stripe_session_id: None,
            stripe_payment_id: None,
            metadata: None,
            expires_at: None,
        }
    }

    fn grant(
        kind: GrantKind,
        amount: i64,
        expires_at: Option<DateTime<Utc>>,
        seq: i64,
    ) -> GrantRecord {
        GrantRecord {
            id: Uuid::new_v4(),
            kind,
            amount_micros: micros(amount),
            remaining_micros: micros(amount),
            expires_at,
            source: format!("grant-{seq}"),
            stripe_payment_id: None,
            transaction_id: None,
            seq,
            created_at: Utc::now() - Duration::days(30),
        }
    }

    /// An account whose balance is exactly what `grants` hold.
    fn account(grants: Vec<GrantRecord>) -> AccountState {
        let balance = grants.iter().map(|g| g.remaining_micros.get()).sum();
        AccountState::new(
            AccountId(1),
            micros(balance),
            Micros::ZERO,
            0,
            Vec::new(),
            grants,
            CAPACITY,
        )
    }

    fn charge(cost: i64) -> UsageCharge {
        UsageCharge {
            model: "claude-sonnet-4-5".into(),
            tokens: TokenUsage {
                input_tokens: 100,
                output_tokens: 50,
                ..TokenUsage::default()
            },
            cost: micros(cost),
            conversation_id: None,
            message_id: None,
            api_key: None,
        }
    }

    /// The value and record of an operation that applied anew.
    fn applied<T>(result: Result<Applied<T>, LedgerError>) -> (T, Record) {
        match result {
            Ok(Applied::New { value, record }) => (value, record),
            Ok(Applied::Replay { seq, .. }) => panic!("a replay of seq {seq}, not a new record"),
            Err(error) => panic!("refused: {error}"),
        }
    }

    /// The value and seq of an operation answered as a replay.
    fn replayed<T>(result: Result<Applied<T>, LedgerError>) -> (T, i64) {
        match result {
            Ok(Applied::Replay { value, seq }) => (value, seq),
            Ok(Applied::New { .. }) => panic!("a new record, not a replay"),
            Err(error) => panic!("refused: {error}"),
        }
    }

    fn refused<T>(result: Result<Applied<T>, LedgerError>) -> LedgerError {
        match result {
            Err(error) => error,
            Ok(_) => panic!("applied, not refused"),
        }
    }

    fn spent_from(paid_by: &[GrantSpend]) -> Vec<(Uuid, i64)> {
        paid_by
            .iter()
            .map(|spend| (spend.grant_id, spend.amount_micros.get()))
            .collect()
    }

    #[test]
    fn a_hold_keeps_its_amount_from_the_available_balance_until_its_settlement_charges_the_cost() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let hold_id = HoldId::generate();
        let (hold, record) =
            applied(state.reserve(hold_id, micros(300), None, now, now + Duration::minutes(5)));
        assert!(matches!(record, Record::HoldPlaced(placed) if placed.id == hold_id));
        assert_eq!(hold.amount_micros, micros(300));
        assert_eq!(
            (state.balance, state.held, state.available()),
            (micros(1_000), micros(300), micros(700))
        );

        let (usage, record) = applied(state.settle(hold_id, &charge(200), now, 0));
        assert!(matches!(record, Record::Settled { late: false, .. }));
        assert_eq!(usage.held_micros, micros(300));
        assert_eq!(
            (usage.balance_before_micros, usage.balance_after_micros),
            (micros(1_000), micros(800))
        );
        assert_eq!(
            (state.balance, state.held, state.available()),
            (micros(800), Micros::ZERO, micros(800))
        );
        assert!(state.holds.is_empty());
        assert!(state.check_invariants().is_ok());
    }

    #[test]
    fn a_released_hold_gives_its_amount_back_and_a_second_release_is_a_replay() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let hold_id = HoldId::generate();
        applied(state.reserve(hold_id, micros(400), None, now, now + Duration::minutes(5)));
        let (release, _) = applied(state.release(hold_id, HoldStatus::Released, now, 0));
        assert_eq!(release.amount_micros, micros(400));
        assert_eq!((state.balance, state.held), (micros(1_000), Micros::ZERO));

        let (again, seq) = replayed(state.release(hold_id, HoldStatus::Released, now, 0));
        assert_eq!((again, seq), (release, release.seq));
        assert_eq!(
            refused(state.reserve(hold_id, micros(400), None, now, now)),
            LedgerError::Conflict(format!("hold {hold_id} already finished"))
        );
    }

    #[test]
    fn a_hold_larger_than_the_available_balance_is_refused_and_a_repeated_hold_id_replays_or_conflicts(
    ) {
        let now = Utc::now();
        let later = now + Duration::minutes(5);
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let first = HoldId::generate();
        applied(state.reserve(first, micros(600), None, now, later));
        assert_eq!(
            refused(state.reserve(HoldId::generate(), micros(401), None, now, later)),
            LedgerError::InsufficientCredits {
                balance: micros(1_000),
                available: micros(400),
                required: micros(401)
            }
        );
        let (_, seq) = replayed(state.reserve(first, micros(600), None, now, later));
        assert_eq!(seq, 1);
        assert!(matches!(
            refused(state.reserve(first, micros(500), None, now, later)),
            LedgerError::Conflict(_)
        ));
        assert_eq!(state.held, micros(600));
    }

    #[test]
    fn a_key_limit_counts_the_keys_settled_spend_and_active_holds_only() {
        let now = Utc::now();
        let later = now + Duration::minutes(5);
        let mut state = account(vec![grant(GrantKind::Paid, 10_000, None, 1)]);
        let key = KeyLimit {
            key: ApiKeyId(Uuid::new_v4()),
            limit: Some(micros(1_000)),
        };
        let first = HoldId::generate();
        applied(state.reserve(first, micros(400), Some(key), now, later));
        applied(state.reserve(HoldId::generate(), micros(400), Some(key), now, later));
        assert_eq!(
            refused(state.reserve(HoldId::generate(), micros(201), Some(key), now, later)),
            LedgerError::KeyLimitReached {
                key: key.key,
                limit: micros(1_000),
                spent: Micros::ZERO,
                held: micros(800),
                required: micros(201),
            }
        );
        // Another key's holds and holds without a key do not count.
        let other = KeyLimit {
            key: ApiKeyId(Uuid::new_v4()),
            limit: Some(micros(300)),
        };
        applied(state.reserve(HoldId::generate(), micros(300), Some(other), now, later));
        applied(state.reserve(HoldId::generate(), micros(900), None, now, later));
        // Settled for less: the key has 300 spent and 400 held.
        let charge = UsageCharge {
            api_key: Some(key.key),
            ..charge(300)
        };
        applied(state.settle(first, &charge, now, 0));
        applied(state.reserve(HoldId::generate(), micros(300), Some(key), now, later));
        assert!(matches!(
            refused(state.reserve(HoldId::generate(), micros(1), Some(key), now, later)),
            LedgerError::KeyLimitReached { .. }
        ));
    }

    #[test]
    fn a_settled_hold_settled_again_is_a_replay_and_released_after_is_a_conflict() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let hold_id = HoldId::generate();
        applied(state.reserve(hold_id, micros(300), None, now, now + Duration::minutes(5)));
        let (usage, _) = applied(state.settle(hold_id, &charge(200), now, 0));
        let (again, seq) = replayed(state.settle(hold_id, &charge(200), now, 0));
        assert_eq!((again.id, seq), (usage.id, usage.seq));
        assert!(matches!(
            refused(state.settle(hold_id, &charge(201), now, 0)),
            LedgerError::Conflict(_)
        ));
        assert!(matches!(
            refused(state.release(hold_id, HoldStatus::Released, now, 0)),
            LedgerError::Conflict(_)
        ));
        assert_eq!(
            refused(state.release(HoldId(Uuid::nil()), HoldStatus::Released, now, 0)),
            LedgerError::HoldNotFound(HoldId(Uuid::nil()))
        );
        assert_eq!(state.balance, micros(800));
    }

    #[test]
    fn a_settlement_of_an_unknown_hold_is_charged_late_holding_nothing() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 100, None, 1)]);
        let (usage, record) = applied(state.settle(HoldId::generate(), &charge(250), now, 0));
        assert!(matches!(record, Record::Settled { late: true, .. }));
        assert_eq!(usage.held_micros, Micros::ZERO);
        assert_eq!(state.balance, micros(-150));
        assert_eq!(state.debt(), micros(150));
    }

    #[test]
    fn a_debit_spends_promo_grants_before_paid_ones_and_the_earliest_expiry_first() {
        let now = Utc::now();
        let paid = grant(GrantKind::Paid, 1_000, None, 1);
        let promo_lasting = grant(GrantKind::Promo, 100, None, 2);
        let promo_soon = grant(GrantKind::Promo, 100, Some(now + Duration::days(1)), 3);
        let promo_later = grant(GrantKind::Promo, 100, Some(now + Duration::days(9)), 4);
        let ids = [promo_soon.id, promo_later.id, promo_lasting.id, paid.id];
        let mut state = account(vec![paid, promo_lasting, promo_soon, promo_later]);
        let (debit, _) = applied(state.post(
            Direction::Debit,
            &posting("debit:1", TransactionType::Adjustment, 350),
            now,
            0,
        ));
        assert_eq!(
            spent_from(&debit.paid_by),
            vec![(ids[0], 100), (ids[1], 100), (ids[2], 100), (ids[3], 50)]
        );
        assert_eq!(state.balance, micros(950));
        let snapshot = state.snapshot();
        assert_eq!(snapshot.grants.len(), 1, "spent grants are dropped");
        assert_eq!(snapshot.grants[0].remaining_micros, micros(950));
        assert_eq!(state.take_grant_writes().len(), 4);
        assert!(state.check_invariants().is_ok());
    }

    #[test]
    fn a_refund_takes_from_its_own_top_up_before_the_spend_order() {
        let now = Utc::now();
        let older = grant(GrantKind::Paid, 500, None, 1);
        let mut refunded = grant(GrantKind::Paid, 500, None, 2);
        refunded.stripe_payment_id = Some("pi_refunded".into());
        let (older_id, refunded_id) = (older.id, refunded.id);
        let mut state = account(vec![older, refunded]);
        let mut refund = posting("refund:1", TransactionType::Refund, 600);
        refund.stripe_payment_id = Some("pi_refunded".into());
        let (debit, _) = applied(state.post(Direction::Debit, &refund, now, 0));
        assert_eq!(
            spent_from(&debit.paid_by),
            vec![(refunded_id, 500), (older_id, 100)]
        );
    }

    #[test]
    fn a_credit_makes_a_grant_in_its_place_in_the_spend_order() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let mut promo = posting("promo:1", TransactionType::PromoBonus, 200);
        promo.expires_at = Some(now + Duration::days(7));
        let (credit, record) = applied(state.post(Direction::Credit, &promo, now, 0));
        assert!(matches!(record, Record::Transaction(_)));
        assert_eq!(
            (credit.balance_before_micros, credit.balance_after_micros),
            (micros(1_000), micros(1_200))
        );
        let grants = state.snapshot().grants;
        assert_eq!(grants.len(), 2);
        assert_eq!(
            (grants[0].kind, grants[0].transaction_id),
            (GrantKind::Promo, Some(credit.id))
        );
        assert_eq!(grants[0].remaining_micros, micros(200));
        assert_eq!(state.take_grant_writes().len(), 1);
        assert!(state.check_invariants().is_ok());
    }

    #[test]
    fn a_debit_past_the_grants_leaves_debt_that_the_next_credit_repays_first() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 100, None, 1)]);
        applied(state.post(
            Direction::Debit,
            &posting("dispute:1", TransactionType::Dispute, 300),
            now,
            0,
        ));
        assert_eq!((state.balance, state.debt()), (micros(-200), micros(200)));
        assert!(state.snapshot().grants.is_empty());

        applied(state.post(
            Direction::Credit,
            &posting("topup:1", TransactionType::TopUp, 500),
            now,
            0,
        ));
        assert_eq!((state.balance, state.debt()), (micros(300), Micros::ZERO));
        let grants = state.snapshot().grants;
        assert_eq!(
            (grants[0].amount_micros, grants[0].remaining_micros),
            (micros(500), micros(300))
        );
        assert!(state.check_invariants().is_ok());
    }

    #[test]
    fn an_expired_grant_loses_its_remainder_under_a_key_named_after_it() {
        let now = Utc::now();
        let promo = grant(GrantKind::Promo, 300, Some(now - Duration::seconds(1)), 1);
        let promo_id = promo.id;
        let mut state = account(vec![promo, grant(GrantKind::Paid, 1_000, None, 2)]);
        assert_eq!(state.expired_grants(now), vec![promo_id]);
        assert_eq!(state.next_grant_expiry(now), Some(now));
        let (expired, record) = applied(state.expire_grant(promo_id, now, 0));
        let expired = expired.unwrap();
        assert!(matches!(record, Record::Transaction(_)));
        assert_eq!(
            (expired.kind, expired.direction),
            (TransactionType::Expired, Direction::Debit)
        );
        assert_eq!(expired.amount_micros, micros(300));
        assert_eq!(
            expired.idempotency_key,
            key(&format!("grant:{promo_id}:expired"))
        );
        assert_eq!(spent_from(&expired.paid_by), vec![(promo_id, 300)]);
        assert_eq!(state.balance, micros(1_000));
        assert!(state.expired_grants(now).is_empty());
        let (nothing, _) = replayed(state.expire_grant(promo_id, now, 0));
        assert!(nothing.is_none());
    }

    #[test]
    fn a_hold_placed_before_a_grant_expired_keeps_its_part_from_the_expiry_and_may_still_spend_it()
    {
        let placed = Utc::now();
        let expiry = placed + Duration::minutes(1);
        let now = expiry + Duration::seconds(1);
        let promo = grant(GrantKind::Promo, 300, Some(expiry), 1);
        let promo_id = promo.id;
        let mut state = account(vec![promo, grant(GrantKind::Paid, 1_000, None, 2)]);
        let hold_id = HoldId::generate();
        applied(state.reserve(
            hold_id,
            micros(200),
            None,
            placed,
            now + Duration::minutes(5),
        ));

        let (expired, _) = applied(state.expire_grant(promo_id, now, 0));
        let expired = expired.unwrap();
        assert_eq!(expired.amount_micros, micros(100));
        assert_eq!(
            expired.idempotency_key,
            key(&format!("grant:{promo_id}:expired:{}", expired.seq))
        );

        let (usage, _) = applied(state.settle(hold_id, &charge(150), now, 0));
        assert_eq!(spent_from(&usage.paid_by)[0], (promo_id, 150));
        assert_eq!(
            state.expired_grants(now),
            vec![promo_id],
            "what the hold left now expires"
        );
    }

    #[test]
    fn every_new_record_takes_the_next_version_and_replays_and_refusals_take_none() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let credit = posting("topup:1", TransactionType::TopUp, 100);
        let (first, _) = applied(state.post(Direction::Credit, &credit, now, 0));
        assert_eq!((first.seq, state.seq), (1, 1));
        let hold_id = HoldId::generate();
        let (hold, _) =
            applied(state.reserve(hold_id, micros(50), None, now, now + Duration::minutes(5)));
        assert_eq!(hold.seq, 2);
        let (usage, _) = applied(state.settle(hold_id, &charge(10), now, 0));
        assert_eq!(usage.seq, 3);

        replayed(state.post(Direction::Credit, &credit, now, 0));
        refused(state.reserve(HoldId::generate(), micros(5_000), None, now, now));
        refused(state.post(
            Direction::Credit,
            &posting("zero", TransactionType::TopUp, 0),
            now,
            0,
        ));
        assert_eq!((state.seq, state.view().version), (3, 3));
    }

    #[test]
    fn a_key_used_again_with_the_same_money_replays_and_with_other_money_conflicts() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let credit = posting("topup:1", TransactionType::TopUp, 100);
        let (first, _) = applied(state.post(Direction::Credit, &credit, now, 0));
        assert!(state.knows_key(&credit.key));

        let (again, seq) = replayed(state.post(Direction::Credit, &credit, now, 0));
        assert_eq!((again.id, seq), (first.id, first.seq));
        assert_eq!(state.balance, micros(1_100));

        let other_amount = posting("topup:1", TransactionType::TopUp, 101);
        assert_eq!(
            refused(state.post(Direction::Credit, &other_amount, now, 0)),
            LedgerError::Conflict(
                "idempotency key `topup:1` was already used for a TOP_UP CREDIT of 100 micros"
                    .into()
            )
        );
        assert!(matches!(
            refused(state.post(Direction::Debit, &credit, now, 0)),
            LedgerError::Conflict(_)
        ));
        assert_eq!(state.balance, micros(1_100));
    }

    #[test]
    fn an_invalid_posting_is_refused_before_it_changes_anything() {
        let now = Utc::now();
        let mut state = account(vec![grant(GrantKind::Paid, 1_000, None, 1)]);
        let mut paid_expiring = posting("topup:1", TransactionType::TopUp, 100);
        paid_expiring.expires_at = Some(now + Duration::days(1));
        let mut promo_expired = posting("promo:1", TransactionType::PromoBonus, 100);
        promo_expired.expires_at = Some(now);
        let mut control_text = posting("promo:2", TransactionType::PromoBonus, 100);
        control_text.description = Some("bonus\u{0}".into());
        let overflow = posting("promo:3", TransactionType::PromoBonus, i64::MAX);
        for (case, invalid, direction) in [
            (
                "zero",
                posting("zero", TransactionType::TopUp, 0),
                Direction::Credit,
            ),
            (
                "negative",
                posting("negative", TransactionType::Adjustment, -1),
                Direction::Debit,
            ),
            ("paid expiring", paid_expiring, Direction::Credit),
            ("expiry not in the future", promo_expired, Direction::Credit),
            ("control character", control_text, Direction::Credit),
            ("overflow", overflow, Direction::Credit),
        ] {
            let error = refused(state.post(direction, &invalid, now, 0));
            assert!(
                matches!(error, LedgerError::InvalidRequest(_)),
                "{case}: {error:?}"
            );
            assert!(!state.knows_key(&invalid.key), "{case}");
        }
        assert!(matches!(
            refused(state.settle(HoldId::generate(), &charge(-1), now, 0)),
            LedgerError::InvalidRequest(_)
        ));
        assert!(matches!(
            refused(state.reserve(HoldId::generate(), Micros::ZERO, None, now, now)),
            LedgerError::InvalidRequest(_)
        ));
        assert_eq!((state.balance, state.seq), (micros(1_000), 0));
        assert!(state.take_grant_writes().is_empty());
    }

    #[test]
    fn a_state_that_breaks_an_invariant_is_reported_as_a_bug() {
        let now = Utc::now();
        let hold = HoldRecord {
            id: HoldId::generate(),
            seq: 1,
            amount_micros: micros(100),
            created_at: now,
            expires_at: now + Duration::minutes(5),
            api_key_id: None,
        };
        let grants = vec![grant(GrantKind::Paid, 1_000, None, 1)];
        let wrong_held = AccountState::new(
            AccountId(1),
            micros(1_000),
            micros(99),
            1,
            vec![hold],
            grants.clone(),
            CAPACITY,
        );
        assert!(matches!(
            wrong_held.check_invariants(),
            Err(LedgerError::Internal(_))
        ));

        let more_than_granted = AccountState::new(
            AccountId(1),
            micros(1_001),
            Micros::ZERO,
            1,
            Vec::new(),
            grants,
            CAPACITY,
        );
        assert!(matches!(
            more_than_granted.check_invariants(),
            Err(LedgerError::Internal(_))
        ));

        let mut overfull = grant(GrantKind::Paid, 1_000, None, 1);
        overfull.remaining_micros = micros(1_001);
        let overfull = account(vec![overfull]);
        assert!(matches!(
            overfull.check_invariants(),
            Err(LedgerError::Internal(_))
        ));

        let consistent = AccountState::new(
            AccountId(1),
            micros(1_000),
            micros(100),
            1,
            vec![hold],
            vec![grant(GrantKind::Paid, 1_000, None, 1)],
            CAPACITY,
        );
        assert!(consistent.check_invariants().is_ok());
    }
}
