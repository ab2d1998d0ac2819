//! Random operation sequences against a plain reference model: every
//! answer, every balance and every grant must match the model after each
//! step, and the journal in PostgreSQL must reconcile at the end.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use creditd::clock::Clock;
use creditd::config::Settings;
use creditd::ledger::{
    AccountId, Engine, GrantSpend, HoldId, HoldStatus, LedgerError, LimitWindow, LimitsChange,
    Posting, TransactionType, UsageCharge,
};
use creditd::pricing::TokenUsage;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use uuid::Uuid;

use crate::support::*;

/// What a credit is: paid money, or a gift that may expire (in minutes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gift {
    Paid,
    Promo,
    PromoFor(i64),
}

impl Gift {
    fn kind(self) -> TransactionType {
        match self {
            Gift::Paid => TransactionType::TopUp,
            Gift::Promo | Gift::PromoFor(_) => TransactionType::PromoBonus,
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Credit {
        key: u8,
        amount: i64,
    },
    Grant {
        key: u8,
        amount: i64,
        gift: Gift,
    },
    /// Moves the clock on by this many minutes; due grants expire.
    Advance {
        minutes: i64,
    },
    Debit {
        key: u8,
        amount: i64,
    },
    Reserve {
        hold: u8,
        amount: i64,
    },
    Settle {
        hold: u8,
        cost: i64,
    },
    Release {
        hold: u8,
    },
    ExpireAll,
    Balance,
    /// Stops the engine (journal drained) and starts a new one on the same
    /// database, as a restart does: the account comes back from PostgreSQL.
    Reload,
    /// Places a hold and finishes it (settles `cost`, or releases it when
    /// `None`) without awaiting the first: both entries travel together.
    PlaceAndFinish {
        hold: u8,
        amount: i64,
        cost: Option<i64>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Few keys, holds and amounts, so replays and conflicts are common.
    let amount = prop_oneof![Just(100i64), Just(250), Just(1_000), 1i64..5_000];
    prop_oneof![
        3 => (0u8..6, amount.clone()).prop_map(|(key, amount)| Op::Credit { key, amount }),
        1 => (0u8..6, amount.clone()).prop_map(|(key, amount)| Op::Debit { key, amount }),
        4 => (0u8..5, amount.clone()).prop_map(|(hold, amount)| Op::Reserve { hold, amount }),
        3 => (0u8..5, prop_oneof![Just(0i64), Just(100), 0i64..8_000])
            .prop_map(|(hold, cost)| Op::Settle { hold, cost }),
        2 => (0u8..5).prop_map(|hold| Op::Release { hold }),
        1 => Just(Op::ExpireAll),
        1 => Just(Op::Balance),
    ]
}

/// `op`, with restarts and holds placed and finished in one go (sequential
/// model only: the pipelined test has its own faults).
fn model_op() -> impl Strategy<Value = Op> {
    let amount = prop_oneof![Just(100i64), Just(250), 1i64..5_000];
    let cost = prop_oneof![Just(None), Just(Some(0i64)), (0i64..8_000).prop_map(Some)];
    prop_oneof![
        15 => op(),
        1 => Just(Op::Reload),
        2 => (0u8..5, amount, cost)
            .prop_map(|(hold, amount, cost)| Op::PlaceAndFinish { hold, amount, cost }),
    ]
}

/// `model_op()` with grants of every kind and a clock that moves, so spends
/// meet expiring bonuses, held parts and expiries.
fn grant_op() -> impl Strategy<Value = Op> {
    let amount = prop_oneof![Just(100i64), Just(250), Just(1_000), 1i64..5_000];
    let gift = prop_oneof![
        Just(Gift::Paid),
        Just(Gift::Promo),
        (1i64..120).prop_map(Gift::PromoFor),
    ];
    prop_oneof![
        6 => model_op(),
        3 => (0u8..6, amount, gift).prop_map(|(key, amount, gift)| Op::Grant { key, amount, gift }),
        2 => (1i64..90).prop_map(|minutes| Op::Advance { minutes }),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Finished {
    Settled(i64),
    Released,
    Expired,
}

/// A grant as the model sees it: named by the credit that made it.
#[derive(Debug, Clone)]
struct ModelGrant {
    credit: Uuid,
    promo: bool,
    /// Minutes since the case started.
    expires: Option<i64>,
    remaining: i64,
}

impl ModelGrant {
    fn expired_at(&self, at: i64) -> bool {
        self.expires.is_some_and(|expiry| expiry <= at)
    }
}

/// What the engine must do, written as plainly as possible.
#[derive(Default)]
struct Model {
    balance: i64,
    /// Amount and the minute it was placed.
    holds: HashMap<u8, (i64, i64)>,
    finished: HashMap<u8, Finished>,
    keys: HashMap<u8, (bool, i64, TransactionType)>,
    /// Minutes since the case started.
    now: i64,
    /// In the order they were made.
    grants: Vec<ModelGrant>,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Applied,
    Replayed,
    Conflict,
    Insufficient { available: i64, required: i64 },
    HoldNotFound,
}

impl Model {
    fn held(&self) -> i64 {
        self.holds.values().map(|(amount, _)| amount).sum()
    }

    fn debt(&self) -> i64 {
        self.grants.iter().map(|g| g.remaining).sum::<i64>() - self.balance
    }

    /// Grant indexes in spend order: promo before paid, then earliest
    /// expiry (none last), then oldest.
    fn spend_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.grants.len()).collect();
        order.sort_by_key(|&i| {
            let g = &self.grants[i];
            (!g.promo, g.expires.is_none(), g.expires, i)
        });
        order
    }

    /// Takes `amount` from the grants that may pay, in spend order; the
    /// rest is debt.
    fn spend(&mut self, amount: i64, may_pay: impl Fn(&ModelGrant) -> bool) -> Vec<(Uuid, i64)> {
        let mut left = amount;
        let mut paid_by = Vec::new();
        for i in self.spend_order() {
            let grant = &mut self.grants[i];
            if left == 0 || grant.remaining == 0 || !may_pay(grant) {
                continue;
            }
            let take = left.min(grant.remaining);
            grant.remaining -= take;
            left -= take;
            paid_by.push((grant.credit, take));
        }
        paid_by
    }

    /// Expires what is left of each grant past its expiry, except what
    /// active holds placed before the expiry keep of it. The amounts.
    fn expire(&mut self) -> Vec<i64> {
        let mut expired = Vec::new();
        let mut kept_so_far = 0;
        for i in self.spend_order() {
            let grant = &self.grants[i];
            let Some(expiry) = grant.expires.filter(|_| grant.expired_at(self.now)) else {
                continue;
            };
            if grant.remaining == 0 {
                continue;
            }
            let pool: i64 = self
                .holds
                .values()
                .filter(|(_, placed)| *placed < expiry)
                .map(|(amount, _)| amount)
                .sum();
            let keep = grant.remaining.min((pool - kept_so_far).max(0));
            kept_so_far += keep;
            let gone = grant.remaining - keep;
            if gone > 0 {
                self.grants[i].remaining = keep;
                self.balance -= gone;
                expired.push(gone);
            }
        }
        expired
    }

    /// A credit or debit; what paid a debit when it applied.
    fn post(
        &mut self,
        key: u8,
        credit: bool,
        amount: i64,
        gift: Gift,
        credit_id: impl FnOnce() -> Option<Uuid>,
    ) -> (Expect, Option<Vec<(Uuid, i64)>>) {
        match self.keys.get(&key) {
            Some(&first) if first == (credit, amount, gift.kind()) => (Expect::Replayed, None),
            Some(_) => (Expect::Conflict, None),
            None => {
                self.keys.insert(key, (credit, amount, gift.kind()));
                if !credit {
                    let now = self.now;
                    let paid_by = self.spend(amount, |g| !g.expired_at(now));
                    self.balance -= amount;
                    return (Expect::Applied, Some(paid_by));
                }
                let repaid = self.debt().min(amount);
                self.grants.push(ModelGrant {
                    credit: credit_id().unwrap_or_else(Uuid::nil),
                    promo: gift != Gift::Paid,
                    expires: match gift {
                        Gift::PromoFor(minutes) => Some(self.now + minutes),
                        Gift::Paid | Gift::Promo => None,
                    },
                    remaining: amount - repaid,
                });
                self.balance += amount;
                (Expect::Applied, None)
            }
        }
    }

    fn reserve(&mut self, hold: u8, amount: i64) -> Expect {
        if let Some(&(held, _)) = self.holds.get(&hold) {
            return if held == amount {
                Expect::Replayed
            } else {
                Expect::Conflict
            };
        }
        let available = self.balance - self.held();
        if available < amount {
            return Expect::Insufficient {
                available,
                required: amount,
            };
        }
        self.holds.insert(hold, (amount, self.now));
        Expect::Applied
    }

    /// A settlement posts whatever became of its hold (active, released,
    /// expired or never placed); only a settled hold is a replay.
    /// A hold placed before a grant expired may spend what it kept of it.
    fn settle(&mut self, hold: u8, cost: i64) -> (Expect, Option<Vec<(Uuid, i64)>>) {
        match self.finished.get(&hold) {
            Some(Finished::Settled(first)) if *first == cost => (Expect::Replayed, None),
            Some(Finished::Settled(_)) => (Expect::Conflict, None),
            _ => {
                let placed = self.holds.remove(&hold).map_or(self.now, |(_, at)| at);
                let paid_by = self.spend(cost, |g| !g.expired_at(placed));
                self.balance -= cost;
                self.finished.insert(hold, Finished::Settled(cost));
                self.expire();
                (Expect::Applied, Some(paid_by))
            }
        }
    }

    fn release(&mut self, hold: u8) -> Expect {
        if self.holds.remove(&hold).is_some() {
            self.finished.insert(hold, Finished::Released);
            self.expire();
            return Expect::Applied;
        }
        match self.finished.get(&hold) {
            Some(Finished::Released | Finished::Expired) => Expect::Replayed,
            Some(Finished::Settled(_)) => Expect::Conflict,
            None => Expect::HoldNotFound,
        }
    }
}

fn observed<T>(result: Result<creditd::ledger::Outcome<T>, LedgerError>) -> Result<Expect, String> {
    match result {
        Ok(outcome) if outcome.replayed => Ok(Expect::Replayed),
        Ok(_) => Ok(Expect::Applied),
        Err(LedgerError::Conflict(_)) => Ok(Expect::Conflict),
        Err(LedgerError::InsufficientCredits {
            available,
            required,
            ..
        }) => Ok(Expect::Insufficient {
            available: available.get(),
            required: required.get(),
        }),
        Err(LedgerError::HoldNotFound(_)) => Ok(Expect::HoldNotFound),
        Err(other) => Err(format!("unexpected error: {other:?}")),
    }
}

fn charge(cost: i64) -> UsageCharge {
    UsageCharge {
        model: "gpt-4o-mini".into(),
        tokens: TokenUsage {
            input_tokens: cost.unsigned_abs(),
            output_tokens: 1,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost: micros(cost),
        conversation_id: None,
        message_id: None,
        api_key: None,
    }
}

/// What the engine answered a debit or settlement: whether it applied,
/// and the grants that paid it.
fn spent<T>(
    result: Result<creditd::ledger::Outcome<T>, LedgerError>,
    paid_by: impl Fn(&T) -> Vec<GrantSpend>,
) -> (Result<Expect, String>, Option<Vec<GrantSpend>>) {
    let spends = match &result {
        Ok(outcome) if !outcome.replayed => Some(paid_by(&outcome.record)),
        _ => None,
    };
    (observed(result), spends)
}

async fn run_case(
    engine: &mut Engine,
    db: &TestDb,
    settings: &Settings,
    clock: &Clock,
    account: AccountId,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let mut model = Model::default();
    let start = clock.now();
    let minutes = |m: i64| start + chrono::Duration::minutes(m);
    let holds: Vec<HoldId> = (0..5).map(|_| HoldId::generate()).collect();
    // Each grant's id, learnt from the snapshots: the credit that made it.
    let mut credits: HashMap<Uuid, Uuid> = HashMap::new();
    for (step, op) in ops.iter().enumerate() {
        let key = |k: u8| format!("key-{k}");
        let mut expected_paid_by = None;
        let mut got_paid_by = None;
        let (expected, got) = match *op {
            Op::Credit { key: k, amount } | Op::Grant { key: k, amount, .. } => {
                let gift = match *op {
                    Op::Grant { gift, .. } => gift,
                    _ => Gift::Paid,
                };
                let posting = Posting {
                    expires_at: match gift {
                        Gift::PromoFor(m) => Some(minutes(model.now + m)),
                        Gift::Paid | Gift::Promo => None,
                    },
                    ..posting(&key(k), gift.kind(), micros(amount))
                };
                let result = engine.credit(account, posting).await;
                let id = result.as_ref().ok().map(|outcome| outcome.record.id);
                let (expected, _) = model.post(k, true, amount, gift, || id);
                (expected, observed(result))
            }
            Op::Debit { key: k, amount } => {
                let (got, paid_by) = spent(
                    engine
                        .debit(
                            account,
                            posting(&key(k), TransactionType::TopUp, micros(amount)),
                        )
                        .await,
                    |t| t.paid_by.clone(),
                );
                got_paid_by = paid_by;
                let (expected, paid_by) = model.post(k, false, amount, Gift::Paid, || None);
                expected_paid_by = paid_by;
                (expected, got)
            }
            // Hold ids are made by creditd, fresh per request: a finished id
            // is never reserved again (the database refuses it; see the
            // dedicated test).
            Op::Reserve { hold, .. } if model.finished.contains_key(&hold) => continue,
            Op::Reserve { hold, amount } => (
                model.reserve(hold, amount),
                observed(
                    engine
                        .reserve(account, holds[hold as usize], micros(amount))
                        .await,
                ),
            ),
            Op::Settle { hold, cost } => {
                let (got, paid_by) = spent(
                    engine
                        .settle(account, holds[hold as usize], charge(cost))
                        .await,
                    |u| u.paid_by.clone(),
                );
                got_paid_by = paid_by;
                let (expected, paid_by) = model.settle(hold, cost);
                expected_paid_by = paid_by;
                (expected, got)
            }
            Op::Release { hold } => (
                model.release(hold),
                observed(engine.release(account, holds[hold as usize]).await),
            ),
            Op::ExpireAll => {
                let due: Vec<u8> = model.holds.keys().copied().collect();
                for hold in &due {
                    model.holds.remove(hold);
                    model.finished.insert(*hold, Finished::Expired);
                }
                model.expire();
                let far = clock.now() + chrono::Duration::days(365);
                let released = engine
                    .expire_holds(account, far)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("expire: {e:?}")))?;
                prop_assert_eq!(released.len(), due.len(), "step {}: expired holds", step);
                prop_assert!(released.iter().all(|r| r.status == HoldStatus::Expired));
                (Expect::Applied, Ok(Expect::Applied))
            }
            Op::Advance { minutes: by } => {
                model.now += by;
                let expected = model.expire();
                // Every entry of the account so far is at or below this
                // version (the actor applies in order).
                let before = engine
                    .balance(account)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("balance: {e:?}")))?
                    .version;
                clock
                    .set(minutes(model.now))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expired = engine
                    .expire_grants(account, clock.now())
                    .await
                    .map_err(|e| TestCaseError::fail(format!("expire grants: {e:?}")))?;
                prop_assert!(expired.iter().all(|t| t.kind == TransactionType::Expired));
                // The account's own timer may have fired between the
                // clock's move and this call, and posted the expiries
                // itself: what counts is every expiry journaled in this
                // step, and the call answers the rest.
                // The timer's expiries are waited for by nobody: read once
                // the account's row has caught up with the actor.
                let applied = engine
                    .balance(account)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("balance: {e:?}")))?
                    .version;
                let client = db.client().await;
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let durable: i64 = client
                        .query_one(
                            "SELECT version FROM credit_balances WHERE user_id = $1",
                            &[&account.0],
                        )
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                        .get(0);
                    if durable >= applied {
                        break;
                    }
                    prop_assert!(
                        std::time::Instant::now() < deadline,
                        "step {}: version {} never committed",
                        step,
                        applied
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let this_step: Vec<i64> = client
                    .query(
                        "SELECT amount_micros FROM credit_transactions
                          WHERE user_id = $1 AND type = 'EXPIRED' AND seq > $2 ORDER BY seq",
                        &[&account.0, &before],
                    )
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                prop_assert_eq!(&this_step, &expected, "step {}: grants expired", step);
                let amounts: Vec<i64> = expired.iter().map(|t| t.amount_micros.get()).collect();
                prop_assert!(
                    this_step.ends_with(&amounts),
                    "step {}: the call answered {:?} of {:?}",
                    step,
                    amounts,
                    this_step
                );
                (Expect::Applied, Ok(Expect::Applied))
            }
            Op::Balance => (Expect::Applied, Ok(Expect::Applied)),
            Op::Reload => {
                prop_assert!(
                    engine.shutdown(Duration::from_secs(5)).await,
                    "step {}: the journal drained before the restart",
                    step
                );
                *engine = db.engine_with_clock(settings, clock.clone());
                (Expect::Applied, Ok(Expect::Applied))
            }
            Op::PlaceAndFinish { hold, .. } if model.finished.contains_key(&hold) => continue,
            Op::PlaceAndFinish { hold, amount, cost } => {
                let id = holds[hold as usize];
                // Both calls reach the account's mailbox in this order
                // before either is answered.
                let (placed, finished) = match cost {
                    Some(cost) => {
                        let (placed, settled) = futures_util::join!(
                            engine.reserve(account, id, micros(amount)),
                            engine.settle(account, id, charge(cost)),
                        );
                        let (settled, paid_by) = spent(settled, |u| u.paid_by.clone());
                        got_paid_by = paid_by;
                        (observed(placed), settled)
                    }
                    None => {
                        let (placed, released) = futures_util::join!(
                            engine.reserve(account, id, micros(amount)),
                            engine.release(account, id),
                        );
                        (observed(placed), observed(released))
                    }
                };
                let expected_placed = model.reserve(hold, amount);
                let got_placed = placed.map_err(TestCaseError::fail)?;
                prop_assert_eq!(
                    &got_placed,
                    &expected_placed,
                    "step {}: {:?} placed",
                    step,
                    op
                );
                let expected = match cost {
                    Some(cost) => {
                        let (expected, paid_by) = model.settle(hold, cost);
                        expected_paid_by = paid_by;
                        expected
                    }
                    None => model.release(hold),
                };
                (expected, finished)
            }
        };
        let got = got.map_err(TestCaseError::fail)?;
        prop_assert_eq!(&got, &expected, "step {}: {:?}", step, op);
        if let (Some(expected), Some(got)) = (&expected_paid_by, &got_paid_by) {
            // Which grants paid, named by their credits, in spend order.
            let got: Vec<(Uuid, i64)> = got
                .iter()
                .map(|spend| {
                    let credit = credits.get(&spend.grant_id).copied();
                    (credit.unwrap_or_else(Uuid::nil), spend.amount_micros.get())
                })
                .collect();
            prop_assert_eq!(&got, expected, "step {}: paidBy of {:?}", step, op);
            let paid: i64 = got.iter().map(|(_, amount)| amount).sum();
            let amount = match *op {
                Op::Debit { amount, .. } => amount,
                Op::Settle { cost, .. } => cost,
                Op::PlaceAndFinish { cost, .. } => cost.unwrap_or(0),
                _ => 0,
            };
            prop_assert!(paid <= amount, "step {}: paidBy exceeds the amount", step);
        }
        let snapshot = engine
            .balance(account)
            .await
            .map_err(|e| TestCaseError::fail(format!("balance: {e:?}")))?;
        prop_assert_eq!(
            snapshot.balance_micros.get(),
            model.balance,
            "step {}: balance",
            step
        );
        prop_assert_eq!(
            snapshot.held_micros.get(),
            model.held(),
            "step {}: held",
            step
        );
        prop_assert_eq!(
            snapshot.available_micros.get(),
            model.balance - model.held(),
            "step {}: available",
            step
        );
        prop_assert_eq!(snapshot.holds.len(), model.holds.len());
        let sum: i64 = snapshot.holds.iter().map(|h| h.amount_micros.get()).sum();
        prop_assert_eq!(
            sum,
            snapshot.held_micros.get(),
            "held = sum of active holds"
        );
        // balance = Σ remaining − debt, debt ≥ 0; each grant as the model has it.
        let granted: i64 = snapshot
            .grants
            .iter()
            .map(|g| g.remaining_micros.get())
            .sum();
        prop_assert!(model.debt() >= 0, "step {}: negative debt", step);
        prop_assert_eq!(
            granted - snapshot.balance_micros.get(),
            model.debt(),
            "step {}: debt",
            step
        );
        let mut engine_grants: Vec<(Uuid, i64)> = Vec::new();
        for grant in &snapshot.grants {
            let credit = grant.transaction_id.unwrap_or_else(Uuid::nil);
            credits.insert(grant.id, credit);
            engine_grants.push((credit, grant.remaining_micros.get()));
            prop_assert!(grant.remaining_micros <= grant.amount_micros);
        }
        engine_grants.sort();
        let mut model_grants: Vec<(Uuid, i64)> = model
            .grants
            .iter()
            .filter(|g| g.remaining > 0)
            .map(|g| (g.credit, g.remaining))
            .collect();
        model_grants.sort();
        prop_assert_eq!(engine_grants, model_grants, "step {}: grants", step);
        // No grant past its expiry keeps more than the holds placed before it.
        for grant in model.grants.iter().filter(|g| g.expired_at(model.now)) {
            let expiry = grant.expires.unwrap_or(i64::MAX);
            let kept: i64 = model
                .holds
                .values()
                .filter(|(_, placed)| *placed < expiry)
                .map(|(amount, _)| amount)
                .sum();
            prop_assert!(
                grant.remaining <= kept,
                "step {}: expired grant spendable",
                step
            );
        }
    }
    Ok(())
}

#[test]
fn random_operation_sequences_match_the_reference_model_after_every_step() {
    let system = actix::System::new();
    let db = system.block_on(TestDb::new());
    let mut settings = settings();
    // Tiny memories, so replays often go to PostgreSQL.
    settings.engine.recent_keys = 2;
    // Holds outlive the hours the clock moves by in a case.
    settings.engine.hold_ttl_s = 30 * 86_400;
    // One writer whose batches wait a little for company, so entries sent
    // together (a hold placed and finished) share a batch.
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = 500;
    settings.journal.gather_when_idle = true;
    let clock = Clock::manual(Utc::now());
    let engine = std::cell::RefCell::new(
        system.block_on(async { db.engine_with_clock(&settings, clock.clone()) }),
    );
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let counter = std::cell::Cell::new(0u32);
    let result = runner.run(&prop::collection::vec(grant_op(), 1..60), |ops| {
        counter.set(counter.get() + 1);
        let mut engine = engine.borrow_mut();
        system.block_on(async {
            let account = db.user(&format!("model_{}", counter.get())).await;
            run_case(&mut engine, &db, &settings, &clock, account, &ops).await?;
            // What the engine answered is what PostgreSQL holds.
            let client = db.client().await;
            let row = client
                .query_one(
                    "SELECT balance_micros, held_micros FROM credit_balances WHERE user_id = $1",
                    &[&account.0],
                )
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let snapshot = engine
                .balance(account)
                .await
                .map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(row.get::<_, i64>(0), snapshot.balance_micros.get());
            prop_assert_eq!(row.get::<_, i64>(1), snapshot.held_micros.get());
            let stored: i64 = client
                .query_one(
                    "SELECT coalesce(sum(remaining_micros), 0)::int8 FROM credit_grants
                      WHERE user_id = $1",
                    &[&account.0],
                )
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?
                .get(0);
            let granted: i64 = snapshot
                .grants
                .iter()
                .map(|g| g.remaining_micros.get())
                .sum();
            prop_assert_eq!(stored, granted, "grants as PostgreSQL holds them");
            Ok(())
        })
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    let engine = engine.into_inner();
    system.block_on(async {
        engine.shutdown(Duration::from_secs(5)).await;
        db.reconcile_is_clean().await;
    });
}

/// One operation of the pipelined test, on one of its accounts.
#[derive(Debug, Clone)]
enum Step {
    Op {
        account: usize,
        op: Op,
    },
    /// Ends every connection of the engine (journal writer and pool) while
    /// the round's operations are in flight: their batch fails.
    Fail,
}

fn step() -> impl Strategy<Value = Step> {
    // Promo credits too, lasting or expiring later, so spends in failed
    // batches move grants of every kind.
    let gift = prop_oneof![Just(Gift::Promo), (60i64..600).prop_map(Gift::PromoFor)];
    let grant =
        (0u8..6, 1i64..5_000, gift).prop_map(|(key, amount, gift)| Op::Grant { key, amount, gift });
    prop_oneof![
        12 => (0usize..3, op()).prop_map(|(account, op)| Step::Op { account, op }),
        3 => (0usize..3, grant).prop_map(|(account, op)| Step::Op { account, op }),
        1 => Just(Step::Fail),
    ]
}

/// What an acknowledged operation promises PostgreSQL holds.
#[derive(Debug)]
enum Promise {
    Transaction { key: String, signed_micros: i64 },
    Usage { hold: HoldId, cost_micros: i64 },
    HoldPlaced { hold: HoldId },
    HoldEnded { hold: HoldId },
}

async fn run_step(
    engine: &Engine,
    accounts: &[AccountId],
    holds: &[Vec<HoldId>],
    round: usize,
    step: &Step,
    db: &TestDb,
) -> Result<Option<Promise>, String> {
    let Step::Op { account, op } = step else {
        // Every backend of this database but the one asking (a concurrent
        // `Fail` may end this one first: either way the engine's went).
        let _ = db
            .client()
            .await
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                  WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await;
        return Ok(None);
    };
    // Hold ids are made fresh per chat and a chat settles only a hold it
    // took: reserves of round r use ids of their own, settles and releases
    // name ids of the round before (round 0: ids never reserved).
    let (id, holds) = (accounts[*account], &holds[*account]);
    let reserved = |hold: u8| holds[(round + 1) * 5 + hold as usize];
    let named = |hold: u8| holds[round * 5 + hold as usize];
    let key = |k: u8| format!("r{round}-u{}-key-{k}", id.0);
    let acknowledged = |result: Result<(), LedgerError>, promise: Promise| match result {
        Ok(()) => Ok(Some(promise)),
        // Refusals by the rules, and failures the fault injection causes.
        Err(
            LedgerError::Conflict(_)
            | LedgerError::InsufficientCredits { .. }
            | LedgerError::HoldNotFound(_)
            | LedgerError::Unavailable(_)
            | LedgerError::Overloaded
            | LedgerError::Reset,
        ) => Ok(None),
        Err(other) => Err(format!("{op:?}: unexpected {other:?}")),
    };
    match *op {
        Op::Advance { .. } => Ok(None),
        Op::Grant {
            key: k,
            amount,
            gift,
        } => {
            let posting = Posting {
                expires_at: match gift {
                    Gift::PromoFor(minutes) => {
                        Some(Utc::now() + chrono::Duration::minutes(minutes))
                    }
                    Gift::Paid | Gift::Promo => None,
                },
                ..posting(&key(k), gift.kind(), micros(amount))
            };
            acknowledged(
                engine.credit(id, posting).await.map(|_| ()),
                Promise::Transaction {
                    key: key(k),
                    signed_micros: amount,
                },
            )
        }
        Op::Credit { key: k, amount } | Op::Debit { key: k, amount } => {
            let credit = matches!(op, Op::Credit { .. });
            let posting = posting(&key(k), TransactionType::TopUp, micros(amount));
            let result = if credit {
                engine.credit(id, posting).await
            } else {
                engine.debit(id, posting).await
            };
            let signed_micros = if credit { amount } else { -amount };
            acknowledged(
                result.map(|_| ()),
                Promise::Transaction {
                    key: key(k),
                    signed_micros,
                },
            )
        }
        Op::Reserve { hold, amount } => {
            let hold = reserved(hold);
            acknowledged(
                engine.reserve(id, hold, micros(amount)).await.map(|_| ()),
                Promise::HoldPlaced { hold },
            )
        }
        Op::Settle { hold, cost } => {
            let hold = named(hold);
            acknowledged(
                engine.settle(id, hold, charge(cost)).await.map(|_| ()),
                Promise::Usage {
                    hold,
                    cost_micros: cost,
                },
            )
        }
        Op::Release { hold } => {
            let hold = named(hold);
            acknowledged(
                engine.release(id, hold).await.map(|_| ()),
                Promise::HoldEnded { hold },
            )
        }
        Op::ExpireAll => {
            let far = Utc::now() + chrono::Duration::days(365);
            match engine.expire_holds(id, far).await {
                Ok(_) | Err(LedgerError::Unavailable(_) | LedgerError::Reset) => Ok(None),
                Err(other) => Err(format!("expire: unexpected {other:?}")),
            }
        }
        // Generated for the sequential model only.
        Op::Balance | Op::Reload | Op::PlaceAndFinish { .. } => Ok(None),
    }
}

async fn check_promise(db: &TestDb, promise: &Promise) -> Result<(), String> {
    let client = db.client().await;
    let found = match promise {
        Promise::Transaction { key, signed_micros } => client
            .query_opt(
                "SELECT 1 FROM credit_transactions WHERE idempotency_key = $1
                   AND CASE direction WHEN 'DEBIT' THEN -amount_micros ELSE amount_micros END = $2",
                &[key, signed_micros],
            )
            .await
            .map(|row| row.is_some()),
        Promise::Usage { hold, cost_micros } => client
            .query_opt(
                "SELECT 1 FROM credit_usages WHERE hold_id = $1 AND cost_micros = $2",
                &[&hold.0, cost_micros],
            )
            .await
            .map(|row| row.is_some()),
        Promise::HoldPlaced { hold } => client
            .query_opt("SELECT 1 FROM credit_holds WHERE id = $1", &[&hold.0])
            .await
            .map(|row| row.is_some()),
        Promise::HoldEnded { hold } => client
            .query_opt(
                "SELECT 1 FROM credit_holds WHERE id = $1 AND status <> 'ACTIVE'",
                &[&hold.0],
            )
            .await
            .map(|row| row.is_some()),
    }
    .map_err(|e| e.to_string())?;
    if found {
        Ok(())
    } else {
        Err(format!("acknowledged but not durable: {promise:?}"))
    }
}

/// Several accounts' operations run concurrently in rounds (so one batch
/// holds entries of several accounts, and several entries of one account
/// are in flight at once), with the engine's connections killed at random
/// moments. After every round: every acknowledged operation is durable,
/// each account's state as the engine serves it is what PostgreSQL holds,
/// and every ledger invariant reconciles.
#[test]
fn pipelined_operations_of_several_accounts_with_failed_batches_keep_every_invariant() {
    let system = actix::System::new();
    let db = system.block_on(TestDb::new());
    let mut settings = settings();
    settings.engine.recent_keys = 2;
    // One writer, and batches that wait for company: accounts share batches.
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = 2_000;
    settings.journal.gather_when_idle = true;
    let engine = system.block_on(async { db.engine(&settings) });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let counter = std::cell::Cell::new(0u32);
    let rounds = prop::collection::vec(prop::collection::vec(step(), 1..12), 1..8);
    let result = runner.run(&rounds, |rounds| {
        counter.set(counter.get() + 1);
        system.block_on(async {
            let case = counter.get();
            let mut accounts = Vec::new();
            for index in 0..3 {
                accounts.push(db.user(&format!("pipelined_{case}_{index}")).await);
            }
            let holds: Vec<Vec<HoldId>> = (0..3)
                .map(|_| {
                    (0..(rounds.len() + 1) * 5)
                        .map(|_| HoldId::generate())
                        .collect()
                })
                .collect();
            let mut promises = Vec::new();
            for (round, steps) in rounds.iter().enumerate() {
                let results = futures_util::future::join_all(
                    steps
                        .iter()
                        .map(|step| run_step(&engine, &accounts, &holds, round, step, &db)),
                )
                .await;
                for result in results {
                    if let Some(promise) = result.map_err(TestCaseError::fail)? {
                        promises.push(promise);
                    }
                }
                for promise in &promises {
                    check_promise(&db, promise)
                        .await
                        .map_err(|e| TestCaseError::fail(format!("round {round}: {e}")))?;
                }
                for &account in &accounts {
                    let snapshot = serve_balance(&engine, account).await?;
                    let row = db
                        .client()
                        .await
                        .query_one(
                            "SELECT balance_micros, held_micros, version FROM credit_balances
                              WHERE user_id = $1",
                            &[&account.0],
                        )
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    // The engine may be a few entries ahead of PostgreSQL only
                    // while they are in flight; every step of the round was
                    // awaited, so both agree here.
                    prop_assert_eq!(row.get::<_, i64>(2), snapshot.version, "round {}", round);
                    prop_assert_eq!(row.get::<_, i64>(0), snapshot.balance_micros.get());
                    prop_assert_eq!(row.get::<_, i64>(1), snapshot.held_micros.get());
                    let sum: i64 = snapshot.holds.iter().map(|h| h.amount_micros.get()).sum();
                    prop_assert_eq!(sum, snapshot.held_micros.get(), "held = sum of holds");
                    let stored: i64 = db
                        .client()
                        .await
                        .query_one(
                            "SELECT coalesce(sum(remaining_micros), 0)::int8 FROM credit_grants
                              WHERE user_id = $1",
                            &[&account.0],
                        )
                        .await
                        .map_err(|e| TestCaseError::fail(e.to_string()))?
                        .get(0);
                    let granted: i64 = snapshot
                        .grants
                        .iter()
                        .map(|g| g.remaining_micros.get())
                        .sum();
                    prop_assert_eq!(stored, granted, "round {}: grants as stored", round);
                }
                let mut client = db.client().await;
                let report = creditd::ledger::reconcile::reconcile(&mut client)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(report.clean, "round {}: {:?}", round, report.problems);
            }
            Ok(())
        })
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    system.block_on(async {
        engine.shutdown(Duration::from_secs(5)).await;
        db.reconcile_is_clean().await;
    });
}

/// The account as the engine serves it, retried while a killed connection
/// is being replaced.
async fn serve_balance(
    engine: &Engine,
    account: AccountId,
) -> Result<creditd::ledger::BalanceSnapshot, TestCaseError> {
    for _ in 0..100 {
        match engine.balance(account).await {
            Ok(snapshot) => return Ok(snapshot),
            Err(LedgerError::Unavailable(_) | LedgerError::Reset) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(other) => return Err(TestCaseError::fail(format!("balance: {other:?}"))),
        }
    }
    Err(TestCaseError::fail("the account never came back"))
}

/// An operation of the spending limits model.
#[derive(Debug, Clone)]
enum LimitOp {
    Reserve {
        amount: i64,
    },
    /// Settles the `nth` active hold (modulo their number) at `percent`
    /// of its amount: a chat costs at most what it held.
    Settle {
        nth: usize,
        percent: i64,
    },
    Release {
        nth: usize,
    },
    /// Moves the clock forward by whole days and some hours.
    Later {
        days: i64,
        hours: i64,
    },
}

fn limit_op() -> impl Strategy<Value = LimitOp> {
    let amount = prop_oneof![Just(100i64), Just(1_000), 1i64..3_000];
    prop_oneof![
        6 => amount.prop_map(|amount| LimitOp::Reserve { amount }),
        4 => (0usize..8, 0i64..=100).prop_map(|(nth, percent)| LimitOp::Settle { nth, percent }),
        1 => (0usize..8).prop_map(|nth| LimitOp::Release { nth }),
        1 => (0i64..20, 0i64..24).prop_map(|(days, hours)| LimitOp::Later { days, hours }),
    ]
}

/// The limits rule, plainly: settled spend of the UTC day (month) plus
/// active holds plus the new hold must stay within the day's (month's) limit.
struct LimitModel {
    daily: Option<i64>,
    monthly: Option<i64>,
    now: chrono::DateTime<Utc>,
    spent_today: i64,
    spent_this_month: i64,
    holds: Vec<(HoldId, i64)>,
}

#[derive(Debug, PartialEq)]
enum LimitAnswer {
    Held,
    Refused {
        window: LimitWindow,
        limit: i64,
        spent: i64,
        held: i64,
    },
}

impl LimitModel {
    fn held(&self) -> i64 {
        self.holds.iter().map(|(_, amount)| amount).sum()
    }

    fn reserve(&mut self, hold: HoldId, amount: i64) -> LimitAnswer {
        let held = self.held();
        for (window, limit, spent) in [
            (LimitWindow::Daily, self.daily, self.spent_today),
            (LimitWindow::Monthly, self.monthly, self.spent_this_month),
        ] {
            if let Some(limit) = limit {
                if spent + held + amount > limit {
                    return LimitAnswer::Refused {
                        window,
                        limit,
                        spent,
                        held,
                    };
                }
            }
        }
        self.holds.push((hold, amount));
        LimitAnswer::Held
    }

    fn later(&mut self, by: chrono::Duration) {
        use chrono::Datelike;
        let next = self.now + by;
        if next.date_naive() != self.now.date_naive() {
            self.spent_today = 0;
        }
        if (next.year(), next.month()) != (self.now.year(), self.now.month()) {
            self.spent_this_month = 0;
        }
        self.now = next;
    }
}

async fn run_limits_case(
    engine: &Engine,
    clock: &creditd::clock::Clock,
    account: AccountId,
    limits: (Option<i64>, Option<i64>),
    ops: &[LimitOp],
) -> Result<(), TestCaseError> {
    let fail = |what: &str, e: LedgerError| TestCaseError::fail(format!("{what}: {e:?}"));
    engine
        .credit(
            account,
            posting(
                "limits-funds",
                TransactionType::TopUp,
                micros(1_000_000_000),
            ),
        )
        .await
        .map_err(|e| fail("fund", e))?;
    let change = LimitsChange::Owner {
        daily_micros: limits.0.map(micros),
        monthly_micros: limits.1.map(micros),
    };
    engine
        .set_limits(account, change)
        .await
        .map_err(|e| fail("limits", e))?;
    let mut model = LimitModel {
        daily: limits.0,
        monthly: limits.1,
        now: clock.now(),
        spent_today: 0,
        spent_this_month: 0,
        holds: Vec::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        match *op {
            LimitOp::Reserve { amount } => {
                let hold = HoldId::generate();
                let expected = model.reserve(hold, amount);
                let got = match engine.reserve(account, hold, micros(amount)).await {
                    Ok(_) => LimitAnswer::Held,
                    Err(LedgerError::SpendLimitReached {
                        window,
                        limit,
                        spent,
                        held,
                        ..
                    }) => LimitAnswer::Refused {
                        window,
                        limit: limit.get(),
                        spent: spent.get(),
                        held: held.get(),
                    },
                    Err(other) => return Err(fail("reserve", other)),
                };
                prop_assert_eq!(got, expected, "step {}: {:?}", step, op);
            }
            LimitOp::Settle { nth, percent } if !model.holds.is_empty() => {
                let (hold, amount) = model.holds.remove(nth % model.holds.len());
                let cost = amount * percent / 100;
                model.spent_today += cost;
                model.spent_this_month += cost;
                engine
                    .settle(account, hold, charge(cost))
                    .await
                    .map_err(|e| fail("settle", e))?;
            }
            LimitOp::Release { nth } if !model.holds.is_empty() => {
                let (hold, _) = model.holds.remove(nth % model.holds.len());
                engine
                    .release(account, hold)
                    .await
                    .map_err(|e| fail("release", e))?;
            }
            LimitOp::Settle { .. } | LimitOp::Release { .. } => continue,
            LimitOp::Later { days, hours } => {
                let by = chrono::Duration::days(days) + chrono::Duration::hours(hours);
                model.later(by);
                clock.set(model.now).map_err(TestCaseError::fail)?;
            }
        }
        let spending = engine
            .spending(account)
            .await
            .map_err(|e| fail("spending", e))?;
        prop_assert_eq!(
            spending.daily.spent_micros.get(),
            model.spent_today,
            "step {}",
            step
        );
        prop_assert_eq!(
            spending.monthly.spent_micros.get(),
            model.spent_this_month,
            "step {}",
            step
        );
        prop_assert_eq!(spending.held_micros.get(), model.held(), "step {}", step);
        // No window is ever past its limit, holds included.
        for window in [&spending.daily, &spending.monthly] {
            if let Some(limit) = window.limit_micros {
                prop_assert!(
                    window.spent_micros.get() + spending.held_micros.get() <= limit.get(),
                    "step {}: {:?} with {:?} held",
                    step,
                    window,
                    spending.held_micros
                );
            }
        }
    }
    Ok(())
}

#[test]
fn random_sequences_against_spending_limits_never_take_a_window_past_its_limit() {
    let system = actix::System::new();
    let db = system.block_on(TestDb::new());
    let mut settings = settings();
    // Holds outlive every case (the clock moves by days): expiry is not
    // what this model is about.
    settings.engine.hold_ttl_s = 100_000 * 86_400;
    let clock = creditd::clock::Clock::manual("2026-01-27T18:00:00Z".parse().unwrap());
    let engine = system.block_on(async {
        let database = db.database(&settings);
        let pool = database.pool(&settings.database).expect("pool");
        crate::support::listening(Engine::start_with_clock(
            &settings.engine,
            &settings.journal,
            database,
            pool,
            clock.clone(),
        ))
    });
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let limit = prop_oneof![Just(None), (0i64..12_000).prop_map(Some)];
    let case = (
        (limit.clone(), limit),
        prop::collection::vec(limit_op(), 1..60),
    );
    let counter = std::cell::Cell::new(0u32);
    let result = runner.run(&case, |(limits, ops)| {
        counter.set(counter.get() + 1);
        clock
            .set("2026-01-27T18:00:00Z".parse().unwrap())
            .map_err(TestCaseError::fail)?;
        system.block_on(async {
            let account = db.user(&format!("limits_{}", counter.get())).await;
            run_limits_case(&engine, &clock, account, limits, &ops).await
        })
    });
    if let Err(error) = result {
        panic!("{error}");
    }
    system.block_on(async {
        engine.shutdown(Duration::from_secs(5)).await;
        db.reconcile_is_clean().await;
    });
}
