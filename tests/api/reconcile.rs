//! `reconcile` finds every kind of drift between the journal and the
//! balances: a test that only ever sees it clean proves nothing.

use creditd::ledger::reconcile::reconcile;
use creditd::ledger::{HoldId, TransactionType, UsageCharge};
use creditd::pricing::TokenUsage;

use crate::support::*;

/// A ledger with one of each entry: a credit, a settled hold, an active hold.
async fn busy_ledger() -> TestDb {
    let db = TestDb::new().await;
    let engine = db.engine(&settings());
    let account = db.user("user_reconcile").await;
    engine
        .credit(account, posting("seed", TransactionType::TopUp, eur(10)))
        .await
        .expect("credit");
    let settled = HoldId::generate();
    engine
        .reserve(account, settled, eur(1))
        .await
        .expect("reserve");
    let charge = UsageCharge {
        model: "claude-haiku-4-5".into(),
        tokens: TokenUsage {
            input_tokens: 100,
            output_tokens: 100,
            cache_read_tokens: 0,
            cache_write_tokens: 0,
        },
        cost: micros(12_345),
        conversation_id: None,
        message_id: None,
        api_key: None,
    };
    engine
        .settle(account, settled, charge)
        .await
        .expect("settle");
    engine
        .reserve(account, HoldId::generate(), eur(2))
        .await
        .expect("reserve");
    engine.shutdown(std::time::Duration::from_secs(5)).await;
    db.reconcile_is_clean().await;
    db
}

async fn problems_after(tamper: &str) -> Vec<creditd::ledger::reconcile::Problem> {
    let db = busy_ledger().await;
    let mut client = db.client().await;
    client.batch_execute(tamper).await.expect("tamper");
    let report = reconcile(&mut client).await.expect("reconcile");
    assert!(!report.clean);
    report.problems
}

async fn checks_failing_after(tamper: &str) -> Vec<&'static str> {
    let mut checks: Vec<&'static str> = problems_after(tamper)
        .await
        .iter()
        .map(|p| p.check)
        .collect();
    checks.dedup();
    checks
}

#[actix::test]
async fn a_balance_that_disagrees_with_the_journal_is_reported() {
    let checks =
        checks_failing_after("UPDATE credit_balances SET balance_micros = balance_micros + 1")
            .await;
    // The balance no longer matches its grants either.
    assert_eq!(checks, vec!["balance", "grants"]);
}

#[actix::test]
async fn a_held_amount_that_disagrees_with_the_active_holds_is_reported() {
    let checks =
        checks_failing_after("UPDATE credit_balances SET held_micros = held_micros + 1").await;
    assert_eq!(checks, vec!["held"]);
}

#[actix::test]
async fn a_broken_running_balance_is_reported() {
    let checks = checks_failing_after(
        "UPDATE credit_transactions SET balance_before_micros = 5, balance_after_micros = 10000005",
    )
    .await;
    assert!(checks.contains(&"chain"), "{checks:?}");
}

#[actix::test]
async fn an_entry_applied_twice_or_lost_breaks_the_sequence() {
    let checks = checks_failing_after("UPDATE credit_balances SET version = version + 1").await;
    assert_eq!(checks, vec!["sequence"]);
}

#[actix::test]
async fn a_usage_without_its_settled_hold_is_an_orphan() {
    let checks = checks_failing_after(
        "UPDATE credit_holds SET status = 'RELEASED' WHERE status = 'SETTLED'",
    )
    .await;
    assert!(checks.contains(&"orphan"), "{checks:?}");
}

#[actix::test]
async fn journal_rows_of_an_account_without_a_balance_row_are_orphans() {
    let checks = checks_failing_after("DELETE FROM credit_balances").await;
    assert_eq!(checks, vec!["orphan"]);
}

#[actix::test]
async fn an_event_without_the_change_that_caused_it_is_reported() {
    let checks = checks_failing_after("UPDATE outgoing_events SET seq = seq + 100").await;
    assert_eq!(checks, vec!["event"]);
}

#[actix::test]
async fn an_event_numbered_past_a_number_never_given_is_reported() {
    let checks = checks_failing_after("UPDATE outgoing_events SET sequence = 2").await;
    assert_eq!(checks, vec!["eventSequence"]);
}

#[actix::test]
async fn grants_holding_more_or_less_than_the_balance_are_reported() {
    let more = checks_failing_after(
        "UPDATE credit_grants SET remaining_micros = remaining_micros + 1, amount_micros = amount_micros + 1",
    )
    .await;
    assert_eq!(more, vec!["grants"]);
    let less =
        checks_failing_after("UPDATE credit_grants SET remaining_micros = remaining_micros - 1")
            .await;
    assert_eq!(less, vec!["grants"]);
}

#[actix::test]
async fn a_usage_paid_by_more_than_it_cost_is_reported() {
    let checks = checks_failing_after(
        "UPDATE credit_usages SET paid_by = jsonb_build_array(jsonb_build_object(
             'grantId', paid_by->0->>'grantId', 'kind', 'PAID', 'amountMicros', cost_micros + 1))",
    )
    .await;
    assert_eq!(checks, vec!["paidBy"]);
}

#[actix::test]
async fn a_grant_that_paid_more_than_it_had_is_reported() {
    let checks = checks_failing_after(
        "UPDATE credit_grants SET remaining_micros = amount_micros;
         UPDATE credit_balances SET balance_micros = balance_micros + 12345",
    )
    .await;
    assert!(checks.contains(&"paidBy"), "{checks:?}");
}

#[actix::test]
async fn a_grant_spent_after_it_expired_is_reported() {
    let problems = problems_after(
        "UPDATE credit_grants SET kind = 'PROMO', expires_at = created_at - interval '1 hour'",
    )
    .await;
    let expiry: Vec<&str> = problems
        .iter()
        .filter(|p| p.check == "expiry")
        .map(|p| p.detail.as_str())
        .collect();
    // The usage it paid after its expiry (its hold was placed after it).
    assert_eq!(expiry.len(), 1, "{problems:?}");
    assert!(expiry[0].contains("after it expired"), "{problems:?}");
}
