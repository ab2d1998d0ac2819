//! Users' own provider keys: saved sealed, shown by their last 4
//! characters, used for chats that are never held nor charged.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::support::*;
use creditd::accounts::KeyCipher;
use creditd::config::{Secret, Settings};
use creditd::pricing::Provider;

const USER_ANTHROPIC_KEY: &str = "sk-ant-api03-user-key-abcdefghijWXYZ";
const USER_OPENAI_KEY: &str = "sk-proj-user-key-0123456789wxyz";
const ENCRYPTION_KEY: [u8; 32] = [42; 32];

fn with_byok(settings: &mut Settings) {
    settings.byok.encryption_key = Secret::new(STANDARD.encode(ENCRYPTION_KEY));
}

async fn put_keys(
    app: &TestApp,
    clerk_id: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = app
        .http
        .put(app.url("/api/settings/api-keys"))
        .bearer_auth(app.token(clerk_id))
        .json(body)
        .send()
        .await
        .expect("request");
    json_of(response).await
}

async fn stored_column(app: &TestApp, clerk_id: &str, column: &str) -> Option<Vec<u8>> {
    let client = app.db.client().await;
    let sql = match column {
        "anthropic_key_encrypted" => {
            "SELECT anthropic_key_encrypted FROM users WHERE clerk_id = $1"
        }
        "openai_key_encrypted" => "SELECT openai_key_encrypted FROM users WHERE clerk_id = $1",
        other => panic!("no query for column `{other}`"),
    };
    client
        .query_one(sql, &[&clerk_id])
        .await
        .expect("user row")
        .get(0)
}

#[actix::test]
async fn saved_keys_are_stored_sealed_and_shown_only_by_their_last_four_characters() {
    let fakes = fakes().await;
    let app = app_with(&fakes, with_byok).await;

    let (status, saved) = put_keys(
        &app,
        "user_k",
        &json!({ "anthropicKey": USER_ANTHROPIC_KEY, "openaiKey": USER_OPENAI_KEY }),
    )
    .await;
    let (_, listed) = json_of(app.get_as("user_k", "/api/settings/api-keys").await).await;
    let (_, overview) = json_of(app.get_as("user_k", "/api/credits").await).await;

    assert_eq!(status, 200, "{saved}");
    assert_eq!(saved, listed);
    assert_eq!(listed["anthropic"], json!({ "set": true, "last4": "WXYZ" }));
    assert_eq!(listed["openai"], json!({ "set": true, "last4": "wxyz" }));
    assert!(!listed.to_string().contains("user-key"));
    assert_eq!(overview["hasByok"], true);
    for (column, key, provider) in [
        (
            "anthropic_key_encrypted",
            USER_ANTHROPIC_KEY,
            Provider::Anthropic,
        ),
        ("openai_key_encrypted", USER_OPENAI_KEY, Provider::Openai),
    ] {
        let stored = stored_column(&app, "user_k", column).await.expect("stored");
        assert!(
            !stored.windows(key.len()).any(|w| w == key.as_bytes()),
            "{column} holds the plaintext"
        );
        let account = app.account("user_k").await;
        let opened = KeyCipher::from_bytes(&ENCRYPTION_KEY)
            .unwrap()
            .open(account, provider, &stored)
            .unwrap();
        assert_eq!(opened, key);
    }

    let response = app
        .http
        .delete(app.url("/api/settings/api-keys/anthropic"))
        .bearer_auth(app.token("user_k"))
        .send()
        .await
        .unwrap();
    let (status, after) = json_of(response).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["anthropic"], json!({ "set": false, "last4": null }));
    assert_eq!(after["openai"]["set"], true);
    assert!(stored_column(&app, "user_k", "anthropic_key_encrypted")
        .await
        .is_none());
}

#[actix::test]
async fn keys_of_the_wrong_shape_are_refused_by_field_without_echoing_them() {
    let fakes = fakes().await;
    let app = app_with(&fakes, with_byok).await;

    for (body, field) in [
        (
            json!({ "anthropicKey": "sk-proj-not-anthropic-0123456789" }),
            "anthropicKey",
        ),
        (json!({ "openaiKey": "short" }), "openaiKey"),
        (
            json!({ "openaiKey": "sk-ant-api03-this-is-anthropic-123" }),
            "openaiKey",
        ),
        (
            json!({ "openaiKey": "sk-with spaces 0123456789abcdef" }),
            "openaiKey",
        ),
        (json!({}), "anthropicKey"),
        (json!({ "geminiKey": "x" }), "geminiKey"),
    ] {
        let (status, answer) = put_keys(&app, "user_shape", &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains(field), "{field}: {message}");
        assert!(!message.contains("0123456789"), "{message}");
    }
    assert!(stored_column(&app, "user_shape", "openai_key_encrypted")
        .await
        .is_none());
}

#[actix::test]
async fn a_byok_chat_uses_the_users_key_and_never_holds_or_charges() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", USER_ANTHROPIC_KEY))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("mine", 100, 100, 0, 0)),
        )
        .expect(1)
        .mount(&fakes.anthropic)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .and(header(
            "authorization",
            format!("Bearer {USER_OPENAI_KEY}").as_str(),
        ))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(openai_completion("mine too", 10, 10, 0)),
        )
        .expect(1)
        .mount(&fakes.openai)
        .await;
    let app = app_with(&fakes, with_byok).await;
    fund(&app, "user_own", 1_000_000).await;
    put_keys(
        &app,
        "user_own",
        &json!({ "anthropicKey": USER_ANTHROPIC_KEY, "openaiKey": USER_OPENAI_KEY }),
    )
    .await;

    let (first_status, first) = json_of(
        app.post_as(
            "user_own",
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;
    let (second_status, second) = json_of(
        app.post_as(
            "user_own",
            "/api/chat",
            &json!({ "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(first_status, 200, "{first}");
    assert_eq!(first["content"], "mine");
    assert_eq!(first["model"], "claude-sonnet-4-5");
    assert!(first.get("credits").is_none(), "{first}");
    assert_eq!(second_status, 200, "{second}");
    assert_eq!(second["model"], "gpt-4o-mini");
    assert!(second.get("credits").is_none(), "{second}");
    assert_eq!(count(&app, "credit_holds", "user_own").await, 0);
    assert_eq!(count(&app, "credit_usages", "user_own").await, 0);
    let (_, overview) = json_of(app.get_as("user_own", "/api/credits").await).await;
    assert_eq!(overview["balanceMicros"], 1_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_byok_key_the_provider_refuses_answers_400_telling_the_user() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(anthropic_error("authentication_error", "invalid x-api-key")),
        )
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, with_byok).await;
    put_keys(
        &app,
        "user_revoked",
        &json!({ "anthropicKey": USER_ANTHROPIC_KEY }),
    )
    .await;

    let (status, body) = json_of(
        app.post_as(
            "user_revoked",
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "BYOK_KEY_REFUSED");
    assert!(
        body["message"].as_str().unwrap().contains("your API key"),
        "{body}"
    );
    assert_eq!(count(&app, "credit_holds", "user_revoked").await, 0);
}

#[actix::test]
async fn a_wrong_encryption_key_fails_clearly_instead_of_using_garbage() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(anthropic_message("x", 1, 1, 0, 0)))
        .expect(0)
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, with_byok).await;
    let account = app.account("user_rotated").await;
    let sealed = KeyCipher::from_bytes(&[7; 32])
        .unwrap()
        .seal(account, Provider::Anthropic, USER_ANTHROPIC_KEY)
        .unwrap();
    app.db
        .client()
        .await
        .execute(
            "UPDATE users SET anthropic_key_encrypted = $2 WHERE id = $1",
            &[&account.0, &sealed],
        )
        .await
        .unwrap();

    let (list_status, listed) =
        json_of(app.get_as("user_rotated", "/api/settings/api-keys").await).await;
    let (chat_status, chat) = json_of(
        app.post_as(
            "user_rotated",
            "/api/chat",
            &json!({ "messages": [{ "role": "user", "content": "hi" }] }),
        )
        .await,
    )
    .await;

    for (status, body) in [(list_status, &listed), (chat_status, &chat)] {
        assert_eq!(status, 500, "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("byok.encryption_key"), "{message}");
        assert!(message.contains("save the key again"), "{message}");
    }
    assert_eq!(count(&app, "credit_holds", "user_rotated").await, 0);
}

#[actix::test]
async fn without_an_encryption_key_the_byok_routes_say_it_is_not_configured() {
    let fakes = fakes().await;
    let app = app_with(&fakes, |_| {}).await;

    let (get_status, got) = json_of(app.get_as("user_n", "/api/settings/api-keys").await).await;
    let (put_status, put) =
        put_keys(&app, "user_n", &json!({ "openaiKey": USER_OPENAI_KEY })).await;

    for (status, body) in [(get_status, got), (put_status, put)] {
        assert_eq!(status, 501, "{body}");
        assert_eq!(body["error"], "BYOK_NOT_CONFIGURED");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .contains("byok.encryption_key"));
    }
}

#[actix::test]
async fn the_balance_page_flag_follows_saved_and_removed_keys_at_once() {
    let fakes = fakes().await;
    let app = app_with(&fakes, with_byok).await;
    let has_byok = || async {
        let (_, overview) = json_of(app.get_as("user_flag", "/api/credits").await).await;
        overview["hasByok"].clone()
    };

    assert_eq!(has_byok().await, false);
    put_keys(&app, "user_flag", &json!({ "openaiKey": USER_OPENAI_KEY })).await;
    assert_eq!(has_byok().await, true);
    let response = app
        .http
        .delete(app.url("/api/settings/api-keys/openai"))
        .bearer_auth(app.token("user_flag"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(has_byok().await, false);
}

#[actix::test]
async fn a_key_saved_after_platform_chats_is_used_by_the_very_next_chat() {
    let fakes = fakes().await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", USER_ANTHROPIC_KEY))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("mine", 10, 10, 0, 0)),
        )
        .expect(1)
        .mount(&fakes.anthropic)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(anthropic_message("platform", 10, 10, 0, 0)),
        )
        .expect(1)
        .mount(&fakes.anthropic)
        .await;
    let app = app_with(&fakes, with_byok).await;
    fund(&app, "user_switch", 1_000_000).await;
    let chat = json!({ "messages": [{ "role": "user", "content": "hi" }] });

    let (_, platform) = json_of(app.post_as("user_switch", "/api/chat", &chat).await).await;
    put_keys(
        &app,
        "user_switch",
        &json!({ "anthropicKey": USER_ANTHROPIC_KEY }),
    )
    .await;
    let (status, own) = json_of(app.post_as("user_switch", "/api/chat", &chat).await).await;

    assert_eq!(platform["content"], "platform", "{platform}");
    assert!(platform.get("credits").is_some());
    assert_eq!(status, 200, "{own}");
    assert_eq!(own["content"], "mine");
    assert!(own.get("credits").is_none(), "{own}");
    assert_eq!(count(&app, "credit_usages", "user_switch").await, 1);
}
