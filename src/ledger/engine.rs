//! `Engine`: the ledger's entry point. Starts the account actors'
//! arbiters and the journal writers, and turns each operation into a
//! message to the account's actor (through the `Directory`), with its
//! metrics.

use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};

use super::actor::*;
use super::cluster::{self, ClusterRole, InstanceId, ListenerStatus};
use super::directory::{Directory, ResidentView};
use super::journal::{spawn_writer, WriterHandle};
use super::outbox::{self, AlertThresholds, LimitRefusal};
use super::store;
use super::types::*;
use super::watch::{BalanceWatch, WatchLimits, WatchRefused};
use crate::clock::Clock;
use crate::config::{EngineSettings, JournalSettings};
use crate::db::Database;
use crate::money::Micros;

/// What operators and metrics read off the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    pub resident_actors: usize,
    pub journal_queue_depth: usize,
}

/// The ledger engine: actors on their arbiters, the journal writer on its own.
pub struct Engine {
    directory: Directory,
    writer: WriterHandle,
    pool: Option<deadpool_postgres::Pool>,
    arbiters: Vec<Arbiter>,
    clock: Clock,
    /// Whether other instances' writes are heard (none without a database).
    listener: Option<ListenerStatus>,
    /// This instance's name among those sharing the database.
    instance: InstanceId,
    /// Windows whose `spend_limit.reached` is recorded: later refusals in
    /// them skip the database (and concurrent ones wait for one recording).
    limit_events: moka::future::Cache<(AccountId, LimitWindow, DateTime<Utc>), ()>,
}

fn actor_settings(
    settings: &EngineSettings,
    journal: &JournalSettings,
    clock: Clock,
    alerts: AlertThresholds,
) -> ActorSettings {
    ActorSettings {
        clock,
        alerts,
        hold_delay: Duration::from_micros(journal.hold_delay_us),
        mailbox_capacity: settings.mailbox_capacity.max(1),
        idle_timeout: Duration::from_millis(settings.idle_timeout_ms),
        hold_ttl: chrono::Duration::seconds(
            i64::try_from(settings.hold_ttl_s).unwrap_or(i64::MAX / 1000),
        ),
        recent_keys: settings.recent_keys,
    }
}

impl Engine {
    /// Starts the engine on PostgreSQL (`pool` for account loads and reads).
    pub fn start(
        engine: &EngineSettings,
        journal: &JournalSettings,
        database: Database,
        pool: deadpool_postgres::Pool,
    ) -> Engine {
        Engine::start_with_clock(engine, journal, database, pool, Clock::system())
    }

    /// As `start`, reading the time from `clock` (tests move it by hand).
    pub fn start_with_clock(
        engine: &EngineSettings,
        journal: &JournalSettings,
        database: Database,
        pool: deadpool_postgres::Pool,
        clock: Clock,
    ) -> Engine {
        Engine::start_with_alerts(
            engine,
            journal,
            database,
            pool,
            clock,
            AlertThresholds::default(),
        )
    }

    /// As `start_with_clock`, with the balance alerts' thresholds.
    pub fn start_with_alerts(
        engine: &EngineSettings,
        journal: &JournalSettings,
        database: Database,
        pool: deadpool_postgres::Pool,
        clock: Clock,
        alerts: AlertThresholds,
    ) -> Engine {
        Engine::start_in_cluster(
            engine,
            journal,
            (database, pool),
            (clock, alerts),
            ClusterRole::from_settings(&crate::config::ClusterSettings {
                instance_id: String::new(),
                drain_s: 0,
                singleton_check_ms: 2000,
                listen_retry_ms: 500,
            }),
        )
    }

    /// As `start_with_alerts`, as the instance `role` names among those
    /// sharing the database.
    pub fn start_in_cluster(
        engine: &EngineSettings,
        journal: &JournalSettings,
        (database, pool): (Database, deadpool_postgres::Pool),
        (clock, alerts): (Clock, AlertThresholds),
        role: ClusterRole,
    ) -> Engine {
        Engine::build(
            engine,
            journal,
            Some(database),
            Backend::Postgres {
                pool: pool.clone(),
                instance: role.instance.clone(),
            },
            Some(pool),
            (clock, alerts),
            role,
        )
    }

    /// An engine whose persistence is stubbed: every account opens with
    /// `opening_balance` and every entry is acknowledged at once. For
    /// measuring the engine itself.
    pub fn in_memory(
        engine: &EngineSettings,
        journal: &JournalSettings,
        opening_balance: Micros,
    ) -> Engine {
        Engine::build(
            engine,
            journal,
            None,
            Backend::Memory { opening_balance },
            None,
            (Clock::system(), AlertThresholds::default()),
            ClusterRole {
                instance: InstanceId::new("memory"),
                listen_retry: Duration::from_millis(500),
                check_interval: Duration::from_secs(2),
            },
        )
    }

    fn build(
        engine: &EngineSettings,
        journal: &JournalSettings,
        database: Option<Database>,
        backend: Backend,
        pool: Option<deadpool_postgres::Pool>,
        (clock, alerts): (Clock, AlertThresholds),
        role: ClusterRole,
    ) -> Engine {
        let count = if engine.arbiters == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            engine.arbiters
        };
        let writer_arbiter = Arbiter::new();
        let writer = spawn_writer(
            &writer_arbiter.handle(),
            database.clone(),
            journal,
            role.instance.clone(),
        );
        let mut arbiters: Vec<Arbiter> = (0..count).map(|_| Arbiter::new()).collect();
        let handles = arbiters.iter().map(Arbiter::handle).collect();
        arbiters.push(writer_arbiter);
        let directory = Directory::new(
            handles,
            backend,
            writer.clone(),
            actor_settings(engine, journal, clock.clone(), alerts),
            Duration::from_millis(engine.call_timeout_ms),
        );
        let instance = role.instance.clone();
        let listener = database.map(|database| {
            cluster::spawn_listener(&arbiters[0].handle(), database, directory.clone(), role)
        });
        Engine {
            directory,
            writer,
            pool,
            arbiters,
            clock,
            listener,
            instance,
            limit_events: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(32 * 24 * 3600))
                .build(),
        }
    }

    /// This instance's name: what a write outside the journal names as its
    /// writer when it tells the others (`cluster::notify_settings_changed`).
    pub fn instance(&self) -> &InstanceId {
        &self.instance
    }

    /// The clock the engine's actors read.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    pub fn writer(&self) -> &WriterHandle {
        &self.writer
    }

    /// The pool the engine reads with (none when persistence is stubbed).
    pub fn pool(&self) -> Option<&deadpool_postgres::Pool> {
        self.pool.as_ref()
    }

    /// Whether this engine hears other instances' writes: `false` while
    /// its listener is (re)connecting, when no copy can be trusted to be
    /// current; `true` without a database (nobody else writes).
    pub fn listening(&self) -> bool {
        self.listener.as_ref().is_none_or(ListenerStatus::listening)
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            resident_actors: self.directory.resident(),
            journal_queue_depth: self.writer.queue_depth(),
        }
    }

    /// Waits for the journal to drain, then stops every actor and the writer.
    pub async fn shutdown(&self, limit: Duration) -> bool {
        let drained = self.writer.flush(limit).await;
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        drained
    }

    pub async fn credit(
        &self,
        account: AccountId,
        posting: Posting,
    ) -> Result<Outcome<TransactionRecord>, LedgerError> {
        self.post_credit(
            account,
            Credit {
                posting,
                attempt: None,
            },
        )
        .await
    }

    /// Credits what an auto-recharge attempt's payment paid; the credit
    /// ends the attempt (its transaction names it).
    pub async fn credit_attempt(
        &self,
        account: AccountId,
        posting: Posting,
        attempt: uuid::Uuid,
    ) -> Result<Outcome<TransactionRecord>, LedgerError> {
        self.post_credit(
            account,
            Credit {
                posting,
                attempt: Some(attempt),
            },
        )
        .await
    }

    async fn post_credit(
        &self,
        account: AccountId,
        credit: Credit,
    ) -> Result<Outcome<TransactionRecord>, LedgerError> {
        let kind = credit.posting.kind;
        let result = observe("credit", self.directory.call_durable(account, credit).await);
        if let Ok(Outcome {
            record,
            replayed: false,
        }) = &result
        {
            metrics::counter!(crate::telemetry::CREDITED_MICROS_TOTAL.name, "kind" => kind.as_str())
                .increment(record.amount_micros.get().unsigned_abs());
        }
        result
    }

    pub async fn debit(
        &self,
        account: AccountId,
        posting: Posting,
    ) -> Result<Outcome<TransactionRecord>, LedgerError> {
        observe(
            "debit",
            self.directory
                .call_durable(account, Debit { posting })
                .await,
        )
    }

    /// Holds `amount`; answers once the hold is durable.
    pub async fn reserve(
        &self,
        account: AccountId,
        hold_id: HoldId,
        amount: Micros,
    ) -> Result<Outcome<HoldRecord>, LedgerError> {
        self.reserve_answering(account, hold_id, amount, None, Answer::WhenDurable)
            .await
    }

    /// Holds `amount` as admission control for a chat: answers as soon as
    /// the account's actor applied the hold, without waiting for its commit.
    /// A hold whose commit then fails is simply gone; the chat's settlement
    /// posts all the same (see `settle`).
    pub async fn admit(
        &self,
        account: AccountId,
        hold_id: HoldId,
        amount: Micros,
    ) -> Result<Outcome<HoldRecord>, LedgerError> {
        self.reserve_answering(account, hold_id, amount, None, Answer::WhenApplied)
            .await
    }

    /// As [`Engine::admit`], for a call made with a gateway API key: the
    /// key's spend limit is judged by the account's actor with the hold.
    pub async fn admit_for_key(
        &self,
        account: AccountId,
        hold_id: HoldId,
        amount: Micros,
        key: Option<KeyLimit>,
    ) -> Result<Outcome<HoldRecord>, LedgerError> {
        self.reserve_answering(account, hold_id, amount, key, Answer::WhenApplied)
            .await
    }

    async fn reserve_answering(
        &self,
        account: AccountId,
        hold_id: HoldId,
        amount: Micros,
        key: Option<KeyLimit>,
        answer: Answer,
    ) -> Result<Outcome<HoldRecord>, LedgerError> {
        let message = Reserve {
            hold_id,
            amount,
            key,
            answer,
        };
        let result = observe(
            "reserve",
            self.directory.call_durable(account, message).await,
        );
        if let Err(LedgerError::SpendLimitReached {
            window,
            limit,
            spent,
            resets_at,
            ..
        }) = &result
        {
            let refusal = LimitRefusal {
                window: *window,
                limit: *limit,
                spent: *spent,
                resets_at: *resets_at,
            };
            self.limit_reached(account, refusal).await;
        }
        result
    }

    /// Records `spend_limit.reached` for the window a hold was refused in,
    /// once per account and window (concurrent refusals wait for one
    /// recording), after the changes the account applied before it. The
    /// refusal is answered whatever happens here: a failure to record is
    /// logged, and the window's next refusal tries again.
    async fn limit_reached(&self, account: AccountId, refusal: LimitRefusal) {
        let Some(pool) = &self.pool else {
            return;
        };
        let key = (account, refusal.window, refusal.resets_at);
        let event = outbox::limit_reached_event(account, refusal, self.clock.now());
        let recorded = self
            .limit_events
            .try_get_with(key, async {
                let mut client = store::client(pool).await?;
                let tx = client.transaction().await.map_err(store::database_error)?;
                self.record_events(&tx, account, &[event]).await?;
                tx.commit().await.map_err(store::database_error)
            })
            .await;
        if let Err(error) = recorded {
            tracing::error!(account = account.0, %error, "spend_limit.reached not recorded; the next refusal retries");
        }
    }

    /// Records, in `tx`, events that have no journal entry of their own
    /// (a refusal, an auto-recharge that failed), in their place in the
    /// account's order: after every change the account's actor applied
    /// before this call. It waits until those changes are committed (or
    /// failed: they never happened), typically one group commit, then
    /// writes the events after the account's last committed change, so
    /// they are never sent before the events of an earlier change. The
    /// caller commits `tx` with the events' cause: no event without its
    /// cause, no cause without its event. Changes in flight on another
    /// instance are not waited for (the account is moving between
    /// instances: its events may then come first).
    pub async fn record_events(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        account: AccountId,
        events: &[OutgoingEvent],
    ) -> Result<(), LedgerError> {
        self.applied_committed(account).await?;
        outbox::insert_following_committed(tx, account, events).await
    }

    /// Waits until no change the account's actor applied so far is still
    /// in flight. An account with no live actor here has none.
    async fn applied_committed(&self, account: AccountId) -> Result<(), LedgerError> {
        if self.directory.summary(account).is_none() {
            return Ok(());
        }
        self.directory
            .call(account, AwaitApplied)
            .await
            .map_err(|error| match error {
                LedgerError::Unavailable(reason) => LedgerError::Unavailable(format!(
                    "the account's earlier changes did not commit in time: {reason}"
                )),
                other => other,
            })
    }

    /// Debits what `request.object` refunded beyond what was already clawed
    /// back for it (`None`: nothing left), computed inside the account's
    /// actor so that any delivery order gives exactly the refunded total.
    pub async fn clawback(
        &self,
        account: AccountId,
        request: ClawbackRequest,
    ) -> Result<Outcome<Option<TransactionRecord>>, LedgerError> {
        observe(
            "clawback",
            self.directory
                .call_durable(account, Clawback { request })
                .await,
        )
    }

    /// Posts a delivered answer's cost under its hold id, whatever became of
    /// the hold (active, expired, released or unknown); idempotent by hold id.
    pub async fn settle(
        &self,
        account: AccountId,
        hold_id: HoldId,
        charge: UsageCharge,
    ) -> Result<Outcome<UsageRecord>, LedgerError> {
        let result = observe(
            "settle",
            self.directory
                .call_durable(account, Settle { hold_id, charge })
                .await,
        );
        if let Ok(Outcome {
            record,
            replayed: false,
        }) = &result
        {
            metrics::counter!(crate::telemetry::CHARGED_MICROS_TOTAL.name, "model" => record.model.clone())
                .increment(record.cost_micros.get().unsigned_abs());
        }
        result
    }

    pub async fn release(
        &self,
        account: AccountId,
        hold_id: HoldId,
    ) -> Result<Outcome<ReleaseRecord>, LedgerError> {
        observe(
            "release",
            self.directory
                .call_durable(account, Release { hold_id })
                .await,
        )
    }

    pub async fn expire_holds(
        &self,
        account: AccountId,
        now: DateTime<Utc>,
    ) -> Result<Vec<ReleaseRecord>, LedgerError> {
        self.directory.call(account, ExpireHolds { now }).await
    }

    /// Expires the grants due at `now` (the account's actor also does so on
    /// its own); the `EXPIRED` debits journaled.
    pub async fn expire_grants(
        &self,
        account: AccountId,
        now: DateTime<Utc>,
    ) -> Result<Vec<TransactionRecord>, LedgerError> {
        self.directory.call(account, ExpireGrants { now }).await
    }

    /// Changes an account's spending limits; answers once they are stored.
    pub async fn set_limits(
        &self,
        account: AccountId,
        change: LimitsChange,
    ) -> Result<SpendingSnapshot, LedgerError> {
        self.directory.call(account, SetLimits { change }).await
    }

    /// An account's spending limits and what its windows count now.
    pub async fn spending(&self, account: AccountId) -> Result<SpendingSnapshot, LedgerError> {
        self.directory.call(account, GetSpending).await
    }

    /// Sets the account's auto-recharge (`None`: off, or no saved card).
    pub async fn set_auto_recharge(
        &self,
        account: AccountId,
        config: Option<super::auto_recharge::RechargeConfig>,
    ) -> Result<(), LedgerError> {
        self.directory
            .call(account, super::actor::SetAutoRecharge { config })
            .await
    }

    /// An auto-recharge attempt ended (a failed one switched it off).
    pub async fn auto_recharge_ended(
        &self,
        account: AccountId,
        attempt: uuid::Uuid,
        end: super::auto_recharge::AttemptEnd,
    ) -> Result<(), LedgerError> {
        self.directory
            .call(account, super::actor::AutoRechargeEnded { attempt, end })
            .await
    }

    pub async fn balance(&self, account: AccountId) -> Result<BalanceSnapshot, LedgerError> {
        self.directory.call(account, GetBalance).await
    }

    /// The account's view: the resident actor's last publication, read
    /// with no message; when there is none (not resident, stale, or a write
    /// of it failed), the account is loaded (or reloaded) through its actor
    /// once and its fresh publication read.
    pub async fn view(&self, account: AccountId) -> Result<ResidentView, LedgerError> {
        if let Some(resident) = self.directory.view(account) {
            return Ok(resident);
        }
        let snapshot = self.balance(account).await?;
        Ok(self.directory.view(account).unwrap_or_else(|| {
            // Stopped again since it answered (passivated, or written
            // elsewhere): its answer is still what it applied.
            ResidentView::detached(view_of(&snapshot))
        }))
    }

    /// Listens for the account's changes (every publication of its view),
    /// within `limits`; refused once the instance drains.
    pub fn watch(
        &self,
        account: AccountId,
        limits: WatchLimits,
    ) -> Result<BalanceWatch, WatchRefused> {
        self.directory.watchers().subscribe(account, limits)
    }

    /// Ends every listener and refuses new ones (the instance drains: its
    /// clients reconnect to another instance).
    pub fn close_watches(&self) {
        self.directory.watchers().close();
    }

    /// Listeners open on this instance.
    pub fn watches_open(&self) -> usize {
        self.directory.watchers().open()
    }

    /// The account's amounts and version: from the resident actor's last
    /// published state when there is one, else by asking (and loading) it.
    pub async fn balance_summary(&self, account: AccountId) -> Result<BalanceSummary, LedgerError> {
        if let Some(summary) = self.directory.summary(account) {
            return Ok(summary);
        }
        self.balance(account)
            .await
            .map(|snapshot| snapshot.summary())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
    }
}

/// A view of an account from its actor's full answer.
fn view_of(snapshot: &BalanceSnapshot) -> AccountView {
    let granted = snapshot
        .grants
        .iter()
        .fold(0_i64, |sum, g| sum.saturating_add(g.remaining_micros.get()));
    AccountView {
        balance_micros: snapshot.balance_micros,
        held_micros: snapshot.held_micros,
        available_micros: snapshot.available_micros,
        debt_micros: Micros::new(granted.saturating_sub(snapshot.balance_micros.get()).max(0)),
        version: snapshot.version,
        grants: snapshot.grants.clone(),
    }
}

fn observe<T>(
    kind: &'static str,
    result: Result<Outcome<T>, LedgerError>,
) -> Result<Outcome<T>, LedgerError> {
    let outcome = match &result {
        Ok(Outcome { replayed: true, .. }) => "replayed",
        Ok(_) => "ok",
        Err(LedgerError::InsufficientCredits { .. }) => "insufficient_credits",
        Err(LedgerError::SpendLimitReached { .. }) => "spend_limit_reached",
        Err(LedgerError::KeyLimitReached { .. }) => "key_limit_reached",
        Err(LedgerError::Conflict(_)) => "conflict",
        Err(LedgerError::InvalidRequest(_)) => "invalid",
        Err(LedgerError::AccountNotFound(_) | LedgerError::HoldNotFound(_)) => "not_found",
        Err(LedgerError::Overloaded) => "overloaded",
        Err(LedgerError::Unavailable(_) | LedgerError::Reset) => "unavailable",
        Err(LedgerError::Internal(_)) => "internal",
    };
    metrics::counter!(crate::telemetry::LEDGER_OPERATIONS_TOTAL.name, "kind" => kind, "outcome" => outcome)
        .increment(1);
    if outcome == "insufficient_credits" {
        metrics::counter!(crate::telemetry::RESERVES_REFUSED_TOTAL.name).increment(1);
    }
    if let Err(LedgerError::SpendLimitReached { window, .. }) = &result {
        metrics::counter!(crate::telemetry::SPEND_LIMIT_REFUSALS_TOTAL.name, "window" => window.as_str())
            .increment(1);
    }
    if let Err(LedgerError::KeyLimitReached { .. }) = &result {
        metrics::counter!(crate::telemetry::SPEND_LIMIT_REFUSALS_TOTAL.name, "window" => "api_key")
            .increment(1);
    }
    result
}
