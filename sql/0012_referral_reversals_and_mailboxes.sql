-- One person, one bonus; and referral bonuses that do not outlive the
-- money that paid them.

-- When the user signed up at Clerk (`created_at` of `user.created` and
-- `user.updated`): the referral window starts there. NULL for users Clerk
-- never described; their window starts at `created_at`, creditd's first
-- sight of them.
ALTER TABLE users ADD COLUMN signed_up_at TIMESTAMPTZ;

-- The canonical mailbox (src/accounts/mailbox.rs, the same rule): lower-
-- cased and trimmed, the `+tag` of the local part removed for every
-- domain, and for gmail.com and googlemail.com (read as gmail.com) the
-- dots of the local part removed. The domain follows the last `@`.
CREATE FUNCTION pg_temp.canonical_mailbox(address TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
             WHEN parts.address = '' THEN NULL
             WHEN parts.domain IS NULL THEN parts.address
             WHEN parts.domain IN ('gmail.com', 'googlemail.com')
               THEN replace(parts.local, '.', '') || '@gmail.com'
             ELSE parts.local || '@' || parts.domain
           END
      FROM (SELECT whole.address,
                   substring(whole.address FROM '@([^@]*)$') AS domain,
                   CASE WHEN split_part(substring(whole.address FROM '^(.*)@'), '+', 1) = ''
                        THEN substring(whole.address FROM '^(.*)@')
                        ELSE split_part(substring(whole.address FROM '^(.*)@'), '+', 1)
                   END AS local
              FROM (SELECT lower(btrim(address)) AS address) AS whole) AS parts
$$;

-- Each user's person hash, from the canonical mailbox of the email still
-- stored. Only users whose hash was set (a verified primary email) get
-- one; a deleted user's email is gone, so its hash stays as it was.
CREATE TEMP TABLE mailbox_rehash ON COMMIT DROP AS
SELECT id AS user_id,
       email_hash AS old_hash,
       encode(sha256(convert_to(pg_temp.canonical_mailbox(email), 'UTF8')), 'hex') AS new_hash
  FROM users
 WHERE email_hash IS NOT NULL AND email IS NOT NULL AND btrim(email) <> '';

UPDATE users u SET email_hash = m.new_hash
  FROM mailbox_rehash m
 WHERE u.id = m.user_id AND u.email_hash <> m.new_hash;

-- The signup-bonus claims follow: one claim per person, the earliest of
-- those made under the person's spellings. Another account of the same
-- person that already had its bonus keeps it; asking for it again finds
-- the claim naming someone else and gives it back (see accounts::bonus).
CREATE TEMP TABLE rekeyed_claims ON COMMIT DROP AS
SELECT DISTINCT ON (m.new_hash) m.new_hash AS email_hash, c.user_id, c.claimed_at
  FROM signup_bonus_claims c
  JOIN (SELECT DISTINCT old_hash, new_hash FROM mailbox_rehash) m ON m.old_hash = c.email_hash
 ORDER BY m.new_hash, c.claimed_at, c.user_id;

DELETE FROM signup_bonus_claims c
 USING (SELECT DISTINCT old_hash FROM mailbox_rehash) m
 WHERE c.email_hash = m.old_hash;

INSERT INTO signup_bonus_claims (email_hash, user_id, claimed_at)
SELECT email_hash, user_id, claimed_at FROM rekeyed_claims
ON CONFLICT (email_hash) DO NOTHING;

-- A person whose bonus was credited without a claim (before their email
-- was known) is recognised too.
INSERT INTO signup_bonus_claims (email_hash, user_id)
SELECT DISTINCT ON (u.email_hash) u.email_hash, u.id
  FROM users u
  JOIN credit_transactions t
    ON t.user_id = u.id AND t.type = 'SIGNUP_BONUS' AND t.direction = 'CREDIT'
 WHERE u.email_hash IS NOT NULL
 ORDER BY u.email_hash, u.id
ON CONFLICT DO NOTHING;

DROP FUNCTION pg_temp.canonical_mailbox(TEXT);

-- A referral records the top-up that paid its bonuses (its Checkout
-- session and payment intent: a refund or dispute of that payment finds
-- the referral by it), and the bonus each side was paid. The referred
-- person's hash makes presenting a code once per person, not per account.
ALTER TABLE referrals
    ADD COLUMN referred_email_hash TEXT,
    ADD COLUMN paid_by_session_id  TEXT,
    ADD COLUMN paid_by_payment_id  TEXT,
    ADD COLUMN bonus_micros        BIGINT CHECK (bonus_micros > 0),
    ADD COLUMN reversal_steps      INTEGER NOT NULL DEFAULT 0 CHECK (reversal_steps >= 0);

-- Existing referrals: the first person to be referred keeps the row's
-- hash (two spellings referred before this carry one person twice).
UPDATE referrals r SET referred_email_hash = u.email_hash
  FROM users u
 WHERE u.id = r.referred_user_id AND u.email_hash IS NOT NULL
   AND r.referred_email_hash IS NULL
   AND NOT EXISTS (
       SELECT 1 FROM referrals o JOIN users ou ON ou.id = o.referred_user_id
        WHERE ou.email_hash = u.email_hash
          AND (o.created_at, o.referred_user_id) < (r.created_at, r.referred_user_id));
CREATE UNIQUE INDEX referrals_one_per_person
    ON referrals (referred_email_hash) WHERE referred_email_hash IS NOT NULL;

-- Existing rewarded referrals: the paying top-up is the referred user's
-- first Checkout top-up credited once the code was presented (the first
-- the bonuses followed), else the last one before them; the bonus is the
-- amount the referred side was credited.
UPDATE referrals r
   SET (paid_by_session_id, paid_by_payment_id) = (
        SELECT t.stripe_session_id, t.stripe_payment_id
          FROM credit_transactions t
         WHERE t.user_id = r.referred_user_id AND t.type = 'TOP_UP'
           AND t.direction = 'CREDIT' AND t.stripe_session_id IS NOT NULL
         ORDER BY (t.created_at >= r.created_at) DESC,
                  CASE WHEN t.created_at >= r.created_at THEN t.seq ELSE -t.seq END
         LIMIT 1),
       bonus_micros = (
        SELECT t.amount_micros FROM credit_transactions t
         WHERE t.user_id = r.referred_user_id
           AND t.idempotency_key = 'referral:' || r.referred_user_id || ':referee')
 WHERE r.rewarded_at IS NOT NULL AND r.paid_by_session_id IS NULL;

-- The steps a referral's bonuses took back and forth as the paying
-- top-up's money moved: odd steps take both bonuses back (a refund, a
-- lost dispute), even steps give them back (a won dispute). Each step's
-- amounts are fixed when it is recorded, under the referral row's lock,
-- and posted under `referral:<referred>:<side>:reversal:<step>`, so every
-- delivery, in any order, posts the same entries once.
CREATE TABLE referral_reversals (
    referred_user_id BIGINT NOT NULL REFERENCES referrals (referred_user_id),
    step             INTEGER NOT NULL CHECK (step > 0),
    reason           TEXT NOT NULL CHECK (reason IN ('REFUNDED', 'DISPUTED', 'DISPUTE_WON')),
    referee_micros   BIGINT NOT NULL CHECK (referee_micros >= 0),
    referrer_micros  BIGINT NOT NULL CHECK (referrer_micros >= 0),
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (referred_user_id, step),
    CHECK ((step % 2 = 1) = (reason <> 'DISPUTE_WON'))
);

-- A step's amount reads what the credit it reverses still stands for
-- (what of its grant expired unspent): a credit's grant by the credit.
-- Credits are rare next to usages, and the column never changes (grant
-- updates stay HOT).
CREATE INDEX credit_grants_transaction ON credit_grants (transaction_id)
    WHERE transaction_id IS NOT NULL;
