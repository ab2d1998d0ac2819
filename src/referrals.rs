//! Referrals: each user's code, a new user presenting one, and the promo
//! credit both sides get once the referred user's first paid top-up lands.
//!
//! A code is made once, on first asking: 8 characters of an alphabet with
//! no look-alikes (no 0/O, 1/I/L), 40 random bits, unique in PostgreSQL.
//! A person presents at most one code (one per canonical mailbox, not per
//! account), within `REDEEM_DAYS` of signing up at Clerk, never their own
//! nor one of an account of the same canonical mailbox. The first paid
//! top-up after that is recorded as the one paying the referral (under the
//! referral row's lock), then the bonus is posted under one idempotency key
//! per side and referred person (`referral:<referred>:referee`,
//! `…:referrer`), so a replayed webhook, a retry after a crash or a later
//! top-up never pays twice. The bonuses follow that top-up's money
//! afterwards: see [`reversals`].

use chrono::{DateTime, Duration, Utc};
use tokio_postgres::GenericClient;

use crate::db::{self, DbError};
use crate::ledger::{AccountId, Engine, IdempotencyKey, LedgerError, Posting, TransactionType};
use crate::money::Micros;

mod reversals;

pub use reversals::follow_paying_topup;

/// Days after signup during which a code may be presented.
pub const REDEEM_DAYS: i64 = 7;
/// The characters of a code: letters and digits without the look-alikes
/// 0/O and 1/I/L.
const ALPHABET: &[u8; 31] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
pub const CODE_LEN: usize = 8;

/// A new random code: 64 random bits read as base-31 digits (31^8 is far
/// below 2^64, so the digits are as good as uniform), about 40 bits.
fn new_code() -> String {
    let random = uuid::Uuid::new_v4();
    // Bytes 6 and 8 of a v4 UUID carry its version and variant bits.
    let bytes = random.as_bytes();
    let mut n = [0, 1, 2, 3, 4, 5, 10, 11]
        .iter()
        .fold(0u64, |n, &i| (n << 8) | u64::from(bytes[i]));
    let base = ALPHABET.len() as u64;
    (0..CODE_LEN)
        .map(|_| {
            let digit = (n % base) as usize;
            n /= base;
            char::from(ALPHABET[digit])
        })
        .collect()
}

/// A code as typed: trimmed, upper-cased, checked for shape.
pub fn normalize(code: &str) -> Option<String> {
    let code = code.trim().to_ascii_uppercase();
    (code.len() == CODE_LEN && code.bytes().all(|b| ALPHABET.contains(&b))).then_some(code)
}

/// The user's code, made on first asking.
pub async fn code_of(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<String, LedgerError> {
    for _ in 0..8 {
        if let Some(row) = client
            .query_opt(
                "SELECT code FROM referral_codes WHERE user_id = $1",
                &[&account.0],
            )
            .await
            .map_err(DbError::from)?
        {
            return Ok(row.get(0));
        }
        // Skips both a concurrent first asking (same user) and a code
        // another user already has; the loop reads which it was.
        client
            .execute(
                "INSERT INTO referral_codes (user_id, code) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
                &[&account.0, &new_code()],
            )
            .await
            .map_err(DbError::from)?;
    }
    Err(LedgerError::Internal(
        "no free referral code after 8 tries".into(),
    ))
}

/// Referral codes and their redemption, on the service's own connections.
#[derive(Clone)]
pub struct Referrals {
    pool: db::Pool,
}

impl Referrals {
    pub fn new(pool: db::Pool) -> Referrals {
        Referrals { pool }
    }

    /// What the referral page shows the user (see [`summary`]).
    pub async fn summary(&self, account: AccountId) -> Result<Summary, LedgerError> {
        let client = db::client(&self.pool).await?;
        summary(&**client, account).await
    }

    /// The user presents a code (see [`redeem`]).
    pub async fn redeem(
        &self,
        account: AccountId,
        code: &str,
        now: DateTime<Utc>,
    ) -> Result<Result<Redeemed, Refusal>, LedgerError> {
        let client = db::client(&self.pool).await?;
        redeem(&**client, account, code, now).await
    }
}

/// What the referral page shows a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub code: String,
    /// Users who presented this user's code.
    pub referred_count: i64,
    /// Of those, the ones whose first top-up paid both bonuses and still
    /// does (not refunded nor lost in a dispute).
    pub rewarded_count: i64,
    /// Whether this user presented someone's code.
    pub referred: bool,
    /// Until when this user may present a code (none once referred).
    pub redeem_until: Option<DateTime<Utc>>,
}

pub async fn summary(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Summary, LedgerError> {
    let code = code_of(client, account).await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM referrals WHERE referrer_user_id = $1),
                    (SELECT count(*) FROM referrals
                      WHERE referrer_user_id = $1 AND rewarded_at IS NOT NULL
                        AND reversal_steps % 2 = 0),
                    EXISTS (SELECT 1 FROM referrals WHERE referred_user_id = $1),
                    (SELECT COALESCE(signed_up_at, created_at) FROM users WHERE id = $1)",
            &[&account.0],
        )
        .await
        .map_err(DbError::from)?;
    let referred: bool = row.get(2);
    let signed_up: Option<DateTime<Utc>> = row.get(3);
    Ok(Summary {
        code,
        referred_count: row.get(0),
        rewarded_count: row.get(1),
        referred,
        redeem_until: signed_up
            .filter(|_| !referred)
            .map(|at| at + Duration::days(REDEEM_DAYS)),
    })
}

/// Why a code was not taken, in the order they are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No user has this code (or its owner was deleted).
    Unknown,
    /// The code is the user's own.
    OwnCode,
    /// The user signed up more than `REDEEM_DAYS` ago.
    TooLate { closed_at: DateTime<Utc> },
    /// Its owner's account has the same canonical mailbox as the user's.
    SameEmail,
    /// The user already presented another code.
    AlreadyReferred,
    /// Another account of the same person (canonical mailbox) presented a
    /// code.
    PersonAlreadyReferred,
}

/// A code taken: `replayed` when this user had presented it before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redeemed {
    pub referrer: AccountId,
    pub replayed: bool,
}

/// The user `account` presents `code` at `now`.
pub async fn redeem(
    client: &impl GenericClient,
    account: AccountId,
    code: &str,
    now: DateTime<Utc>,
) -> Result<Result<Redeemed, Refusal>, LedgerError> {
    let Some(owner) = client
        .query_opt(
            "SELECT c.user_id, u.email_hash
               FROM referral_codes c JOIN users u ON u.id = c.user_id
              WHERE c.code = $1 AND u.deleted_at IS NULL",
            &[&code],
        )
        .await
        .map_err(DbError::from)?
    else {
        return Ok(Err(Refusal::Unknown));
    };
    let referrer = AccountId(owner.get(0));
    if referrer == account {
        return Ok(Err(Refusal::OwnCode));
    }
    // The window opens at Clerk's signup when Clerk told it, else at
    // creditd's first sight of the user.
    let me = client
        .query_one(
            "SELECT COALESCE(u.signed_up_at, u.created_at), u.email_hash,
                    (SELECT referrer_user_id FROM referrals WHERE referred_user_id = u.id)
               FROM users u WHERE u.id = $1",
            &[&account.0],
        )
        .await
        .map_err(DbError::from)?;
    if let Some(earlier) = me.get::<_, Option<i64>>(2) {
        return Ok(presented_before(earlier, referrer));
    }
    let closed_at = me.get::<_, DateTime<Utc>>(0) + Duration::days(REDEEM_DAYS);
    if now > closed_at {
        return Ok(Err(Refusal::TooLate { closed_at }));
    }
    let mine: Option<String> = me.get(1);
    let same_person = matches!(
        (owner.get::<_, Option<String>>(1), mine.as_deref()),
        (Some(theirs), Some(mine)) if theirs == mine
    );
    if same_person {
        return Ok(Err(Refusal::SameEmail));
    }
    // Unique per referred account and per referred person: a second
    // presentation of either inserts nothing.
    let inserted = client
        .query_opt(
            "INSERT INTO referrals
                    (referred_user_id, referrer_user_id, code, created_at, referred_email_hash)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING referrer_user_id",
            &[&account.0, &referrer.0, &code, &now, &mine],
        )
        .await
        .map_err(DbError::from)?;
    if inserted.is_some() {
        return Ok(Ok(Redeemed {
            referrer,
            replayed: false,
        }));
    }
    // A concurrent request of this user won (it decides), or another
    // account of the same person was referred.
    let winner = client
        .query_opt(
            "SELECT referrer_user_id FROM referrals WHERE referred_user_id = $1",
            &[&account.0],
        )
        .await
        .map_err(DbError::from)?;
    Ok(match winner {
        Some(row) => presented_before(row.get(0), referrer),
        None => Err(Refusal::PersonAlreadyReferred),
    })
}

/// The user had presented the code of `earlier`: the same code again is a
/// replay, another one a refusal.
fn presented_before(earlier: i64, referrer: AccountId) -> Result<Redeemed, Refusal> {
    if earlier == referrer.0 {
        Ok(Redeemed {
            referrer,
            replayed: true,
        })
    } else {
        Err(Refusal::AlreadyReferred)
    }
}

/// The promo credit each side of a referral gets, and how much of the
/// paying top-up must be kept for it to stay paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bonus {
    /// 0: no referral bonus.
    pub amount: Micros,
    /// Days the bonus lasts; 0: it never expires.
    pub expiry_days: u32,
    /// The minimum top-up (`stripe.topup_cents_min`): refunds that leave
    /// less of the paying top-up than this take both bonuses back.
    pub minimum_kept: Micros,
}

/// How a referral went at a paid top-up of the referred user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reward {
    /// The user was not referred, or the bonus is off.
    None,
    /// Paid before (by this top-up or another): nothing more.
    AlreadyPaid,
    /// Both sides are one person (the same canonical mailbox, known since
    /// the code was presented): no bonus.
    Refused,
    /// Both bonuses posted (or found posted) now.
    Paid,
}

/// The top-up a referral's bonuses may follow.
#[derive(Debug, Clone, Copy)]
pub struct PaidTopup<'a> {
    /// The Checkout session (`cs_…`).
    pub session_id: &'a str,
    /// Its payment (`pi_…`): refunds and disputes name it.
    pub payment_intent: Option<&'a str>,
}

/// A referral paid by a top-up: both sides and the bonus each side gets.
#[derive(Debug, Clone, Copy)]
struct Paying {
    referred: AccountId,
    referrer: AccountId,
    bonus: Micros,
}

/// One side of a referral.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// The referred user.
    Referee,
    Referrer,
}

impl Side {
    const BOTH: [Side; 2] = [Side::Referee, Side::Referrer];

    fn as_str(self) -> &'static str {
        match self {
            Side::Referee => "referee",
            Side::Referrer => "referrer",
        }
    }

    fn account(self, referral: &Paying) -> AccountId {
        match self {
            Side::Referee => referral.referred,
            Side::Referrer => referral.referrer,
        }
    }

    /// The key of this side's bonus.
    fn bonus_key(self, referral: &Paying) -> String {
        format!("referral:{}:{}", referral.referred.0, self.as_str())
    }
}

mod sql {
    /// The referral of a user, locked: the top-up that pays it is decided
    /// once, and a refund or dispute of that top-up waits for the decision.
    pub const LOCK_FOR_REWARD: &str =
        "SELECT r.referrer_user_id, r.rewarded_at IS NOT NULL, r.paid_by_session_id,
                r.bonus_micros, referred.email_hash, referrer.email_hash
           FROM referrals r
           JOIN users referred ON referred.id = r.referred_user_id
           JOIN users referrer ON referrer.id = r.referrer_user_id
          WHERE r.referred_user_id = $1
            FOR UPDATE OF r";
    pub const PAID_BY: &str = "UPDATE referrals
            SET paid_by_session_id = $2, paid_by_payment_id = $3, bonus_micros = $4
          WHERE referred_user_id = $1";
    pub const REWARDED: &str = "UPDATE referrals SET rewarded_at = now()
          WHERE referred_user_id = $1 AND rewarded_at IS NULL";
}

fn bonus_posting(
    key: String,
    description: &str,
    referral: &Paying,
    bonus: Bonus,
    expires_at: Option<DateTime<Utc>>,
) -> Result<Posting, LedgerError> {
    Ok(Posting {
        key: IdempotencyKey::parse(key).map_err(LedgerError::Internal)?,
        kind: TransactionType::PromoBonus,
        amount: referral.bonus,
        description: Some(description.to_owned()),
        stripe_session_id: None,
        stripe_payment_id: None,
        metadata: Some(serde_json::json!({
            "referral": {
                "referredUserId": referral.referred.0,
                "referrerUserId": referral.referrer.0,
                "expiryDays": bonus.expiry_days,
            }
        })),
        expires_at,
    })
}

/// A referral posting whose key is already taken was posted once: done.
fn posted(result: Result<impl Sized, LedgerError>, side: Side) -> Result<(), LedgerError> {
    match result {
        Ok(_) => Ok(()),
        Err(LedgerError::Conflict(message)) => {
            tracing::warn!(%message, side = side.as_str(), "referral posting key already used; not posted again");
            Ok(())
        }
        Err(LedgerError::AccountNotFound(account)) => {
            tracing::error!(
                account = account.0,
                side = side.as_str(),
                "referral posting for an account that does not exist"
            );
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// After a paid top-up of `referred`: pays both sides of its referral
/// once, if this top-up is the one paying it. The first paid top-up after
/// the code was presented is recorded as paying it (with the bonus of the
/// moment); any other top-up pays nothing. If that top-up was already
/// refunded or disputed, the bonuses are taken back at once (see
/// [`reversals`]). An error leaves the referral unpaid, for the webhook's
/// retry. No connection is held while the engine posts (loading an account
/// takes one from the same pool).
pub async fn reward_after_topup(
    pool: &deadpool_postgres::Pool,
    engine: &Engine,
    bonus: Bonus,
    referred: AccountId,
    topup: PaidTopup<'_>,
) -> Result<Reward, LedgerError> {
    let referral = {
        let mut client = db::client(pool).await?;
        match decide_payer(&mut client, bonus, referred, topup, engine.clock().now()).await? {
            Ok(referral) => referral,
            Err(reward) => return Ok(reward),
        }
    };
    // Both sides' bonuses last `expiry_days` from this first top-up.
    let expires_at = match bonus.expiry_days {
        0 => None,
        days => Some(
            engine
                .clock()
                .now()
                .checked_add_signed(Duration::days(i64::from(days)))
                .ok_or_else(|| {
                    LedgerError::InvalidRequest(
                        "credits.referral_bonus_expiry_days: the expiry is out of range".into(),
                    )
                })?,
        ),
    };
    for (side, description) in [
        (Side::Referee, "Bonus de parrainage (filleul)"),
        (Side::Referrer, "Bonus de parrainage (parrain)"),
    ] {
        let posting = bonus_posting(
            side.bonus_key(&referral),
            description,
            &referral,
            bonus,
            expires_at,
        )?;
        posted(engine.credit(side.account(&referral), posting).await, side)?;
    }
    reversals::post_steps(pool, engine, &referral).await?;
    db::client(pool)
        .await?
        .execute(sql::REWARDED, &[&referred.0])
        .await
        .map_err(DbError::from)?;
    metrics::counter!(crate::telemetry::REFERRAL_BONUSES_TOTAL.name).increment(2);
    Ok(Reward::Paid)
}

/// Decides, under the referral row's lock, whether `topup` pays the
/// referral of `referred`: the referral to pay, or why not. A top-up
/// recorded as paying it and not rewarded yet (a retry) pays it again
/// with the recorded bonus; a first one is recorded now, with its payment's
/// refunds and disputes so far (see `reversals::advance`).
async fn decide_payer(
    client: &mut deadpool_postgres::Object,
    bonus: Bonus,
    referred: AccountId,
    topup: PaidTopup<'_>,
    now: DateTime<Utc>,
) -> Result<Result<Paying, Reward>, LedgerError> {
    let tx = client.transaction().await.map_err(DbError::from)?;
    let Some(row) = tx
        .query_opt(sql::LOCK_FOR_REWARD, &[&referred.0])
        .await
        .map_err(DbError::from)?
    else {
        return Ok(Err(Reward::None));
    };
    let referrer = AccountId(row.get(0));
    let rewarded: bool = row.get(1);
    let paid_by: Option<String> = row.get(2);
    match (paid_by.as_deref(), row.get::<_, Option<i64>>(3)) {
        (Some(session), Some(amount)) if session == topup.session_id && !rewarded => {
            return Ok(Ok(Paying {
                referred,
                referrer,
                bonus: Micros::new(amount),
            }));
        }
        (Some(_), _) => return Ok(Err(Reward::AlreadyPaid)),
        (None, _) if rewarded => return Ok(Err(Reward::AlreadyPaid)),
        (None, _) => {}
    }
    if !bonus.amount.is_positive() {
        return Ok(Err(Reward::None));
    }
    let same_person = matches!(
        (row.get::<_, Option<String>>(4), row.get::<_, Option<String>>(5)),
        (Some(referred), Some(referrer)) if referred == referrer
    );
    if same_person {
        tracing::warn!(
            referred = referred.0,
            referrer = referrer.0,
            "both sides of the referral have one mailbox; no referral bonus"
        );
        return Ok(Err(Reward::Refused));
    }
    tx.execute(
        sql::PAID_BY,
        &[
            &referred.0,
            &topup.session_id,
            &topup.payment_intent,
            &bonus.amount.get(),
        ],
    )
    .await
    .map_err(DbError::from)?;
    let referral = Paying {
        referred,
        referrer,
        bonus: bonus.amount,
    };
    if let Some(payment_intent) = topup.payment_intent {
        reversals::advance(&*tx, &referral, 0, payment_intent, bonus.minimum_kept, now).await?;
    }
    tx.commit().await.map_err(DbError::from)?;
    Ok(Ok(referral))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_codes_have_eight_unambiguous_characters_and_read_back_as_typed() {
        for _ in 0..1000 {
            let code = new_code();
            assert_eq!(normalize(&code).as_deref(), Some(code.as_str()));
            assert!(!code.contains(['0', 'O', '1', 'I', 'L']), "{code}");
            assert_eq!(
                normalize(&format!("  {}  ", code.to_lowercase())),
                Some(code)
            );
        }
        assert_eq!(normalize("ABCDEFG0"), None);
        assert_eq!(normalize("ABCDEFG"), None);
    }
}
