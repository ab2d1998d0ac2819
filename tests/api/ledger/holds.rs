//! Holds: reserved against what is available, settled for their real
//! cost, released, expired.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use creditd::ledger::{HoldId, HoldStatus, LedgerError, TransactionType};
use futures_util::future::join_all;

use crate::support::*;

use super::*;

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
            balance: micros(50_000),
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
                    ..
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

#[actix::test]
async fn a_keys_spend_and_active_holds_still_count_against_its_limit_when_the_account_loads_again()
{
    use creditd::ledger::{ApiKeyId, KeyLimit, UsageCharge};
    let db = TestDb::new().await;
    let settings = settings();
    let account = db.user("user_ledger_key_limit").await;
    let key = KeyLimit {
        key: ApiKeyId(uuid::Uuid::new_v4()),
        limit: Some(micros(1_000)),
    };
    {
        let engine = db.engine(&settings);
        engine
            .credit(
                account,
                posting("k-key", TransactionType::TopUp, micros(100_000)),
            )
            .await
            .unwrap();
        let settled = HoldId::generate();
        engine
            .admit_for_key(account, settled, micros(400), Some(key))
            .await
            .unwrap();
        let charge = UsageCharge {
            api_key: Some(key.key),
            ..charge(300)
        };
        engine.settle(account, settled, charge).await.unwrap();
        engine
            .admit_for_key(account, HoldId::generate(), micros(400), Some(key))
            .await
            .unwrap();
        engine.shutdown(Duration::from_secs(5)).await;
    }
    let engine = db.engine(&settings);
    // Loaded again: 300 spent and 400 held with the key; 300 more fit.
    let refused = engine
        .admit_for_key(account, HoldId::generate(), micros(301), Some(key))
        .await;
    assert_eq!(
        refused.unwrap_err(),
        LedgerError::KeyLimitReached {
            key: key.key,
            limit: micros(1_000),
            spent: micros(300),
            held: micros(400),
            required: micros(301),
        }
    );
    engine
        .admit_for_key(account, HoldId::generate(), micros(300), Some(key))
        .await
        .unwrap();
    // A hold without the key is not judged by its limit.
    engine
        .admit_for_key(account, HoldId::generate(), micros(5_000), None)
        .await
        .unwrap();
}
