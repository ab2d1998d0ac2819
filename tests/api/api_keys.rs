//! `/api/credits/api-keys`: a person's gateway keys, made (shown once),
//! listed without their secret, revoked; bad input named.

use serde_json::json;

use crate::support::*;

/// Makes a key as `clerk_id`; the answer's JSON.
pub async fn create_key(
    app: &TestApp,
    clerk_id: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let (status, created) =
        json_of(app.post_as(clerk_id, "/api/credits/api-keys", &body).await).await;
    assert_eq!(status, 201, "{created}");
    created
}

#[actix::test]
async fn a_key_is_shown_once_and_listed_by_prefix_name_limit_and_spend() {
    let app = spawn_app().await;
    let created = create_key(
        &app,
        "user_keys",
        json!({ "name": "My todo app", "spendLimitEur": "12.50" }),
    )
    .await;
    let secret = created["key"].as_str().unwrap();
    assert!(secret.starts_with("cd_") && secret.len() == 46, "{secret}");
    let key = &created["apiKey"];
    assert_eq!(key["prefix"], json!(&secret[..11]));
    assert_eq!(key["spendLimitMicros"], json!(12_500_000));
    assert_eq!(key["spentMicros"], json!(0));

    let (status, listed) = json_of(app.get_as("user_keys", "/api/credits/api-keys").await).await;
    assert_eq!(status, 200);
    assert_eq!(listed["keys"].as_array().unwrap().len(), 1);
    assert_eq!(listed["keys"][0]["name"], json!("My todo app"));
    assert!(
        !listed.to_string().contains(secret),
        "a list never shows a secret"
    );
    // Stored as a hash: the secret is nowhere in the table.
    let client = app.db.client().await;
    let row = client
        .query_one(
            "SELECT count(*) FROM api_keys WHERE key_sha256 = sha256($1::text::bytea)",
            &[&secret],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);

    // Another person sees none of it, and cannot revoke it.
    let (_, theirs) = json_of(app.get_as("user_other", "/api/credits/api-keys").await).await;
    assert_eq!(theirs["keys"], json!([]));
    let id = key["id"].as_str().unwrap();
    let path = format!("/api/credits/api-keys/{id}");
    let refused = app
        .http
        .delete(app.url(&path))
        .bearer_auth(app.token("user_other"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let revoked = app
        .http
        .delete(app.url(&path))
        .bearer_auth(app.token("user_keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let (_, listed) = json_of(app.get_as("user_keys", "/api/credits/api-keys").await).await;
    assert_eq!(listed["keys"], json!([]));
}

#[actix::test]
async fn a_bad_name_limit_or_expiry_is_refused_naming_the_field() {
    let app = spawn_app().await;
    for (body, field) in [
        (json!({ "name": "" }), "name"),
        (json!({ "name": "a\u{0}b" }), "name"),
        (json!({ "name": "x".repeat(101) }), "name"),
        (
            json!({ "name": "app", "spendLimitEur": 0 }),
            "spendLimitEur",
        ),
        (
            json!({ "name": "app", "spendLimitEur": "-5" }),
            "spendLimitEur",
        ),
        (
            json!({ "name": "app", "spendLimitEur": "1.0000001" }),
            "spendLimitEur",
        ),
        (
            json!({ "name": "app", "spendLimitEur": "ten" }),
            "spendLimitEur",
        ),
        (
            json!({ "name": "app", "expiresAt": "2001-01-01T00:00:00Z" }),
            "expiresAt",
        ),
    ] {
        let (status, error) = json_of(
            app.post_as("user_bad_keys", "/api/credits/api-keys", &body)
                .await,
        )
        .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(
            error["message"].as_str().unwrap().contains(field),
            "{body}: {error}"
        );
    }
    let (_, listed) = json_of(app.get_as("user_bad_keys", "/api/credits/api-keys").await).await;
    assert_eq!(listed["keys"], json!([]));
}
