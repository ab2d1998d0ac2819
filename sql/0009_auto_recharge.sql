-- Auto-recharge: an off-session payment on the card saved by a top-up when
-- a change takes the available balance under the user's threshold.

-- The card a top-up saved (`setup_future_usage=off_session`).
ALTER TABLE users ADD COLUMN stripe_payment_method_id TEXT;

-- The user's settings; `disabled_reason` says why creditd switched it off
-- (a declined card, an authentication the user must give).
CREATE TABLE auto_recharge_settings (
    user_id          BIGINT PRIMARY KEY REFERENCES users (id),
    enabled          BOOLEAN NOT NULL,
    threshold_cents  BIGINT NOT NULL CHECK (threshold_cents >= 0),
    amount_cents     BIGINT NOT NULL CHECK (amount_cents > 0),
    disabled_reason  TEXT,
    updated_at       TIMESTAMPTZ NOT NULL
);

-- An attempt is decided by the account's actor and recorded as an
-- `auto_recharge.requested` event (its id is the attempt's) in the same
-- journal batch as the change that crossed the threshold. This row follows
-- the attempt once the payment worker takes it, until it ends.
CREATE TABLE auto_recharge_attempts (
    id                 UUID PRIMARY KEY,
    user_id            BIGINT NOT NULL REFERENCES users (id),
    amount_cents       BIGINT NOT NULL CHECK (amount_cents > 0),
    status             TEXT NOT NULL DEFAULT 'PENDING'
                       CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED')),
    payment_intent_id  TEXT,
    failure_reason     TEXT,
    created_at         TIMESTAMPTZ NOT NULL,
    ended_at           TIMESTAMPTZ
);

-- Never two attempts of one account in flight.
CREATE UNIQUE INDEX auto_recharge_attempts_one_pending
    ON auto_recharge_attempts (user_id) WHERE status = 'PENDING';

-- The requested attempts of an account (its load) and the worker's scan.
CREATE INDEX outgoing_events_auto_recharge ON outgoing_events (user_id, created_at)
    WHERE type = 'auto_recharge.requested';
