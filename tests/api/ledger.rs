//! The ledger engine against PostgreSQL: semantics, idempotency,
//! concurrency, durability across rebuilds, fencing and database outages.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use creditd::ledger::{AccountId, HoldId, HoldStatus, LedgerError, TransactionType, UsageCharge};
use creditd::pricing::TokenUsage;
use futures_util::future::join_all;

use crate::support::*;

fn charge(cost: i64) -> UsageCharge {
    UsageCharge {
        model: "claude-sonnet-4-5".into(),
        tokens: TokenUsage {
            input_tokens: 500,
            output_tokens: 2000,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost: micros(cost),
        conversation_id: Some("conv_1".into()),
        message_id: None,
    }
}

#[actix::test]
async fn credits_and_debits_are_journaled_with_their_running_balance() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_1").await;

    let bonus = engine
        .credit(
            account,
            posting("bonus:signup:1", TransactionType::SignupBonus, eur(10)),
        )
        .await
        .expect("credit");
    assert!(!bonus.replayed);
    assert_eq!(bonus.record.balance_before_micros, micros(0));
    assert_eq!(bonus.record.balance_after_micros, eur(10));
    let refund = engine
        .debit(
            account,
            posting("refund:1", TransactionType::Refund, eur(3)),
        )
        .await
        .expect("debit");
    assert_eq!(refund.record.balance_after_micros, eur(7));

    let snapshot = engine.balance(account).await.expect("balance");
    assert_eq!(snapshot.balance_micros, eur(7));
    assert_eq!(snapshot.available_micros, eur(7));
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT balance_micros, version FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        7_000_000,
        "acknowledged means in PostgreSQL"
    );
    assert_eq!(row.get::<_, i64>(1), 2);
    let rows = client
        .query(
            "SELECT type, direction, amount_micros, balance_after_micros FROM credit_transactions
              WHERE user_id = $1 ORDER BY seq",
            &[&account.0],
        )
        .await
        .unwrap();
    let journal: Vec<(String, String, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        journal,
        vec![
            (
                "SIGNUP_BONUS".into(),
                "CREDIT".into(),
                10_000_000,
                10_000_000
            ),
            ("REFUND".into(), "DEBIT".into(), 3_000_000, 7_000_000),
        ]
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn replaying_a_key_returns_the_first_result_and_a_different_amount_is_a_conflict() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_2").await;
    let request = posting("stripe:checkout:cs_1", TransactionType::TopUp, eur(20));

    let first = engine.credit(account, request.clone()).await.unwrap();
    let again = engine.credit(account, request.clone()).await.unwrap();
    assert!(again.replayed);
    assert_eq!(
        again.record, first.record,
        "a replay answers the first result"
    );

    let mut different = request.clone();
    different.amount = eur(21);
    let conflict = engine.credit(account, different).await.unwrap_err();
    assert!(matches!(conflict, LedgerError::Conflict(_)), "{conflict:?}");
    let as_debit = engine.debit(account, request).await.unwrap_err();
    assert!(matches!(as_debit, LedgerError::Conflict(_)), "{as_debit:?}");

    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        eur(20)
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_reserve_beyond_the_available_amount_reports_both_amounts() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_3").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(50_000)),
        )
        .await
        .unwrap();
    engine
        .reserve(account, HoldId::generate(), micros(30_000))
        .await
        .unwrap();
    let refused = engine
        .reserve(account, HoldId::generate(), micros(30_000))
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        LedgerError::InsufficientCredits {
            available: micros(20_000),
            required: micros(30_000)
        }
    );
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.held_micros, micros(30_000));
    assert_eq!(snapshot.holds.len(), 1);
}

#[actix::test]
async fn a_settle_above_its_hold_posts_the_whole_cost_as_debt_and_refuses_the_next_reserve() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_4").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(100_000)),
        )
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine.reserve(account, hold, micros(90_000)).await.unwrap();
    let usage = engine.settle(account, hold, charge(130_000)).await.unwrap();
    assert_eq!(usage.record.cost_micros, micros(130_000));
    assert_eq!(usage.record.held_micros, micros(90_000));
    assert_eq!(usage.record.balance_after_micros, micros(-30_000));

    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.balance_micros, micros(-30_000));
    assert_eq!(snapshot.held_micros, micros(0));
    let refused = engine
        .reserve(account, HoldId::generate(), micros(1))
        .await
        .unwrap_err();
    assert!(matches!(refused, LedgerError::InsufficientCredits { .. }));

    let replay = engine.settle(account, hold, charge(130_000)).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.record, usage.record);
    let other = engine.settle(account, hold, charge(1)).await.unwrap_err();
    assert!(matches!(other, LedgerError::Conflict(_)), "{other:?}");
    let client = db.client().await;
    let row = client
        .query_one("SELECT status FROM credit_holds WHERE id = $1", &[&hold.0])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "SETTLED");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn release_returns_the_hold_a_later_settlement_still_charges_and_unknown_releases_are_not_found(
) {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_5").await;
    engine
        .credit(account, posting("k1", TransactionType::TopUp, micros(100)))
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine.reserve(account, hold, micros(100)).await.unwrap();
    let released = engine.release(account, hold).await.unwrap();
    assert_eq!(released.record.status, HoldStatus::Released);
    assert_eq!(released.record.amount_micros, micros(100));
    assert!(engine.release(account, hold).await.unwrap().replayed);
    // A released hold's answer was delivered after all: its usage posts.
    let settle_after = engine.settle(account, hold, charge(1)).await.unwrap();
    assert!(!settle_after.replayed);
    assert_eq!(settle_after.record.held_micros, micros(0));
    let again = engine.settle(account, hold, charge(1)).await.unwrap();
    assert!(again.replayed, "a settled hold is a replay");
    assert!(matches!(
        engine.settle(account, hold, charge(2)).await.unwrap_err(),
        LedgerError::Conflict(_)
    ));
    assert!(matches!(
        engine.release(account, hold).await.unwrap_err(),
        LedgerError::Conflict(_)
    ));
    let unknown = HoldId::generate();
    assert_eq!(
        engine.release(account, unknown).await.unwrap_err(),
        LedgerError::HoldNotFound(unknown)
    );
    assert_eq!(
        engine.balance(account).await.unwrap().available_micros,
        micros(99)
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_operation_on_an_account_without_a_user_is_account_not_found() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let missing = creditd::ledger::AccountId(987_654);
    let error = engine
        .credit(missing, posting("k", TransactionType::TopUp, micros(1)))
        .await
        .unwrap_err();
    assert_eq!(error, LedgerError::AccountNotFound(missing));
}

#[actix::test]
async fn non_positive_amounts_are_refused_before_anything_applies() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_6").await;
    for amount in [0, -5] {
        let error = engine
            .credit(
                account,
                posting("k", TransactionType::TopUp, micros(amount)),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, LedgerError::InvalidRequest(_)), "{error:?}");
        let error = engine
            .reserve(account, HoldId::generate(), micros(amount))
            .await
            .unwrap_err();
        assert!(matches!(error, LedgerError::InvalidRequest(_)), "{error:?}");
    }
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.version, 0, "nothing was journaled");
}

#[actix::test]
async fn expired_holds_are_released_and_journaled_as_expired() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_7").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    let hold = HoldId::generate();
    let placed = engine.reserve(account, hold, micros(600)).await.unwrap();
    assert!(engine
        .expire_holds(account, Utc::now())
        .await
        .unwrap()
        .is_empty());

    let expired = engine
        .expire_holds(account, placed.record.expires_at)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].status, HoldStatus::Expired);
    assert_eq!(
        engine.balance(account).await.unwrap().available_micros,
        micros(1_000)
    );
    let late = engine.settle(account, hold, charge(10)).await.unwrap();
    assert!(!late.replayed);
    assert_eq!(
        late.record.cost_micros,
        micros(10),
        "expiry never frees usage"
    );
    assert_eq!(late.record.held_micros, micros(0));
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        micros(990)
    );
    let status: String = db
        .client()
        .await
        .query_one("SELECT status FROM credit_holds WHERE id = $1", &[&hold.0])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "EXPIRED");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn holds_that_expired_while_the_account_was_not_loaded_are_released_on_load() {
    let db = TestDb::new().await;
    let account = db.user("user_ledger_8").await;
    let hold = HoldId::generate();
    {
        let engine = db.engine(&settings());
        engine
            .credit(
                account,
                posting("k1", TransactionType::TopUp, micros(1_000)),
            )
            .await
            .unwrap();
        engine.reserve(account, hold, micros(700)).await.unwrap();
        engine.shutdown(Duration::from_secs(5)).await;
    }
    db.client()
        .await
        .execute(
            "UPDATE credit_holds SET expires_at = now() - interval '1 minute' WHERE id = $1",
            &[&hold.0],
        )
        .await
        .unwrap();
    let engine = db.engine(&settings());
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.held_micros, micros(0), "released before serving");
    assert!(snapshot.holds.is_empty());
    engine.shutdown(Duration::from_secs(5)).await;
    let status: String = db
        .client()
        .await
        .query_one("SELECT status FROM credit_holds WHERE id = $1", &[&hold.0])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "EXPIRED");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_thousand_concurrent_reserves_against_a_balance_for_a_hundred_grant_exactly_a_hundred() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.engine.mailbox_capacity = 2_000;
    let engine = Arc::new(db.engine(&settings));
    let account = db.user("user_ledger_9").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(100 * 250)),
        )
        .await
        .unwrap();

    let attempts = (0..1_000).map(|_| {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .reserve(account, HoldId::generate(), micros(250))
                .await
        })
    });
    let results: Vec<_> = join_all(attempts)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let granted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(granted, 100);
    for result in &results {
        if let Err(error) = result {
            match error {
                LedgerError::InsufficientCredits {
                    available,
                    required,
                } => {
                    assert!(
                        available.get() >= 0 && available.get() < 250,
                        "{available:?}"
                    );
                    assert_eq!(*required, micros(250));
                }
                other => panic!("unexpected error {other:?}"),
            }
        }
    }
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.available_micros, micros(0));
    assert_eq!(snapshot.holds.len(), 100);
    let active: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_holds WHERE user_id = $1 AND status = 'ACTIVE'",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 100);
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn the_same_key_sent_a_hundred_times_at_once_applies_once_and_answers_all_alike() {
    let db = TestDb::new().await;
    let engine = Arc::new(db.engine(&settings()));
    let account = db.user("user_ledger_10").await;
    let request = posting("stripe:checkout:cs_same", TransactionType::TopUp, eur(15));
    let calls = (0..100).map(|_| {
        let engine = engine.clone();
        let request = request.clone();
        tokio::spawn(async move { engine.credit(account, request).await })
    });
    let outcomes: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap().expect("every caller is answered"))
        .collect();
    assert_eq!(outcomes.iter().filter(|o| !o.replayed).count(), 1);
    let ids: HashSet<_> = outcomes.iter().map(|o| o.record.id).collect();
    assert_eq!(ids.len(), 1, "all callers see the same transaction");
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        eur(15)
    );
    let count: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_transactions WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[actix::test]
async fn keys_and_holds_the_actor_forgot_are_found_in_postgres() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.engine.recent_keys = 2;
    let account = db.user("user_ledger_11").await;
    let first_hold = HoldId::generate();
    let (first, usage) = {
        let engine = db.engine(&settings);
        let first = engine
            .credit(account, posting("old-key", TransactionType::TopUp, eur(5)))
            .await
            .unwrap();
        engine
            .reserve(account, first_hold, micros(10))
            .await
            .unwrap();
        let usage = engine.settle(account, first_hold, charge(7)).await.unwrap();
        for index in 0..6 {
            let key = format!("newer-{index}");
            engine
                .credit(
                    account,
                    posting(&key, TransactionType::PromoBonus, micros(1)),
                )
                .await
                .unwrap();
            let hold = HoldId::generate();
            engine.reserve(account, hold, micros(1)).await.unwrap();
            engine.release(account, hold).await.unwrap();
        }
        let replay = engine
            .credit(account, posting("old-key", TransactionType::TopUp, eur(5)))
            .await
            .unwrap();
        assert!(replay.replayed, "an evicted key is looked up");
        assert_eq!(replay.record, first.record);
        engine.shutdown(Duration::from_secs(5)).await;
        (first, usage)
    };
    let engine = db.engine(&settings);
    let replay = engine
        .credit(account, posting("old-key", TransactionType::TopUp, eur(5)))
        .await
        .unwrap();
    assert!(
        replay.replayed,
        "a key from before the restart is looked up"
    );
    assert_eq!(replay.record.id, first.record.id);
    let settled_again = engine.settle(account, first_hold, charge(7)).await.unwrap();
    assert!(settled_again.replayed);
    assert_eq!(settled_again.record.id, usage.record.id);
    let conflict = engine
        .credit(account, posting("old-key", TransactionType::TopUp, eur(6)))
        .await
        .unwrap_err();
    assert!(matches!(conflict, LedgerError::Conflict(_)));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn acknowledged_operations_survive_rebuilding_the_engine_from_postgres() {
    let db = TestDb::new().await;
    let accounts = [
        db.user("user_rebuild_a").await,
        db.user("user_rebuild_b").await,
        db.user("user_rebuild_c").await,
    ];
    let before = {
        let engine = Arc::new(db.engine(&settings()));
        let work = accounts.iter().enumerate().map(|(index, &account)| {
            let engine = engine.clone();
            async move {
                engine
                    .credit(
                        account,
                        posting("seed", TransactionType::TopUp, eur(index as i64 + 1)),
                    )
                    .await
                    .unwrap();
                let mut kept = Vec::new();
                for round in 0..20 {
                    let hold = HoldId::generate();
                    engine.reserve(account, hold, micros(1_000)).await.unwrap();
                    match round % 3 {
                        0 => kept.push(hold),
                        1 => {
                            engine
                                .settle(account, hold, charge(round * 10))
                                .await
                                .unwrap();
                        }
                        _ => {
                            engine.release(account, hold).await.unwrap();
                        }
                    }
                }
                kept
            }
        });
        join_all(work).await;
        let mut snapshots = Vec::new();
        for &account in &accounts {
            snapshots.push(engine.balance(account).await.unwrap());
        }
        // Dropped without a flush: everything acknowledged is already durable.
        snapshots
    };
    let engine = db.engine(&settings());
    for (account, old) in accounts.iter().zip(before) {
        let new = engine.balance(*account).await.unwrap();
        assert_eq!(new, old, "account {account:?} came back identical");
        assert_eq!(new.holds.len(), 7);
    }
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stale_actor_cannot_overwrite_a_newer_state_and_reloads() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_12").await;
    engine
        .credit(account, posting("k1", TransactionType::TopUp, eur(1)))
        .await
        .unwrap();

    // Another writer (a second instance) moves the account on.
    db.client()
        .await
        .batch_execute(&format!(
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), {id}, 2, 'ADJUSTMENT', 'CREDIT', 4000000, 'elsewhere',
                 1000000, 5000000, now());
             INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
                 source, seq, created_at)
             VALUES (gen_random_uuid(), {id}, 'PROMO', 4000000, 4000000, 'elsewhere', 2, now());
             UPDATE credit_balances SET balance_micros = 5000000, version = 2
              WHERE user_id = {id};",
            id = account.0
        ))
        .await
        .unwrap();

    let stale = engine
        .credit(account, posting("k2", TransactionType::TopUp, eur(2)))
        .await
        .unwrap_err();
    assert!(matches!(stale, LedgerError::Unavailable(_)), "{stale:?}");
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT balance_micros, version FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (5_000_000, 2));

    let retried = engine
        .credit(account, posting("k2", TransactionType::TopUp, eur(2)))
        .await
        .expect("a fresh actor serves after reloading");
    assert_eq!(retried.record.balance_before_micros, eur(5));
    assert_eq!(retried.record.seq, 3);
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        eur(7)
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_stale_actor_cannot_release_a_hold_over_a_newer_state_and_reloads() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_stale_release").await;
    engine
        .credit(account, posting("k1", TransactionType::TopUp, eur(1)))
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine
        .reserve(account, hold, micros(300_000))
        .await
        .unwrap();

    // Another writer (a second instance) moves the account on to seq 3.
    let client = db.client().await;
    client
        .execute(
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), $1, 3, 'ADJUSTMENT', 'CREDIT', 4000000, 'elsewhere',
                 1000000, 5000000, now())",
            &[&account.0],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
                 source, seq, created_at)
             VALUES (gen_random_uuid(), $1, 'PROMO', 4000000, 4000000, 'elsewhere', 3, now())",
            &[&account.0],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE credit_balances SET balance_micros = 5000000, version = 3
              WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap();

    // The release is journaled as seq 3 too, but it inserts no row keyed
    // by seq (it finishes the hold row in place): only the version fence
    // on the balance row can refuse it.
    let stale = engine.release(account, hold).await.unwrap_err();
    assert!(matches!(stale, LedgerError::Unavailable(_)), "{stale:?}");
    let balance = client
        .query_one(
            "SELECT balance_micros, held_micros, version FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            balance.get::<_, i64>(0),
            balance.get::<_, i64>(1),
            balance.get::<_, i64>(2)
        ),
        (5_000_000, 300_000, 3),
        "the stale actor's balance did not overwrite the newer one"
    );
    let status: String = client
        .query_one("SELECT status FROM credit_holds WHERE id = $1", &[&hold.0])
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "ACTIVE", "the refused release was undone");

    let retried = engine
        .release(account, hold)
        .await
        .expect("a fresh actor serves after reloading");
    assert_eq!(retried.record.status, HoldStatus::Released);
    let after = engine.balance(account).await.unwrap();
    assert_eq!(
        (after.balance_micros, after.held_micros),
        (eur(5), micros(0))
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_flooded_account_answers_overloaded_and_loses_nothing() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.engine.mailbox_capacity = 4;
    let engine = Arc::new(db.engine(&settings));
    let account = db.user("user_ledger_13").await;
    let calls = (0..300).map(|index| {
        let engine = engine.clone();
        tokio::spawn(async move {
            let key = format!("flood-{index}");
            engine
                .credit(
                    account,
                    posting(&key, TransactionType::PromoBonus, micros(1)),
                )
                .await
        })
    });
    let results: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let ok = results.iter().filter(|r| r.is_ok()).count() as i64;
    let overloaded = results
        .iter()
        .filter(|r| matches!(r, Err(LedgerError::Overloaded)))
        .count() as i64;
    assert!(overloaded > 0, "a mailbox of 4 cannot take 300 at once");
    assert_eq!(ok + overloaded, 300, "no other outcome: {results:?}");
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        micros(ok)
    );
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn idle_accounts_are_passivated_and_come_back_with_their_state() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.engine.idle_timeout_ms = 50;
    let engine = db.engine(&settings);
    let account = db.user("user_ledger_14").await;
    engine
        .credit(account, posting("k1", TransactionType::TopUp, micros(42)))
        .await
        .unwrap();
    assert_eq!(engine.stats().resident_actors, 1);
    let mut waited = 0;
    while engine.stats().resident_actors > 0 && waited < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += 1;
    }
    assert_eq!(engine.stats().resident_actors, 0, "the idle actor stopped");
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        micros(42)
    );
    assert_eq!(engine.stats().resident_actors, 1);
}

#[actix::test]
async fn an_account_with_an_active_hold_is_not_passivated() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.engine.idle_timeout_ms = 30;
    let engine = db.engine(&settings);
    let account = db.user("user_ledger_15").await;
    engine
        .credit(account, posting("k1", TransactionType::TopUp, micros(42)))
        .await
        .unwrap();
    engine
        .reserve(account, HoldId::generate(), micros(2))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(engine.stats().resident_actors, 1);
}

#[actix::test]
async fn a_refused_entry_fails_only_its_own_account_and_applies_nothing() {
    let db = TestDb::new().await;
    let mut settings = settings();
    // Forget finished holds at once, so only PostgreSQL knows the old id.
    settings.engine.recent_keys = 1;
    // One writer, so both accounts share its batches (with two, these two
    // accounts land on different writers and never meet in a batch).
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = 5_000;
    let engine = Arc::new(db.engine(&settings));
    let bad = db.user("user_refused_bad").await;
    let good = db.user("user_refused_good").await;
    for account in [bad, good] {
        engine
            .credit(
                account,
                posting("seed", TransactionType::TopUp, micros(10_000)),
            )
            .await
            .unwrap();
    }
    let reused = HoldId::generate();
    engine.reserve(bad, reused, micros(100)).await.unwrap();
    engine.release(bad, reused).await.unwrap();
    for _ in 0..3 {
        let hold = HoldId::generate();
        engine.reserve(bad, hold, micros(1)).await.unwrap();
        engine.release(bad, hold).await.unwrap();
    }
    let before = engine.balance(bad).await.unwrap();
    let stats_before = engine.writer().stats();

    // The bad account reuses a finished hold id while the good one works.
    let good_work = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            for index in 0..50 {
                let key = format!("good-{index}");
                results.push(
                    engine
                        .credit(good, posting(&key, TransactionType::PromoBonus, micros(1)))
                        .await,
                );
            }
            results
        })
    };
    let refused = engine.reserve(bad, reused, micros(100)).await;
    assert!(
        matches!(
            refused,
            Err(LedgerError::Unavailable(_)) | Err(LedgerError::Conflict(_))
        ),
        "{refused:?}"
    );
    for result in good_work.await.unwrap() {
        result.expect("the other account's work commits");
    }
    let after = engine.balance(bad).await.unwrap();
    assert_eq!(after, before, "nothing of the refused entry applied");
    assert_eq!(
        engine.balance(good).await.unwrap().balance_micros,
        micros(10_050)
    );
    // Catches the hold insert without `ON CONFLICT DO NOTHING` (the primary
    // key aborts the batch, which is then split).
    let stats = engine.writer().stats();
    assert_eq!(stats.batches_split, stats_before.batches_split, "no split");
    assert_eq!(stats.accounts_refused, stats_before.accounts_refused + 1);
    db.reconcile_is_clean().await;
}

/// An account whose finished hold id `reused` only PostgreSQL remembers,
/// and another account; both funded and resident on one writer.
pub(crate) async fn bad_and_good_on_one_writer(
    db: &TestDb,
    batch_delay_us: u64,
) -> (creditd::ledger::Engine, AccountId, AccountId, HoldId) {
    let mut settings = settings();
    settings.engine.recent_keys = 1;
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = batch_delay_us;
    let engine = db.engine(&settings);
    let bad = db.user("user_batch_bad").await;
    let good = db.user("user_batch_good").await;
    let (a, b) = tokio::join!(
        engine.credit(bad, posting("seed", TransactionType::TopUp, micros(10_000))),
        engine.credit(
            good,
            posting("seed", TransactionType::TopUp, micros(10_000))
        ),
    );
    a.unwrap();
    b.unwrap();
    let reused = HoldId::generate();
    engine.reserve(bad, reused, micros(100)).await.unwrap();
    engine.release(bad, reused).await.unwrap();
    for _ in 0..3 {
        let hold = HoldId::generate();
        engine.reserve(bad, hold, micros(1)).await.unwrap();
        engine.release(bad, hold).await.unwrap();
    }
    (engine, bad, good, reused)
}

#[actix::test]
async fn an_entry_the_database_refuses_is_undone_and_the_other_account_in_its_batch_commits_in_the_same_transaction(
) {
    let db = TestDb::new().await;
    // A gathering window long enough that two entries sent together share
    // one batch.
    let (engine, bad, good, reused) = bad_and_good_on_one_writer(&db, 50_000).await;
    let bad_before = engine.balance(bad).await.unwrap();
    let before = engine.writer().stats();

    let (refused, credited) = tokio::join!(
        engine.reserve(bad, reused, micros(100)),
        engine.credit(
            good,
            posting("good-1", TransactionType::PromoBonus, micros(7))
        ),
    );
    let after = engine.writer().stats();
    assert!(
        matches!(refused, Err(LedgerError::Unavailable(_))),
        "{refused:?}"
    );
    credited.expect("the other account's entry commits");
    // Catches the hold insert without `ON CONFLICT DO NOTHING`: the primary
    // key aborts the transaction and the batch is split (committed 0, split 1).
    assert_eq!(
        after.batches_committed,
        before.batches_committed + 1,
        "both entries were written by one transaction: {before:?} → {after:?}"
    );
    assert_eq!(after.batches_split, before.batches_split, "no split");
    assert_eq!(after.accounts_refused, before.accounts_refused + 1);

    // Catches an undo that leaves the balance row moved: the reloaded actor
    // would show the 100 held (and reconcile a balance without its hold).
    assert_eq!(engine.balance(bad).await.unwrap(), bad_before);
    assert_eq!(
        engine.balance(good).await.unwrap().balance_micros,
        micros(10_007)
    );
    let client = db.client().await;
    let version: i64 = client
        .query_one(
            "SELECT version FROM credit_balances WHERE user_id = $1",
            &[&bad.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, bad_before.version);
    // The account serves again, from what PostgreSQL has.
    engine
        .reserve(bad, HoldId::generate(), micros(100))
        .await
        .expect("the refused account serves again");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_nul_in_a_stored_text_is_refused_before_it_applies_and_its_batch_neighbour_commits() {
    let db = TestDb::new().await;
    let (engine, bad, good, _) = bad_and_good_on_one_writer(&db, 50_000).await;
    let bad_before = engine.balance(bad).await.unwrap();
    let before = engine.writer().stats();
    let mut nul = posting("nul-description", TransactionType::PromoBonus, micros(5));
    nul.description = Some("a\0b".into());

    let (refused, credited) = tokio::join!(
        engine.credit(bad, nul),
        engine.credit(
            good,
            posting("good-2", TransactionType::PromoBonus, micros(7))
        ),
    );
    let after = engine.writer().stats();
    // Catches an engine that lets the text through: its entry reaches the
    // writer (refused there, the account reset) or PostgreSQL (a split).
    assert!(
        matches!(&refused, Err(LedgerError::InvalidRequest(m)) if m.contains("description")),
        "{refused:?}"
    );
    credited.expect("the other account's entry commits");
    assert_eq!(after.batches_split, before.batches_split, "no split");
    assert_eq!(after.accounts_refused, before.accounts_refused);
    assert_eq!(
        engine.balance(bad).await.unwrap(),
        bad_before,
        "nothing applied, no reset"
    );
    let stored: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_transactions WHERE idempotency_key = 'nul-description'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_batch_that_fails_in_flight_fails_its_accounts_later_batches_and_loses_nothing_acknowledged(
) {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.journal.writers = 1;
    settings.journal.pipeline_depth = 3;
    // Batches gather every account's entries (one round of credits is sent
    // every 4 ms), so the killed batch holds more than the victim.
    settings.journal.batch_delay_us = 5_000;
    settings.engine.mailbox_capacity = 2_000;
    let engine = Arc::new(db.engine(&settings));
    let mut accounts = Vec::new();
    for index in 0..4 {
        accounts.push(db.user(&format!("user_pipeline_{index}")).await);
    }
    for &account in &accounts {
        engine
            .credit(
                account,
                posting("seed", TransactionType::TopUp, micros(1_000_000)),
            )
            .await
            .unwrap();
    }
    let victim = accounts[0];

    // Another session holds the victim's balance row: the batch carrying
    // the victim's next entries stalls on it while later batches gather
    // behind it, then that batch's connection is killed.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.query(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&victim.0],
    )
    .await
    .unwrap();
    let killer = {
        let config = db.config.clone();
        let engine = engine.clone();
        tokio::spawn(async move {
            let admin = connect(&config).await.expect("admin connection");
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                let waiting = admin
                    .query(
                        "SELECT pid FROM pg_stat_activity
                          WHERE datname = current_database() AND wait_event_type = 'Lock'
                            AND pid <> pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap();
                if waiting.len() == 1 && engine.writer().stats().peak_in_flight >= 2 {
                    let pid: i32 = waiting[0].get(0);
                    admin
                        .execute("SELECT pg_terminate_backend($1)", &[&pid])
                        .await
                        .unwrap();
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            false
        })
    };

    // A steady stream of credits on every account, not awaited one by one.
    let mut calls = Vec::new();
    let started = std::time::Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_millis(400) {
        for &account in &accounts {
            let engine = engine.clone();
            let key = format!("pipe-{round}");
            calls.push((
                account,
                key.clone(),
                tokio::spawn(async move {
                    engine
                        .credit(
                            account,
                            posting(&key, TransactionType::PromoBonus, micros(1)),
                        )
                        .await
                }),
            ));
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    assert!(
        killer.await.unwrap(),
        "a batch stalled on the lock with another in flight"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    lock.rollback().await.unwrap();

    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for (account, key, call) in calls {
        match call.await.unwrap() {
            Ok(outcome) => acknowledged.push((account, key, outcome.record.seq)),
            Err(LedgerError::Unavailable(_)) => failed.push((account, key)),
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }
    assert!(!failed.is_empty(), "the killed batch failed its entries");
    assert!(
        failed.iter().any(|(account, _)| *account == victim),
        "the victim's entries failed"
    );
    let stats = engine.writer().stats();
    assert!(stats.peak_in_flight >= 2, "{stats:?}");
    assert!(stats.batches_failed >= 1, "{stats:?}");
    // Catches a terminated backend taken for a database refusal (the
    // `Some(db)` arm of `connection_lost` answering `false`): the killed
    // batch is split and retried one account per transaction.
    assert_eq!(stats.batches_split, 0, "a lost connection is not split");

    // Every acknowledged credit is in PostgreSQL, as answered.
    let client = db.client().await;
    for (account, key, seq) in &acknowledged {
        let stored: i64 = client
            .query_one(
                "SELECT seq FROM credit_transactions WHERE user_id = $1 AND idempotency_key = $2",
                &[&account.0, &key.as_str()],
            )
            .await
            .unwrap_or_else(|e| panic!("acknowledged {key} of {account:?} is stored: {e}"))
            .get(0);
        assert_eq!(stored, *seq);
    }
    // The failed ones, retried with their keys, apply once; the failed
    // accounts reload and serve again.
    for (account, key) in &failed {
        let mut attempts = 0;
        loop {
            match engine
                .credit(
                    *account,
                    posting(key, TransactionType::PromoBonus, micros(1)),
                )
                .await
            {
                Ok(_) => break,
                Err(error) if attempts < 10 => {
                    attempts += 1;
                    tracing::debug!(%error, "retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("{key} of {account:?} never applied: {error:?}"),
            }
        }
    }
    let total = acknowledged.len() + failed.len();
    for &account in &accounts {
        let row = client
            .query_one(
                "SELECT count(*), count(DISTINCT idempotency_key), sum(amount_micros)::int8
                   FROM credit_transactions WHERE user_id = $1 AND idempotency_key <> 'seed'",
                &[&account.0],
            )
            .await
            .unwrap();
        let (rows, keys, sum): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(rows, keys, "no key twice");
        assert_eq!(
            engine.balance(account).await.unwrap().balance_micros,
            micros(1_000_000 + sum)
        );
    }
    let stored: i64 = client
        .query_one(
            "SELECT count(*) FROM credit_transactions WHERE idempotency_key LIKE 'pipe-%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as usize, total, "every credit applied exactly once");
    db.reconcile_is_clean().await;
}

/// Waits until some session of this database waits for a row lock.
async fn a_session_waits_for_a_lock(client: &tokio_postgres::Client) -> bool {
    for _ in 0..1_000 {
        let waiting: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[actix::test]
async fn entries_behind_a_failed_batch_in_flight_never_commit_even_when_another_writer_brings_the_version_they_expect(
) {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.journal.writers = 1;
    settings.journal.pipeline_depth = 3;
    let engine = Arc::new(db.engine(&settings));
    let account = db.user("user_pipeline_fence").await;
    engine
        .credit(account, posting("seed", TransactionType::TopUp, eur(1)))
        .await
        .unwrap();

    // Another writer holds the balance row at version 1.
    let mut other = db.client().await;
    let foreign = other.transaction().await.unwrap();
    foreign
        .query(
            "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
            &[&account.0],
        )
        .await
        .unwrap();
    let watcher = db.client().await;

    // Seq 2 goes into a batch that stalls on the row lock ...
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .credit(
                    account,
                    posting("first", TransactionType::TopUp, micros(10)),
                )
                .await
        })
    };
    assert!(a_session_waits_for_a_lock(&watcher).await);
    // ... seq 3 (computed on seq 2) into a second batch in flight behind it.
    let second = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .credit(
                    account,
                    posting("second", TransactionType::TopUp, micros(20)),
                )
                .await
        })
    };
    let mut waited = 0;
    while engine.writer().stats().peak_in_flight < 2 && waited < 1_000 {
        tokio::time::sleep(Duration::from_millis(2)).await;
        waited += 1;
    }
    assert!(
        engine.writer().stats().peak_in_flight >= 2,
        "two batches in flight"
    );

    // The other writer commits its own seq 2: the first batch is fenced, and
    // the version is now exactly the one the second batch expects.
    foreign
        .batch_execute(&format!(
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), {id}, 2, 'ADJUSTMENT', 'CREDIT', 4000000, 'elsewhere',
                 1000000, 5000000, now());
             INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
                 source, seq, created_at)
             VALUES (gen_random_uuid(), {id}, 'PROMO', 4000000, 4000000, 'elsewhere', 2, now());
             UPDATE credit_balances SET balance_micros = 5000000, version = 2
              WHERE user_id = {id};",
            id = account.0
        ))
        .await
        .unwrap();
    foreign.commit().await.unwrap();

    let first = first.await.unwrap();
    let second = second.await.unwrap();
    assert!(
        matches!(first, Err(LedgerError::Unavailable(_))),
        "{first:?}"
    );
    // Catches a batch that does not wait for the outcome of the earlier one
    // holding its account (or does not drop the failed incarnation's entries
    // after waiting): the fence passes and seq 3 commits on the other
    // writer's seq 2, its balance_before from a state that never existed.
    assert!(
        matches!(second, Err(LedgerError::Unavailable(_))),
        "{second:?}"
    );
    assert!(engine.writer().flush(Duration::from_secs(5)).await);
    db.reconcile_is_clean().await;

    let retried = engine
        .credit(
            account,
            posting("second", TransactionType::TopUp, micros(20)),
        )
        .await
        .expect("a fresh actor serves after reloading");
    assert_eq!(retried.record.seq, 3);
    assert_eq!(retried.record.balance_before_micros, eur(5));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_settlement_after_its_hold_expired_is_charged_once_even_across_a_rebuild() {
    let db = TestDb::new().await;
    let settings = settings();
    let account = db.user("user_ledger_late").await;
    let hold = HoldId::generate();
    {
        let engine = db.engine(&settings);
        engine
            .credit(account, posting("k1", TransactionType::TopUp, micros(500)))
            .await
            .unwrap();
        let placed = engine.reserve(account, hold, micros(400)).await.unwrap();
        engine
            .expire_holds(account, placed.record.expires_at)
            .await
            .unwrap();
        let late = engine.settle(account, hold, charge(700)).await.unwrap();
        assert_eq!(
            late.record.balance_after_micros,
            micros(-200),
            "debt allowed"
        );
        engine.shutdown(Duration::from_secs(5)).await;
    }
    // A fresh engine knows the hold only from PostgreSQL: EXPIRED, with a usage.
    let engine = db.engine(&settings);
    let replay = engine.settle(account, hold, charge(700)).await.unwrap();
    assert!(replay.replayed, "{replay:?}");
    assert_eq!(replay.record.cost_micros, micros(700));
    assert!(matches!(
        engine.settle(account, hold, charge(1)).await.unwrap_err(),
        LedgerError::Conflict(_)
    ));
    assert_eq!(
        engine.balance(account).await.unwrap().balance_micros,
        micros(-200)
    );
    let usages: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_usages WHERE hold_id = $1",
            &[&hold.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(usages, 1);
    db.reconcile_is_clean().await;
}

/// The journal writer's backend while it waits for a row lock.
async fn blocked_writer_pid(db: &TestDb) -> i32 {
    let client = db.client().await;
    for _ in 0..500 {
        if let Some(row) = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                  WHERE wait_event_type = 'Lock' AND query LIKE '%UPDATE credit_balances%'",
                &[],
            )
            .await
            .unwrap()
        {
            return row.get(0);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no journal batch ever waited on the locked balance row");
}

#[actix::test]
async fn a_hold_lost_with_its_failed_batch_is_still_charged_by_its_settlement() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_lost").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    // Stall the account's next batch on its balance row, admit a hold (it
    // answers before its commit), then kill the stalled batch's connection.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();
    let hold = HoldId::generate();
    let admitted = engine.admit(account, hold, micros(300)).await.unwrap();
    assert_eq!(admitted.record.amount_micros, micros(300));
    let writer = blocked_writer_pid(&db).await;
    lock.execute("SELECT pg_terminate_backend($1)", &[&writer])
        .await
        .unwrap();
    lock.rollback().await.unwrap();

    // The hold never became durable and the actor reset; the answer was
    // delivered, so its settlement posts under the hold id all the same.
    let mut settled = None;
    for _ in 0..50 {
        match engine.settle(account, hold, charge(250)).await {
            Ok(outcome) => {
                settled = Some(outcome);
                break;
            }
            Err(LedgerError::Unavailable(_) | LedgerError::Reset) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => panic!("{error:?}"),
        }
    }
    let settled = settled.expect("the settlement committed");
    assert_eq!(settled.record.held_micros, micros(0), "the hold was lost");
    assert_eq!(settled.record.cost_micros, micros(250));
    assert!(
        engine
            .settle(account, hold, charge(250))
            .await
            .unwrap()
            .replayed
    );
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.balance_micros, micros(750));
    assert_eq!(snapshot.held_micros, micros(0));
    let holds: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_holds WHERE id = $1",
            &[&hold.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(holds, 0, "the hold's batch did not commit");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn an_admitted_hold_is_answered_before_its_commit_and_counts_against_the_balance_at_once() {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_ledger_admit").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();
    // With the balance row locked nothing of this account can commit: an
    // admission still answers, a durable reserve does not.
    let first = HoldId::generate();
    tokio::time::timeout(
        Duration::from_secs(5),
        engine.admit(account, first, micros(700)),
    )
    .await
    .expect("an admission does not wait for its commit")
    .unwrap();
    let refused = engine.admit(account, HoldId::generate(), micros(400)).await;
    assert!(
        matches!(refused, Err(LedgerError::InsufficientCredits { .. })),
        "{refused:?}"
    );
    let durable = tokio::time::timeout(
        Duration::from_millis(300),
        engine.reserve(account, HoldId::generate(), micros(100)),
    )
    .await;
    assert!(
        durable.is_err(),
        "a durable reserve answered before its commit"
    );
    lock.rollback().await.unwrap();
    let settled = engine.settle(account, first, charge(600)).await.unwrap();
    assert_eq!(settled.record.held_micros, micros(700));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_fast_chat_writes_its_hold_and_settlement_in_one_batch_as_one_finished_hold_row() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.journal.writers = 1;
    // Long enough that the pause below (a provider answering) fits in it
    // even on a loaded machine.
    settings.journal.hold_delay_us = 2_000_000;
    let engine = db.engine(&settings);
    let account = db.user("user_ledger_fast_chat").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    let before = engine.writer().stats();
    let hold = HoldId::generate();
    engine.admit(account, hold, micros(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let settled = engine.settle(account, hold, charge(120)).await.unwrap();
    let after = engine.writer().stats();

    // Catches a hold entry sent at once: it commits in a batch of its own,
    // and the settlement finishes it with an update in a second one.
    assert_eq!(
        after.batches_committed,
        before.batches_committed + 1,
        "the hold and its settlement committed together"
    );
    assert_eq!(settled.record.held_micros, micros(300));
    let row = db
        .client()
        .await
        .query_one(
            "SELECT status, finished_seq FROM credit_holds WHERE id = $1",
            &[&hold.0],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "SETTLED");
    assert_eq!(row.get::<_, Option<i64>>(1), Some(settled.record.seq));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_held_back_hold_is_journaled_after_its_delay_when_no_settlement_comes() {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.journal.hold_delay_us = 50_000;
    let engine = db.engine(&settings);
    let account = db.user("user_ledger_slow_chat").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine.admit(account, hold, micros(300)).await.unwrap();
    let client = db.client().await;
    let mut active: i64 = 0;
    for _ in 0..300 {
        active = client
            .query_one(
                "SELECT count(*) FROM credit_holds WHERE id = $1 AND status = 'ACTIVE'",
                &[&hold.0],
            )
            .await
            .unwrap()
            .get(0);
        if active == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        active, 1,
        "the hold reached PostgreSQL without any other operation"
    );
    db.reconcile_is_clean().await;
}
