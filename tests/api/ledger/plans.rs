//! What PostgreSQL does with the journal writer's statements: plans made
//! once per connection (generic), on whatever the tables hold then, and
//! kept as they grow (checked on an empty database, where a plan that
//! suits small tables would show); updates that stay on their page.

use creditd::ledger::{Journal, JOURNAL, WRITER_SESSION};
use serde_json::Value;

use crate::support::*;

/// The scans of `plan` that read a table or an index without a key to
/// look up: a sequential scan, or an index scan with no `Index Cond`.
fn unkeyed_scans(plan: &Value, found: &mut Vec<String>) {
    let kind = plan["Node Type"].as_str().unwrap_or_default();
    let relation = plan["Relation Name"]
        .as_str()
        .or(plan["Index Name"].as_str())
        .unwrap_or_default();
    let keyed = plan.get("Index Cond").is_some();
    match kind {
        "Seq Scan" | "Sample Scan" | "Tid Range Scan" => {
            found.push(format!("{kind} on {relation}"))
        }
        "Index Scan" | "Index Only Scan" | "Bitmap Index Scan" if !keyed => {
            found.push(format!("{kind} on {relation} without a key"))
        }
        _ => {}
    }
    for child in plan["Plans"].as_array().into_iter().flatten() {
        unkeyed_scans(child, found);
    }
}

/// Prepares `statement` under its name on `client`; returns how to
/// execute it with every parameter NULL.
async fn prepared(client: &tokio_postgres::Client, statement: &Journal) -> String {
    client
        .batch_execute(&format!("PREPARE {} AS {}", statement.name, statement.sql))
        .await
        .unwrap();
    let parameters = statement
        .sql
        .split('$')
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<usize>().ok()
        })
        .max()
        .unwrap_or(0);
    format!(
        "EXECUTE {}({})",
        statement.name,
        vec!["NULL"; parameters].join(", ")
    )
}

#[actix::test]
async fn every_journal_statement_planned_once_on_empty_tables_looks_rows_up_by_key() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute(WRITER_SESSION).await.unwrap();
    let mut problems = Vec::new();
    for statement in JOURNAL {
        let explain = format!(
            "EXPLAIN (FORMAT JSON) {}",
            prepared(&client, &statement).await
        );
        let row = client.query_one(&explain, &[]).await.unwrap();
        let plan: Value = row.get(0);
        let mut found = Vec::new();
        unkeyed_scans(&plan[0]["Plan"], &mut found);
        // A generic plan: what the writer's connection keeps.
        let generic = client
            .query_one(
                "SELECT generic_plans FROM pg_prepared_statements WHERE name = $1",
                &[&statement.name],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        if generic == 0 {
            found.push("planned for its parameters, not once".into());
        }
        if !found.is_empty() {
            problems.push(format!("{}: {}", statement.name, found.join("; ")));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The columns every batch rewrites, by table: no index may name them, or
/// the rewrite cannot stay on its page (a HOT update) and writes a new
/// entry into every index of the table.
const REWRITTEN: &[(&str, &[&str])] = &[
    (
        "credit_balances",
        &[
            "balance_micros",
            "held_micros",
            "version",
            "written_by",
            "updated_at",
        ],
    ),
    ("credit_grants", &["remaining_micros", "updated_at"]),
];

#[actix::test]
async fn the_columns_each_batch_rewrites_are_in_no_index_so_their_updates_stay_on_the_page() {
    let db = TestDb::new().await;
    let client = db.client().await;
    let mut problems = Vec::new();
    for (table, columns) in REWRITTEN {
        let rows = client
            .query(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1",
                &[table],
            )
            .await
            .unwrap();
        assert!(!rows.is_empty(), "{table} has no index at all");
        for row in rows {
            let (name, definition): (String, String) = (row.get(0), row.get(1));
            for column in *columns {
                if definition.contains(column) {
                    problems.push(format!("{name} names {column}: {definition}"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[actix::test]
async fn outside_a_batch_transaction_the_writers_session_refuses_every_journal_statement() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client.batch_execute(WRITER_SESSION).await.unwrap();
    let mut written = Vec::new();
    // The notification writes no row: sent alone, it would only make the
    // other instances drop a copy, which is always safe.
    for statement in JOURNAL.iter().filter(|s| s.name != "notify_accounts") {
        let execute = prepared(&client, statement).await;
        match client.batch_execute(&execute).await {
            Err(error)
                if error.code()
                    == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) => {}
            other => written.push(format!("{}: {other:?}", statement.name)),
        }
    }
    assert!(written.is_empty(), "{written:#?}");
    // Inside one, they run.
    client.batch_execute("BEGIN READ WRITE").await.unwrap();
    client
        .batch_execute("EXECUTE update_balances(NULL, NULL, NULL, NULL, NULL, NULL)")
        .await
        .unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
}
