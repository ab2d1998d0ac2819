//! Who may use an account: deleted users are out, and the signup bonus is
//! granted once per person (by verified email), however they sign up.

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::clerk_webhooks::{bonuses, clerk_app, deliver, user_event};
use crate::support::*;

/// 32 bytes, standard base64: BYOK on, so its routes reach the account.
const BYOK_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn deleted_event(clerk_id: &str) -> Value {
    json!({ "object": "event", "type": "user.deleted",
            "data": { "object": "user", "id": clerk_id, "deleted": true } })
}

async fn balance_micros(app: &TestApp, clerk_id: &str) -> i64 {
    let (status, body) = json_of(app.get_as(clerk_id, "/api/credits").await).await;
    assert_eq!(status, 200, "{body}");
    body["balanceMicros"].as_i64().expect("balanceMicros")
}

/// Every route an end user calls, with a body it accepts.
fn user_routes() -> Vec<(reqwest::Method, &'static str, Option<Value>)> {
    use reqwest::Method;
    vec![
        (Method::GET, "/api/credits", None),
        (Method::GET, "/api/credits/transactions", None),
        (Method::GET, "/api/credits/usages", None),
        (Method::POST, "/api/credits/claim-bonus", Some(json!({}))),
        (
            Method::POST,
            "/api/credits/topup",
            Some(json!({ "amount": 1000 })),
        ),
        (
            Method::POST,
            "/api/chat",
            Some(json!({ "messages": [{ "role": "user", "content": "hi" }] })),
        ),
        (Method::GET, "/api/settings/api-keys", None),
        (
            Method::PUT,
            "/api/settings/api-keys",
            Some(json!({ "openaiKey": "sk-test-0123456789" })),
        ),
        (Method::DELETE, "/api/settings/api-keys/openai", None),
    ]
}

#[actix::test]
async fn a_deleted_user_gets_401_on_every_user_route_admins_still_read_the_account_and_undelete_restores_it(
) {
    let app = spawn_app_with(|settings| {
        settings.clerk_webhook.signing_secret = creditd::config::Secret::new(SIGNING_SECRET);
        settings.byok.encryption_key = creditd::config::Secret::new(BYOK_KEY);
        settings.stripe.secret_key = creditd::config::Secret::new("sk_test_unused");
        settings.stripe.api_base = "http://127.0.0.1:9".into();
        settings.providers.anthropic_api_key = creditd::config::Secret::new("sk-ant-unused");
        settings.providers.anthropic_base_url = "http://127.0.0.1:9".into();
    })
    .await;
    let created = user_event("user.created", "user_gone", "gone@example.com", "G", "O");
    assert_eq!(deliver(&app, "msg_gone_created", &created).await, 200);
    assert_eq!(balance_micros(&app, "user_gone").await, 10_000_000);

    assert_eq!(
        deliver(&app, "msg_gone_deleted", &deleted_event("user_gone")).await,
        200
    );

    for (method, path, body) in user_routes() {
        let mut request = app
            .http
            .request(method.clone(), app.url(path))
            .bearer_auth(app.token("user_gone"));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, answer) = json_of(request.send().await.expect("request")).await;
        assert_eq!(status, 401, "{method} {path}: {answer}");
        assert_eq!(answer["error"], "ACCOUNT_DELETED", "{method} {path}");
    }
    let (status, account) = json_of(
        app.admin(reqwest::Method::GET, "/admin/accounts/user_gone")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{account}");
    assert_eq!(account["balanceMicros"], 10_000_000);

    assert_eq!(deliver(&app, "msg_gone_back", &created).await, 200);
    assert_eq!(balance_micros(&app, "user_gone").await, 10_000_000);
    assert_eq!(bonuses(&app).await, 1, "coming back is not a new signup");
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_person_who_deletes_and_signs_up_again_with_the_same_email_in_any_case_gets_no_second_bonus(
) {
    let app = clerk_app().await;
    let first = user_event("user.created", "user_eve_1", "Eve@Example.com", "E", "V");
    assert_eq!(deliver(&app, "msg_eve_1", &first).await, 200);
    assert_eq!(
        deliver(&app, "msg_eve_1_gone", &deleted_event("user_eve_1")).await,
        200
    );

    let again = user_event("user.created", "user_eve_2", " eve@example.COM ", "E", "V");
    let signed_up = deliver(&app, "msg_eve_2", &again).await;
    let (claimed, body) = json_of(
        app.post_as("user_eve_2", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;

    assert_eq!(signed_up, 200);
    assert_eq!(claimed, 409, "{body}");
    assert_eq!(bonuses(&app).await, 1);
    assert_eq!(balance_micros(&app, "user_eve_2").await, 0);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn claim_bonus_and_user_created_racing_for_two_clerk_ids_of_one_email_grant_one_bonus() {
    let app = clerk_app().await;
    let people = 10;
    for n in 0..people {
        // The first id is known with its email (user.updated grants nothing).
        let known = user_event(
            "user.updated",
            &format!("user_race_a{n}"),
            &format!("Racer{n}@Example.com"),
            "R",
            "A",
        );
        assert_eq!(
            deliver(&app, &format!("msg_race_known_{n}"), &known).await,
            200
        );
    }

    let claims = join_all((0..people).map(|n| {
        let app = &app;
        async move {
            let clerk_id = format!("user_race_a{n}");
            app.post_as(&clerk_id, "/api/credits/claim-bonus", &json!({}))
                .await
                .status()
                .as_u16()
        }
    }));
    let signups = join_all((0..people).map(|n| {
        let app = &app;
        async move {
            let created = user_event(
                "user.created",
                &format!("user_race_b{n}"),
                &format!("racer{n}@example.com"),
                "R",
                "B",
            );
            deliver(app, &format!("msg_race_new_{n}"), &created).await
        }
    }));
    let (claims, signups) = futures_util::join!(claims, signups);

    assert!(claims.iter().all(|s| [201, 409].contains(s)), "{claims:?}");
    assert!(signups.iter().all(|&s| s == 200), "{signups:?}");
    assert_eq!(bonuses(&app).await, people);
    for n in 0..people {
        let a = balance_micros(&app, &format!("user_race_a{n}")).await;
        let b = balance_micros(&app, &format!("user_race_b{n}")).await;
        assert_eq!(a + b, 10_000_000, "person {n}: {a} + {b}");
    }
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_bonus_claim_left_without_its_credit_is_completed_by_the_same_accounts_retry_only() {
    let app = clerk_app().await;
    let known = user_event("user.updated", "user_crash", "crash@example.com", "C", "R");
    assert_eq!(deliver(&app, "msg_crash_known", &known).await, 200);
    let other = user_event("user.updated", "user_other", "other@example.com", "O", "T");
    assert_eq!(deliver(&app, "msg_other_known", &other).await, 200);
    // As a crash right after the claim committed would leave it: the claim
    // names user_crash, no credit followed; other@ is claimed by user_crash too.
    let client = app.db.client().await;
    client
        .execute(
            "INSERT INTO signup_bonus_claims (email_hash, user_id)
             SELECT email_hash, (SELECT id FROM users WHERE clerk_id = 'user_crash')
               FROM users WHERE clerk_id IN ('user_crash', 'user_other')",
            &[],
        )
        .await
        .unwrap();

    let (retried, _) = json_of(
        app.post_as("user_crash", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    let (again, body) = json_of(
        app.post_as("user_crash", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    let (stranger, _) = json_of(
        app.post_as("user_other", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;

    assert_eq!((retried, again, stranger), (201, 200, 409));
    assert_eq!(body["alreadyClaimed"], true);
    assert_eq!(bonuses(&app).await, 1);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn a_re_signup_that_claims_the_bonus_before_its_email_is_known_gives_it_back_when_the_email_comes(
) {
    let app = clerk_app().await;
    let first = user_event(
        "user.created",
        "user_quick_1",
        "quick@example.com",
        "Q",
        "K",
    );
    assert_eq!(deliver(&app, "msg_quick_1", &first).await, 200);
    assert_eq!(
        deliver(&app, "msg_quick_1_gone", &deleted_event("user_quick_1")).await,
        200
    );

    // The new account asks before Clerk's user.created for it arrives.
    let (claimed, _) = json_of(
        app.post_as("user_quick_2", "/api/credits/claim-bonus", &json!({}))
            .await,
    )
    .await;
    assert_eq!(claimed, 201, "no email known yet: by Clerk id");
    let again = user_event(
        "user.created",
        "user_quick_2",
        "QUICK@example.com",
        "Q",
        "K",
    );
    let delivered = join_all((0..5).map(|_| deliver(&app, "msg_quick_2", &again))).await;
    let redelivered = deliver(&app, "msg_quick_2_resent", &again).await;

    assert!(delivered.iter().all(|&s| s == 200), "{delivered:?}");
    assert_eq!(redelivered, 200);
    assert_eq!(
        balance_micros(&app, "user_quick_2").await,
        0,
        "taken back once"
    );
    let (_, first_account) = json_of(
        app.admin(reqwest::Method::GET, "/admin/accounts/user_quick_1")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(first_account["balanceMicros"], 10_000_000);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn mailbox_aliases_get_one_signup_bonus_between_them_and_dots_outside_gmail_are_other_people()
{
    let app = clerk_app().await;
    let aliases = [
        "j.doe@gmail.com",
        "jdoe+apps@gmail.com",
        "JDOE@GMAIL.COM",
        "j.d.o.e@googlemail.com",
        " JDoe+x@GoogleMail.com ",
    ];

    let statuses = join_all(aliases.iter().enumerate().map(|(n, email)| {
        let created = user_event("user.created", &format!("user_alias_{n}"), email, "J", "D");
        let app = &app;
        async move { deliver(app, &format!("msg_alias_{n}"), &created).await }
    }))
    .await;
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert_eq!(bonuses(&app).await, 1);
    let mut total = 0;
    for n in 0..aliases.len() {
        total += balance_micros(&app, &format!("user_alias_{n}")).await;
    }
    assert_eq!(total, 10_000_000);

    for (clerk_id, email) in [
        ("user_dotted", "j.doe@example.com"),
        ("user_undotted", "jdoe@example.com"),
        ("user_undotted_tagged", "jdoe+x@example.com"),
    ] {
        let created = user_event("user.created", clerk_id, email, "J", "D");
        assert_eq!(
            deliver(&app, &format!("msg_{clerk_id}"), &created).await,
            200
        );
    }
    assert_eq!(balance_micros(&app, "user_dotted").await, 10_000_000);
    assert_eq!(balance_micros(&app, "user_undotted").await, 10_000_000);
    assert_eq!(balance_micros(&app, "user_undotted_tagged").await, 0);
    assert_eq!(bonuses(&app).await, 3);
    app.db.reconcile_is_clean().await;
}

#[actix::test]
async fn profile_updates_arriving_while_the_accounts_journal_commits_neither_deadlock_nor_fail() {
    // A delivery upserts the user row (locked against the journal's
    // foreign-key checks) and ensures the balance row; a journal batch
    // updates the balance row, then inserts rows referencing the user. The
    // delivery must not wait for the batch's balance row while it holds
    // the user row, or each waits for the other.
    let app = clerk_app().await;
    let created = user_event(
        "user.created",
        "user_busy_profile",
        "busy@example.com",
        "B",
        "P",
    );
    assert_eq!(deliver(&app, "msg_busy_created", &created).await, 200);

    // Each debit takes the balance under the low-balance threshold and
    // each credit back over it: the batches insert outgoing events, whose
    // foreign key reads the user row.
    let adjustments = async {
        let mut statuses = Vec::new();
        for n in 0..60 {
            for (kind, amount) in [("debit", -9_000_000), ("credit", 9_000_000)] {
                let response = app
                    .admin(
                        reqwest::Method::POST,
                        "/admin/accounts/user_busy_profile/credits",
                    )
                    .json(&json!({ "amountMicros": amount, "key": format!("busy-{kind}-{n}"), "reason": "load" }))
                    .send()
                    .await
                    .expect("request");
                statuses.push(response.status().as_u16());
            }
        }
        statuses
    };
    let updates = (0..120).map(|n| {
        let app = &app;
        async move {
            let updated = user_event(
                "user.updated",
                "user_busy_profile",
                "busy@example.com",
                "B",
                &format!("P{n}"),
            );
            deliver(app, &format!("msg_busy_updated_{n}"), &updated).await
        }
    });
    let (adjusted, delivered) = futures_util::join!(adjustments, join_all(updates));

    assert!(adjusted.iter().all(|&s| s == 201), "{adjusted:?}");
    assert!(delivered.iter().all(|&s| s == 200), "{delivered:?}");
    assert_eq!(balance_micros(&app, "user_busy_profile").await, 10_000_000);
    app.db.reconcile_is_clean().await;
}
