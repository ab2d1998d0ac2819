//! How a database failure on a request path answers: out of reach is 503
//! `UNAVAILABLE` with `Retry-After` (the same request succeeds later); a
//! constraint creditd broke is 500 `INTERNAL` without `Retry-After` (a retry
//! changes nothing), whatever the driver's error said.

use crate::support::*;

/// Makes every new referral code break a unique constraint, as a write
/// that collides with an existing row does.
async fn break_referral_codes(app: &TestApp) {
    app.db
        .client()
        .await
        .batch_execute(
            "CREATE FUNCTION collide() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 RAISE unique_violation USING CONSTRAINT = 'referral_codes_code_key';
             END $$;
             CREATE TRIGGER collide BEFORE INSERT ON referral_codes
                FOR EACH ROW EXECUTE FUNCTION collide();",
        )
        .await
        .expect("install the colliding trigger");
}

#[actix::test]
async fn a_unique_violation_on_a_request_path_is_an_internal_error_with_no_retry() {
    let app = spawn_app().await;
    app.db.user("user_collide").await;
    break_referral_codes(&app).await;

    let response = app.get_as("user_collide", "/api/credits/referral").await;
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = json_of(response).await;

    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "INTERNAL");
    assert_eq!(retry_after, None, "a retry would meet the same constraint");
    assert!(
        !body.to_string().contains("referral_codes"),
        "no internals leak: {body}"
    );
}

#[actix::test]
async fn a_database_out_of_reach_answers_unavailable_with_retry_after() {
    let app = spawn_app().await;
    app.db.user("user_cut_off").await;

    let cut = cut_database(&app).await;
    let response = app.get_as("user_cut_off", "/api/credits/referral").await;
    cut.restore().await;
    let retry_after = response.headers().get("retry-after").cloned();
    let (status, body) = json_of(response).await;

    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "UNAVAILABLE");
    assert_eq!(
        retry_after.as_ref().and_then(|value| value.to_str().ok()),
        Some("1"),
        "{body}"
    );
    assert_eq!(
        app.get_as("user_cut_off", "/api/credits/referral")
            .await
            .status()
            .as_u16(),
        200,
        "the same request succeeds once the database is back"
    );
}
