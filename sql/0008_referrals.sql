-- Referrals. Each user's code is made once, on first asking, and never
-- changes. A referral is one row per referred user (the primary key: a
-- person is referred once); `rewarded_at` is set once both promo credits
-- of the referral posted (each under its own idempotency key,
-- `referral:<referred>:referee` and `referral:<referred>:referrer`).
CREATE TABLE referral_codes (
    user_id    BIGINT PRIMARY KEY REFERENCES users (id),
    code       TEXT NOT NULL UNIQUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE referrals (
    referred_user_id BIGINT PRIMARY KEY REFERENCES users (id),
    referrer_user_id BIGINT NOT NULL REFERENCES users (id),
    code             TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    rewarded_at      TIMESTAMPTZ,
    CHECK (referred_user_id <> referrer_user_id)
);
-- A referrer's counts.
CREATE INDEX referrals_referrer ON referrals (referrer_user_id);
