//! History pages: newest first, opaque cursors, every entry exactly once
//! even while new entries arrive.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::json;

use crate::support::*;

async fn credit(app: &TestApp, user: &str, key: &str) {
    let response = app
        .admin(Method::POST, &format!("/admin/accounts/{user}/credits"))
        .json(&json!({"amountMicros": 10_000, "key": key, "reason": "history"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 201);
}

#[actix::test]
async fn paging_returns_every_entry_exactly_once_while_entries_are_being_added() {
    let app = spawn_app().await;
    for index in 0..45 {
        credit(&app, "user_pages", &format!("before-{index}")).await;
    }
    let writer = async {
        for index in 0..30 {
            credit(&app, "user_pages", &format!("during-{index}")).await;
        }
    };
    let reader = async {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(cursor) => format!("/api/credits/transactions?limit=10&cursor={cursor}"),
                None => "/api/credits/transactions?limit=10".to_owned(),
            };
            let (status, page) = json_of(app.get_as("user_pages", &path).await).await;
            assert_eq!(status, 200, "{page}");
            for item in page["items"].as_array().expect("items") {
                seen.push(item["id"].as_str().expect("id").to_owned());
            }
            match page["nextCursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        seen
    };
    let ((), seen) = futures_util::join!(writer, reader);

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no entry appears twice");
    let client = app.db.client().await;
    let before: Vec<String> = client
        .query(
            "SELECT id::text FROM credit_transactions WHERE idempotency_key LIKE 'admin:before-%'",
            &[],
        )
        .await
        .expect("rows")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(before.len(), 45);
    for id in &before {
        assert!(
            unique.contains(id),
            "entry {id} present before paging was missed"
        );
    }
}

#[actix::test]
async fn pages_are_newest_first_and_the_last_page_has_no_cursor() {
    let app = spawn_app().await;
    for index in 0..5 {
        credit(&app, "user_order", &format!("k{index}")).await;
    }
    let (_, first) = json_of(
        app.get_as("user_order", "/api/credits/transactions?limit=3")
            .await,
    )
    .await;
    let cursor = first["nextCursor"]
        .as_str()
        .expect("a full page has a cursor");
    let (_, second) = json_of(
        app.get_as(
            "user_order",
            &format!("/api/credits/transactions?limit=3&cursor={cursor}"),
        )
        .await,
    )
    .await;

    let balances: Vec<i64> = first["items"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(second["items"].as_array().into_iter().flatten())
        .map(|item| item["balanceAfterMicros"].as_i64().expect("balance"))
        .collect();
    assert_eq!(balances, vec![50_000, 40_000, 30_000, 20_000, 10_000]);
    assert!(second["nextCursor"].is_null());
}

#[actix::test]
async fn bad_paging_parameters_are_refused_by_name() {
    let app = spawn_app().await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        ("offset=10", "offset"),
    ] {
        for route in ["/api/credits/transactions", "/api/credits/usages"] {
            let (status, body) =
                json_of(app.get_as("user_q", &format!("{route}?{query}")).await).await;
            assert_eq!(status, 400, "{route}?{query}: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(field), "{route}?{query}: {message}");
        }
    }
}
