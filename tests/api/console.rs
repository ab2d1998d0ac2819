//! The operator console (`/admin`): operators sign in (the admin token
//! exchanged for a short-lived HttpOnly SameSite=Strict cookie, or a Clerk
//! session listed in `admin.operator_ids`), find an account, credit and
//! debit it with a reason, redeliver a failed event, and every action is
//! recorded with who made it; nobody else gets into the page or the admin
//! API. The page runs in headless Chromium against the real server.

use reqwest::header::{COOKIE, LOCATION, ORIGIN, SET_COOKIE};
use reqwest::redirect::Policy;
use reqwest::Method;
use serde_json::{json, Value};

use crate::browser::Browser;
use crate::support::*;

const OPERATOR: &str = "user_operator";

async fn console_app() -> TestApp {
    spawn_app_with(|settings| settings.admin.operator_ids = vec![OPERATOR.into()]).await
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

/// Credits (or debits) through the admin API with the bearer token.
async fn adjust(app: &TestApp, clerk_id: &str, amount_micros: i64, key: &str) {
    let (status, body) = json_of(
        app.admin(Method::POST, &format!("/admin/accounts/{clerk_id}/credits"))
            .json(&json!({"amountMicros": amount_micros, "key": key, "reason": "setup"}))
            .send()
            .await
            .expect("request"),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

/// The console session cookie (`creditd_admin=…`) for `name`.
async fn console_cookie(app: &TestApp, name: &str) -> String {
    let response = no_redirects()
        .post(app.url("/admin/session"))
        .header(ORIGIN, &app.address)
        .form(&[("name", name), ("token", ADMIN_TOKEN)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 303);
    let cookie = response
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("the session cookie")
        .to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/admin", "Max-Age=1800"] {
        assert!(cookie.contains(attribute), "{attribute} in {cookie}");
    }
    cookie.split(';').next().expect("name=value").to_owned()
}

/// Every operation of the OpenAPI document under `/admin/` but the
/// session's own, with its placeholders filled.
async fn admin_operations(app: &TestApp) -> Vec<(Method, String)> {
    let (_, document) = json_of(
        app.http
            .get(app.url("/openapi.json"))
            .send()
            .await
            .expect("document"),
    )
    .await;
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        if !path.starts_with("/admin/") || path.starts_with("/admin/session") {
            continue;
        }
        for method in item.as_object().expect("operations").keys() {
            let concrete = path
                .replace("{userId}", "user_someone")
                .replace("{eventId}", "6f1c1c1e-0000-4000-8000-000000000001");
            operations.push((method.to_uppercase().parse().expect("method"), concrete));
        }
    }
    assert!(operations.len() >= 10, "{operations:?}");
    operations
}

#[actix::test]
async fn nobody_but_an_operator_gets_into_the_console_or_the_admin_api_and_a_cross_site_post_with_the_console_cookie_is_refused(
) {
    let app = console_app().await;
    let http = no_redirects();
    let own = app.address.clone();
    let stranger = format!("__session={}", app.token("user_nobody"));

    for (method, path) in admin_operations(&app).await {
        let anonymous = http
            .request(method.clone(), app.url(&path))
            .header(ORIGIN, &own)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(anonymous.status(), 401, "anonymous {method} {path}");
        let signed_in = http
            .request(method.clone(), app.url(&path))
            .header(COOKIE, &stranger)
            .header(ORIGIN, &own)
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert_eq!(signed_in.status(), 403, "a non-operator's {method} {path}");
        let operator = http
            .request(method.clone(), app.url(&path))
            .bearer_auth(app.token(OPERATOR))
            .json(&json!({}))
            .send()
            .await
            .expect("request");
        assert!(
            ![401, 403].contains(&operator.status().as_u16()),
            "the operator's {method} {path}: {}",
            operator.status()
        );
    }
    let page = |cookie: Option<String>| {
        let mut request = http.get(app.url("/admin"));
        if let Some(cookie) = cookie {
            request = request.header(COOKIE, cookie);
        }
        request.send()
    };
    let anonymous = page(None).await.expect("page");
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous
        .text()
        .await
        .expect("html")
        .contains("action=\"/admin/session\""));
    assert_eq!(
        page(Some(stranger.clone())).await.expect("page").status(),
        403
    );
    let operator_cookie = format!("__session={}", app.token(OPERATOR));
    assert_eq!(
        page(Some(operator_cookie)).await.expect("page").status(),
        200
    );

    // The token's session: only from the console's own page, and only with
    // the right token.
    let foreign = http
        .post(app.url("/admin/session"))
        .header(ORIGIN, "https://evil.example")
        .form(&[("name", "Mallory"), ("token", ADMIN_TOKEN)])
        .send()
        .await
        .expect("sign in");
    assert_eq!(foreign.status(), 403);
    let wrong = http
        .post(app.url("/admin/session"))
        .header(ORIGIN, &own)
        .form(&[("name", "Mallory"), ("token", "not-the-token")])
        .send()
        .await
        .expect("sign in");
    assert_eq!(wrong.status(), 303);
    assert_eq!(
        wrong.headers().get(LOCATION).and_then(|v| v.to_str().ok()),
        Some("/admin?signin=refused")
    );
    assert!(wrong.headers().get(SET_COOKIE).is_none());

    let session = console_cookie(&app, "Léa").await;
    let credit = |origin: &str| {
        http.post(app.url("/admin/accounts/user_credited/credits"))
            .header(COOKIE, &session)
            .header(ORIGIN, origin)
            .json(&json!({"amountMicros": 5_000_000, "key": "goodwill-1", "reason": "geste commercial"}))
            .send()
    };
    assert_eq!(
        credit("https://evil.example")
            .await
            .expect("request")
            .status(),
        403,
        "a cross-site POST with the console cookie"
    );
    assert_eq!(credit(&own).await.expect("request").status(), 201);
    let recorded = app
        .db
        .client()
        .await
        .query(
            "SELECT operator, action, clerk_id, reason FROM operator_actions ORDER BY id",
            &[],
        )
        .await
        .expect("actions")
        .iter()
        .map(|row| {
            (
                row.get::<_, String>(0),
                row.get::<_, String>(1),
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<String>>(3),
            )
        })
        .filter(|(operator, ..)| operator.starts_with("token:"))
        .collect::<Vec<_>>();
    assert_eq!(
        recorded,
        [
            ("token:Léa".to_owned(), "session".to_owned(), None, None),
            (
                "token:Léa".to_owned(),
                "credit".to_owned(),
                Some("user_credited".to_owned()),
                Some("geste commercial".to_owned())
            ),
        ]
    );
}

/// The balance the console's account element shows, in micros.
async fn console_balance(browser: &Browser, expected: i64) {
    browser
        .until(
            &format!("the console's balance at {expected} micros"),
            &format!(
                "const a = document.querySelector('admin-account'); return a && a.dataset.state === 'ok' && a.dataset.balanceMicros === '{expected}'"
            ),
        )
        .await;
}

#[actix::test]
async fn an_operator_signs_in_finds_an_account_by_email_credits_five_euros_debits_after_confirming_and_redelivers_a_failed_event(
) {
    let app = console_app().await;
    let account = app.account("user_findme").await;
    app.db
        .client()
        .await
        .execute(
            "UPDATE users SET email = 'findme@example.test' WHERE id = $1",
            &[&account.0],
        )
        .await
        .expect("address");
    // Auto-recharge on, with a card a top-up saved.
    app.db
        .client()
        .await
        .batch_execute(&format!(
            "UPDATE users SET stripe_payment_method_id = 'pm_card_visa' WHERE id = {id};
             INSERT INTO auto_recharge_settings (user_id, enabled, threshold_cents, amount_cents, updated_at)
             VALUES ({id}, true, 500, 2000, now())",
            id = account.0
        ))
        .await
        .expect("auto-recharge on");
    adjust(&app, "user_findme", 3_000_000, "start").await;
    adjust(&app, "user_findme", -2_000_000, "down").await;
    // The low-balance event never reached its receiver.
    let failed: String = app
        .db
        .client()
        .await
        .query_one(
            "UPDATE outgoing_events
                SET status = 'FAILED', attempts = 3, sequence = 1,
                    last_error = 'answered 500 Internal Server Error'
              WHERE user_id = $1 AND type = 'balance.low' RETURNING id::text",
            &[&account.0],
        )
        .await
        .expect("a failed event")
        .get(0);

    let mut browser = Browser::start().await;
    browser.goto(&app.url("/admin")).await;
    browser.type_into("input[name=name]", "Léa Martin").await;
    browser.type_into("input[name=token]", ADMIN_TOKEN).await;
    browser.click(".sign-in button[type=submit]").await;
    assert_eq!(browser.text("#operator").await, "token:Léa Martin");
    // The sign-in page answers 401 (which Chromium logs): the only error allowed.
    browser.collect_errors().await;
    browser.errors.retain(|error| {
        !error
            .contains("/admin - Failed to load resource: the server responded with a status of 401")
    });
    browser
        .until(
            "one failed event on the platform view",
            "const d = document.querySelector('admin-platform [data-key=eventsFailed] dd'); return d && d.textContent === '1'",
        )
        .await;

    browser
        .type_into("#search-query", "FindMe@example.test")
        .await;
    browser.click(".search__submit").await;
    console_balance(&browser, 1_000_000).await;
    assert_eq!(
        browser.text("admin-account [data-key=balance] dd").await,
        "1.00€"
    );

    browser
        .type_into("admin-account input[name=amount]", "5")
        .await;
    browser
        .type_into("admin-account input[name=reason]", "geste commercial")
        .await;
    browser.click(".adjust__submit").await;
    console_balance(&browser, 6_000_000).await;

    browser
        .type_into("admin-account input[name=amount]", "1")
        .await;
    browser
        .js("const s = document.querySelector('admin-account select[name=direction]'); s.value = 'debit'; return true")
        .await;
    browser
        .type_into("admin-account input[name=reason]", "erreur de saisie")
        .await;
    browser.click(".adjust__submit").await;
    assert_eq!(
        browser.text(".adjust__confirm").await,
        "Confirmer le débit de 1.00€"
    );
    assert_eq!(
        browser
            .js("return document.querySelector('admin-account').dataset.balanceMicros")
            .await,
        json!("6000000"),
        "nothing is debited before the confirmation"
    );
    browser.click(".adjust__confirm").await;
    console_balance(&browser, 5_000_000).await;
    assert_eq!(
        browser.text("admin-account [data-key=byok] dd").await,
        "aucune"
    );
    assert_eq!(
        browser
            .text("admin-account [data-key=auto-recharge] dd")
            .await,
        "activée : 20€ sous 5€"
    );
    browser
        .type_into(
            "admin-account input[name=rechargeOffReason]",
            "carte signalée volée",
        )
        .await;
    browser.click(".recharge-off__submit").await;
    browser
        .until(
            "auto-recharge switched off",
            "const d = document.querySelector('admin-account [data-key=auto-recharge] dd'); return d && d.textContent === 'désactivée par un opérateur'",
        )
        .await;

    browser
        .type_into("admin-account input[name=dailyCeiling]", "2")
        .await;
    browser
        .type_into(
            "admin-account input[name=ceilingReason]",
            "usage inhabituel",
        )
        .await;
    browser.click(".ceilings__submit").await;
    browser
        .until(
            "the daily ceiling in the limits table",
            "const c = document.querySelector('admin-account .ceilings input[name=dailyCeiling]'); const s = document.querySelector('admin-account .account__status'); return c && c.value === '2.00' && s && s.textContent === 'Plafonds enregistrés.'",
        )
        .await;

    browser
        .click(&format!("tr[data-event-id='{failed}'] .event__redeliver"))
        .await;
    browser
        .until(
            "the event back in the queue",
            &format!("const r = document.querySelector(\"tr[data-event-id='{failed}']\"); return r && r.dataset.status === 'PENDING'"),
        )
        .await;
    browser.resize(1280).await;
    browser.fits(1280).await;
    browser.assert_no_console_errors().await;

    // The person's own billing page shows the operator's credit and debit.
    browser
        .sign_in_with_cookie(&app.address, app.token("user_findme"))
        .await;
    browser.goto(&app.url("/billing")).await;
    browser
        .until(
            "the person's balance",
            "const e = document.querySelector('credit-balance'); return e && e.dataset.balanceMicros === '5000000'",
        )
        .await;
    browser
        .until(
            "the person told why auto-recharge is off",
            "const e = document.querySelector('credit-auto-recharge'); return e && e.textContent.includes(\"notre équipe l'a désactivée\")",
        )
        .await;
    browser.assert_no_console_errors().await;
    browser.close().await;

    let recorded: Vec<(String, String, Option<String>)> = app
        .db
        .client()
        .await
        .query(
            "SELECT operator, action, reason FROM operator_actions ORDER BY id",
            &[],
        )
        .await
        .expect("actions")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let by_lea: Vec<(&str, Option<&str>)> = recorded
        .iter()
        .filter(|(operator, _, _)| operator == "token:Léa Martin")
        .map(|(_, action, reason)| (action.as_str(), reason.as_deref()))
        .collect();
    assert_eq!(
        by_lea,
        [
            ("session", None),
            ("credit", Some("geste commercial")),
            ("debit", Some("erreur de saisie")),
            ("auto_recharge_off", Some("carte signalée volée")),
            ("limits", Some("usage inhabituel")),
            ("redeliver", None),
        ]
    );
    let operators: Vec<Value> = app
        .db
        .client()
        .await
        .query(
            "SELECT metadata->'operator' FROM credit_transactions
              WHERE user_id = $1 AND description IN ('geste commercial', 'erreur de saisie')",
            &[&account.0],
        )
        .await
        .expect("transactions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        operators,
        [json!("token:Léa Martin"), json!("token:Léa Martin")]
    );
}
