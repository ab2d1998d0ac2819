//! Several instances on one database: a write on one instance evicts the
//! other's copy of the account (LISTEN/NOTIFY), so every copy that answers
//! is current; loads read one snapshot; a lost listener drops every copy.

use std::time::{Duration, Instant};

use creditd::ledger::{AccountId, Engine, Eviction, HoldId, LedgerError, TransactionType};
use futures_util::future::join_all;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::ledger::charge;
use crate::support::*;

/// Polls `engine`'s balance of `account` until it is `expected`; the time
/// it took, or a panic after two seconds.
async fn until_balance(engine: &Engine, account: AccountId, expected: i64) -> Duration {
    let started = Instant::now();
    loop {
        let seen = engine.balance(account).await.unwrap().balance_micros.get();
        if seen == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the instance still reads {seen}, PostgreSQL has {expected}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Engines "a" and "b" on `db`, once both hear each other's writes.
async fn two_instances(db: &TestDb) -> (Engine, Engine) {
    let a = db.engine_as(&settings(), "a");
    let b = db.engine_as(&settings(), "b");
    wait_until(|| a.listening() && b.listening()).await;
    (a, b)
}

async fn stored_balance(db: &TestDb, account: AccountId) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT balance_micros FROM credit_balances WHERE user_id = $1",
            &[&account.0],
        )
        .await
        .unwrap()
        .get(0)
}

#[actix::test]
async fn a_credit_on_one_instance_is_spendable_at_once_on_another() {
    let db = TestDb::new().await;
    let (a, b) = two_instances(&db).await;
    let account = db.user("user_cluster_1").await;
    a.credit(account, posting("c1", TransactionType::TopUp, micros(1)))
        .await
        .unwrap();
    let refused = a.reserve(account, HoldId::generate(), eur(1)).await;
    assert!(
        matches!(refused, Err(LedgerError::InsufficientCredits { .. })),
        "{refused:?}"
    );

    b.credit(account, posting("c2", TransactionType::TopUp, eur(5)))
        .await
        .unwrap();

    until_balance(&a, account, 5_000_001).await;
    a.reserve(account, HoldId::generate(), eur(1))
        .await
        .expect("the credit made on b is spendable on a");
}

#[actix::test]
async fn an_instance_that_only_read_an_account_hears_of_every_later_write_elsewhere() {
    let db = TestDb::new().await;
    let (a, b) = two_instances(&db).await;
    let account = db.user("user_cluster_2").await;
    b.credit(account, posting("c1", TransactionType::TopUp, eur(1)))
        .await
        .unwrap();
    until_balance(&a, account, 1_000_000).await;

    // b stays the account's writer: only a's read since tells b to notify.
    b.credit(account, posting("c2", TransactionType::TopUp, eur(2)))
        .await
        .unwrap();

    until_balance(&a, account, 3_000_000).await;
}

#[actix::test]
async fn parallel_credits_and_chats_over_two_instances_all_land_once_and_both_read_the_stored_balance(
) {
    let db = TestDb::new().await;
    let (a, b) = two_instances(&db).await;
    let account = db.user("user_cluster_3").await;
    let operations = (0..120).map(|i| {
        let engine = if i % 2 == 0 { &a } else { &b };
        async move {
            // A reset or a fenced write answers Unavailable: the caller
            // retries with the same key, as the HTTP clients do.
            for _ in 0..50 {
                let applied = if i % 3 == 0 {
                    let hold = HoldId::generate();
                    match engine.admit(account, hold, micros(1_000)).await {
                        Ok(_) => engine
                            .settle(account, hold, charge(700))
                            .await
                            .map(|_| -700),
                        Err(error) => Err(error),
                    }
                } else {
                    engine
                        .credit(
                            account,
                            posting(&format!("p{i}"), TransactionType::TopUp, micros(10_000)),
                        )
                        .await
                        .map(|_| 10_000)
                };
                match applied {
                    Ok(amount) => return amount,
                    Err(
                        LedgerError::Unavailable(_)
                        | LedgerError::Overloaded
                        | LedgerError::InsufficientCredits { .. },
                    ) => tokio::time::sleep(Duration::from_millis(5)).await,
                    Err(error) => panic!("operation {i}: {error}"),
                }
            }
            panic!("operation {i} never applied");
        }
    });
    let expected: i64 = join_all(operations).await.into_iter().sum();

    assert_eq!(stored_balance(&db, account).await, expected);
    until_balance(&a, account, expected).await;
    until_balance(&b, account, expected).await;
    db.reconcile_is_clean().await;
}

#[actix::test]
async fn losing_the_notification_listener_drops_every_resident_account() {
    let db = TestDb::new().await;
    let a = db.engine_as(&settings(), "a");
    // Once listening: the listener's start drops every copy loaded before.
    wait_until(|| a.listening()).await;
    for name in ["user_cluster_4", "user_cluster_5", "user_cluster_6"] {
        let account = db.user(name).await;
        a.balance(account).await.unwrap();
    }
    assert_eq!(a.stats().resident_actors, 3);

    db.client()
        .await
        .execute(
            // This test's database only: other tests' instances listen too.
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
              WHERE application_name = 'creditd-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();

    wait_until(|| a.stats().resident_actors == 0).await;
    wait_until(|| a.listening()).await;
}

#[actix::test]
async fn loads_racing_commits_elsewhere_never_read_a_torn_account() {
    creditd::app::metrics_handle().unwrap();
    let db = TestDb::new().await;
    let (a, b) = two_instances(&db).await;
    let account = db.user("user_cluster_8").await;
    b.credit(account, posting("c1", TransactionType::TopUp, eur(100)))
        .await
        .unwrap();
    let done = std::sync::atomic::AtomicBool::new(false);
    let raced = std::sync::atomic::AtomicUsize::new(0);
    // At least 300 chats, and on until more than ten loads raced them (a
    // loaded machine may run many chats per load), up to 5,000.
    let chats = async {
        for i in 0..5_000 {
            if i >= 300 && raced.load(std::sync::atomic::Ordering::Acquire) > 10 {
                break;
            }
            let hold = HoldId::generate();
            if b.admit(account, hold, micros(5_000)).await.is_ok() {
                b.settle(account, hold, charge(3_001)).await.unwrap();
            }
        }
        done.store(true, std::sync::atomic::Ordering::Release);
    };
    let loads = async {
        let mut loads = 0;
        while !done.load(std::sync::atomic::Ordering::Acquire) {
            a.directory()
                .evict(account, i64::MAX, Eviction::WrittenElsewhere);
            match a.balance(account).await {
                Ok(_) => {
                    loads += 1;
                    raced.store(loads, std::sync::atomic::Ordering::Release);
                }
                // Each of b's commits makes a's fresh copy stale again: a
                // hot account read on one instance and written on another
                // may be answered "retry".
                Err(LedgerError::Unavailable(reason)) if reason.contains("kept resetting") => {}
                Err(error) => panic!("load {loads} failed: {error}"),
            }
        }
        loads
    };
    let ((), loads) = tokio::join!(chats, loads);
    assert!(loads > 10, "only {loads} loads raced the chats");
    let metrics = creditd::app::metrics_handle().unwrap().render();
    assert!(
        !metrics.contains("creditd_account_loads_retried_total"),
        "a load read an inconsistent account: {metrics}"
    );
    db.reconcile_is_clean().await;
}

/// Polls `condition` every few milliseconds; panics after five seconds.
async fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "condition never held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[actix::test]
async fn a_chat_refused_for_credits_is_served_once_another_instance_credited_the_account() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message(
            "Here it is.",
            100,
            50,
            0,
            0,
        )))
        .mount(&fakes.anthropic)
        .await;
    let a = app_with(&fakes, |s| s.cluster.instance_id = "a".into()).await;
    let b = a.peer("b").await;
    fund(&a, "user_cluster_9", 1).await;
    let chat = json!({ "messages": conversation(), "maxTokens": 1000 });
    let (status, _) = json_of(a.post_as("user_cluster_9", "/api/chat", &chat).await).await;
    assert_eq!(status, 402);

    fund(&b, "user_cluster_9", 5_000_000).await;

    let started = Instant::now();
    loop {
        let (status, body) = json_of(a.post_as("user_cluster_9", "/api/chat", &chat).await).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 402, "{body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still refused after the credit elsewhere"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let page = balance(&a, "user_cluster_9").await;
    assert!(
        page["balanceMicros"].as_i64().unwrap() > 4_900_000,
        "{page}"
    );
    let metrics = a.metrics().await;
    assert!(
        metrics.contains("creditd_accounts_evicted_total{reason=\"written_elsewhere\"}"),
        "{metrics}"
    );
}

/// The delay between a write's acknowledgement on one instance and a read
/// on the other that shows it (the notification's trip), over 100 writes.
#[actix::test]
async fn the_delay_before_another_instance_reads_a_write_is_measured() {
    let db = TestDb::new().await;
    let (a, b) = two_instances(&db).await;
    let account = db.user("user_cluster_10").await;
    let mut delays = Vec::new();
    let mut expected = 0;
    for i in 0..100 {
        a.balance(account).await.unwrap();
        b.credit(
            account,
            posting(&format!("d{i}"), TransactionType::TopUp, micros(1_000)),
        )
        .await
        .unwrap();
        expected += 1_000;
        delays.push(until_balance(&a, account, expected).await);
    }
    delays.sort();
    eprintln!(
        "notification delay over {} writes: p50 {:?}, p99 {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays[delays.len() * 99 / 100],
        delays[delays.len() - 1]
    );
}

#[actix::test]
async fn an_account_evicted_with_a_write_in_flight_loads_again_only_once_that_write_settled() {
    let db = TestDb::new().await;
    let a = db.engine_as(&settings(), "a");
    let account = db.user("user_cluster_in_flight").await;
    a.credit(account, posting("c1", TransactionType::TopUp, eur(10)))
        .await
        .unwrap();
    // The next batch waits behind this lock: the credit below is applied
    // by the actor and in flight, not committed.
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();

    let credit = a.credit(account, posting("c2", TransactionType::TopUp, eur(10)));
    let evicted_then_read = async {
        wait_until(|| {
            a.directory()
                .summary(account)
                .is_some_and(|s| s.balance_micros.get() == 20_000_000)
        })
        .await;
        // Evicted (another instance's write, a lost listener) while its
        // credit is in flight: the next copy must not load before it lands.
        assert!(a
            .directory()
            .evict(account, i64::MAX, Eviction::WrittenElsewhere));
        let read = a.balance(account);
        let release = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            lock.commit().await.unwrap();
        };
        let (read, ()) = futures_util::future::join(read, release).await;
        read.unwrap()
    };
    let (credited, read) = futures_util::future::join(credit, evicted_then_read).await;

    credited.unwrap();
    assert_eq!(stored_balance(&db, account).await, 20_000_000);
    assert_eq!(
        read.balance_micros.get(),
        20_000_000,
        "the copy loaded after the eviction includes the credit that was in flight"
    );
    db.reconcile_is_clean().await;
}

/// Every payload sent on the accounts channel of `db`, as it arrives.
async fn listen_to_accounts(
    db: &TestDb,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (client, mut connection) = db.config.connect(tokio_postgres::NoTls).await.unwrap();
    let (sent, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(message) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let Ok(tokio_postgres::AsyncMessage::Notification(notification)) = message {
                let _ = sent.send(notification.payload().to_owned());
            }
        }
    });
    client
        .batch_execute(&format!(
            "LISTEN {}",
            creditd::ledger::cluster::ACCOUNTS_CHANNEL
        ))
        .await
        .unwrap();
    (client, received)
}

#[actix::test]
async fn a_batch_taking_over_hundreds_of_accounts_at_once_notifies_every_one_within_the_payload_limit(
) {
    let db = TestDb::new().await;
    let mut settings = settings();
    // One writer gathering for long enough that the first writes of every
    // account share a batch or two.
    settings.journal.writers = 1;
    settings.journal.batch_delay_us = 100_000;
    settings.journal.gather_when_idle = true;
    // Every account loads at once, through the pool's few connections.
    settings.database.pool_wait_timeout_ms = 20_000;
    let engine = db.engine_as(&settings, "taker");
    wait_until(|| engine.listening()).await;
    let mut accounts = Vec::new();
    for index in 0..300 {
        accounts.push(db.user(&format!("user_taken_over_{index}")).await);
    }
    let (_listener, mut payloads) = listen_to_accounts(&db).await;
    let before = engine.writer().stats();
    let credits = accounts.iter().map(|&account| {
        engine.credit(
            account,
            posting("taken-over", TransactionType::TopUp, micros(1_000)),
        )
    });
    for credited in join_all(credits).await {
        credited.unwrap();
    }
    let after = engine.writer().stats();
    assert_eq!(
        after.batches_rewritten, before.batches_rewritten,
        "taking accounts over is written at once: {before:?} → {after:?}"
    );
    let batches = after.batches_committed - before.batches_committed;
    let mut heard = std::collections::BTreeMap::new();
    let mut notifications = 0;
    while heard.len() < accounts.len() {
        let payload = tokio::time::timeout(Duration::from_secs(5), payloads.recv())
            .await
            .unwrap_or_else(|_| panic!("{} of 300 accounts notified", heard.len()))
            .unwrap();
        assert!(payload.len() < 8_000, "{} bytes", payload.len());
        let (writer, written) = creditd::ledger::cluster::parse_payload(&payload)
            .unwrap_or_else(|| panic!("unreadable payload {payload}"));
        assert_eq!(writer, "taker");
        for (account, version) in written {
            assert_eq!(heard.insert(account, version), None, "{account:?} twice");
        }
        notifications += 1;
    }
    for account in &accounts {
        assert_eq!(heard.get(account), Some(&1), "{account:?}");
    }
    // More notifications than batches: a batch's accounts were split.
    assert!(
        notifications > batches,
        "{notifications} notifications for {batches} batches"
    );
}
