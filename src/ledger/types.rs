//! The engine's vocabulary: ids, requests, records and errors.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::money::Micros;
use crate::pricing::TokenUsage;

/// A credit account: the `users.id` of its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(pub i64);

/// A hold's id. creditd generates them, so they need no lookup to be unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HoldId(pub Uuid);

impl HoldId {
    pub fn generate() -> HoldId {
        HoldId(row_id())
    }
}

/// A new id for a row of the journal's tables (holds, usages,
/// transactions, grants, events): time-ordered (UUID version 7), so each
/// table's primary key and `hold_id` index grow at their right edge, where
/// PostgreSQL inserts without descending the tree and touches few pages,
/// instead of at a random leaf each time. 74 bits stay random.
pub fn row_id() -> Uuid {
    Uuid::now_v7()
}

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A gateway API key, as the ledger knows it: the id its usages carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ApiKeyId(pub Uuid);

impl fmt::Display for ApiKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The key a hold is made with and its spend limit (`None`: none),
/// judged by the account's actor with the key's settled spend and active
/// holds, so parallel calls with one key can never pass its limit together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimit {
    pub key: ApiKeyId,
    pub limit: Option<Micros>,
}

/// A caller-chosen key that makes a credit or debit apply at most once
/// (`stripe:checkout:cs_…`, `bonus:signup:<user>`, an admin's key).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct IdempotencyKey(String);

pub const IDEMPOTENCY_KEY_MAX_LEN: usize = 200;

impl IdempotencyKey {
    pub fn parse(key: impl Into<String>) -> Result<IdempotencyKey, String> {
        let key = key.into();
        if key.is_empty() || key.len() > IDEMPOTENCY_KEY_MAX_LEN {
            return Err(format!(
                "must be 1 to {IDEMPOTENCY_KEY_MAX_LEN} characters long"
            ));
        }
        if key
            .chars()
            .any(|c| crate::text::is_refused(c) || c.is_whitespace())
        {
            return Err(
                "must not contain spaces, control or invisible formatting characters".into(),
            );
        }
        Ok(IdempotencyKey(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        IdempotencyKey::parse(value)
    }
}

impl From<IdempotencyKey> for String {
    fn from(key: IdempotencyKey) -> String {
        key.0
    }
}

/// What every account did in a period, from the committed journal (the
/// operator console's last hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activity {
    /// Settled chats (usages).
    pub chats: i64,
    /// What they cost, in micros of the ledger currency.
    pub spend_micros: Micros,
    /// Top-ups credited (Checkout and auto-recharge).
    pub top_ups: i64,
    pub top_up_micros: Micros,
    /// Refunds taken back.
    pub refunds: i64,
    pub refund_micros: Micros,
}

/// Why money moved (the seed's `CreditTransactionType`, plus disputes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransactionType {
    SignupBonus,
    TopUp,
    PromoBonus,
    Refund,
    Dispute,
    Adjustment,
    /// The unspent, unheld remainder of a grant, debited at its expiry.
    Expired,
}

impl TransactionType {
    /// Every kind a credit or an adjustment may carry: all but `EXPIRED`,
    /// which only the expiry of a grant posts.
    pub const CREDITS: [TransactionType; 6] = [
        TransactionType::SignupBonus,
        TransactionType::TopUp,
        TransactionType::PromoBonus,
        TransactionType::Refund,
        TransactionType::Dispute,
        TransactionType::Adjustment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransactionType::SignupBonus => "SIGNUP_BONUS",
            TransactionType::TopUp => "TOP_UP",
            TransactionType::PromoBonus => "PROMO_BONUS",
            TransactionType::Refund => "REFUND",
            TransactionType::Dispute => "DISPUTE",
            TransactionType::Adjustment => "ADJUSTMENT",
            TransactionType::Expired => "EXPIRED",
        }
    }

    pub fn parse(text: &str) -> Option<TransactionType> {
        [
            TransactionType::SignupBonus,
            TransactionType::TopUp,
            TransactionType::PromoBonus,
            TransactionType::Refund,
            TransactionType::Dispute,
            TransactionType::Adjustment,
            TransactionType::Expired,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Direction {
    Credit,
    Debit,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Credit => "CREDIT",
            Direction::Debit => "DEBIT",
        }
    }

    pub fn parse(text: &str) -> Option<Direction> {
        match text {
            "CREDIT" => Some(Direction::Credit),
            "DEBIT" => Some(Direction::Debit),
            _ => None,
        }
    }
}

/// A credit or debit as asked: what the key promises to apply once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub key: IdempotencyKey,
    pub kind: TransactionType,
    /// Positive; the direction says which way it moves the balance.
    pub amount: Micros,
    pub description: Option<String>,
    pub stripe_session_id: Option<String>,
    pub stripe_payment_id: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// When the grant a credit creates expires (promo credits only; paid
    /// credits never expire). Ignored by debits.
    pub expires_at: Option<DateTime<Utc>>,
}

/// What a grant's money came from: a payment (`PAID`, never expires) or a
/// gift (`PROMO`: signup bonus, promo, referral, goodwill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum GrantKind {
    Paid,
    Promo,
}

impl GrantKind {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantKind::Paid => "PAID",
            GrantKind::Promo => "PROMO",
        }
    }

    pub fn parse(text: &str) -> Option<GrantKind> {
        match text {
            "PAID" => Some(GrantKind::Paid),
            "PROMO" => Some(GrantKind::Promo),
            _ => None,
        }
    }

    /// The kind of grant a credit of this type creates: money paid (a
    /// top-up, a dispute's funds reinstated, a refund given back) or a gift.
    pub fn of_credit(kind: TransactionType) -> GrantKind {
        match kind {
            TransactionType::TopUp | TransactionType::Dispute | TransactionType::Refund => {
                GrantKind::Paid
            }
            TransactionType::SignupBonus
            | TransactionType::PromoBonus
            | TransactionType::Adjustment
            | TransactionType::Expired => GrantKind::Promo,
        }
    }
}

/// One credit as spendable money: what is left of it, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantRecord {
    pub id: Uuid,
    pub kind: GrantKind,
    pub amount_micros: Micros,
    pub remaining_micros: Micros,
    pub expires_at: Option<DateTime<Utc>>,
    /// The Stripe Checkout session of a top-up, else the credit's key
    /// (`migrated` for the balance an account had before grants existed).
    pub source: String,
    /// The Stripe payment of a top-up: its refunds and disputes take from
    /// this grant first.
    pub stripe_payment_id: Option<String>,
    /// The credit that created it (none for a migrated balance).
    pub transaction_id: Option<Uuid>,
    /// The account seq of that credit (0 when migrated): "oldest first".
    pub seq: i64,
    pub created_at: DateTime<Utc>,
}

impl GrantRecord {
    /// The spend order: promo before paid, then earliest expiry (none
    /// last), then oldest.
    pub fn spend_rank(&self) -> (u8, bool, Option<DateTime<Utc>>, i64, Uuid) {
        let paid = match self.kind {
            GrantKind::Promo => 0,
            GrantKind::Paid => 1,
        };
        (
            paid,
            self.expires_at.is_none(),
            self.expires_at,
            self.seq,
            self.id,
        )
    }

    pub fn has_expired_at(&self, at: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|expiry| expiry <= at)
    }
}

/// The part of a debit or usage one grant paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GrantSpend {
    pub grant_id: Uuid,
    pub kind: GrantKind,
    pub amount_micros: Micros,
}

/// A clawback asked for: debit what `object` (a Stripe charge) refunded
/// beyond what was already clawed back for it, up to the cumulative `target`.
#[derive(Debug, Clone)]
pub struct ClawbackRequest {
    /// The object whose refunds are clawed back (`ch_…`).
    pub object: String,
    /// Its cumulative refunded amount.
    pub target: Micros,
    /// The key of this cumulative state (`stripe:charge:<id>:refunded:<cents>`).
    pub key: IdempotencyKey,
    pub kind: TransactionType,
    /// The description of the debit, given its amount.
    pub describe: fn(Micros) -> String,
    pub stripe_payment_id: Option<String>,
    /// Must carry `{"chargeId": object}`: how past clawbacks are found.
    pub metadata: Option<serde_json::Value>,
}

/// A committed credit or debit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionRecord {
    pub id: Uuid,
    pub seq: i64,
    #[serde(rename = "type")]
    pub kind: TransactionType,
    pub direction: Direction,
    pub amount_micros: Micros,
    pub idempotency_key: IdempotencyKey,
    pub description: Option<String>,
    pub stripe_session_id: Option<String>,
    pub stripe_payment_id: Option<String>,
    pub metadata: Option<serde_json::Value>,
    pub balance_before_micros: Micros,
    pub balance_after_micros: Micros,
    pub created_at: DateTime<Utc>,
    /// For a debit: the grants that paid it, in spend order; what they did
    /// not pay (amount − their sum) became debt.
    pub paid_by: Vec<GrantSpend>,
}

impl TransactionRecord {
    /// Same key, same money: a replay. Anything else under the key is a conflict.
    pub fn matches(&self, direction: Direction, posting: &Posting) -> bool {
        self.direction == direction
            && self.kind == posting.kind
            && self.amount_micros == posting.amount
    }
}

/// An active hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HoldRecord {
    pub id: HoldId,
    pub seq: i64,
    pub amount_micros: Micros,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The gateway API key the hold was made with (`None`: a session).
    pub api_key_id: Option<ApiKeyId>,
}

/// What a settle posts: the real cost of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCharge {
    pub model: String,
    pub tokens: TokenUsage,
    pub cost: Micros,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    /// The gateway API key the request was made with (`None`: a session).
    pub api_key: Option<ApiKeyId>,
}

/// A committed usage (one settled hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    pub id: Uuid,
    pub seq: i64,
    pub hold_id: HoldId,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    pub cost_micros: Micros,
    pub held_micros: Micros,
    pub conversation_id: Option<String>,
    pub message_id: Option<String>,
    pub balance_before_micros: Micros,
    pub balance_after_micros: Micros,
    pub created_at: DateTime<Utc>,
    /// The grants that paid its cost, in spend order; what they did not
    /// pay (cost − their sum) became debt.
    pub paid_by: Vec<GrantSpend>,
    /// The gateway API key it was made with (`None`: a session).
    pub api_key_id: Option<ApiKeyId>,
}

impl UsageRecord {
    pub fn matches(&self, charge: &UsageCharge) -> bool {
        self.cost_micros == charge.cost
            && self.model == charge.model
            && self.input_tokens == charge.tokens.input_tokens
            && self.output_tokens == charge.tokens.output_tokens
            && self.cache_read_tokens == charge.tokens.cache_read_tokens
            && self.cache_write_tokens == charge.tokens.cache_write_tokens
            && self.api_key_id == charge.api_key
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HoldStatus {
    Active,
    Settled,
    Released,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Active => "ACTIVE",
            HoldStatus::Settled => "SETTLED",
            HoldStatus::Released => "RELEASED",
            HoldStatus::Expired => "EXPIRED",
        }
    }

    pub fn parse(text: &str) -> Option<HoldStatus> {
        [
            HoldStatus::Active,
            HoldStatus::Settled,
            HoldStatus::Released,
            HoldStatus::Expired,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }
}

/// A hold removed without charge (released, or expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    pub hold_id: HoldId,
    pub seq: i64,
    pub amount_micros: Micros,
    pub status: HoldStatus,
    pub finished_at: DateTime<Utc>,
}

/// How a finished hold ended, remembered to answer replays. Boxed: every
/// resident account keeps a few of these, and a usage is ~200 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishedHold {
    Settled(Box<UsageRecord>),
    Released(ReleaseRecord),
}

/// An operation's answer; `replayed` when an earlier identical request
/// already applied it and this one changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<T> {
    pub record: T,
    pub replayed: bool,
}

/// An account as its actor sees it (reads may be a few ms ahead of
/// durability, never showing a failed operation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceSnapshot {
    pub account: AccountId,
    pub balance_micros: Micros,
    pub held_micros: Micros,
    pub available_micros: Micros,
    pub version: i64,
    pub holds: Vec<HoldRecord>,
    /// Grants with money left, in spend order.
    pub grants: Vec<GrantRecord>,
}

/// An account's amounts and version, without its holds: what the balance
/// page needs, readable without a message to the account's actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceSummary {
    pub balance_micros: Micros,
    pub held_micros: Micros,
    pub available_micros: Micros,
    pub version: i64,
}

/// An account as its actor last applied it, published for reads that skip
/// the mailbox (the balance page, its stream): immutable, shared behind an
/// `Arc`, replaced whole after every applied operation. It may show an
/// operation a few milliseconds before it is durable; a view whose
/// incarnation's write failed is withdrawn (see `Directory::view`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub balance_micros: Micros,
    pub held_micros: Micros,
    pub available_micros: Micros,
    /// What the account owes beyond its grants (never negative).
    pub debt_micros: Micros,
    pub version: i64,
    /// Grants with money left, in spend order.
    pub grants: Vec<GrantRecord>,
}

impl AccountView {
    pub fn summary(&self) -> BalanceSummary {
        BalanceSummary {
            balance_micros: self.balance_micros,
            held_micros: self.held_micros,
            available_micros: self.available_micros,
            version: self.version,
        }
    }
}

impl BalanceSnapshot {
    pub fn summary(&self) -> BalanceSummary {
        BalanceSummary {
            balance_micros: self.balance_micros,
            held_micros: self.held_micros,
            available_micros: self.available_micros,
            version: self.version,
        }
    }
}

/// A spending limit's window: the UTC day or the UTC month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitWindow {
    Daily,
    Monthly,
}

impl LimitWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitWindow::Daily => "daily",
            LimitWindow::Monthly => "monthly",
        }
    }
}

/// An account's spending limits: those its owner set and the ceilings an
/// administrator set, each optional. A ceiling is a limit of its own the
/// owner cannot raise: the limit that applies is the lower of the two.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendLimits {
    pub daily_micros: Option<Micros>,
    pub monthly_micros: Option<Micros>,
    pub daily_ceiling_micros: Option<Micros>,
    pub monthly_ceiling_micros: Option<Micros>,
}

impl SpendLimits {
    /// The limit that applies in `window`: the lower of the owner's and the ceiling.
    pub fn effective(&self, window: LimitWindow) -> Option<Micros> {
        let (own, ceiling) = match window {
            LimitWindow::Daily => (self.daily_micros, self.daily_ceiling_micros),
            LimitWindow::Monthly => (self.monthly_micros, self.monthly_ceiling_micros),
        };
        match (own, ceiling) {
            (Some(own), Some(ceiling)) => Some(own.min(ceiling)),
            (own, ceiling) => own.or(ceiling),
        }
    }

    /// The ceiling of `window`, if an administrator set one.
    pub fn ceiling(&self, window: LimitWindow) -> Option<Micros> {
        match window {
            LimitWindow::Daily => self.daily_ceiling_micros,
            LimitWindow::Monthly => self.monthly_ceiling_micros,
        }
    }
}

/// A change of an account's spending limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitsChange {
    /// The owner sets their limits (`None`: no limit of their own); a limit
    /// above an administrator's ceiling is refused.
    Owner {
        daily_micros: Option<Micros>,
        monthly_micros: Option<Micros>,
    },
    /// An administrator sets everything.
    Admin(SpendLimits),
}

/// One window's spend as the account's actor counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowSpend {
    /// The limit that applies (the lower of the owner's and the ceiling).
    pub limit_micros: Option<Micros>,
    /// Settled usage in the window.
    pub spent_micros: Micros,
    /// When the window ends and its count starts again from zero.
    pub resets_at: DateTime<Utc>,
}

/// An account's limits and what its windows count now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendingSnapshot {
    pub limits: SpendLimits,
    pub daily: WindowSpend,
    pub monthly: WindowSpend,
    /// Active holds, which count against both windows until they finish.
    pub held_micros: Micros,
}

/// Every way an engine operation can fail, in the order they are checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// The request itself is invalid (amount not positive, out of range).
    #[error("{0}")]
    InvalidRequest(String),
    /// No user row for this account.
    #[error("account {0:?} does not exist")]
    AccountNotFound(AccountId),
    /// settle/release named a hold this account never had.
    #[error("hold {0} not found")]
    HoldNotFound(HoldId),
    /// Same key or hold id, different content; or a hold already finished otherwise.
    #[error("{0}")]
    Conflict(String),
    /// A reserve larger than the available amount; the balance too, so a
    /// refusal answers the client without asking the engine again.
    #[error("insufficient credits: {available:?} available, {required:?} required")]
    InsufficientCredits {
        balance: Micros,
        available: Micros,
        required: Micros,
    },
    /// A reserve that would take a window's settled spend plus its active
    /// holds past the window's limit.
    #[error("{} spending limit of {limit:?} reached: {spent:?} spent, {held:?} held, {required:?} required", window.as_str())]
    SpendLimitReached {
        window: LimitWindow,
        limit: Micros,
        spent: Micros,
        held: Micros,
        required: Micros,
        resets_at: DateTime<Utc>,
        /// Whole seconds from the refusal to `resets_at`, rounded up.
        retry_after_s: u64,
    },
    /// A reserve that would take an API key's settled spend plus its
    /// active holds past the key's spend limit.
    #[error("spend limit of API key {key} reached: {limit:?} limit, {spent:?} spent, {held:?} held, {required:?} required")]
    KeyLimitReached {
        key: ApiKeyId,
        limit: Micros,
        spent: Micros,
        held: Micros,
        required: Micros,
    },
    /// Too many operations in flight for this account or for the journal.
    #[error("too many operations in flight; retry shortly")]
    Overloaded,
    /// The database could not be reached or the batch did not commit.
    #[error("{0}")]
    Unavailable(String),
    /// The actor was reset (its journal failed or it passivated); the
    /// operation was not applied and may be sent to a fresh actor.
    #[error("account actor reset; the operation was not applied")]
    Reset,
    /// An invariant broke: a bug, never a user error.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What one journal entry makes durable: the change an operation applied.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    Transaction(TransactionRecord),
    HoldPlaced(HoldRecord),
    /// `late`: its hold was no longer active (expired, released or
    /// unknown), so no hold row is finished by it.
    Settled {
        usage: UsageRecord,
        late: bool,
    },
    Released(ReleaseRecord),
}

/// A grant row an entry inserts (`before` none) or whose remaining
/// amount it moves (from `before`).
#[derive(Debug, Clone)]
pub(crate) struct GrantWrite {
    pub grant: GrantRecord,
    pub before: Option<Micros>,
}

/// A NUL in any key or string of a JSON value (PostgreSQL's jsonb refuses it).
pub(crate) fn holds_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields
            .iter()
            .any(|(key, item)| key.contains('\0') || holds_nul(item)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// What happened, as the receiver of the events reads it.
/// Written in `outgoing_events.type` by `as_str`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    BalanceLow,
    BalanceDepleted,
    BalanceRecovered,
    TopupSucceeded,
    TopupRefunded,
    /// A hold was refused by a spending limit (once per account and window).
    SpendLimitReached,
    /// An auto-recharge attempt was decided (the event's id is the attempt's).
    AutoRechargeRequested,
    AutoRechargeSucceeded,
    AutoRechargeFailed,
    AutoRechargeDisabled,
    /// The payment worker gave an attempt up before paying it.
    AutoRechargeCanceled,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::BalanceLow => "balance.low",
            EventType::BalanceDepleted => "balance.depleted",
            EventType::BalanceRecovered => "balance.recovered",
            EventType::TopupSucceeded => "topup.succeeded",
            EventType::TopupRefunded => "topup.refunded",
            EventType::SpendLimitReached => "spend_limit.reached",
            EventType::AutoRechargeRequested => "auto_recharge.requested",
            EventType::AutoRechargeSucceeded => "auto_recharge.succeeded",
            EventType::AutoRechargeFailed => "auto_recharge.failed",
            EventType::AutoRechargeDisabled => "auto_recharge.disabled",
            EventType::AutoRechargeCanceled => "auto_recharge.canceled",
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        [
            EventType::BalanceLow,
            EventType::BalanceDepleted,
            EventType::BalanceRecovered,
            EventType::TopupSucceeded,
            EventType::TopupRefunded,
            EventType::SpendLimitReached,
            EventType::AutoRechargeRequested,
            EventType::AutoRechargeSucceeded,
            EventType::AutoRechargeFailed,
            EventType::AutoRechargeDisabled,
            EventType::AutoRechargeCanceled,
        ]
        .into_iter()
        .find(|t| t.as_str() == text)
    }
}

/// One event, written with the entry of the change that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingEvent {
    pub id: Uuid,
    pub kind: EventType,
    pub data: EventData,
    pub created_at: DateTime<Utc>,
}

/// What an outgoing event says (its `data`), one shape per kind of news.
/// Serialized as the bare payload: the receiver reads the kind from the
/// event's `type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EventData {
    Balance(BalanceAlertData),
    TopupSucceeded(TopupSucceededData),
    TopupRefunded(TopupRefundedData),
    SpendLimitReached(SpendLimitReachedData),
    AutoRechargeRequested(AutoRechargeRequestedData),
    AutoRechargeSucceeded(AutoRechargeSucceededData),
    AutoRechargeFailed(AutoRechargeFailedData),
    AutoRechargeDisabled(AutoRechargeDisabledData),
    AutoRechargeCanceled(AutoRechargeCanceledData),
}

/// `balance.low`, `balance.depleted` and `balance.recovered`: where the
/// account stands against the low threshold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceAlertData {
    pub available_micros: i64,
    pub balance_micros: i64,
    pub threshold_micros: i64,
}

/// `topup.succeeded`: a Checkout top-up was credited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopupSucceededData {
    pub transaction_id: Uuid,
    pub amount_micros: i64,
    pub balance_micros: i64,
    pub stripe_session_id: Option<String>,
    pub stripe_payment_id: Option<String>,
}

/// `topup.refunded`: a refund was debited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TopupRefundedData {
    pub transaction_id: Uuid,
    pub amount_micros: i64,
    pub balance_micros: i64,
    pub stripe_payment_id: Option<String>,
}

/// `spend_limit.reached`: a hold was refused by a spending limit's window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendLimitReachedData {
    /// The window's name (`daily`, `monthly`).
    pub limit: &'static str,
    pub limit_micros: i64,
    pub spent_micros: i64,
    pub resets_at: DateTime<Utc>,
}

/// `auto_recharge.requested`: the account's actor started an attempt (the
/// event's id is the attempt's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeRequestedData {
    pub attempt_id: Uuid,
    pub amount_cents: i64,
    pub threshold_cents: i64,
    pub available_micros: i64,
}

/// `auto_recharge.succeeded`: the attempt's payment was credited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeSucceededData {
    pub attempt_id: Uuid,
    pub transaction_id: Uuid,
    pub amount_micros: i64,
    pub balance_micros: i64,
    pub stripe_payment_id: Option<String>,
}

/// `auto_recharge.failed`: Stripe refused the attempt's payment (`reason`:
/// Stripe's code).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeFailedData {
    pub attempt_id: Uuid,
    pub amount_cents: i64,
    pub reason: String,
}

/// `auto_recharge.disabled`: auto-recharge was switched off, after a failed
/// attempt (named) or on its own for `reason`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeDisabledData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<Uuid>,
    pub reason: String,
}

/// `auto_recharge.canceled`: the payment worker gave the attempt up before
/// paying it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoRechargeCanceledData {
    pub attempt_id: Uuid,
    pub amount_cents: i64,
    pub reason: &'static str,
}
