-- The signup bonus is once per person, and a person is known by the
-- verified primary email Clerk sends (trimmed, lowercased, SHA-256 hex:
-- no address in a key). users.email_hash is that identity of each user;
-- signup_bonus_claims holds, per email, the one account that may receive
-- the bonus. The claim commits before the credit (keyed per account), so
-- a crash in between leaves a claim naming the account whose retry credits
-- it, never a second account's bonus.
ALTER TABLE users ADD COLUMN email_hash TEXT;

CREATE TABLE signup_bonus_claims (
    email_hash TEXT PRIMARY KEY,
    user_id    BIGINT NOT NULL REFERENCES users (id),
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Users and bonuses from before this migration: the emails still stored
-- claim their bonus for the account that received it.
UPDATE users SET email_hash = encode(sha256(convert_to(lower(btrim(email)), 'UTF8')), 'hex')
 WHERE email IS NOT NULL AND btrim(email) <> '';

INSERT INTO signup_bonus_claims (email_hash, user_id)
SELECT DISTINCT ON (u.email_hash) u.email_hash, u.id
  FROM users u
  JOIN credit_transactions t ON t.user_id = u.id AND t.type = 'SIGNUP_BONUS'
 WHERE u.email_hash IS NOT NULL
 ORDER BY u.email_hash, u.id
ON CONFLICT DO NOTHING;
