//! The ledger engine against PostgreSQL: semantics, idempotency,
//! concurrency, durability across rebuilds, fencing and database outages.

mod actors;
mod holds;
mod journal;
mod plans;
mod postings;

use std::time::Duration;

use creditd::ledger::{AccountId, HoldId, TransactionType, UsageCharge};
use creditd::pricing::TokenUsage;

use crate::support::*;

pub(super) fn charge(cost: i64) -> UsageCharge {
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
        api_key: None,
    }
}

/// Another writer (a second instance) moves the account from version 1 to
/// 2: its seq 2, a 4 EUR adjustment on top of the 1 EUR the test credited.
pub(super) async fn move_on_elsewhere(
    client: &impl tokio_postgres::GenericClient,
    account: AccountId,
) {
    client
        .execute(
            "INSERT INTO credit_transactions (id, user_id, seq, type, direction, amount_micros,
                 idempotency_key, balance_before_micros, balance_after_micros, created_at)
             VALUES (gen_random_uuid(), $1, 2, 'ADJUSTMENT', 'CREDIT', 4000000, 'elsewhere',
                 1000000, 5000000, now())",
            &[&account.0],
        )
        .await
        .expect("the other writer's entry");
    client
        .execute(
            "INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros,
                 source, seq, created_at)
             VALUES (gen_random_uuid(), $1, 'PROMO', 4000000, 4000000, 'elsewhere', 2, now())",
            &[&account.0],
        )
        .await
        .expect("the other writer's grant");
    client
        .execute(
            "UPDATE credit_balances SET balance_micros = 5000000, version = 2 WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .expect("the other writer's balance");
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
    settings.journal.gather_when_idle = true;
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

/// Waits until some session of this database waits for a row lock.
pub(super) async fn a_session_waits_for_a_lock(client: &tokio_postgres::Client) -> bool {
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

/// The journal writer's backend while it waits for a row lock.
pub(super) async fn blocked_writer_pid(db: &TestDb) -> i32 {
    let client = db.client().await;
    for _ in 0..500 {
        if let Some(row) = client
            .query_opt(
                "SELECT pid FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'
                    AND query LIKE '%UPDATE credit_balances%'",
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
