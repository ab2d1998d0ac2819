//! The `users` table: a Clerk id's account (created on first sight),
//! deletion, the profile from Clerk's events, the Stripe customer and the
//! plan. Named queries in [`sql`].

use deadpool_postgres::Pool;
use moka::future::Cache;
use tokio_postgres::GenericClient;

use crate::db::{self, DbError};
use crate::ledger::AccountId;

/// Most Clerk ids kept in the id → account cache.
const USER_CACHE_ENTRIES: u64 = 100_000;

mod sql {
    pub const CUSTOMER: &str = "SELECT stripe_customer_id, email, name FROM users WHERE id = $1";
    pub const STORE_CUSTOMER: &str = "UPDATE users SET stripe_customer_id = $2, updated_at = now()
          WHERE id = $1 AND stripe_customer_id IS NULL";
    pub const STORED_CUSTOMER: &str = "SELECT stripe_customer_id FROM users WHERE id = $1";
    pub const PLAN: &str = "SELECT plan FROM users WHERE id = $1";
    pub const SET_PLAN: &str = "UPDATE users SET plan = $2, stripe_subscription_id = $3,
                stripe_subscription_event_at = $4, updated_at = now()
          WHERE stripe_customer_id = $1
            AND (stripe_subscription_event_at IS NULL OR stripe_subscription_event_at <= $4)
            AND ($5 = false OR stripe_subscription_id IS NULL OR stripe_subscription_id = $6)";
    pub const CUSTOMER_KNOWN: &str = "SELECT 1 FROM users WHERE stripe_customer_id = $1";
    /// A transaction lock per Clerk id, in a key space of its own (the
    /// two-key form never meets the singletons' one-key locks).
    pub const LOCK_PROFILE: &str = "SELECT pg_advisory_xact_lock(1329, hashtext($1))";
    pub const UPSERT_PROFILE: &str =
        "INSERT INTO users (clerk_id, email, name, image_url, email_hash, signed_up_at)
         VALUES ($1, $2, $3, $4, $5, $7)
         ON CONFLICT (clerk_id) DO UPDATE
            SET email = EXCLUDED.email, name = EXCLUDED.name,
                image_url = EXCLUDED.image_url, email_hash = EXCLUDED.email_hash,
                signed_up_at = COALESCE(EXCLUDED.signed_up_at, users.signed_up_at),
                deleted_at = CASE WHEN $6 THEN NULL ELSE users.deleted_at END,
                updated_at = now()
         RETURNING id";
    /// Inserts only when no committed row exists: a plain `ON CONFLICT DO
    /// NOTHING` waits for a journal batch updating the existing row, and
    /// the caller may hold the user row that batch's event inserts check
    /// their foreign key against (a deadlock).
    pub const ENSURE_BALANCE: &str = "INSERT INTO credit_balances (user_id)
         SELECT $1 WHERE NOT EXISTS (SELECT 1 FROM credit_balances WHERE user_id = $1)
         ON CONFLICT DO NOTHING";
    pub const MARK_DELETED: &str =
        "UPDATE users SET deleted_at = now(), email = NULL, updated_at = now()
          WHERE clerk_id = $1 AND deleted_at IS NULL
         RETURNING id";
    pub const EMAIL_HASH: &str = "SELECT email_hash FROM users WHERE id = $1";
}

pub use crate::clerk::tokens::ClerkUserId;

/// Why a user's request cannot go on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AccountError {
    /// The user was deleted (Clerk's `user.deleted`).
    #[error("this account was deleted; sign up again to use the service")]
    Deleted,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// A Clerk id's account and whether the user was deleted.
#[derive(Debug, Clone, Copy)]
struct CachedUser {
    account: AccountId,
    deleted: bool,
}

/// The profile of a user as Clerk's events give it, checked.
#[derive(Debug, Clone, Copy)]
pub struct Profile<'a> {
    pub clerk_id: &'a ClerkUserId,
    pub email: Option<&'a str>,
    pub name: Option<&'a str>,
    pub image_url: Option<&'a str>,
    /// How the signup bonus knows the person (see `bonus::email_hash`).
    pub email_hash: Option<&'a str>,
    /// When the user signed up at Clerk (`created_at`), if Clerk said.
    pub signed_up_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// A user an operator's search found.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FoundUser {
    /// The Clerk id.
    pub user_id: String,
    pub email: Option<String>,
    pub stripe_customer_id: Option<String>,
    pub deleted: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Clerk id → account, created on first sight and kept in memory.
pub struct Users {
    pool: Pool,
    /// Clerk id → account, the least used evicted past `USER_CACHE_ENTRIES`.
    cache: Cache<ClerkUserId, CachedUser>,
    /// Serializes the first lookup of a Clerk id (by hash shard).
    first_sight: Vec<tokio::sync::Mutex<()>>,
}

impl Users {
    pub fn new(pool: Pool) -> Users {
        Users {
            pool,
            cache: Cache::new(USER_CACHE_ENTRIES),
            first_sight: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }

    /// The account of a Clerk user, created on first sight. Concurrent
    /// first requests of one user (a page load fires several) share one
    /// lookup. A deleted user is refused.
    pub async fn account(&self, clerk_id: &ClerkUserId) -> Result<AccountId, AccountError> {
        let user = self.resolve(clerk_id).await?;
        if user.deleted {
            return Err(AccountError::Deleted);
        }
        Ok(user.account)
    }

    /// The account of a Clerk user for an operator: created on first sight,
    /// deleted or not (a deleted user's ledger stays and can be adjusted).
    pub async fn any_account(&self, clerk_id: &ClerkUserId) -> Result<AccountId, DbError> {
        Ok(self.resolve(clerk_id).await?.account)
    }

    /// The account of a Clerk user, if the user exists (deleted or not).
    pub async fn existing_account(
        &self,
        clerk_id: &ClerkUserId,
    ) -> Result<Option<AccountId>, DbError> {
        if let Some(user) = self.cached(clerk_id).await {
            return Ok(Some(user.account));
        }
        let client = db::client(&self.pool).await?;
        let found = find_user_status(&**client, clerk_id.as_str()).await?;
        Ok(found.map(|(account, _)| account))
    }

    async fn resolve(&self, clerk_id: &ClerkUserId) -> Result<CachedUser, DbError> {
        if let Some(user) = self.cached(clerk_id).await {
            return Ok(user);
        }
        let _turn = self.turn(clerk_id).await;
        if let Some(user) = self.cached(clerk_id).await {
            return Ok(user);
        }
        let client = db::client(&self.pool).await?;
        let user = match find_user_status(&**client, clerk_id.as_str()).await? {
            Some((account, deleted)) => CachedUser { account, deleted },
            None => CachedUser {
                account: ensure_user(&**client, clerk_id.as_str()).await?,
                deleted: false,
            },
        };
        self.remember(clerk_id, user).await;
        Ok(user)
    }

    /// Serializes the lookups of one Clerk id and the cache forgetting it
    /// (by hash shard): a lookup that read the row before a committed
    /// change (a deletion) cannot cache it after `forget`.
    async fn turn(&self, clerk_id: &ClerkUserId) -> tokio::sync::MutexGuard<'_, ()> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(clerk_id, &mut hasher);
        let shard = std::hash::Hasher::finish(&hasher) as usize % self.first_sight.len();
        self.first_sight[shard].lock().await
    }

    /// The user's plan (`free` until a subscription says otherwise).
    pub async fn plan(&self, account: AccountId) -> Result<String, DbError> {
        plan(&**db::client(&self.pool).await?, account).await
    }

    /// The users an operator's search names: by Clerk id, email (as typed
    /// or lowercased) or Stripe customer id, each looked up by its index.
    pub async fn search(&self, text: &str) -> Result<Vec<FoundUser>, DbError> {
        let client = db::client(&self.pool).await?;
        let lowered = text.to_lowercase();
        let rows = client
            .query(
                "SELECT clerk_id, email, stripe_customer_id, deleted_at IS NOT NULL, created_at
                   FROM users
                  WHERE clerk_id = $1 OR email = $1 OR email = $2 OR stripe_customer_id = $1
                  ORDER BY created_at DESC LIMIT 20",
                &[&text, &lowered],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(FoundUser {
                    user_id: row.try_get(0)?,
                    email: row.try_get(1)?,
                    stripe_customer_id: row.try_get(2)?,
                    deleted: row.try_get(3)?,
                    created_at: row.try_get(4)?,
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(DbError::from)
    }

    /// Forgets what the cache holds of a Clerk id whose row a transaction
    /// just committed a change to (Clerk's user events): the next lookup
    /// reads the committed row. Under the user's turn, so a lookup that
    /// read the row before the commit cannot cache it after this; and two
    /// events' steps after their commits, in either order, leave nothing
    /// stale (a remembered value could be the older one's).
    pub async fn forget(&self, clerk_id: &ClerkUserId) {
        let _turn = self.turn(clerk_id).await;
        self.cache.invalidate(clerk_id).await;
    }

    /// The account of a Clerk id and whether the user was deleted, as
    /// committed (read from the database, not the cache); `None` when
    /// the user does not exist.
    pub async fn stored(
        &self,
        clerk_id: &ClerkUserId,
    ) -> Result<Option<(AccountId, bool)>, DbError> {
        let client = db::client(&self.pool).await?;
        find_user_status(&**client, clerk_id.as_str()).await
    }

    async fn cached(&self, clerk_id: &ClerkUserId) -> Option<CachedUser> {
        self.cache.get(clerk_id).await
    }

    async fn remember(&self, clerk_id: &ClerkUserId, user: CachedUser) {
        self.cache.insert(clerk_id.clone(), user).await;
    }
}

/// Creates the user (with its balance row), or brings email, name and
/// picture up to date; `created` (Clerk's `user.created`) also brings a
/// deleted user back. On the caller's transaction (the event's inbox
/// row commits with it); the cache learns it after the commit
/// (`Users::forget`).
pub async fn upsert_profile(
    client: &impl GenericClient,
    profile: Profile<'_>,
    created: bool,
) -> Result<AccountId, DbError> {
    // Deliveries of one new user's events insert at once: ON CONFLICT
    // settles the Clerk id, but the email's unique index is no arbiter, and
    // a racing insert of the same address fails there. One at a time per
    // user (until the caller's transaction ends), the later ones find the
    // row and update it.
    client
        .execute(sql::LOCK_PROFILE, &[&profile.clerk_id.as_str()])
        .await?;
    let row = client
        .query_one(
            sql::UPSERT_PROFILE,
            &[
                &profile.clerk_id.as_str(),
                &profile.email,
                &profile.name,
                &profile.image_url,
                &profile.email_hash,
                &created,
                &profile.signed_up_at,
            ],
        )
        .await?;
    let account = AccountId(row.get(0));
    client.execute(sql::ENSURE_BALANCE, &[&account.0]).await?;
    Ok(account)
}

/// Marks the user deleted; the ledger stays. The email is released so
/// the address can sign up again as a new user. On the caller's
/// transaction; the user's requests are refused once it committed and the
/// cache forgot the user (`Users::forget`). The account when a live user
/// was deleted now.
pub async fn mark_deleted(
    client: &impl GenericClient,
    clerk_id: &ClerkUserId,
) -> Result<Option<AccountId>, DbError> {
    Ok(client
        .query_opt(sql::MARK_DELETED, &[&clerk_id.as_str()])
        .await?
        .map(|row| AccountId(row.get(0))))
}

/// The user's Stripe customer id, email and name.
pub struct CustomerFields {
    pub customer_id: Option<String>,
    pub email: Option<String>,
    pub name: Option<String>,
}

pub async fn customer_fields(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<CustomerFields, DbError> {
    let row = client.query_one(sql::CUSTOMER, &[&account.0]).await?;
    Ok(CustomerFields {
        customer_id: row.get(0),
        email: row.get(1),
        name: row.get(2),
    })
}

/// Stores the user's Stripe customer unless one is stored already; true
/// when this one was stored.
pub async fn store_customer(
    client: &impl GenericClient,
    account: AccountId,
    customer_id: &str,
) -> Result<bool, DbError> {
    let updated = client
        .execute(sql::STORE_CUSTOMER, &[&account.0, &customer_id])
        .await?;
    Ok(updated == 1)
}

/// The user's stored Stripe customer.
pub async fn stored_customer(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Option<String>, DbError> {
    Ok(client
        .query_one(sql::STORED_CUSTOMER, &[&account.0])
        .await?
        .get(0))
}

/// The user's plan as stored (`users.plan`).
pub async fn plan(client: &impl GenericClient, account: AccountId) -> Result<String, DbError> {
    Ok(client.query_one(sql::PLAN, &[&account.0]).await?.get(0))
}

/// A user's plan, as `users.plan` stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Free,
    Starter,
    Pro,
    Team,
}

impl Plan {
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Free => "FREE",
            Plan::Starter => "STARTER",
            Plan::Pro => "PRO",
            Plan::Team => "TEAM",
        }
    }
}

/// A subscription event's effect on a customer's user.
#[derive(Debug, Clone, Copy)]
pub struct PlanChange<'a> {
    pub customer_id: &'a str,
    pub plan: Plan,
    /// The subscription now current; `None` once deleted.
    pub current_subscription_id: Option<&'a str>,
    pub subscription_id: &'a str,
    pub deleted: bool,
    pub event_at: chrono::DateTime<chrono::Utc>,
}

/// What setting the plan did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanSet {
    Applied,
    /// A newer event already set the plan, or the deleted subscription is
    /// not the user's current one.
    Superseded,
    UnknownCustomer,
}

/// Sets the plan of the customer's user, unless a newer event set it.
pub async fn set_plan(
    client: &impl GenericClient,
    change: PlanChange<'_>,
) -> Result<PlanSet, DbError> {
    let updated = client
        .execute(
            sql::SET_PLAN,
            &[
                &change.customer_id,
                &change.plan.as_str(),
                &change.current_subscription_id,
                &change.event_at,
                &change.deleted,
                &change.subscription_id,
            ],
        )
        .await?;
    if updated == 1 {
        return Ok(PlanSet::Applied);
    }
    let known = client
        .query_opt(sql::CUSTOMER_KNOWN, &[&change.customer_id])
        .await?
        .is_some();
    Ok(if known {
        PlanSet::Superseded
    } else {
        PlanSet::UnknownCustomer
    })
}

/// The email hash the signup bonus knows the user by, if any.
pub async fn email_hash(
    client: &impl GenericClient,
    account: AccountId,
) -> Result<Option<String>, DbError> {
    Ok(client
        .query_opt(sql::EMAIL_HASH, &[&account.0])
        .await?
        .and_then(|row| row.get(0)))
}

/// The user with this Clerk id, created (with a zero balance row) when new
/// (the balance row is the ledger's, but a user never exists without one).
pub async fn ensure_user(
    client: &impl GenericClient,
    clerk_id: &str,
) -> Result<AccountId, DbError> {
    if let Some(account) = find_user(client, clerk_id).await? {
        return Ok(account);
    }
    // DO UPDATE (not DO NOTHING) so the row comes back even when a
    // concurrent insert of the same user won: DO NOTHING would return no
    // row, and a SELECT in the same statement cannot see the winner's.
    let row = client
        .query_one(
            "INSERT INTO users (clerk_id) VALUES ($1)
             ON CONFLICT (clerk_id) DO UPDATE SET clerk_id = EXCLUDED.clerk_id
             RETURNING id",
            &[&clerk_id],
        )
        .await?;
    let id: i64 = row.get(0);
    client.execute(sql::ENSURE_BALANCE, &[&id]).await?;
    Ok(AccountId(id))
}

/// The user with this Clerk id, if known.
pub async fn find_user(
    client: &impl GenericClient,
    clerk_id: &str,
) -> Result<Option<AccountId>, DbError> {
    Ok(client
        .query_opt("SELECT id FROM users WHERE clerk_id = $1", &[&clerk_id])
        .await?
        .map(|row| AccountId(row.get(0))))
}

/// The account of a Clerk id and whether the user was deleted.
pub async fn find_user_status(
    client: &impl GenericClient,
    clerk_id: &str,
) -> Result<Option<(AccountId, bool)>, DbError> {
    Ok(client
        .query_opt(
            "SELECT id, deleted_at IS NOT NULL FROM users WHERE clerk_id = $1",
            &[&clerk_id],
        )
        .await?
        .map(|row| (AccountId(row.get(0)), row.get(1))))
}
