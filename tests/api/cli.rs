//! The `creditd` command line against a real database, and a graceful stop
//! of the service: SIGTERM finishes in-flight requests and flushes the journal.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::*;

fn creditd(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_creditd"))
        .args(args)
        .env("CREDITD__DATABASE__URL", db.url())
        .env("CREDITD__LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run creditd")
}

fn stdout_json(output: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

#[actix::test]
async fn grant_then_balance_then_reconcile_from_the_command_line() {
    let db = TestDb::new().await;

    let migrate = creditd(&db, &["migrate"]);
    let grant = creditd(
        &db,
        &[
            "grant", "--user", "user_cli", "--amount", "12.5", "--reason", "support", "--key",
            "cli-1",
        ],
    );
    let again = creditd(
        &db,
        &[
            "grant", "--user", "user_cli", "--amount", "12.5", "--reason", "support", "--key",
            "cli-1",
        ],
    );
    let debit = creditd(
        &db,
        &[
            "grant",
            "--user",
            "user_cli",
            "--amount",
            "-2.25",
            "--reason",
            "correction",
        ],
    );
    let balance = creditd(&db, &["balance", "--user", "user_cli"]);
    let reconcile = creditd(&db, &["reconcile"]);

    assert!(migrate.status.success(), "{migrate:?}");
    assert!(grant.status.success(), "{grant:?}");
    assert_eq!(stdout_json(&grant)["amountMicros"], 12_500_000);
    assert_eq!(
        stdout_json(&again)["id"],
        stdout_json(&grant)["id"],
        "the key applies once"
    );
    assert!(debit.status.success(), "{debit:?}");
    assert_eq!(stdout_json(&balance)["balanceMicros"], 10_250_000);
    assert!(reconcile.status.success(), "{reconcile:?}");
    assert_eq!(stdout_json(&reconcile)["clean"], true);
}

#[actix::test]
async fn bad_command_line_values_are_refused_with_a_message_naming_them() {
    let db = TestDb::new().await;
    let amount = creditd(
        &db,
        &[
            "grant",
            "--user",
            "u",
            "--amount",
            "1.0000001",
            "--reason",
            "r",
        ],
    );
    let zero = creditd(
        &db,
        &["grant", "--user", "u", "--amount", "0", "--reason", "r"],
    );
    let unknown = creditd(&db, &["balance", "--user", "user_never_seen"]);
    let config = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .arg("migrate")
        .env("CREDITD__ENGINE__NO_SUCH_KEY", "1")
        .output()
        .expect("run");

    for (output, needle) in [
        (&amount, "--amount"),
        (&zero, "--amount"),
        (&unknown, "user_never_seen"),
        (&config, "engine.no_such_key"),
    ] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "`{stderr}` should name {needle}");
    }
}

#[actix::test]
async fn sigterm_finishes_in_flight_requests_and_flushes_the_journal_before_exiting() {
    let db = TestDb::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let mut child = Command::new(env!("CARGO_BIN_EXE_creditd"))
        .env("CREDITD__DATABASE__URL", db.url())
        .env("CREDITD__SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("CREDITD__ADMIN__TOKEN", ADMIN_TOKEN)
        .env("CREDITD__LOG__LEVEL", "warn")
        // The test holds balance rows locked for a moment; no lock timeout.
        .env("CREDITD__DATABASE__STATEMENT_TIMEOUT_MS", "60000")
        .env("CREDITD__SERVER__SHUTDOWN_TIMEOUT_S", "30")
        // The stop itself, without the balancer's drain before it.
        .env("CREDITD__CLUSTER__DRAIN_S", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "creditd did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let credit = |n: usize| {
        http.post(format!("{base}/admin/accounts/user_term_{}/credits", n % 4))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"amountMicros": 1_000 + n, "key": format!("term-{n}"), "reason": "stop"}))
            .send()
    };
    let client = db.client().await;
    let durable = |keys: Vec<String>| {
        let client = &client;
        async move {
            let mut stored = Vec::new();
            for key in keys {
                let count: i64 = client
                    .query_one(
                        "SELECT count(*) FROM credit_transactions WHERE idempotency_key = $1",
                        &[&key],
                    )
                    .await
                    .expect("count")
                    .get(0);
                assert!(count <= 1, "{key} stored {count} times");
                if count == 1 {
                    stored.push(key);
                }
            }
            stored
        }
    };

    // The service serves before the signal: 16 credits over 4 accounts.
    let before = futures_util::future::join_all((0..16).map(credit)).await;
    for (n, answer) in before.iter().enumerate() {
        let status = answer.as_ref().map(|r| r.status().as_u16());
        assert_eq!(
            status.ok(),
            Some(201),
            "credit {n} before the signal: {answer:?}"
        );
    }

    // The journal cannot commit while these balance rows are locked, so the
    // next credits wait inside their handlers when the signal comes.
    let locker = db.client().await;
    locker
        .batch_execute(
            "BEGIN;
             SELECT 1 FROM credit_balances
              WHERE user_id IN (SELECT id FROM users WHERE clerk_id LIKE 'user_term_%')
                FOR UPDATE;",
        )
        .await
        .expect("lock the balance rows");
    let in_flight = futures_util::future::join_all((16..64).map(credit));
    let terminate = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let waiting: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("lock waits")
                .get(0);
            if waiting > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "the journal never waited");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        // The listener closes once the stop began; only then may the
        // journal commit, so the waiting credits finish during the stop.
        let address: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        while std::net::TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
            assert!(Instant::now() < deadline, "creditd kept accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Not a wait for anything: a commit slower than the HTTP server's
        // first look at its stopping workers (after 1 s), well inside the
        // shutdown timeout, so a stop that does not wait drops them.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        locker.batch_execute("ROLLBACK").await.expect("unlock");
    };
    let (answers, ()) = futures_util::join!(in_flight, terminate);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task")
        .expect("exit status");

    assert!(
        status.success(),
        "creditd exits cleanly on SIGTERM: {status:?}"
    );
    let mut acknowledged = Vec::new();
    for (n, answer) in (16..64).zip(&answers) {
        match answer {
            Ok(response) => {
                assert_eq!(response.status(), 201, "credit {n} during the stop");
                acknowledged.push(format!("admin:term-{n}"));
            }
            Err(error) => assert!(
                error.is_connect() || error.is_request(),
                "credit {n} during the stop: {error:?}"
            ),
        }
    }
    let before_keys: Vec<String> = (0..16).map(|n| format!("admin:term-{n}")).collect();
    assert_eq!(durable(before_keys.clone()).await, before_keys);
    let stored = durable((16..64).map(|n| format!("admin:term-{n}")).collect()).await;
    assert!(
        !acknowledged.is_empty(),
        "none of the credits waiting on the journal at the signal was answered: {:?}",
        answers.first()
    );
    assert_eq!(
        stored, acknowledged,
        "every acknowledged credit is stored, and every stored one was answered"
    );
    db.reconcile_is_clean().await;
}
