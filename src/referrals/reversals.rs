//! Referral bonuses follow the money that paid them.
//!
//! A referral records the top-up that paid its bonuses. When that top-up's
//! money leaves (a refund that keeps less than the minimum top-up of it, a
//! dispute whose funds were withdrawn), both bonuses are taken back; when a
//! dispute is won (its funds reinstated, and no such refund), they are given
//! back. What the money did is read from the referred user's ledger (the
//! top-up's credit, its refunds' clawbacks, its disputes' debits and
//! credits, all under the payment intent), after the event's own entry
//! committed, under the referral row's lock: the last event to take the
//! lock sees every entry before it, so any delivery order, redelivery or
//! concurrency ends in the state the money is in.
//!
//! Each change of state is a step, recorded under that lock with its
//! amounts fixed (`referral_reversals`): odd steps take back (debits, debt
//! allowed, as for any clawback: spent bonus money becomes debt, not free
//! money), even steps give back. Every step is then posted per side under
//! `referral:<referred>:<side>:reversal:<step>`, by whichever delivery
//! comes, again on every redelivery until the event is recorded: once.

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio_postgres::GenericClient;

use super::{posted, Bonus, Paying, Side};
use crate::db::{self, DbError};
use crate::ledger::{AccountId, Engine, IdempotencyKey, LedgerError, Posting, TransactionType};
use crate::money::Micros;

mod sql {
    /// The referral of a user, locked while its state moves.
    pub const LOCK: &str =
        "SELECT referrer_user_id, paid_by_payment_id, bonus_micros, reversal_steps
           FROM referrals WHERE referred_user_id = $1
            FOR UPDATE";
    /// What a top-up's money did, as the ledger of its payer records it.
    pub const MONEY: &str = "SELECT
            COALESCE(sum(amount_micros) FILTER (WHERE type = 'TOP_UP' AND direction = 'CREDIT'), 0)::BIGINT,
            COALESCE(sum(amount_micros) FILTER (WHERE type = 'REFUND' AND direction = 'DEBIT'), 0)::BIGINT,
            count(*) FILTER (WHERE type = 'DISPUTE' AND direction = 'DEBIT'),
            count(*) FILTER (WHERE type = 'DISPUTE' AND direction = 'CREDIT')
          FROM credit_transactions
         WHERE user_id = $1 AND stripe_payment_id = $2";
    /// A posted credit: what it still stands for at `$3` (its amount less
    /// what of its grant expired, or is past its expiry unspent), and the
    /// expiry of its grant.
    pub const CREDIT: &str = "SELECT
            GREATEST(t.amount_micros
                - CASE WHEN g.expires_at <= $3 THEN g.remaining_micros ELSE 0 END
                - COALESCE((SELECT sum(e.amount_micros) FROM credit_transactions e
                             WHERE e.user_id = t.user_id AND e.type = 'EXPIRED'
                               AND e.metadata->>'grantId' = g.id::text), 0), 0)::BIGINT,
            g.expires_at
          FROM credit_transactions t
          LEFT JOIN credit_grants g ON g.transaction_id = t.id
         WHERE t.user_id = $1 AND t.idempotency_key = $2 AND t.direction = 'CREDIT'";
    pub const STEPS: &str = "SELECT step, reason, referee_micros, referrer_micros
          FROM referral_reversals WHERE referred_user_id = $1 ORDER BY step";
    pub const STEP_AMOUNTS: &str = "SELECT referee_micros, referrer_micros
          FROM referral_reversals WHERE referred_user_id = $1 AND step = $2";
    pub const RECORD_STEP: &str = "INSERT INTO referral_reversals
            (referred_user_id, step, reason, referee_micros, referrer_micros)
          VALUES ($1, $2, $3, $4, $5)";
    pub const COUNT_STEPS: &str =
        "UPDATE referrals SET reversal_steps = $2 WHERE referred_user_id = $1";
}

/// Why the bonuses moved at a step (`referral_reversals.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    /// Refunds left less than the minimum top-up of the paying top-up.
    Refunded,
    /// A dispute of the paying top-up withdrew its funds.
    Disputed,
    /// The dispute was won: its funds were reinstated.
    DisputeWon,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Refunded => "REFUNDED",
            Reason::Disputed => "DISPUTED",
            Reason::DisputeWon => "DISPUTE_WON",
        }
    }

    fn parse(text: &str) -> Option<Reason> {
        match text {
            "REFUNDED" => Some(Reason::Refunded),
            "DISPUTED" => Some(Reason::Disputed),
            "DISPUTE_WON" => Some(Reason::DisputeWon),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Reason::Refunded => "Bonus de parrainage repris (recharge remboursée)",
            Reason::Disputed => "Bonus de parrainage repris (paiement contesté)",
            Reason::DisputeWon => "Bonus de parrainage rendu (contestation gagnée)",
        }
    }
}

/// What became of a top-up's money, as its payer's ledger records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Money {
    /// Credited for the top-up.
    topup: Micros,
    /// Clawed back for its refunds, in all.
    refunded: Micros,
    /// Disputes whose funds were withdrawn, and those reinstated.
    withdrawn: i64,
    reinstated: i64,
}

/// Whether the bonuses a top-up paid must stay taken back, and why: its
/// refunds left less than `minimum_kept` of it (a partial refund that
/// keeps at least the minimum top-up keeps them), or a dispute withdrew its
/// funds that no reinstatement gave back. Refunds come first: a refunded
/// top-up whose dispute was won is still refunded.
fn taken_back(money: Money, minimum_kept: Micros) -> Option<Reason> {
    if !money.topup.is_positive() {
        return None;
    }
    let kept = money.topup.checked_sub(money.refunded);
    if kept.map_or(true, |kept| kept < minimum_kept) {
        return Some(Reason::Refunded);
    }
    (money.withdrawn > money.reinstated).then_some(Reason::Disputed)
}

/// One recorded step: the amount it moves per side (referee, referrer).
#[derive(Debug, Clone, Copy)]
struct Step {
    number: i32,
    reason: Reason,
    amounts: [Micros; 2],
}

impl Step {
    /// Odd steps take back, even steps give back.
    fn gives_back(&self) -> bool {
        self.number % 2 == 0
    }

    fn amount(&self, side: Side) -> Micros {
        match side {
            Side::Referee => self.amounts[0],
            Side::Referrer => self.amounts[1],
        }
    }
}

/// The key of a step's posting on one side.
fn step_key(referral: &Paying, side: Side, step: i32) -> String {
    format!(
        "referral:{}:{}:reversal:{step}",
        referral.referred.0,
        side.as_str()
    )
}

/// After a refund or dispute of a top-up of `referred` (its payment intent
/// `payment_intent`), its ledger entry committed: when that top-up paid the
/// user's referral, brings both bonuses in line with what its money did,
/// and posts whatever step is not posted yet. Nothing for any other top-up.
pub async fn follow_paying_topup(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    bonus: Bonus,
    referred: AccountId,
    payment_intent: &str,
) -> Result<(), LedgerError> {
    let referral = {
        let mut client = db::client(pool).await?;
        let tx = client.transaction().await.map_err(DbError::from)?;
        let Some(row) = tx
            .query_opt(sql::LOCK, &[&referred.0])
            .await
            .map_err(DbError::from)?
        else {
            return Ok(());
        };
        let paid_by: Option<String> = row.get(1);
        let (Some(amount), true) = (
            row.get::<_, Option<i64>>(2),
            paid_by.as_deref() == Some(payment_intent),
        ) else {
            return Ok(());
        };
        let referral = Paying {
            referred,
            referrer: AccountId(row.get(0)),
            bonus: Micros::new(amount),
        };
        let now = engine.clock().now();
        advance(
            &*tx,
            &referral,
            row.get(3),
            payment_intent,
            bonus.minimum_kept,
            now,
        )
        .await?;
        tx.commit().await.map_err(DbError::from)?;
        referral
    };
    post_steps(pool, engine, &referral).await
}

/// Records the next step when what the paying top-up's money did (read
/// now, under the referral row's lock held by `tx`) no longer matches the
/// state the `steps` recorded so far leave the bonuses in.
pub(super) async fn advance(
    tx: &impl GenericClient,
    referral: &Paying,
    steps: i32,
    payment_intent: &str,
    minimum_kept: Micros,
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    let row = tx
        .query_one(sql::MONEY, &[&referral.referred.0, &payment_intent])
        .await
        .map_err(DbError::from)?;
    let money = Money {
        topup: Micros::new(row.get(0)),
        refunded: Micros::new(row.get(1)),
        withdrawn: row.get(2),
        reinstated: row.get(3),
    };
    let wanted = taken_back(money, minimum_kept);
    if wanted.is_some() == (steps % 2 == 1) {
        return Ok(());
    }
    let step = steps + 1;
    let reason = wanted.unwrap_or(Reason::DisputeWon);
    let previous = match step {
        1 => None,
        _ => Some(step_amounts(tx, referral.referred, step - 1).await?),
    };
    let mut amounts = [Micros::ZERO; 2];
    for (i, side) in Side::BOTH.into_iter().enumerate() {
        let before = previous.map(|amounts: [Micros; 2]| amounts[i]);
        amounts[i] = step_amount(tx, referral, side, step, before, now).await?;
    }
    tx.execute(
        sql::RECORD_STEP,
        &[
            &referral.referred.0,
            &step,
            &reason.as_str(),
            &amounts[0].get(),
            &amounts[1].get(),
        ],
    )
    .await
    .map_err(DbError::from)?;
    tx.execute(sql::COUNT_STEPS, &[&referral.referred.0, &step])
        .await
        .map_err(DbError::from)?;
    tracing::info!(
        referred = referral.referred.0,
        step,
        reason = reason.as_str(),
        "referral bonuses follow their top-up's money"
    );
    Ok(())
}

/// A posted credit: what it still stands for and its grant's expiry.
async fn credit(
    tx: &impl GenericClient,
    account: AccountId,
    key: &str,
    now: DateTime<Utc>,
) -> Result<Option<(Micros, Option<DateTime<Utc>>)>, LedgerError> {
    Ok(tx
        .query_opt(sql::CREDIT, &[&account.0, &key, &now])
        .await
        .map_err(DbError::from)?
        .map(|row| (Micros::new(row.get(0)), row.get(1))))
}

async fn step_amounts(
    tx: &impl GenericClient,
    referred: AccountId,
    step: i32,
) -> Result<[Micros; 2], LedgerError> {
    let row = tx
        .query_one(sql::STEP_AMOUNTS, &[&referred.0, &step])
        .await
        .map_err(DbError::from)?;
    Ok([Micros::new(row.get(0)), Micros::new(row.get(1))])
}

/// What step `step` moves on one side. Taking back (odd) takes what the
/// credit it reverses (the bonus, or the last giving back) still stands
/// for: its amount less what of it expired unspent, or, not posted yet,
/// what it will be. Giving back (even) gives what the step before took,
/// unless the bonus's expiry has passed: it would have expired by now.
async fn step_amount(
    tx: &impl GenericClient,
    referral: &Paying,
    side: Side,
    step: i32,
    before: Option<Micros>,
    now: DateTime<Utc>,
) -> Result<Micros, LedgerError> {
    let account = side.account(referral);
    let bonus = credit(tx, account, &side.bonus_key(referral), now).await?;
    let expired = bonus
        .and_then(|(_, expires_at)| expires_at)
        .is_some_and(|at| at <= now);
    let before = match before {
        None => return Ok(bonus.map_or(referral.bonus, |(standing, _)| standing)),
        Some(_) if step % 2 == 0 && expired => return Ok(Micros::ZERO),
        Some(before) if step % 2 == 0 => return Ok(before),
        Some(before) => before,
    };
    // A giving back not posted by now, past the expiry, never will be.
    let nominal = if expired { Micros::ZERO } else { before };
    Ok(
        credit(tx, account, &step_key(referral, side, step - 1), now)
            .await?
            .map_or(nominal, |(standing, _)| standing),
    )
}

/// Posts every recorded step of the referral, both sides, in order; the
/// ones posted before are replays.
pub(super) async fn post_steps(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    referral: &Paying,
) -> Result<(), LedgerError> {
    let steps = {
        let client = db::client(pool).await?;
        client
            .query(sql::STEPS, &[&referral.referred.0])
            .await
            .map_err(DbError::from)?
            .iter()
            .map(|row| {
                let reason: String = row.get(1);
                Ok(Step {
                    number: row.get(0),
                    reason: Reason::parse(&reason).ok_or_else(|| {
                        LedgerError::Internal(format!("referral step reason `{reason}`"))
                    })?,
                    amounts: [Micros::new(row.get(2)), Micros::new(row.get(3))],
                })
            })
            .collect::<Result<Vec<Step>, LedgerError>>()?
    };
    for step in &steps {
        for side in Side::BOTH {
            post_step(pool, engine, referral, step, side).await?;
        }
    }
    Ok(())
}

async fn post_step(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    referral: &Paying,
    step: &Step,
    side: Side,
) -> Result<(), LedgerError> {
    let amount = step.amount(side);
    if !amount.is_positive() {
        return Ok(());
    }
    let account = side.account(referral);
    let now = engine.clock().now();
    // Given back, the bonus lasts as long as it was to last.
    let expires_at = if step.gives_back() {
        let client = db::client(pool).await?;
        credit(&**client, account, &side.bonus_key(referral), now)
            .await?
            .and_then(|(_, expires_at)| expires_at)
    } else {
        None
    };
    if expires_at.is_some_and(|at| at <= now) {
        tracing::warn!(
            referred = referral.referred.0,
            side = side.as_str(),
            step = step.number,
            "referral bonus not given back: its expiry passed before it could be"
        );
        return Ok(());
    }
    let posting = Posting {
        key: IdempotencyKey::parse(step_key(referral, side, step.number))
            .map_err(LedgerError::Internal)?,
        kind: TransactionType::PromoBonus,
        amount,
        description: Some(format!("{} : {amount}", step.reason.describe())),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: Some(json!({
            "referral": {
                "referredUserId": referral.referred.0,
                "referrerUserId": referral.referrer.0,
                "step": step.number,
                "reason": step.reason.as_str(),
            }
        })),
        expires_at,
    };
    let result = if step.gives_back() {
        engine.credit(account, posting).await
    } else {
        engine.debit(account, posting).await
    };
    if matches!(&result, Ok(outcome) if !outcome.replayed) {
        let kind = if step.gives_back() {
            "given_back"
        } else {
            "taken_back"
        };
        metrics::counter!(crate::telemetry::REFERRAL_REVERSALS_TOTAL.name, "step" => kind)
            .increment(1);
    }
    posted(result, side)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMUM: Micros = Micros::new(5_000_000);

    fn money(topup: i64, refunded: i64, withdrawn: i64, reinstated: i64) -> Money {
        Money {
            topup: Micros::new(topup),
            refunded: Micros::new(refunded),
            withdrawn,
            reinstated,
        }
    }

    #[test]
    fn a_refund_takes_the_bonuses_back_once_less_than_the_minimum_top_up_is_kept() {
        assert_eq!(taken_back(money(5_000_000, 0, 0, 0), MINIMUM), None);
        assert_eq!(
            taken_back(money(5_000_000, 1, 0, 0), MINIMUM),
            Some(Reason::Refunded),
            "any refund of a minimum top-up"
        );
        assert_eq!(
            taken_back(money(20_000_000, 15_000_000, 0, 0), MINIMUM),
            None
        );
        assert_eq!(
            taken_back(money(20_000_000, 15_000_001, 0, 0), MINIMUM),
            Some(Reason::Refunded)
        );
    }

    #[test]
    fn a_dispute_takes_them_back_until_its_funds_are_reinstated_and_a_refund_outranks_it() {
        assert_eq!(
            taken_back(money(5_000_000, 0, 1, 0), MINIMUM),
            Some(Reason::Disputed)
        );
        assert_eq!(taken_back(money(5_000_000, 0, 1, 1), MINIMUM), None);
        assert_eq!(
            taken_back(money(5_000_000, 0, 0, 1), MINIMUM),
            None,
            "reinstated delivered before withdrawn"
        );
        assert_eq!(
            taken_back(money(5_000_000, 5_000_000, 1, 1), MINIMUM),
            Some(Reason::Refunded)
        );
    }

    #[test]
    fn money_of_a_top_up_not_credited_takes_nothing_back() {
        assert_eq!(taken_back(money(0, 5_000_000, 1, 0), MINIMUM), None);
    }
}
