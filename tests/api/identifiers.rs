//! Stored identifiers and free text refuse control and invisible formatting
//! characters (Unicode Cc, Cf, U+2028/U+2029) on every route and webhook
//! field creditd keeps: 400 naming the field, nothing stored.

use serde_json::{json, Value};

use crate::support::stripe::*;
use crate::support::*;

/// Right-to-left override, zero width space, left-to-right isolate, bell.
const REFUSED: [char; 4] = ['\u{202E}', '\u{200B}', '\u{2066}', '\u{0007}'];

/// Where a stored text arrives.
#[derive(Debug, Clone, Copy)]
enum Field {
    /// `POST /api/chat`, a body field.
    Chat(&'static str),
    /// `POST /admin/accounts/{userId}/credits`, a body field.
    AdminCredit(&'static str),
    /// `GET /admin/accounts/{userId}`, the path.
    AdminUserId,
    /// `POST /api/credits/referral`, `code`.
    ReferralCode,
    /// `POST /api/webhooks/clerk` (`user.created`), a field of `data`.
    Clerk(&'static str),
    /// `POST /api/webhooks/stripe` (`checkout.session.completed`), a field
    /// of the event (`id`) or of its session (`data.object.…`).
    Stripe(&'static str),
}

const FIELDS: [(Field, &str); 14] = [
    (Field::Chat("conversationId"), "conversationId"),
    (Field::Chat("messageId"), "messageId"),
    (Field::Chat("model"), "model"),
    (Field::AdminCredit("key"), "key"),
    (Field::AdminCredit("reason"), "reason"),
    (Field::AdminUserId, "userId"),
    (Field::ReferralCode, "code"),
    (Field::Clerk("id"), "data.id"),
    (Field::Clerk("first_name"), "data.first_name"),
    (Field::Clerk("last_name"), "data.last_name"),
    (Field::Stripe("id"), "id"),
    (Field::Stripe("id"), "data.object.id"),
    (
        Field::Stripe("payment_intent"),
        "data.object.payment_intent",
    ),
    (Field::Stripe("invoice"), "data.object.invoice"),
];

const USER: &str = "user_identifiers";

/// Sends `bad` in `field`; the status and the error body.
async fn send(stripe: &StripeApp, field: Field, name: &str, bad: &str) -> (u16, Value) {
    let app = &stripe.app;
    let response = match field {
        Field::Chat(key) => {
            let mut body = json!({ "messages": [{ "role": "user", "content": "A todo app" }] });
            body[key] = json!(bad);
            app.post_as(USER, "/api/chat", &body).await
        }
        Field::AdminCredit(key) => {
            let mut body =
                json!({ "amountMicros": 1_000_000, "key": "goodwill-1", "reason": "goodwill" });
            body[key] = json!(bad);
            app.admin(
                reqwest::Method::POST,
                &format!("/admin/accounts/{USER}/credits"),
            )
            .json(&body)
            .send()
            .await
            .expect("request")
        }
        Field::AdminUserId => {
            let encoded: String = form_urlencoded::byte_serialize(bad.as_bytes()).collect();
            app.admin(reqwest::Method::GET, &format!("/admin/accounts/{encoded}"))
                .send()
                .await
                .expect("request")
        }
        Field::ReferralCode => {
            app.post_as(USER, "/api/credits/referral", &json!({ "code": bad }))
                .await
        }
        Field::Clerk(key) => {
            let mut event = crate::clerk_webhooks::user_event(
                "user.created",
                "user_from_clerk",
                "new@example.com",
                "Ada",
                "Lovelace",
            );
            event["data"][key] = json!(bad);
            let body = event.to_string();
            let now = chrono::Utc::now().timestamp();
            app.http
                .post(app.url("/api/webhooks/clerk"))
                .header("svix-id", "msg_identifiers")
                .header("svix-timestamp", now.to_string())
                .header(
                    "svix-signature",
                    sign(SIGNING_SECRET, "msg_identifiers", now, &body),
                )
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request")
        }
        Field::Stripe(key) => {
            let account = app.account(USER).await.0;
            let mut session = checkout_session("cs_identifiers", account, 1_000, "paid");
            session["invoice"] = json!("in_identifiers");
            let mut event = event("evt_identifiers", "checkout.session.completed", session);
            if name.starts_with("data.object.") {
                event["data"]["object"][key] = json!(bad);
            } else {
                event[key] = json!(bad);
            }
            let body = event.to_string();
            stripe
                .deliver_with(&body, Some(&signed_header(&body)))
                .await
        }
    };
    json_of(response).await
}

/// Rows in every table a refused request could have written.
async fn stored_rows(stripe: &StripeApp) -> Vec<i64> {
    let client = stripe.app.db.client().await;
    let mut counts = Vec::new();
    for count in [
        "SELECT count(*) FROM users",
        "SELECT count(*) FROM credit_transactions",
        "SELECT count(*) FROM credit_holds",
        "SELECT count(*) FROM credit_usages",
        "SELECT count(*) FROM credit_grants",
        "SELECT count(*) FROM processed_webhook_events",
        "SELECT count(*) FROM referrals",
        "SELECT count(*) FROM signup_bonus_claims",
        "SELECT count(*) FROM outgoing_events",
    ] {
        let row = client.query_one(count, &[]).await.expect("count");
        counts.push(row.get(0));
    }
    counts
}

#[actix::test]
async fn every_stored_field_refuses_control_and_invisible_formatting_characters_with_400_naming_it_and_stores_nothing(
) {
    let stripe = spawn_stripe_app_with(|s| {
        s.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
    })
    .await;
    stripe.app.account(USER).await;
    let before = stored_rows(&stripe).await;

    let mut refused = Vec::new();
    for (field, name) in FIELDS {
        for c in REFUSED {
            let bad = format!("x{c}y");
            let (status, body) = send(&stripe, field, name, &bad).await;
            let message = body["message"].as_str().unwrap_or_default().to_owned();
            refused.push((name, c, status, body["error"].clone(), message));
        }
    }
    let after = stored_rows(&stripe).await;

    for (name, c, status, code, message) in &refused {
        let point = format!("U+{:04X}", u32::from(*c));
        assert_eq!(*status, 400, "{name} with {point}: {message}");
        assert_eq!(code, "INVALID_REQUEST", "{name} with {point}");
        assert!(
            message.contains(&format!("`{name}`")),
            "{name} with {point}: {message}"
        );
    }
    assert_eq!(before, after, "nothing stored");
    assert_eq!(stripe.balance_micros(USER).await, 0);
}

#[actix::test]
async fn the_same_fields_take_ordinary_text_in_any_script() {
    let stripe = spawn_stripe_app_with(|s| {
        s.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
    })
    .await;
    stripe.app.account(USER).await;

    let (status, body) = send(
        &stripe,
        Field::AdminCredit("reason"),
        "reason",
        "geste commercial — Élodie, 王小明 🙂",
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = send(
        &stripe,
        Field::Clerk("first_name"),
        "data.first_name",
        "Zoë",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(
        &stripe,
        Field::Stripe("invoice"),
        "data.object.invoice",
        "in_identifiers_2",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(stripe.balance_micros(USER).await, 11_000_000);
}
