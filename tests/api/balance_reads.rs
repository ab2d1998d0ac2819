//! The balance read without the account's mailbox: `GET /api/credits`
//! from the actor's published view, conditional (`ETag`, 304), and live
//! (`GET /api/credits/stream`, Server-Sent Events). Neither shows a change
//! whose write failed once the failure is known, nor a copy another
//! instance's write made stale; streams are bounded and end on drain.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use futures_util::future::join_all;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;

/// A balance stream read frame by frame.
struct Events {
    response: reqwest::Response,
    buffer: String,
}

impl Events {
    /// Opens `clerk_id`'s stream with `token`; panics unless it is a 200 event stream.
    async fn open_with(app: &TestApp, token: &str) -> Events {
        let response = stream_request(app, token).await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Events {
            response,
            buffer: String::new(),
        }
    }

    async fn open(app: &TestApp, clerk_id: &str) -> Events {
        Events::open_with(app, &app.token(clerk_id)).await
    }

    /// The data of the next `balance` event within `within`; `None` when
    /// none came (or the stream ended).
    async fn next_balance(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                let is_balance = frame.lines().any(|line| line == "event: balance");
                let data = frame.lines().find_map(|line| line.strip_prefix("data: "));
                if let (true, Some(data)) = (is_balance, data) {
                    return Some(serde_json::from_str(data).expect("an event's data is JSON"));
                }
            }
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) | Ok(Ok(None)) => return None,
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(Err(error)) => panic!("the stream broke: {error}"),
            }
        }
    }

    /// Whether the stream ends within `within` (whatever it sends first).
    async fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.response.chunk()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
            }
        }
    }
}

async fn stream_request(app: &TestApp, token: &str) -> reqwest::Response {
    app.http
        .get(app.url("/api/credits/stream"))
        .bearer_auth(token)
        .send()
        .await
        .expect("stream request")
}

/// `GET /api/credits` as `clerk_id`, with `If-None-Match` when given: the
/// status, the `ETag` and the body (empty for a 304).
async fn page(app: &TestApp, clerk_id: &str, held: Option<&str>) -> (u16, Option<String>, String) {
    let mut request = app
        .http
        .get(app.url("/api/credits"))
        .bearer_auth(app.token(clerk_id));
    if let Some(tag) = held {
        request = request.header("If-None-Match", tag);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let tag = response
        .headers()
        .get("etag")
        .map(|value| value.to_str().unwrap().to_owned());
    (status, tag, response.text().await.expect("body"))
}

fn balance_of(body: &str) -> i64 {
    let body: Value = serde_json::from_str(body).expect("JSON");
    body["balanceMicros"].as_i64().expect("balanceMicros")
}

/// `amount_micros` credited to `clerk_id` through the admin route on `app`, as
/// `key`: the status.
async fn admin_credit(app: &TestApp, clerk_id: &str, amount_micros: i64, key: &str) -> u16 {
    app.admin(
        reqwest::Method::POST,
        &format!("/admin/accounts/{clerk_id}/credits"),
    )
    .json(&json!({ "amountMicros": amount_micros, "key": key, "reason": "test" }))
    .send()
    .await
    .expect("credit request")
    .status()
    .as_u16()
}

#[actix::test]
async fn the_balance_page_is_answered_304_only_while_nothing_it_shows_changed() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("Hi.", 100, 50, 0, 0)),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, |s| {
        s.byok.encryption_key = creditd::config::Secret::new(STANDARD.encode([7_u8; 32]));
    })
    .await;
    fund(&app, "user_etag", 10_000_000).await;
    fund(&app, "user_etag_other", 10_000_000).await;

    let (status, tag, body) = page(&app, "user_etag", None).await;
    assert_eq!(status, 200, "{body}");
    let tag = tag.expect("a settled page carries an ETag");
    let (status, again, body) = page(&app, "user_etag", Some(&tag)).await;
    assert_eq!(
        (status, again.as_deref(), body.as_str()),
        (304, Some(tag.as_str()), "")
    );
    let (status, _, _) = page(&app, "user_etag", Some("*")).await;
    assert_eq!(status, 304);
    // Same version, another person: never this person's 304.
    let (status, other, _) = page(&app, "user_etag_other", Some(&tag)).await;
    assert_eq!(status, 200);
    assert_ne!(other.as_deref(), Some(tag.as_str()));

    // A chat.
    let (status, chat) = json_of(
        app.post_as(
            "user_etag",
            "/api/chat",
            &json!({ "messages": conversation(), "maxTokens": 100 }),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    let (status, after_chat, body) = page(&app, "user_etag", Some(&tag)).await;
    assert_eq!(status, 200);
    assert!(balance_of(&body) < 10_000_000);
    let after_chat = after_chat.expect("ETag");
    assert_ne!(after_chat, tag);
    assert_eq!(page(&app, "user_etag", Some(&after_chat)).await.0, 304);

    // A top-up (a credit).
    assert_eq!(
        admin_credit(&app, "user_etag", 5_000_000, "topup-etag").await,
        201
    );
    let (status, after_topup, _) = page(&app, "user_etag", Some(&after_chat)).await;
    assert_eq!(status, 200);
    let after_topup = after_topup.expect("ETag");
    assert_ne!(after_topup, after_chat);

    // A key of one's own saved: the version does not move, the page does.
    let saved = app
        .http
        .put(app.url("/api/settings/api-keys"))
        .bearer_auth(app.token("user_etag"))
        .json(&json!({ "anthropicKey": "sk-ant-api03-user-key-abcdefghijWXYZ" }))
        .send()
        .await
        .unwrap();
    assert_eq!(saved.status(), 200);
    let (status, after_key, body) = page(&app, "user_etag", Some(&after_topup)).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"hasByok\":true"), "{body}");
    let after_key = after_key.expect("ETag");
    assert_ne!(after_key, after_topup);
    assert_eq!(page(&app, "user_etag", Some(&after_key)).await.0, 304);
}

#[actix::test]
async fn a_credit_whose_batch_failed_is_never_shown_once_the_failure_is_known() {
    let app = spawn_app().await;
    fund(&app, "user_void", 5_000_000).await;
    let account = app.account("user_void").await;
    let mut events = Events::open(&app, "user_void").await;
    let opened = events
        .next_balance(Duration::from_secs(5))
        .await
        .expect("the opening event");
    assert_eq!(opened["balanceMicros"], 5_000_000);

    // Stall the account's next batch on its balance row, then kill it.
    let mut locker = app.db.client().await;
    let lock = locker.transaction().await.unwrap();
    lock.execute(
        "SELECT 1 FROM credit_balances WHERE user_id = $1 FOR UPDATE",
        &[&account.0],
    )
    .await
    .unwrap();
    let credit = {
        let (http, url, admin) = (
            app.http.clone(),
            app.url("/admin/accounts/user_void/credits"),
            ADMIN_TOKEN,
        );
        tokio::spawn(async move {
            http.post(url)
                .bearer_auth(admin)
                .json(&json!({ "amountMicros": 3_000_000, "key": "void", "reason": "test" }))
                .send()
                .await
                .map(|response| response.status().as_u16())
        })
    };
    let writer = crate::ledger::blocked_writer_pid(&app.db).await;
    // Applied, not durable: the page may show it (a few ms ahead) but
    // carries no ETag; the stream shows only committed states.
    let (status, tag, body) = page(&app, "user_void", None).await;
    assert_eq!((status, balance_of(&body)), (200, 8_000_000));
    assert_eq!(tag, None, "a page ahead of PostgreSQL is never validated");
    assert_eq!(
        events.next_balance(Duration::from_millis(600)).await,
        None,
        "the stream waits for the commit"
    );

    lock.execute("SELECT pg_terminate_backend($1)", &[&writer])
        .await
        .unwrap();
    lock.rollback().await.unwrap();
    assert_eq!(credit.await.unwrap().unwrap(), 503, "the credit failed");

    // Known: from now on, the durable state only.
    let (status, _, body) = page(&app, "user_void", None).await;
    assert_eq!((status, balance_of(&body)), (200, 5_000_000));
    // The next change builds on the durable state, and the stream sends it.
    assert_eq!(
        admin_credit(&app, "user_void", 1_000_000, "after").await,
        201
    );
    let mut shown = Vec::new();
    while shown.last() != Some(&6_000_000) {
        let event = events
            .next_balance(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("the next committed change never came: {shown:?}"));
        shown.push(event["balanceMicros"].as_i64().unwrap());
    }
    assert!(
        !shown.contains(&8_000_000),
        "the failed credit was sent: {shown:?}"
    );
    let (status, _, body) = page(&app, "user_void", None).await;
    assert_eq!((status, balance_of(&body)), (200, 6_000_000));
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_credit_committed_on_another_instance_reaches_the_page_and_the_stream_after_the_eviction()
{
    let app = spawn_app_with(|s| s.cluster.instance_id = "a".into()).await;
    let other = app.peer("b").await;
    fund(&app, "user_elsewhere", 2_000_000).await;
    let mut events = Events::open(&app, "user_elsewhere").await;
    let opened = events
        .next_balance(Duration::from_secs(5))
        .await
        .expect("the opening event");
    assert_eq!(opened["balanceMicros"], 2_000_000);
    let (_, tag, _) = page(&app, "user_elsewhere", None).await;
    let tag = tag.expect("ETag");

    let written = Instant::now();
    assert_eq!(
        admin_credit(&other, "user_elsewhere", 3_000_000, "elsewhere").await,
        201
    );

    // Instance a never applied it: only a reload after the eviction shows it.
    let event = events
        .next_balance(Duration::from_secs(5))
        .await
        .expect("the stream hears of the credit");
    assert_eq!(event["balanceMicros"], 5_000_000, "{event}");
    eprintln!(
        "the credit reached a's stream {:?} after its commit on b",
        written.elapsed()
    );
    let (status, after, body) = page(&app, "user_elsewhere", Some(&tag)).await;
    assert_eq!((status, balance_of(&body)), (200, 5_000_000));
    assert_ne!(after.as_deref(), Some(tag.as_str()));
    other.stop().await;
}

#[actix::test]
async fn a_thousand_streams_are_bounded_per_account_and_per_instance_and_all_end_on_drain() {
    let app = spawn_app_with(|s| {
        s.server.streams_max = 1_000;
        s.server.streams_per_account_max = 8;
        s.server.shutdown_timeout_s = 60;
        s.cluster.drain_s = 0;
    })
    .await;
    let tokens: Vec<String> = (0..125)
        .map(|i| app.token(&format!("user_many_{i}")))
        .collect();
    let mut opened = Vec::new();
    for batch in 0..10 {
        // A hundred at a time: the listen backlog is not what is tested.
        let streams = (batch * 100..(batch + 1) * 100)
            .map(|i| Events::open_with(&app, &tokens[i % tokens.len()]));
        opened.extend(join_all(streams).await);
    }
    assert_eq!(opened.len(), 1_000);

    // A ninth of one account: its own tabs hold the streams.
    let over_account = stream_request(&app, &tokens[0]).await;
    assert_eq!(over_account.status(), 429);
    assert!(over_account.headers().contains_key("retry-after"));
    let (_, body) = json_of(over_account).await;
    assert_eq!(body["error"], "RATE_LIMITED");
    // Another account, the instance full: its capacity.
    let over_instance = stream_request(&app, &app.token("user_many_late")).await;
    assert_eq!(over_instance.status(), 503);
    assert!(over_instance.headers().contains_key("retry-after"));
    let (_, body) = json_of(over_instance).await;
    assert_eq!(body["error"], "UNAVAILABLE");

    let started = Instant::now();
    let drain = actix_web::rt::spawn(app.drain.clone().run());
    let ended = join_all(
        opened
            .into_iter()
            .map(|mut events| async move { events.ends_within(Duration::from_secs(10)).await }),
    )
    .await;
    assert!(
        ended.iter().all(|&ended| ended),
        "{} streams still open",
        ended.iter().filter(|&&e| !e).count()
    );
    drain.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the graceful stop waited {:?} for streams",
        started.elapsed()
    );
}
