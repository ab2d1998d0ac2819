//! End-user routes: `/api/credits…`, authenticated by Clerk session token.
//! No route takes a user id from the client: the token's `sub` names it.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{CacheControl, CacheDirective, ETag, EntityTag, IfNoneMatch};
use actix_web::web::Bytes;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::error::{ApiError, Code};
use super::state::State;
use super::views::{
    ClaimedBonus, DailyUsageList, DailyUsageView, GrantView, History, Page, TransactionView,
    TransactionsPage, UsageView, UsagesPage,
};
use crate::accounts::SignupBonusClaim;
use crate::ledger::{
    AccountId, AccountView, BalanceWatch, ResidentView, WatchLimits, WatchRefused,
};
use crate::metering;
use crate::money::{Micros, MICROS_PER_CENT};
use crate::payments::followup;

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/api/credits", web::get().to(overview))
        .route("/api/credits/stream", web::get().to(stream))
        .route("/api/credits/transactions", web::get().to(transactions))
        .route("/api/credits/usages", web::get().to(usages))
        .route("/api/credits/usage/daily", web::get().to(usage_daily))
        .route("/api/credits/claim-bonus", web::post().to(claim_bonus));
}

/// Entries shown on the balance page.
const OVERVIEW_ENTRIES: i64 = 10;

/// The balance page's history: from the cache when the account has not
/// moved since, else from PostgreSQL (cached when PostgreSQL has caught up
/// with the actor's version, so a speculative state is never cached).
async fn history(
    state: &State,
    account: AccountId,
    version: i64,
) -> Result<Arc<History>, ApiError> {
    if let Some(history) = state
        .cached_history(account)
        .await
        .filter(|cached| cached.version == version)
    {
        return Ok(history);
    }
    let (read, keys) = tokio::try_join!(
        async {
            Ok::<_, ApiError>(
                state
                    .history
                    .latest_at_version(account, OVERVIEW_ENTRIES)
                    .await?,
            )
        },
        async { Ok::<_, ApiError>(state.provider_keys.load(account).await?) },
    )?;
    let (durable_version, has_byok) = (read.version, keys.any());
    let (transactions, usages) = (read.transactions, read.usages);
    let rendered = |value: Result<Box<RawValue>, serde_json::Error>| {
        value.map_err(|e| ApiError::internal("balance page history", e))
    };
    // A top-up still waiting for its invoice link is not cached: the link
    // arrives (from the follow-up worker) without moving the version.
    let awaits_invoice = transactions.iter().any(followup::awaits_invoice);
    let transactions: Vec<TransactionView> =
        transactions.iter().map(TransactionView::from).collect();
    let usages: Vec<UsageView> = usages.iter().map(UsageView::from).collect();
    let settled = durable_version == version && !awaits_invoice;
    let history = Arc::new(History {
        version,
        settled,
        has_byok,
        transactions: rendered(serde_json::value::to_raw_value(&transactions))?,
        usages: rendered(serde_json::value::to_raw_value(&usages))?,
    });
    if settled {
        state.cache_history(account, history.clone()).await;
    }
    Ok(history)
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct Overview<'a> {
    #[serde(flatten)]
    balance: BalanceView,
    /// The account's version: a stream event of the same version shows
    /// nothing new.
    version: i64,
    has_byok: bool,
    #[schema(value_type = Vec<TransactionView>)]
    transactions: &'a RawValue,
    #[schema(value_type = Vec<UsageView>)]
    usages: &'a RawValue,
    /// What the balance is made of: the grants with money left, in spend
    /// order (promo before paid, then earliest expiry, then oldest).
    grants: Vec<GrantView>,
}

/// The page's validator, when its body is settled: the account's version
/// names one committed state (amounts, grants, history), and what the body
/// shows that moves without the version goes in beside it: `hasByok` (a
/// key saved or removed) and the low-balance threshold (configuration of
/// the instance that answers). The account goes in too: one browser may
/// sign in as another person. A body that is not settled (a change not yet
/// durable, a top-up still waiting for its invoice link) gets no `ETag`,
/// so it is never answered 304 (README, "The balance read").
fn entity_tag(
    account: AccountId,
    resident: &ResidentView,
    history: &History,
    low_cents: i64,
) -> Option<EntityTag> {
    if !resident.durable || !history.settled || history.version != resident.view.version {
        return None;
    }
    let named = format!(
        "{}/{}/{}/{}",
        account.0, resident.view.version, history.has_byok, low_cents
    );
    let digest = Sha256::digest(named.as_bytes());
    Some(EntityTag::new_strong(URL_SAFE_NO_PAD.encode(&digest[..12])))
}

/// Whether the request's `If-None-Match` matches `tag`.
fn not_modified(request: &HttpRequest, tag: &EntityTag) -> bool {
    match request.get_header::<IfNoneMatch>() {
        Some(IfNoneMatch::Any) => true,
        Some(IfNoneMatch::Items(tags)) => tags.iter().any(|t| t.weak_eq(tag)),
        None => false,
    }
}

/// The balance part of the page: what the stream sends too.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct BalanceView {
    /// Integer cents, as the seed's front end reads it.
    balance: i64,
    balance_micros: i64,
    held_micros: i64,
    available_micros: i64,
    balance_formatted: String,
    is_low: bool,
}

impl BalanceView {
    fn of(view: &AccountView, low: Micros) -> BalanceView {
        BalanceView {
            balance: view.balance_micros.floor_cents(),
            balance_micros: view.balance_micros.get(),
            held_micros: view.held_micros.get(),
            available_micros: view.available_micros.get(),
            balance_formatted: view.balance_micros.to_string(),
            is_low: view.balance_micros < low,
        }
    }
}

/// The low-balance threshold.
fn low_balance(state: &State) -> Micros {
    Micros::new(state.settings.credits.low_balance_cents * MICROS_PER_CENT)
}

/// Balance, holds, the 10 newest transactions and usages. Read without a
/// message to the account's actor (its published view) and from the
/// history cache; `ETag` when settled, 304 to a matching `If-None-Match`.
#[utoipa::path(get, path = "/api/credits", tag = "credits", security(("clerk" = [])),
    params(("If-None-Match" = Option<String>, Header, description = "The `ETag` of a page already held")),
    responses(
        (status = 200, description = "The balance page (`ETag` when settled)", body = Overview,
            headers(("ETag" = String, description = "Changes whenever the body can"))),
        (status = 304, description = "Not modified: the page held is current (no body)"),
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn overview(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let resident = state.engine.view(account).await?;
    let view = &resident.view;
    let history = history(&state, account, view.version).await?;
    let tag = entity_tag(
        account,
        &resident,
        &history,
        state.settings.credits.low_balance_cents,
    );
    // Per person, and revalidated every time: the balance moves.
    let cache = CacheControl(vec![CacheDirective::Private, CacheDirective::NoCache]);
    if let Some(tag) = &tag {
        if not_modified(&request, tag) {
            return Ok(HttpResponse::NotModified()
                .insert_header(ETag(tag.clone()))
                .insert_header(cache)
                .finish());
        }
    }
    let mut response = HttpResponse::Ok();
    response.insert_header(cache);
    if let Some(tag) = tag {
        response.insert_header(ETag(tag));
    }
    Ok(response.json(Overview {
        balance: BalanceView::of(view, low_balance(&state)),
        version: view.version,
        has_byok: history.has_byok,
        transactions: &history.transactions,
        usages: &history.usages,
        grants: view.grants.iter().map(GrantView::from).collect(),
    }))
}

/// One event of the balance stream: the balance part of `GET /api/credits`,
/// its grants and the account's version.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct BalanceEvent {
    #[serde(flatten)]
    balance: BalanceView,
    version: i64,
    grants: Vec<GrantView>,
}

/// The balance as Server-Sent Events: an event `balance` when the stream
/// opens and after every change once committed (at most one per
/// `server.stream_coalesce_ms`, the latest state), a comment every
/// `server.stream_keep_alive_ms` while nothing changes.
#[utoipa::path(get, path = "/api/credits/stream", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 200, description = "`text/event-stream` of `balance` events, each a `BalanceEvent` (components) in `data`",
            content_type = "text/event-stream", body = String),
        super::error::SessionAuth,
        (status = 429, description = "RATE_LIMITED (Retry-After): the account holds `server.streams_per_account_max` streams", body = super::error::ErrorBody),
        super::error::Internal,
        (status = 503, description = "UNAVAILABLE (Retry-After): the instance holds `server.streams_max` streams or is shutting down; the ledger did not answer", body = super::error::ErrorBody)
    ))]
async fn stream(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let server = &state.settings.server;
    let limits = WatchLimits {
        per_account: server.streams_per_account_max,
        total: server.streams_max,
    };
    let watch = state.engine.watch(account, limits).inspect_err(|refused| {
        if *refused == WatchRefused::AccountFull {
            metrics::counter!(crate::telemetry::RATE_LIMITED_TOTAL.name, "limit" => "streams_per_account")
                .increment(1);
        }
    })?;
    let events = BalanceStream {
        coalesce: Duration::from_millis(server.stream_coalesce_ms),
        keep_alive: Duration::from_millis(server.stream_keep_alive_ms),
        state: state.clone(),
        account,
        watch,
        sent: None,
        opened: false,
        read_next: true,
        next_event_at: tokio::time::Instant::now(),
    };
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(CacheControl(vec![CacheDirective::NoCache]))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(futures_util::stream::unfold(events, BalanceStream::next)))
}

/// What a balance stream needs between two events.
struct BalanceStream {
    state: State,
    account: AccountId,
    watch: BalanceWatch,
    /// The view of the last event sent (an unchanged view is not sent again).
    sent: Option<Arc<AccountView>>,
    coalesce: Duration,
    keep_alive: Duration,
    /// No event before this (coalescing).
    next_event_at: tokio::time::Instant,
    /// Whether the first event went out.
    opened: bool,
    /// Read the account without waiting for a change (the stream opens, or
    /// the last view read was waiting for its commit).
    read_next: bool,
}

/// Tells `EventSource` to reconnect after 1 s when the stream ends (a
/// deploy): by then the balancer sends it to another instance.
const RETRY_FRAME: &[u8] = b"retry: 1000\n\n";
const KEEP_ALIVE_FRAME: &[u8] = b": keep-alive\n\n";

impl BalanceStream {
    /// The next frame: an event, a keep-alive, or the end (the instance
    /// drains, or the ledger cannot be read: the client reconnects). Only
    /// committed states are sent: a view ahead of PostgreSQL waits for its
    /// commit (or its failure, and then the reloaded durable state).
    async fn next(mut self) -> Option<(Result<Bytes, ApiError>, BalanceStream)> {
        loop {
            if !self.read_next && !self.wait_for_change().await? {
                return Some((Ok(Bytes::from_static(KEEP_ALIVE_FRAME)), self));
            }
            self.read_next = false;
            self.watch.seen();
            let mut resident = match self.state.engine.view(self.account).await {
                Ok(resident) => resident,
                Err(error) => {
                    tracing::warn!(account = self.account.0, %error, "balance stream ends: the ledger did not answer");
                    return None;
                }
            };
            if !resident.durable {
                self.read_next = true;
                tokio::select! {
                    _ = resident.committed() => continue,
                    _ = self.watch.closed() => return None,
                    _ = tokio::time::sleep(self.keep_alive) => {
                        return Some((Ok(Bytes::from_static(KEEP_ALIVE_FRAME)), self));
                    }
                }
            }
            if self.sent.as_deref() == Some(&*resident.view) {
                continue;
            }
            let frame = self.frame(&resident.view);
            self.next_event_at = tokio::time::Instant::now() + self.coalesce;
            self.sent = Some(resident.view);
            return Some((frame, self));
        }
    }

    /// Waits for the account's next change, then for the coalescing delay:
    /// `Some(true)` to read it, `Some(false)` for a keep-alive, `None` when
    /// the instance closes its streams.
    async fn wait_for_change(&mut self) -> Option<bool> {
        tokio::select! {
            open = self.watch.changed() => if !open { return None },
            _ = tokio::time::sleep(self.keep_alive) => return Some(false),
        }
        tokio::select! {
            _ = tokio::time::sleep_until(self.next_event_at) => Some(true),
            _ = self.watch.closed() => None,
        }
    }

    /// The `balance` event of `view` (the first one preceded by `retry:`).
    fn frame(&mut self, view: &AccountView) -> Result<Bytes, ApiError> {
        let event = BalanceEvent {
            balance: BalanceView::of(view, low_balance(&self.state)),
            version: view.version,
            grants: view.grants.iter().map(GrantView::from).collect(),
        };
        let data = serde_json::to_string(&event)
            .map_err(|e| ApiError::internal("balance stream event", e))?;
        let mut frame = Vec::with_capacity(data.len() + 40);
        if !self.opened {
            frame.extend_from_slice(RETRY_FRAME);
            self.opened = true;
        }
        frame.extend_from_slice(b"event: balance\ndata: ");
        frame.extend_from_slice(data.as_bytes());
        frame.extend_from_slice(b"\n\n");
        Ok(Bytes::from(frame))
    }
}

/// Every transaction, newest first, by opaque cursor.
#[utoipa::path(get, path = "/api/credits/transactions", tag = "credits", security(("clerk" = [])),
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Items per page (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of transactions", body = super::views::TransactionsPage),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn transactions(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let items = state
        .history
        .transactions(account, page.before_seq, page.limit)
        .await?;
    let next = page.next_cursor(items.len(), items.last().map(|t| t.seq));
    Ok(HttpResponse::Ok().json(TransactionsPage {
        items: items.iter().map(TransactionView::from).collect(),
        next_cursor: next,
    }))
}

/// Every usage (chat charge), newest first, by opaque cursor.
#[utoipa::path(get, path = "/api/credits/usages", tag = "credits", security(("clerk" = [])),
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Items per page (default 20)"),
        ("cursor" = Option<String>, Query, description = "`nextCursor` of the previous page"),
    ),
    responses(
        (status = 200, description = "A page of usages", body = super::views::UsagesPage),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn usages(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let page = Page::parse(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let items = state
        .history
        .usages(account, page.before_seq, page.limit)
        .await?;
    let next = page.next_cursor(items.len(), items.last().map(|u| u.seq));
    Ok(HttpResponse::Ok().json(UsagesPage {
        items: items.iter().map(UsageView::from).collect(),
        next_cursor: next,
    }))
}

/// `?days=1..=90` (default 30) of `GET /api/credits/usage/daily`; anything
/// else is refused by name.
fn parse_days(query: &str) -> Result<u32, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| ApiError::invalid(format!("query string: {e}")))?
        .into_inner();
    let mut days = DEFAULT_CHART_DAYS;
    for (name, value) in pairs {
        if name != "days" {
            return Err(ApiError::invalid(format!(
                "field `{name}`: unknown query parameter (expected days)"
            )));
        }
        days = value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=metering::MAX_DAYS).contains(n))
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "field `days`: must be an integer from 1 to {}",
                    metering::MAX_DAYS
                ))
            })?;
    }
    Ok(days)
}

/// Days of the usage chart when the request names none.
const DEFAULT_CHART_DAYS: u32 = 30;

/// Spend per UTC day over the last `days` days, oldest first, today last.
#[utoipa::path(get, path = "/api/credits/usage/daily", tag = "credits", security(("clerk" = [])),
    params(("days" = Option<u32>, Query, minimum = 1, maximum = 90, description = "Days to report (default 30)")),
    responses(
        (status = 200, description = "Spend per day", body = super::views::DailyUsageList),
        super::error::Invalid,
        super::error::SessionAuth,
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn usage_daily(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let days = parse_days(request.query_string())?;
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let report = state
        .usage_reports
        .daily(account, days, chrono::Utc::now())
        .await?;
    let days: Vec<DailyUsageView> = report
        .into_iter()
        .map(|day| DailyUsageView {
            date: day.date,
            cost_micros: day.cost_micros,
            chats: day.chats,
            input_tokens: day.input_tokens,
            output_tokens: day.output_tokens,
        })
        .collect();
    Ok(HttpResponse::Ok().json(DailyUsageList { days }))
}

/// The signup bonus, once per person (see `accounts::bonus`).
async fn grant_signup_bonus(
    state: &State,
    account: AccountId,
) -> Result<SignupBonusClaim, ApiError> {
    Ok(state.signup_bonuses.grant(account).await?)
}

/// The signup bonus: 201 the first time, 200 with the same transaction
/// after; 409 when another account of the same email had it.
#[utoipa::path(post, path = "/api/credits/claim-bonus", tag = "credits", security(("clerk" = [])),
    responses(
        (status = 201, description = "The signup bonus, credited now", body = super::views::ClaimedBonus, links(
            ("BalanceAfterBonus" = (operation_id = "overview", description = "The balance with the bonus")),
            ("HistoryAfterBonus" = (operation_id = "transactions", description = "The bonus in the history"))
        )),
        (status = 200, description = "The signup bonus, credited before", body = super::views::ClaimedBonus),
        super::error::SessionAuth,
        (status = 409, description = "CONFLICT (another account of this email had the bonus)", body = super::error::ErrorBody),
        super::error::Internal,
        super::error::LedgerUnavailable
    ))]
async fn claim_bonus(state: State, request: HttpRequest) -> Result<HttpResponse, ApiError> {
    let clerk_id = state.authenticate(&request).await?;
    let account = state.account(&clerk_id).await?;
    let outcome = match grant_signup_bonus(&state, account).await? {
        SignupBonusClaim::Granted(outcome) => outcome,
        SignupBonusClaim::TakenByAnotherAccount => {
            return Err(ApiError::new(
                Code::Conflict,
                "the signup bonus was already granted to an account with this email address",
            ))
        }
    };
    let body = ClaimedBonus {
        transaction: TransactionView::from(&outcome.record),
        already_claimed: outcome.replayed,
    };
    Ok(if outcome.replayed {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::Created().json(body)
    })
}
