//! Loading an account into its actor from one snapshot. Another instance
//! may be committing the account at that moment: its balance, holds,
//! grants, spending windows and each API key's spend, alert and
//! auto-recharge state are read in one repeatable-read transaction, so the
//! load sees all of a commit or none of it. A state that breaks an invariant all the same is read once more
//! from a fresh snapshot before it is reported, and then as unavailable:
//! a caller (a settlement) retries it like any unavailability.

use deadpool_postgres::Pool;
use tokio_postgres::IsolationLevel;

use super::auto_recharge::{self, RechargeState};
use super::cluster::InstanceId;
use super::outbox::{self, AlertState};
use super::spend;
use super::state::AccountState;
use super::store;
use super::types::*;
use crate::clock::Clock;

/// What an actor starts from.
pub(crate) struct Loaded {
    pub state: AccountState,
    pub alerts: AlertState,
    pub recharge: RechargeState,
}

/// What the load needs besides the account.
pub(crate) struct LoadContext {
    pub pool: Pool,
    pub instance: InstanceId,
    pub clock: Clock,
    pub recent_keys: usize,
}

/// Loads `account`, retrying once from a fresh snapshot a state that
/// breaks an invariant.
pub(crate) async fn load(context: &LoadContext, account: AccountId) -> Result<Loaded, LedgerError> {
    let first = match snapshot(context, account).await? {
        Ok(loaded) => return Ok(loaded),
        Err(broken) => broken,
    };
    metrics::counter!(crate::telemetry::ACCOUNT_LOADS_RETRIED_TOTAL.name).increment(1);
    tracing::warn!(account = account.0, %first, "account read inconsistent; reading a fresh snapshot");
    match snapshot(context, account).await? {
        Ok(loaded) => Ok(loaded),
        Err(second) => {
            tracing::error!(account = account.0, %second, "stored account is inconsistent");
            Err(LedgerError::Unavailable(format!(
                "the account's stored state is inconsistent ({second}); retry later"
            )))
        }
    }
}

/// One snapshot of the account; the inner error is a broken invariant.
async fn snapshot(
    context: &LoadContext,
    account: AccountId,
) -> Result<Result<Loaded, LedgerError>, LedgerError> {
    let mut client = store::client(&context.pool).await?;
    // Before the snapshot: the account's writer notifies us of any commit
    // that the snapshot misses.
    client
        .execute(
            store::sql::CLAIM_READER,
            &[&account.0, &context.instance.as_str()],
        )
        .await
        .map_err(store::database_error)?;
    let client: &mut tokio_postgres::Client = &mut client;
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .map_err(store::database_error)?;
    let now = context.clock.now();
    let stored = store::load_account(&tx, account).await?;
    let alerts = outbox::load_alert_state(&tx, account).await?;
    let recharge = auto_recharge::load_state(&tx, account, now).await?;
    let (limits, counters) = spend::load(&tx, account, now).await?;
    let key_spend = spend::load_key_spend(&tx, account).await?;
    tx.commit().await.map_err(store::database_error)?;
    let mut state = AccountState::new(
        account,
        stored.balance,
        stored.held,
        stored.version,
        stored.holds,
        stored.grants,
        context.recent_keys,
    );
    state.load_spending(limits, counters);
    state.load_key_spend(key_spend);
    Ok(state.check_invariants().map(|()| Loaded {
        state,
        alerts,
        recharge,
    }))
}
