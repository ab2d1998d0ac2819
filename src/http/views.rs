//! Response shapes (camelCase, every amount named with its unit) and the
//! paging parameters shared by the history routes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::error::ApiError;
use crate::ledger::{GrantRecord, GrantSpend, HoldRecord, TransactionRecord, UsageRecord};

/// The part of a debit or usage one grant paid.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaidByView {
    pub grant_id: Uuid,
    /// `PAID` or `PROMO`.
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub amount_micros: i64,
}

fn paid_by(spends: &[GrantSpend]) -> Vec<PaidByView> {
    spends
        .iter()
        .map(|spend| PaidByView {
            grant_id: spend.grant_id,
            kind: spend.kind.as_str(),
            amount_micros: spend.amount_micros.get(),
        })
        .collect()
}

/// A grant with money left: spent in order, promo before paid, then
/// earliest expiry (none last), then oldest.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrantView {
    pub id: Uuid,
    /// `PAID` (never expires) or `PROMO`.
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub amount_micros: i64,
    pub remaining_micros: i64,
    /// None: never expires.
    pub expires_at: Option<DateTime<Utc>>,
    /// The Stripe Checkout session of a top-up, else the credit's key.
    pub source: String,
}

impl From<&GrantRecord> for GrantView {
    fn from(g: &GrantRecord) -> Self {
        GrantView {
            id: g.id,
            kind: g.kind.as_str(),
            amount_micros: g.amount_micros.get(),
            remaining_micros: g.remaining_micros.get(),
            expires_at: g.expires_at,
            source: g.source.clone(),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionView {
    pub id: Uuid,
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    #[schema(value_type = String)]
    pub direction: &'static str,
    pub amount_micros: i64,
    pub description: Option<String>,
    pub stripe_session_id: Option<String>,
    /// A top-up's invoice page (Stripe's hosted invoice), when it has one.
    pub invoice_url: Option<String>,
    pub balance_before_micros: i64,
    pub balance_after_micros: i64,
    pub created_at: DateTime<Utc>,
    /// A debit's grants, in spend order; amountMicros − their sum is the
    /// debt it left. Empty for a credit.
    pub paid_by: Vec<PaidByView>,
}

impl From<&TransactionRecord> for TransactionView {
    fn from(t: &TransactionRecord) -> Self {
        TransactionView {
            id: t.id,
            kind: t.kind.as_str(),
            direction: t.direction.as_str(),
            amount_micros: t.amount_micros.get(),
            description: t.description.clone(),
            stripe_session_id: t.stripe_session_id.clone(),
            invoice_url: t
                .metadata
                .as_ref()
                .and_then(|m| m.get("invoiceUrl"))
                .and_then(serde_json::Value::as_str)
                .filter(|url| url.starts_with("https://") || url.starts_with("http://"))
                .map(str::to_owned),
            balance_before_micros: t.balance_before_micros.get(),
            balance_after_micros: t.balance_after_micros.get(),
            created_at: t.created_at,
            paid_by: paid_by(&t.paid_by),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageView {
    pub id: Uuid,
    pub hold_id: Uuid,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub total_tokens: u64,
    pub cost_micros: i64,
    pub held_micros: i64,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    pub balance_after_micros: i64,
    pub created_at: DateTime<Utc>,
    /// The grants that paid its cost, in spend order; costMicros − their
    /// sum is the debt it left.
    pub paid_by: Vec<PaidByView>,
    /// The gateway API key it was made with (null: a session).
    pub api_key_id: Option<Uuid>,
}

impl From<&UsageRecord> for UsageView {
    fn from(u: &UsageRecord) -> Self {
        UsageView {
            id: u.id,
            hold_id: u.hold_id.0,
            model: u.model.clone(),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_tokens,
            cache_write_tokens: u.cache_write_tokens,
            total_tokens: u
                .input_tokens
                .saturating_add(u.output_tokens)
                .saturating_add(u.cache_read_tokens)
                .saturating_add(u.cache_write_tokens),
            cost_micros: u.cost_micros.get(),
            held_micros: u.held_micros.get(),
            conversation_id: u.conversation_id.clone(),
            message_id: u.message_id.clone(),
            balance_after_micros: u.balance_after_micros.get(),
            created_at: u.created_at,
            api_key_id: u.api_key_id.map(|key| key.0),
            paid_by: paid_by(&u.paid_by),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    pub id: Uuid,
    pub amount_micros: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl From<&HoldRecord> for HoldView {
    fn from(h: &HoldRecord) -> Self {
        HoldView {
            id: h.id.0,
            amount_micros: h.amount_micros.get(),
            created_at: h.created_at,
            expires_at: h.expires_at,
        }
    }
}

/// A page of transactions, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransactionsPage {
    pub items: Vec<TransactionView>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

/// A page of usages, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagesPage {
    pub items: Vec<UsageView>,
    pub next_cursor: Option<String>,
}

/// One UTC day of the usage chart.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DailyUsageView {
    pub date: chrono::NaiveDate,
    pub cost_micros: i64,
    pub chats: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
}

/// `GET /api/credits/usage/daily`: spend per UTC day, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = DailyUsage)]
pub struct DailyUsageList {
    pub days: Vec<DailyUsageView>,
}

/// `POST /api/credits/claim-bonus`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedBonus {
    pub transaction: TransactionView,
    pub already_claimed: bool,
}

/// `POST /api/credits/referral`: the code was taken.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Referred {
    pub referred: bool,
    /// This user had presented the same code before.
    pub already_applied: bool,
}

/// `GET /api/credits/auto-recharge` (and `PUT`'s answer): the settings,
/// why creditd switched them off, and this month's auto-recharged total.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeView {
    pub enabled: bool,
    pub threshold_cents: Option<i64>,
    pub amount_cents: Option<i64>,
    /// Set when creditd switched auto-recharge off (e.g. a declined card).
    pub disabled_reason: Option<String>,
    pub has_saved_card: bool,
    pub month_total_cents: i64,
    pub monthly_max_cents: i64,
    pub limits: AutoRechargeBounds,
}

/// The bounds `PUT /api/credits/auto-recharge` accepts, in cents.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeBounds {
    pub min_amount_cents: i64,
    pub max_amount_cents: i64,
    pub min_threshold_cents: i64,
    pub max_threshold_cents: i64,
}

/// `POST /api/credits/topup`: the Checkout Session to send the user to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TopupSession)]
pub struct TopupSessionView {
    pub url: String,
    pub session_id: String,
}

/// What a platform chat cost.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatCredits {
    /// Cents, rounded up.
    pub used: i64,
    pub used_micros: i64,
    /// Cents, rounded down.
    pub balance: i64,
    pub balance_micros: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
}

impl From<&UsageRecord> for ChatCredits {
    fn from(record: &UsageRecord) -> Self {
        ChatCredits {
            used: record.cost_micros.ceil_cents(),
            used_micros: record.cost_micros.get(),
            balance: record.balance_after_micros.floor_cents(),
            balance_micros: record.balance_after_micros.get(),
            input_tokens: record.input_tokens,
            output_tokens: record.output_tokens,
            cache_read_tokens: record.cache_read_tokens,
            cache_write_tokens: record.cache_write_tokens,
        }
    }
}

/// `POST /api/chat` without `stream`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatAnswer {
    pub content: String,
    pub model: String,
    /// Absent for a chat on the user's own key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<ChatCredits>,
}

/// One provider's saved key: whether it is set and its last 4 characters.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SavedKey {
    pub set: bool,
    pub last4: Option<String>,
}

/// The user's own provider keys, never whole.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavedKeys {
    pub anthropic: SavedKey,
    pub openai: SavedKey,
    pub has_byok: bool,
}

/// `POST /admin/accounts/{userId}/credits`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Adjusted {
    pub transaction: TransactionView,
    pub replayed: bool,
    pub balance_micros: i64,
    pub held_micros: i64,
    pub available_micros: i64,
}

/// `GET /admin/accounts/{userId}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminAccount {
    pub balance_micros: i64,
    pub held_micros: i64,
    pub available_micros: i64,
    pub user_id: String,
    pub account_id: i64,
    pub version: i64,
    pub plan: String,
    pub holds: Vec<HoldView>,
    /// Grants with money left, in spend order.
    pub grants: Vec<GrantView>,
    pub transactions: Vec<TransactionView>,
    pub usages: Vec<UsageView>,
    /// Its top-ups' follow-ups not done yet (card, invoice link), newest
    /// first: PENDING ones are retried, FAILED ones were given up.
    pub follow_ups: Vec<crate::payments::followup::FollowUpView>,
    /// The person saved an own provider key (BYOK); the key never shows.
    pub has_byok: bool,
    /// Auto-recharge as the person set it (null: never set).
    pub auto_recharge: Option<AdminAutoRecharge>,
    /// Whether a card is saved for auto-recharges.
    pub has_saved_card: bool,
}

/// An account's auto-recharge, as an operator sees it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminAutoRecharge {
    pub enabled: bool,
    pub threshold_cents: i64,
    pub amount_cents: i64,
    /// Why creditd switched it off (Stripe's decline code, no_saved_card,
    /// dispute, refunded, account_deleted).
    pub disabled_reason: Option<String>,
}

/// `GET /admin/events`: the outbox's events, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    pub events: Vec<crate::events::store::EventDelivery>,
}

/// `GET /admin/emails`: the alert and receipt emails, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmailList {
    pub emails: Vec<crate::email::store::EmailDelivery>,
}

/// `GET /admin/accounts`: the users a search found.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FoundUsers {
    pub users: Vec<crate::accounts::FoundUser>,
}

/// `GET /admin/actions`: what operators did, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OperatorActions {
    pub actions: Vec<crate::operators::OperatorAction>,
}

/// `POST /admin/accounts/{userId}/auto-recharge/off`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwitchedOff {
    /// It was on, and this switched it off.
    pub was_on: bool,
}

/// `GET /admin/platform`: the engine and the queues now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformView {
    /// The last background check of the database answered.
    pub database_up: bool,
    /// Journal entries waiting for their batch on this instance.
    pub journal_queue_depth: usize,
    /// The journal writer made no progress for `journal.stall_after_ms`.
    pub journal_stalled: bool,
    /// Accounts whose actor is in memory on this instance.
    pub resident_accounts: usize,
    /// Platform chats whose settlement is not yet posted, on this instance.
    pub pending_settlements: usize,
    pub events_pending: i64,
    pub events_failed: i64,
    pub emails_pending: i64,
    pub emails_failed: i64,
    /// What every account did in the last hour (all instances: from the
    /// committed journal).
    pub last_hour: ActivityView,
}

/// What every account did in a period, from the committed journal.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ActivityView {
    /// Settled chats.
    pub chats: i64,
    /// What they cost.
    pub spend_micros: i64,
    /// Top-ups credited (Checkout and auto-recharge).
    pub top_ups: i64,
    pub top_up_micros: i64,
    /// Refunds taken back.
    pub refunds: i64,
    pub refund_micros: i64,
}

impl From<crate::ledger::Activity> for ActivityView {
    fn from(activity: crate::ledger::Activity) -> ActivityView {
        ActivityView {
            chats: activity.chats,
            spend_micros: activity.spend_micros.get(),
            top_ups: activity.top_ups,
            top_up_micros: activity.top_up_micros.get(),
            refunds: activity.refunds,
            refund_micros: activity.refund_micros.get(),
        }
    }
}

/// A webhook delivery taken (or already taken: `duplicate`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Received)]
pub struct WebhookReceipt {
    pub received: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<bool>,
}

impl WebhookReceipt {
    /// The receipt of a delivery: taken, or taken before (`duplicate`).
    pub fn of<O>(received: &crate::webhooks::Received<O>) -> WebhookReceipt {
        match received {
            crate::webhooks::Received::Duplicate => WebhookReceipt::duplicate(),
            crate::webhooks::Received::Applied(_) => WebhookReceipt::taken(),
        }
    }

    /// Taken now.
    pub fn taken() -> WebhookReceipt {
        WebhookReceipt {
            received: true,
            duplicate: None,
        }
    }

    /// Taken before: this delivery changes nothing.
    pub fn duplicate() -> WebhookReceipt {
        WebhookReceipt {
            received: true,
            duplicate: Some(true),
        }
    }
}

/// `/healthz`, `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    #[schema(value_type = String)]
    pub status: &'static str,
}

/// `limit` and `cursor` of a history page.
#[derive(Debug)]
pub struct Page {
    pub limit: i64,
    pub before_seq: Option<i64>,
}

const CURSOR_PREFIX: &str = "seq:";

pub fn encode_cursor(seq: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{CURSOR_PREFIX}{seq}"))
}

fn decode_cursor(cursor: &str) -> Option<i64> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    text.strip_prefix(CURSOR_PREFIX)?
        .parse()
        .ok()
        .filter(|seq| *seq > 0)
}

impl Page {
    /// Parses `?limit=1..=100&cursor=…`; anything else is refused by name.
    pub fn parse(query: &str) -> Result<Page, ApiError> {
        let pairs = actix_web::web::Query::<Vec<(String, String)>>::from_query(query)
            .map_err(|e| ApiError::invalid(format!("query string: {e}")))?
            .into_inner();
        let mut page = Page {
            limit: 20,
            before_seq: None,
        };
        for (name, value) in pairs {
            match name.as_str() {
                "limit" => {
                    page.limit = value
                        .parse::<i64>()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid("field `limit`: must be an integer from 1 to 100")
                        })?;
                }
                "cursor" => {
                    page.before_seq = Some(decode_cursor(&value).ok_or_else(|| {
                        ApiError::invalid("field `cursor`: not a cursor this service issued")
                    })?);
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "field `{other}`: unknown query parameter (expected limit, cursor)"
                    )))
                }
            }
        }
        Ok(page)
    }

    /// The cursor of the next page, when this one is full.
    pub fn next_cursor(&self, count: usize, last_seq: Option<i64>) -> Option<String> {
        (count as i64 == self.limit)
            .then_some(last_seq)
            .flatten()
            .map(encode_cursor)
    }
}

/// What the balance page reads from PostgreSQL for one account, kept while
/// the account's version stays the same: the page is polled far more often
/// than the account changes, and the version moves with every entry.
pub struct History {
    pub version: i64,
    /// Read with PostgreSQL at `version` and nothing in it still to come
    /// (an invoice link): it stays true until the version moves or the
    /// keys change, so it may be cached and its page given an `ETag`.
    pub settled: bool,
    pub has_byok: bool,
    /// Serialized once: the page is read far more often than it changes.
    pub transactions: Box<RawValue>,
    pub usages: Box<RawValue>,
}

/// A gateway API key as lists show it: never its secret.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyView {
    pub id: Uuid,
    /// The key's first characters (`cd_` and 8 more), to tell keys apart.
    pub prefix: String,
    pub name: String,
    /// null: no limit.
    pub spend_limit_micros: Option<i64>,
    /// null: never.
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// What the key's usages cost so far.
    pub spent_micros: i64,
}

impl From<&crate::api_keys::ApiKeySummary> for ApiKeyView {
    fn from(key: &crate::api_keys::ApiKeySummary) -> Self {
        ApiKeyView {
            id: key.id.0,
            prefix: key.prefix.clone(),
            name: key.name.clone(),
            spend_limit_micros: key.spend_limit.map(crate::money::Micros::get),
            expires_at: key.expires_at,
            created_at: key.created_at,
            last_used_at: key.last_used_at,
            spent_micros: key.spent.get(),
        }
    }
}

/// A key just made: its secret, shown this once, and the key as listed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKeyView {
    /// The whole key (`cd_…`): store it now, it is never shown again.
    pub key: String,
    pub api_key: ApiKeyView,
}

/// The account's live gateway keys, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ApiKeysView {
    pub keys: Vec<ApiKeyView>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_cursors_are_refused() {
        let page = Page::parse(&format!("limit=5&cursor={}", encode_cursor(42))).unwrap();
        assert_eq!((page.limit, page.before_seq), (5, Some(42)));
        assert!(Page::parse("cursor=abc").is_err());
        assert!(Page::parse("limit=0").is_err());
        assert!(Page::parse("limit=101").is_err());
        assert!(Page::parse("limit=ten").is_err());
        assert!(Page::parse("offset=3")
            .unwrap_err()
            .message
            .contains("offset"));
    }
}
