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
    let requests = (0..64).map(|n| {
        http.post(format!("{base}/admin/accounts/user_term_{}/credits", n % 4))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"amountMicros": 1_000 + n, "key": format!("term-{n}"), "reason": "stop"}))
            .send()
    });
    let in_flight = futures_util::future::join_all(requests);
    let terminate = async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
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
    let acknowledged: Vec<String> = answers
        .into_iter()
        .enumerate()
        .filter(|(_, answer)| answer.as_ref().is_ok_and(|r| r.status().as_u16() == 201))
        .map(|(n, _)| format!("admin:term-{n}"))
        .collect();
    let client = db.client().await;
    for key in &acknowledged {
        let count: i64 = client
            .query_one(
                "SELECT count(*) FROM credit_transactions WHERE idempotency_key = $1",
                &[key],
            )
            .await
            .expect("count")
            .get(0);
        assert_eq!(count, 1, "acknowledged {key} is stored");
    }
    db.reconcile_is_clean().await;
}
