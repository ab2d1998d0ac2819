//! Every Prometheus family creditd exports, described in one place. Families
//! with a known, small label set start at zero, so a scrape shows them before
//! the first event. HTTP families are labelled by route template (`unmatched`
//! for any path no route matched) and a standard method (else `OTHER`),
//! never by raw path, raw method or user id: their label sets are closed.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use crate::ledger::TransactionType;
use crate::pricing::PriceTable;

const TRANSACTION_TYPES: [TransactionType; 6] = [
    TransactionType::SignupBonus,
    TransactionType::TopUp,
    TransactionType::PromoBonus,
    TransactionType::Refund,
    TransactionType::Dispute,
    TransactionType::Adjustment,
];

/// Describes every family and registers the zero-valued ones.
pub fn describe(prices: &PriceTable) {
    describe_counter!(
        "creditd_http_requests_total",
        "HTTP requests by route template, method and status"
    );
    describe_histogram!(
        "creditd_http_request_duration_seconds",
        Unit::Seconds,
        "HTTP request duration by route template, method and status"
    );
    describe_counter!(
        "creditd_ledger_operations_total",
        "Ledger operations by kind and outcome"
    );
    describe_counter!(
        "creditd_reserves_refused_total",
        "Reserves refused for insufficient credits"
    );
    describe_counter!(
        "creditd_spend_limit_refusals_total",
        "Reserves refused by a spending limit, by window (daily, monthly)"
    );
    describe_counter!(
        "creditd_referral_bonuses_total",
        "Referral bonuses paid (two per rewarded referral)"
    );
    describe_counter!(
        "creditd_referral_reversals_total",
        "Referral bonuses taken back (the paying top-up refunded or disputed) or given back (dispute won), one per side"
    );
    describe_counter!("creditd_holds_expired_total", "Holds released by expiry");
    describe_counter!(
        "creditd_accounts_evicted_total",
        "Resident account copies dropped as stale, by reason (written_elsewhere, listener_lost)"
    );
    describe_counter!(
        "creditd_account_loads_retried_total",
        "Account loads that read an inconsistent state and read a fresh snapshot"
    );
    describe_gauge!("creditd_active_holds", "Active holds in PostgreSQL");
    describe_gauge!(
        "creditd_account_actors_resident",
        "Account actors resident in memory"
    );
    describe_histogram!(
        "creditd_journal_batch_size",
        "Journal entries per group commit"
    );
    describe_histogram!(
        "creditd_journal_commit_seconds",
        Unit::Seconds,
        "Duration of one group commit"
    );
    describe_gauge!(
        "creditd_journal_queue_depth",
        "Journal entries waiting for the writer"
    );
    describe_counter!(
        "creditd_journal_entries_total",
        "Journal entries by outcome (committed, failed, dropped)"
    );
    describe_counter!(
        "creditd_journal_batches_total",
        "Journal batches by outcome (committed; split: retried one account per transaction after a database error; failed)"
    );
    describe_counter!(
        "creditd_journal_accounts_refused_total",
        "Accounts failed in a batch because PostgreSQL would refuse or did not write an entry of theirs"
    );
    describe_counter!(
        "creditd_credited_micros_total",
        "Micros credited, by transaction type"
    );
    describe_counter!(
        "creditd_charged_micros_total",
        "Micros charged for usage, by model"
    );
    describe_counter!(
        "creditd_rate_limited_total",
        "Requests refused with 429 RATE_LIMITED, by limit"
    );
    describe_gauge!(
        "creditd_database_up",
        "1 when the last background health check reached the database"
    );
    describe_counter!(
        "creditd_topup_amount_mismatch_total",
        "Paid top-up sessions not credited: amount_total differs from metadata.amountCents"
    );
    describe_gauge!(
        "creditd_topup_followups_pending",
        "Paid top-ups whose follow-ups (card saved, invoice link read) are not done nor given up (read by the follow-up worker)"
    );
    describe_counter!(
        "creditd_topup_followups_done_total",
        "Top-up follow-ups done (card saved, invoice link read)"
    );
    describe_counter!(
        "creditd_topup_followup_failures_total",
        "Top-up follow-up attempts that failed (Stripe unavailable or unreadable; retried or given up)"
    );
    describe_counter!(
        "creditd_topup_followups_failed_total",
        "Top-up follow-ups given up after stripe.followup_attempts_max"
    );
    describe_counter!(
        "creditd_request_body_timeouts_total",
        "Request bodies not received within server.client_request_timeout_ms"
    );
    describe_counter!(
        "creditd_jwks_refresh_failures_total",
        "JWKS refetches that failed (the last good keys were kept)"
    );
    describe_gauge!(
        "creditd_events_pending",
        "Outgoing events recorded and not yet delivered nor failed (read by the sender)"
    );
    describe_counter!(
        "creditd_events_delivered_total",
        "Outgoing events the receiver acknowledged with a 2xx"
    );
    describe_counter!(
        "creditd_events_failed_total",
        "Outgoing events given up after events.retry_for_hours"
    );
    describe_counter!(
        "creditd_event_delivery_failures_total",
        "Delivery attempts of outgoing events that failed (retried or given up)"
    );
    describe_counter!(
        "creditd_auto_recharges_submitted_total",
        "Auto-recharge PaymentIntents Stripe accepted (credited on payment_intent.succeeded)"
    );
    describe_counter!(
        "creditd_auto_recharges_failed_total",
        "Auto-recharge attempts refused (declined card, authentication required, no card): switched off"
    );
    describe_counter!(
        "creditd_auto_recharges_capped_total",
        "Spending under an auto-recharge threshold that started nothing: credits.auto_recharge_monthly_cents_max reached"
    );
    describe_counter!(
        "creditd_auto_recharges_canceled_total",
        "Auto-recharge attempts the payment worker canceled before paying, by reason (disabled, account_deleted, card_changed, monthly_cap, timed_out)"
    );
    describe_counter!(
        "creditd_auto_recharges_looked_up_total",
        "Auto-recharge attempts past recharge.attempt_timeout_s looked up on Stripe, by outcome (found: adopted; not_found: canceled)"
    );
    metrics::counter!("creditd_auto_recharges_submitted_total").increment(0);
    metrics::counter!("creditd_auto_recharges_failed_total").increment(0);
    metrics::counter!("creditd_auto_recharges_capped_total").increment(0);
    metrics::counter!("creditd_events_delivered_total").increment(0);
    metrics::counter!("creditd_events_failed_total").increment(0);
    metrics::counter!("creditd_event_delivery_failures_total").increment(0);
    for limit in ["chats_in_flight", "topups", "unauthenticated"] {
        metrics::counter!("creditd_rate_limited_total", "limit" => limit).increment(0);
    }
    metrics::counter!("creditd_topup_amount_mismatch_total").increment(0);
    metrics::counter!("creditd_topup_followups_done_total").increment(0);
    metrics::counter!("creditd_topup_followup_failures_total").increment(0);
    metrics::counter!("creditd_topup_followups_failed_total").increment(0);
    metrics::counter!("creditd_jwks_refresh_failures_total").increment(0);
    metrics::counter!("creditd_reserves_refused_total").increment(0);
    metrics::counter!("creditd_holds_expired_total").increment(0);
    metrics::counter!("creditd_referral_bonuses_total").increment(0);
    for step in ["taken_back", "given_back"] {
        metrics::counter!("creditd_referral_reversals_total", "step" => step).increment(0);
    }
    for window in ["daily", "monthly"] {
        metrics::counter!("creditd_spend_limit_refusals_total", "window" => window).increment(0);
    }
    metrics::gauge!("creditd_journal_queue_depth").set(0.0);
    for kind in TRANSACTION_TYPES {
        metrics::counter!("creditd_credited_micros_total", "kind" => kind.as_str()).increment(0);
    }
    for (model, _) in prices.models() {
        metrics::counter!("creditd_charged_micros_total", "model" => model.to_owned()).increment(0);
    }
}
