//! Credits and debits: journaled with their running balance, idempotent
//! by key, refused before anything applies when invalid.

use std::collections::HashSet;
use std::sync::Arc;

use creditd::ledger::{HoldId, LedgerError, TransactionType};
use futures_util::future::join_all;

use crate::support::*;

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
