//! The journal writer: batches, entries the database refuses, batches
//! that fail in flight, entries not yet committed.

use std::sync::Arc;
use std::time::Duration;

use creditd::ledger::{HoldId, LedgerError, TransactionType};

use crate::support::*;

use super::*;

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
    settings.journal.gather_when_idle = true;
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
    // Sent at once, the reused hold id raised and rolled the batch back;
    // written again statement by statement, only its account was refused.
    assert_eq!(
        after.batches_rewritten,
        before.batches_rewritten + 1,
        "{before:?} → {after:?}"
    );

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
    settings.journal.gather_when_idle = true;
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
    move_on_elsewhere(&foreign, account).await;
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
async fn a_key_replayed_while_its_first_entry_is_still_uncommitted_applies_once() {
    let db = TestDb::new().await;
    let mut settings = settings();
    // One key in memory: the entry in flight must be the one it keeps.
    settings.engine.recent_keys = 1;
    let engine = Arc::new(db.engine(&settings));
    let account = db.user("user_replay_in_flight").await;
    engine
        .credit(
            account,
            posting("seed", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();

    // Stall the journal on the account's balance row: the first top-up is
    // applied by the actor and sent, but not committed.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();
    let first = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .credit(
                    account,
                    posting("top-up-1", TransactionType::TopUp, micros(500)),
                )
                .await
        })
    };
    blocked_writer_pid(&db).await;

    // Another key (which would push the first out of a memory that forgot
    // entries in flight), then the replay, then a hold answered as soon as
    // it is applied: when it answers, the actor has taken the other two.
    let probe = HoldId::generate();
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let later = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let admitted = async {
                let admitted = engine.admit(account, probe, micros(1)).await;
                let _ = taken_tx.send(());
                admitted
            };
            futures_util::join!(
                engine.credit(
                    account,
                    posting("top-up-2", TransactionType::TopUp, micros(200)),
                ),
                engine.credit(
                    account,
                    posting("top-up-1", TransactionType::TopUp, micros(500)),
                ),
                admitted,
            )
        })
    };
    taken_rx.await.expect("the probe hold was applied");
    assert!(
        !first.is_finished(),
        "the first top-up answered before its commit"
    );
    lock.rollback().await.unwrap();

    let first = first.await.unwrap().expect("the first top-up");
    let (other, replay, admitted) = later.await.unwrap();
    assert!(!first.replayed);
    other.expect("the other top-up");
    admitted.expect("the probe hold");
    let replay = replay.expect("the replay answers like the first");
    assert!(replay.replayed, "the replay applied again");
    assert_eq!(replay.record.id, first.record.id);
    assert_eq!(replay.record.seq, first.record.seq);
    let rows: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM credit_transactions
              WHERE user_id = $1 AND idempotency_key = 'top-up-1'",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    engine.release(account, probe).await.unwrap();
    let snapshot = engine.balance(account).await.unwrap();
    assert_eq!(snapshot.balance_micros, micros(1_700));
    assert_eq!(snapshot.held_micros, micros(0));
    db.reconcile_is_clean().await;
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
    // The actor sends the held-back hold, then the settlement: the writer,
    // woken by the hold, waits this long for what follows it, long enough
    // for the actor's thread to be scheduled again on a loaded machine, and
    // shorter than the provider's pause below, so that a hold sent at once
    // still commits without its settlement.
    settings.journal.batch_delay_us = 100_000;
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
    tokio::time::sleep(Duration::from_millis(300)).await;
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

#[actix::test]
async fn a_settlement_is_answered_only_once_committed_and_a_failed_commit_answers_an_error_never_ok(
) {
    let db = TestDb::new().await;
    let engine = Arc::new(db.engine(&settings()));
    let account = db.user("user_ledger_settle_fails").await;
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine.admit(account, hold, micros(300)).await.unwrap();
    // Nothing of this account can commit while its balance row is locked.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();
    let settle = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.settle(account, hold, charge(250)).await })
    };
    let writer = blocked_writer_pid(&db).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Catches a caller answered once the actor applied the settlement
    // rather than once the writer committed it.
    assert!(
        !settle.is_finished(),
        "a settlement was answered before its commit"
    );
    lock.execute("SELECT pg_terminate_backend($1)", &[&writer])
        .await
        .unwrap();
    lock.rollback().await.unwrap();

    let answer = settle.await.unwrap();
    assert!(
        matches!(answer, Err(LedgerError::Unavailable(_))),
        "a settlement whose batch failed was answered {answer:?}"
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
    assert_eq!(usages, 0, "the failed batch wrote nothing");
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_lone_operation_commits_at_once_instead_of_waiting_out_the_gathering_delay() {
    let db = TestDb::new().await;
    let mut settings = settings();
    // A gathering delay no caller could miss.
    settings.journal.batch_delay_us = 3_000_000;
    let engine = db.engine(&settings);
    let account = db.user("user_ledger_lone_commit").await;
    let started = std::time::Instant::now();
    engine
        .credit(
            account,
            posting("k1", TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "a lone credit waited {:?} for company",
        started.elapsed()
    );
    // A chat: its hold (which waits for company) and its settlement, which
    // joins it; the batch commits as soon as the settlement is in.
    let hold = HoldId::generate();
    let started = std::time::Instant::now();
    engine.admit(account, hold, micros(300)).await.unwrap();
    let settled = engine.settle(account, hold, charge(120)).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "a chat's settlement waited {:?} for company",
        started.elapsed()
    );
    assert_eq!(settled.record.held_micros, micros(300));
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_batch_the_database_refuses_as_a_whole_is_rolled_back_and_its_connection_writes_the_next_one(
) {
    let db = TestDb::new().await;
    let mut settings = settings();
    // One connection: the next batch is written where the refused one was.
    settings.journal.writers = 1;
    settings.journal.pipeline_depth = 1;
    let engine = Arc::new(db.engine(&settings));
    let refused = db.user("user_batch_refused_whole").await;
    let next = db.user("user_batch_after_refusal").await;
    // A refusal the writer's own checks cannot foresee: the whole
    // statement fails, not one row.
    db.client()
        .await
        .batch_execute(
            "CREATE FUNCTION refuse_key() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.idempotency_key = 'refused-by-trigger' THEN
                 RAISE EXCEPTION 'refused by the test';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_key BEFORE INSERT ON credit_transactions
               FOR EACH ROW EXECUTE FUNCTION refuse_key();",
        )
        .await
        .unwrap();
    let error = engine
        .credit(
            refused,
            posting("refused-by-trigger", TransactionType::TopUp, micros(500)),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("not committed"), "{error}");
    for account in [next, refused] {
        engine
            .credit(
                account,
                posting("after-the-refusal", TransactionType::TopUp, micros(700)),
            )
            .await
            .unwrap();
    }
    let client = db.client().await;
    for account in [next, refused] {
        let row = client
            .query_one(
                "SELECT b.balance_micros,
                        (SELECT count(*) FROM credit_transactions t WHERE t.user_id = b.user_id)
                   FROM credit_balances b WHERE b.user_id = $1",
                &[&account.0],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (700, 1),
            "account {account:?}: only the credit after the refusal is durable"
        );
    }
}

#[actix::test]
async fn an_account_this_instance_wrote_last_commits_each_batch_at_once_and_a_refused_batch_writes_nothing_before_its_rewrite(
) {
    let db = TestDb::new().await;
    let mut settings = settings();
    settings.journal.writers = 1;
    // Each operation is its own batch.
    settings.journal.hold_delay_us = 0;
    let engine = db.engine(&settings);
    let account = db.user("user_batches_at_once").await;
    // Its first batch takes the balance row over from nobody: the other
    // instances are told, in the same round trip.
    engine
        .credit(account, posting("seed", TransactionType::TopUp, eur(10)))
        .await
        .unwrap();
    let before = engine.writer().stats();
    assert_eq!(before.batches_rewritten, 0, "{before:?}");

    // Every kind of row: a credit with its grant, a hold placed in one batch
    // and settled in the next (a usage, a finished hold, grants spent from,
    // a low-balance event), a hold released.
    engine
        .credit(
            account,
            posting("promo", TransactionType::PromoBonus, micros(500)),
        )
        .await
        .unwrap();
    let hold = HoldId::generate();
    engine.reserve(account, hold, eur(9)).await.unwrap();
    engine
        .settle(account, hold, charge(8_800_000))
        .await
        .unwrap();
    let released = HoldId::generate();
    engine
        .reserve(account, released, micros(100))
        .await
        .unwrap();
    engine.release(account, released).await.unwrap();
    assert!(engine.writer().flush(Duration::from_secs(5)).await);
    let after = engine.writer().stats();
    assert_eq!(
        after.batches_rewritten, before.batches_rewritten,
        "every batch committed as sent at once: {before:?} → {after:?}"
    );
    assert!(
        after.batches_committed > before.batches_committed,
        "{before:?} → {after:?}"
    );
    let client = db.client().await;
    let events: i64 = client
        .query_one(
            "SELECT count(*) FROM outgoing_events WHERE user_id = $1 AND type = 'balance.low'",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        events, 1,
        "the low-balance event was written with its batch"
    );

    // A batch PostgreSQL refuses at once (a finished hold id used again,
    // which only the database knows) rolls back whole: the account is
    // refused, nothing of it is written, not even the balance row's move.
    let version: i64 = client
        .query_one(
            "SELECT version FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0);
    let mut forgetful = settings.clone();
    forgetful.engine.recent_keys = 1;
    drop(engine);
    let engine = db.engine(&forgetful);
    let refused = engine.reserve(account, hold, micros(100)).await;
    assert!(
        matches!(refused, Err(LedgerError::Unavailable(_))),
        "{refused:?}"
    );
    let stats = engine.writer().stats();
    assert_eq!(stats.batches_rewritten, 1, "{stats:?}");
    assert_eq!(stats.accounts_refused, 1, "{stats:?}");
    let row = client
        .query_one(
            "SELECT version, (SELECT count(*) FROM credit_holds WHERE user_id = $1)
               FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (version, 2),
        "the refused batch left no trace"
    );
    db.reconcile_is_clean().await;
}
