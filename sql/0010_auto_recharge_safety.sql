-- Auto-recharge asks before it pays: the payment worker re-reads, right
-- before each call to Stripe, that the attempt may still be paid, and
-- cancels it otherwise; it stops calling before Stripe forgets the
-- attempt's idempotency key, and looks the attempt up instead.

ALTER TABLE auto_recharge_attempts
    -- The card saved when the worker took the attempt: a different card
    -- saved since cancels it (NULL for attempts taken before this column).
    ADD COLUMN payment_method_id TEXT,
    -- Calls to Stripe made (or look-ups), and when the next may be made.
    ADD COLUMN tries INT NOT NULL DEFAULT 0 CHECK (tries >= 0),
    ADD COLUMN next_try_at TIMESTAMPTZ,
    -- Why the worker canceled it (`disabled`, `account_deleted`,
    -- `card_changed`, `monthly_cap`, `timed_out`).
    ADD COLUMN cancel_reason TEXT;

ALTER TABLE auto_recharge_attempts DROP CONSTRAINT auto_recharge_attempts_status_check;
ALTER TABLE auto_recharge_attempts ADD CONSTRAINT auto_recharge_attempts_status_check
    CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'CANCELED'));

-- A refund or a dispute finds the attempt its payment paid.
CREATE INDEX auto_recharge_attempts_payment_intent ON auto_recharge_attempts (payment_intent_id)
    WHERE payment_intent_id IS NOT NULL;

-- When a dispute or the account's deletion last forgot the saved card: a
-- top-up paid before it must not save its card again (its follow-up may
-- run late, after the dispute).
ALTER TABLE users ADD COLUMN card_forgotten_at TIMESTAMPTZ;
