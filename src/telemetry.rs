//! Every Prometheus family creditd exports, declared and described in one
//! place: each family is a named static (name, kind, unit, help, labels) and
//! every `metrics::counter!`/`gauge!`/`histogram!` call in creditd names one
//! of them. Families with a known, small label set start at zero, so a
//! scrape shows them before the first event. HTTP families are labelled by
//! route template (`unmatched` for any path no route matched) and a standard
//! method (else `OTHER`), never by raw path, raw method or user id: their
//! label sets are closed.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

use crate::pricing::PriceTable;

/// What a family measures, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family: declared once here, named by every call that records
/// it, described from the same row.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
    /// The labels every sample carries (closed sets, never a user id).
    pub labels: &'static [&'static str],
}

impl Family {
    fn describe(&self) {
        match (self.kind, self.unit) {
            (Kind::Counter, Some(unit)) => describe_counter!(self.name, unit, self.help),
            (Kind::Counter, None) => describe_counter!(self.name, self.help),
            (Kind::Gauge, Some(unit)) => describe_gauge!(self.name, unit, self.help),
            (Kind::Gauge, None) => describe_gauge!(self.name, self.help),
            (Kind::Histogram, Some(unit)) => describe_histogram!(self.name, unit, self.help),
            (Kind::Histogram, None) => describe_histogram!(self.name, self.help),
        }
    }
}

/// `creditd_http_requests_total`.
pub static HTTP_REQUESTS_TOTAL: Family = Family {
    name: "creditd_http_requests_total",
    kind: Kind::Counter,
    unit: None,
    help: "HTTP requests by route template, method and status",
    labels: &["route", "method", "status"],
};

/// `creditd_http_request_duration_seconds`.
pub static HTTP_REQUEST_DURATION_SECONDS: Family = Family {
    name: "creditd_http_request_duration_seconds",
    kind: Kind::Histogram,
    unit: Some(Unit::Seconds),
    help: "HTTP request duration by route template, method and status",
    labels: &["route", "method", "status"],
};

/// `creditd_ledger_operations_total`.
pub static LEDGER_OPERATIONS_TOTAL: Family = Family {
    name: "creditd_ledger_operations_total",
    kind: Kind::Counter,
    unit: None,
    help: "Ledger operations by kind and outcome",
    labels: &["kind", "outcome"],
};

/// `creditd_reserves_refused_total`.
pub static RESERVES_REFUSED_TOTAL: Family = Family {
    name: "creditd_reserves_refused_total",
    kind: Kind::Counter,
    unit: None,
    help: "Reserves refused for insufficient credits",
    labels: &[],
};

/// `creditd_spend_limit_refusals_total`.
pub static SPEND_LIMIT_REFUSALS_TOTAL: Family = Family {
    name: "creditd_spend_limit_refusals_total",
    kind: Kind::Counter,
    unit: None,
    help: "Reserves refused by a spending limit, by window (daily, monthly, api_key)",
    labels: &["window"],
};

/// `creditd_referral_bonuses_total`.
pub static REFERRAL_BONUSES_TOTAL: Family = Family {
    name: "creditd_referral_bonuses_total",
    kind: Kind::Counter,
    unit: None,
    help: "Referral bonuses paid (two per rewarded referral)",
    labels: &[],
};

/// `creditd_referral_reversals_total`.
pub static REFERRAL_REVERSALS_TOTAL: Family = Family {
    name: "creditd_referral_reversals_total",
    kind: Kind::Counter,
    unit: None,
    help: "Referral bonuses taken back (the paying top-up refunded or disputed) or given back (dispute won), one per side",
    labels: &["step"],
};

/// `creditd_holds_expired_total`.
pub static HOLDS_EXPIRED_TOTAL: Family = Family {
    name: "creditd_holds_expired_total",
    kind: Kind::Counter,
    unit: None,
    help: "Holds released by expiry",
    labels: &[],
};

/// `creditd_accounts_evicted_total`.
pub static ACCOUNTS_EVICTED_TOTAL: Family = Family {
    name: "creditd_accounts_evicted_total",
    kind: Kind::Counter,
    unit: None,
    help: "Resident account copies dropped as stale, by reason (written_elsewhere, listener_lost)",
    labels: &["reason"],
};

/// `creditd_account_loads_retried_total`.
pub static ACCOUNT_LOADS_RETRIED_TOTAL: Family = Family {
    name: "creditd_account_loads_retried_total",
    kind: Kind::Counter,
    unit: None,
    help: "Account loads that read an inconsistent state and read a fresh snapshot",
    labels: &[],
};

/// `creditd_active_holds`.
pub static ACTIVE_HOLDS: Family = Family {
    name: "creditd_active_holds",
    kind: Kind::Gauge,
    unit: None,
    help: "Active holds in PostgreSQL",
    labels: &[],
};

/// `creditd_account_actors_resident`.
pub static ACCOUNT_ACTORS_RESIDENT: Family = Family {
    name: "creditd_account_actors_resident",
    kind: Kind::Gauge,
    unit: None,
    help: "Account actors resident in memory",
    labels: &[],
};

/// `creditd_journal_batch_size`.
pub static JOURNAL_BATCH_SIZE: Family = Family {
    name: "creditd_journal_batch_size",
    kind: Kind::Histogram,
    unit: None,
    help: "Journal entries per group commit",
    labels: &[],
};

/// `creditd_journal_commit_seconds`.
pub static JOURNAL_COMMIT_SECONDS: Family = Family {
    name: "creditd_journal_commit_seconds",
    kind: Kind::Histogram,
    unit: Some(Unit::Seconds),
    help: "Duration of one group commit",
    labels: &[],
};

/// `creditd_journal_queue_depth`.
pub static JOURNAL_QUEUE_DEPTH: Family = Family {
    name: "creditd_journal_queue_depth",
    kind: Kind::Gauge,
    unit: None,
    help: "Journal entries waiting for the writer",
    labels: &[],
};

/// `creditd_journal_entries_total`.
pub static JOURNAL_ENTRIES_TOTAL: Family = Family {
    name: "creditd_journal_entries_total",
    kind: Kind::Counter,
    unit: None,
    help: "Journal entries by outcome (committed, failed, dropped)",
    labels: &["outcome"],
};

/// `creditd_journal_batches_total`.
pub static JOURNAL_BATCHES_TOTAL: Family = Family {
    name: "creditd_journal_batches_total",
    kind: Kind::Counter,
    unit: None,
    help: "Journal batches by outcome (committed; split: retried one account per transaction after a database error; failed)",
    labels: &["outcome"],
};

/// `creditd_journal_batches_rewritten_total`.
pub static JOURNAL_BATCHES_REWRITTEN_TOTAL: Family = Family {
    name: "creditd_journal_batches_rewritten_total",
    kind: Kind::Counter,
    unit: None,
    help: "Journal batches PostgreSQL refused when sent at once (a fenced account, a row skipped or not found), written again statement by statement",
    labels: &[],
};

/// `creditd_journal_accounts_refused_total`.
pub static JOURNAL_ACCOUNTS_REFUSED_TOTAL: Family = Family {
    name: "creditd_journal_accounts_refused_total",
    kind: Kind::Counter,
    unit: None,
    help: "Accounts failed in a batch because PostgreSQL would refuse or did not write an entry of theirs",
    labels: &[],
};

/// `creditd_credited_micros_total`.
pub static CREDITED_MICROS_TOTAL: Family = Family {
    name: "creditd_credited_micros_total",
    kind: Kind::Counter,
    unit: None,
    help: "Micros credited, by transaction type",
    labels: &["kind"],
};

/// `creditd_charged_micros_total`.
pub static CHARGED_MICROS_TOTAL: Family = Family {
    name: "creditd_charged_micros_total",
    kind: Kind::Counter,
    unit: None,
    help: "Micros charged for usage, by model",
    labels: &["model"],
};

/// `creditd_rate_limited_total`.
pub static RATE_LIMITED_TOTAL: Family = Family {
    name: "creditd_rate_limited_total",
    kind: Kind::Counter,
    unit: None,
    help: "Requests refused with 429 RATE_LIMITED, by limit",
    labels: &["limit"],
};

/// `creditd_database_up`.
pub static DATABASE_UP: Family = Family {
    name: "creditd_database_up",
    kind: Kind::Gauge,
    unit: None,
    help: "1 when the last background health check reached the database",
    labels: &[],
};

/// `creditd_topup_amount_mismatch_total`.
pub static TOPUP_AMOUNT_MISMATCH_TOTAL: Family = Family {
    name: "creditd_topup_amount_mismatch_total",
    kind: Kind::Counter,
    unit: None,
    help: "Paid top-up sessions not credited: amount_total differs from metadata.amountCents",
    labels: &[],
};

/// `creditd_topup_followups_pending`.
pub static TOPUP_FOLLOWUPS_PENDING: Family = Family {
    name: "creditd_topup_followups_pending",
    kind: Kind::Gauge,
    unit: None,
    help: "Paid top-ups whose follow-ups (card saved, invoice link read) are not done nor given up (read by the follow-up worker)",
    labels: &[],
};

/// `creditd_topup_followups_done_total`.
pub static TOPUP_FOLLOWUPS_DONE_TOTAL: Family = Family {
    name: "creditd_topup_followups_done_total",
    kind: Kind::Counter,
    unit: None,
    help: "Top-up follow-ups done (card saved, invoice link read)",
    labels: &[],
};

/// `creditd_topup_followup_failures_total`.
pub static TOPUP_FOLLOWUP_FAILURES_TOTAL: Family = Family {
    name: "creditd_topup_followup_failures_total",
    kind: Kind::Counter,
    unit: None,
    help: "Top-up follow-up attempts that failed (Stripe unavailable or unreadable; retried or given up)",
    labels: &[],
};

/// `creditd_topup_followups_failed_total`.
pub static TOPUP_FOLLOWUPS_FAILED_TOTAL: Family = Family {
    name: "creditd_topup_followups_failed_total",
    kind: Kind::Counter,
    unit: None,
    help: "Top-up follow-ups given up after stripe.followup_attempts_max",
    labels: &[],
};

/// `creditd_request_body_timeouts_total`.
pub static REQUEST_BODY_TIMEOUTS_TOTAL: Family = Family {
    name: "creditd_request_body_timeouts_total",
    kind: Kind::Counter,
    unit: None,
    help: "Request bodies not received within server.client_request_timeout_ms",
    labels: &[],
};

/// `creditd_jwks_refresh_failures_total`.
pub static JWKS_REFRESH_FAILURES_TOTAL: Family = Family {
    name: "creditd_jwks_refresh_failures_total",
    kind: Kind::Counter,
    unit: None,
    help: "JWKS refetches that failed (the last good keys were kept)",
    labels: &[],
};

/// `creditd_events_pending`.
pub static EVENTS_PENDING: Family = Family {
    name: "creditd_events_pending",
    kind: Kind::Gauge,
    unit: None,
    help: "Outgoing events recorded and not yet delivered nor failed (read by the sender)",
    labels: &[],
};

/// `creditd_events_delivered_total`.
pub static EVENTS_DELIVERED_TOTAL: Family = Family {
    name: "creditd_events_delivered_total",
    kind: Kind::Counter,
    unit: None,
    help: "Outgoing events the receiver acknowledged with a 2xx",
    labels: &[],
};

/// `creditd_events_failed_total`.
pub static EVENTS_FAILED_TOTAL: Family = Family {
    name: "creditd_events_failed_total",
    kind: Kind::Counter,
    unit: None,
    help: "Outgoing events given up after events.retry_for_hours",
    labels: &[],
};

/// `creditd_event_delivery_failures_total`.
pub static EVENT_DELIVERY_FAILURES_TOTAL: Family = Family {
    name: "creditd_event_delivery_failures_total",
    kind: Kind::Counter,
    unit: None,
    help: "Delivery attempts of outgoing events that failed (retried or given up)",
    labels: &[],
};

/// `creditd_emails_total`.
pub static EMAILS_TOTAL: Family = Family {
    name: "creditd_emails_total",
    kind: Kind::Counter,
    unit: None,
    help: "Alert and receipt emails by kind and outcome (sent; retried: an attempt failed; failed: given up after email.retry_for_hours; skipped: opted out, deleted, no address or too old)",
    labels: &["kind", "outcome"],
};

/// `creditd_emails_pending`.
pub static EMAILS_PENDING: Family = Family {
    name: "creditd_emails_pending",
    kind: Kind::Gauge,
    unit: None,
    help: "Emails recorded and not yet sent, failed nor skipped (read by the email sender)",
    labels: &[],
};

/// `creditd_auto_recharges_submitted_total`.
pub static AUTO_RECHARGES_SUBMITTED_TOTAL: Family = Family {
    name: "creditd_auto_recharges_submitted_total",
    kind: Kind::Counter,
    unit: None,
    help: "Auto-recharge PaymentIntents Stripe accepted (credited on payment_intent.succeeded)",
    labels: &[],
};

/// `creditd_auto_recharges_failed_total`.
pub static AUTO_RECHARGES_FAILED_TOTAL: Family = Family {
    name: "creditd_auto_recharges_failed_total",
    kind: Kind::Counter,
    unit: None,
    help: "Auto-recharge attempts refused (declined card, authentication required, no card): switched off",
    labels: &[],
};

/// `creditd_auto_recharges_capped_total`.
pub static AUTO_RECHARGES_CAPPED_TOTAL: Family = Family {
    name: "creditd_auto_recharges_capped_total",
    kind: Kind::Counter,
    unit: None,
    help: "Spending under an auto-recharge threshold that started nothing: credits.auto_recharge_monthly_cents_max reached",
    labels: &[],
};

/// `creditd_auto_recharges_canceled_total`.
pub static AUTO_RECHARGES_CANCELED_TOTAL: Family = Family {
    name: "creditd_auto_recharges_canceled_total",
    kind: Kind::Counter,
    unit: None,
    help: "Auto-recharge attempts the payment worker canceled before paying, by reason (disabled, account_deleted, card_changed, monthly_cap, timed_out)",
    labels: &["reason"],
};

/// `creditd_auto_recharges_looked_up_total`.
pub static AUTO_RECHARGES_LOOKED_UP_TOTAL: Family = Family {
    name: "creditd_auto_recharges_looked_up_total",
    kind: Kind::Counter,
    unit: None,
    help: "Auto-recharge attempts past recharge.attempt_timeout_s looked up on Stripe, by outcome (found: adopted; not_found: canceled)",
    labels: &["outcome"],
};

/// `creditd_provider_calls_total`.
pub static PROVIDER_CALLS_TOTAL: Family = Family {
    name: "creditd_provider_calls_total",
    kind: Kind::Counter,
    unit: None,
    help: "AI provider calls by provider, model and outcome",
    labels: &["provider", "model", "outcome"],
};

/// `creditd_provider_call_duration_seconds`.
pub static PROVIDER_CALL_DURATION_SECONDS: Family = Family {
    name: "creditd_provider_call_duration_seconds",
    kind: Kind::Histogram,
    unit: Some(Unit::Seconds),
    help: "AI provider call duration by provider and model",
    labels: &["provider", "model"],
};

/// `creditd_holds_released_total`.
pub static HOLDS_RELEASED_TOTAL: Family = Family {
    name: "creditd_holds_released_total",
    kind: Kind::Counter,
    unit: None,
    help: "Holds of chats released without a charge (nothing was produced), by reason",
    labels: &["reason"],
};

/// `creditd_chat_tokens_total`.
pub static CHAT_TOKENS_TOTAL: Family = Family {
    name: "creditd_chat_tokens_total",
    kind: Kind::Counter,
    unit: None,
    help: "Tokens of platform chats, by model and kind (input, output, cache_read, cache_write)",
    labels: &["model", "kind"],
};

/// `creditd_pending_settlements`.
pub static PENDING_SETTLEMENTS: Family = Family {
    name: "creditd_pending_settlements",
    kind: Kind::Gauge,
    unit: None,
    help: "Settlements of delivered answers waiting for the ledger",
    labels: &[],
};

/// `creditd_chats_refused_total`.
pub static CHATS_REFUSED_TOTAL: Family = Family {
    name: "creditd_chats_refused_total",
    kind: Kind::Counter,
    unit: None,
    help: "Chats refused before calling a provider, by reason",
    labels: &["reason"],
};

/// `creditd_settlement_retries_total`.
pub static SETTLEMENT_RETRIES_TOTAL: Family = Family {
    name: "creditd_settlement_retries_total",
    kind: Kind::Counter,
    unit: None,
    help: "Settlements retried with backoff after the ledger could not commit them",
    labels: &[],
};

/// `creditd_settlements_refused_total`.
pub static SETTLEMENTS_REFUSED_TOTAL: Family = Family {
    name: "creditd_settlements_refused_total",
    kind: Kind::Counter,
    unit: None,
    help: "Settlements the ledger refused (a bug, logged as an error)",
    labels: &[],
};

/// `creditd_webhook_events_total`.
pub static WEBHOOK_EVENTS_TOTAL: Family = Family {
    name: "creditd_webhook_events_total",
    kind: Kind::Counter,
    unit: None,
    help: "Incoming webhook events by source, type and outcome",
    labels: &["source", "type", "outcome"],
};

/// `creditd_stripe_requests_total`.
pub static STRIPE_REQUESTS_TOTAL: Family = Family {
    name: "creditd_stripe_requests_total",
    kind: Kind::Counter,
    unit: None,
    help: "Stripe API requests by operation and outcome",
    labels: &["operation", "outcome"],
};

/// `creditd_topup_currency_mismatch_total`.
pub static TOPUP_CURRENCY_MISMATCH_TOTAL: Family = Family {
    name: "creditd_topup_currency_mismatch_total",
    kind: Kind::Counter,
    unit: None,
    help: "Paid Stripe objects not credited: their currency is not the ledger's, by object",
    labels: &["object"],
};

/// `creditd_grants_expired_total`.
pub static GRANTS_EXPIRED_TOTAL: Family = Family {
    name: "creditd_grants_expired_total",
    kind: Kind::Counter,
    unit: None,
    help: "Grants expired with money left",
    labels: &[],
};

/// `creditd_late_settlements_total`.
pub static LATE_SETTLEMENTS_TOTAL: Family = Family {
    name: "creditd_late_settlements_total",
    kind: Kind::Counter,
    unit: None,
    help: "Usages posted after their hold expired, was released or was lost",
    labels: &[],
};

/// Every family, in the order they are described.
pub static FAMILIES: [&Family; 54] = [
    &HTTP_REQUESTS_TOTAL,
    &HTTP_REQUEST_DURATION_SECONDS,
    &LEDGER_OPERATIONS_TOTAL,
    &RESERVES_REFUSED_TOTAL,
    &SPEND_LIMIT_REFUSALS_TOTAL,
    &REFERRAL_BONUSES_TOTAL,
    &REFERRAL_REVERSALS_TOTAL,
    &HOLDS_EXPIRED_TOTAL,
    &ACCOUNTS_EVICTED_TOTAL,
    &ACCOUNT_LOADS_RETRIED_TOTAL,
    &ACTIVE_HOLDS,
    &ACCOUNT_ACTORS_RESIDENT,
    &JOURNAL_BATCH_SIZE,
    &JOURNAL_COMMIT_SECONDS,
    &JOURNAL_QUEUE_DEPTH,
    &JOURNAL_ENTRIES_TOTAL,
    &JOURNAL_BATCHES_TOTAL,
    &JOURNAL_BATCHES_REWRITTEN_TOTAL,
    &JOURNAL_ACCOUNTS_REFUSED_TOTAL,
    &CREDITED_MICROS_TOTAL,
    &CHARGED_MICROS_TOTAL,
    &RATE_LIMITED_TOTAL,
    &DATABASE_UP,
    &TOPUP_AMOUNT_MISMATCH_TOTAL,
    &TOPUP_FOLLOWUPS_PENDING,
    &TOPUP_FOLLOWUPS_DONE_TOTAL,
    &TOPUP_FOLLOWUP_FAILURES_TOTAL,
    &TOPUP_FOLLOWUPS_FAILED_TOTAL,
    &REQUEST_BODY_TIMEOUTS_TOTAL,
    &JWKS_REFRESH_FAILURES_TOTAL,
    &EVENTS_PENDING,
    &EVENTS_DELIVERED_TOTAL,
    &EVENTS_FAILED_TOTAL,
    &EVENT_DELIVERY_FAILURES_TOTAL,
    &EMAILS_TOTAL,
    &EMAILS_PENDING,
    &AUTO_RECHARGES_SUBMITTED_TOTAL,
    &AUTO_RECHARGES_FAILED_TOTAL,
    &AUTO_RECHARGES_CAPPED_TOTAL,
    &AUTO_RECHARGES_CANCELED_TOTAL,
    &AUTO_RECHARGES_LOOKED_UP_TOTAL,
    &PROVIDER_CALLS_TOTAL,
    &PROVIDER_CALL_DURATION_SECONDS,
    &HOLDS_RELEASED_TOTAL,
    &CHAT_TOKENS_TOTAL,
    &PENDING_SETTLEMENTS,
    &CHATS_REFUSED_TOTAL,
    &SETTLEMENT_RETRIES_TOTAL,
    &SETTLEMENTS_REFUSED_TOTAL,
    &WEBHOOK_EVENTS_TOTAL,
    &STRIPE_REQUESTS_TOTAL,
    &TOPUP_CURRENCY_MISMATCH_TOTAL,
    &GRANTS_EXPIRED_TOTAL,
    &LATE_SETTLEMENTS_TOTAL,
];

/// Describes every family and registers the zero-valued ones, with a
/// series for each kind a credit is posted as (`credited_kinds`, given by
/// the ledger's caller so this module knows no ledger type) and each model.
pub fn describe(prices: &PriceTable, credited_kinds: &[&'static str]) {
    for family in FAMILIES {
        family.describe();
    }
    metrics::counter!(AUTO_RECHARGES_SUBMITTED_TOTAL.name).increment(0);
    metrics::counter!(AUTO_RECHARGES_FAILED_TOTAL.name).increment(0);
    metrics::counter!(AUTO_RECHARGES_CAPPED_TOTAL.name).increment(0);
    metrics::counter!(EVENTS_DELIVERED_TOTAL.name).increment(0);
    metrics::counter!(EVENTS_FAILED_TOTAL.name).increment(0);
    metrics::counter!(EVENT_DELIVERY_FAILURES_TOTAL.name).increment(0);
    for limit in ["chats_in_flight", "topups", "unauthenticated"] {
        metrics::counter!(RATE_LIMITED_TOTAL.name, "limit" => limit).increment(0);
    }
    metrics::counter!(TOPUP_AMOUNT_MISMATCH_TOTAL.name).increment(0);
    metrics::counter!(TOPUP_FOLLOWUPS_DONE_TOTAL.name).increment(0);
    metrics::counter!(TOPUP_FOLLOWUP_FAILURES_TOTAL.name).increment(0);
    metrics::counter!(TOPUP_FOLLOWUPS_FAILED_TOTAL.name).increment(0);
    metrics::counter!(JWKS_REFRESH_FAILURES_TOTAL.name).increment(0);
    metrics::counter!(RESERVES_REFUSED_TOTAL.name).increment(0);
    metrics::counter!(HOLDS_EXPIRED_TOTAL.name).increment(0);
    metrics::counter!(REFERRAL_BONUSES_TOTAL.name).increment(0);
    for step in ["taken_back", "given_back"] {
        metrics::counter!(REFERRAL_REVERSALS_TOTAL.name, "step" => step).increment(0);
    }
    for window in ["daily", "monthly"] {
        metrics::counter!(SPEND_LIMIT_REFUSALS_TOTAL.name, "window" => window).increment(0);
    }
    metrics::gauge!(JOURNAL_QUEUE_DEPTH.name).set(0.0);
    for &kind in credited_kinds {
        metrics::counter!(CREDITED_MICROS_TOTAL.name, "kind" => kind).increment(0);
    }
    for (model, _) in prices.models() {
        metrics::counter!(CHARGED_MICROS_TOTAL.name, "model" => model.to_owned()).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString};

    use super::{describe, Kind, FAMILIES};

    /// Keeps the names of the families described to it.
    #[derive(Default)]
    struct Described(Arc<Mutex<Vec<(String, Kind)>>>);

    impl Described {
        fn note(&self, name: KeyName, kind: Kind) {
            if let Ok(mut names) = self.0.lock() {
                names.push((name.as_str().to_owned(), kind));
            }
        }
    }

    impl Recorder for Described {
        fn describe_counter(&self, name: KeyName, _: Option<metrics::Unit>, _: SharedString) {
            self.note(name, Kind::Counter);
        }
        fn describe_gauge(&self, name: KeyName, _: Option<metrics::Unit>, _: SharedString) {
            self.note(name, Kind::Gauge);
        }
        fn describe_histogram(&self, name: KeyName, _: Option<metrics::Unit>, _: SharedString) {
            self.note(name, Kind::Histogram);
        }
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    #[test]
    fn every_family_is_declared_once_and_described_with_its_kind() {
        let recorder = Described::default();
        let seen = recorder.0.clone();
        let settings = crate::config::Settings::default_file().expect("config.toml parses");
        let prices = crate::pricing::PriceTable::from_settings(&settings.pricing)
            .expect("the default price table converts");
        metrics::with_local_recorder(&recorder, || describe(&prices, &["TOP_UP"]));
        let described = seen.lock().map(|names| names.clone()).unwrap_or_default();
        for (index, family) in FAMILIES.iter().enumerate() {
            assert!(family.name.starts_with("creditd_"), "{}", family.name);
            assert!(
                FAMILIES[..index]
                    .iter()
                    .all(|other| other.name != family.name),
                "{} declared twice",
                family.name
            );
            assert!(
                described.contains(&(family.name.to_owned(), family.kind)),
                "{} is not described as a {:?}",
                family.name,
                family.kind
            );
        }
        assert_eq!(described.len(), FAMILIES.len());
    }

    /// A family named by a string literal anywhere in `src/` would be a
    /// family this module does not know.
    #[test]
    fn every_metric_call_names_a_declared_family() {
        let mut files = vec![std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src"
        ))];
        let mut offenders = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    files.push(entry.path());
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let flat: String = text.split_whitespace().collect();
            for call in ["counter!(\"", "gauge!(\"", "histogram!(\""] {
                if flat.contains(call) {
                    offenders.push(format!("{}: {call}", path.display()));
                }
            }
        }
        assert!(offenders.is_empty(), "literal family names: {offenders:?}");
    }
}
