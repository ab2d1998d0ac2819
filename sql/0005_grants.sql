-- Grants: every credit is spendable money of its own, PAID (a top-up: it
-- never expires) or PROMO (a bonus, a promotion, a goodwill credit: it may
-- expire). A debit or a usage spends them in order (promo before paid, then
-- earliest expiry, none last, then oldest) and records which paid what in
-- `paid_by` ([{grantId, kind, amountMicros}]); what no grant paid is debt.
-- Σ remaining_micros − debt = balance_micros, per account.
--
-- The journal writer inserts a grant with its credit and moves its
-- remaining amount in the batch that spends it, in one transaction with
-- the account's balance row (no foreign key, as for the other journal
-- tables: see 0001_ledger.sql; `creditd reconcile` checks the sums).
CREATE TABLE credit_grants (
    id                UUID PRIMARY KEY,
    user_id           BIGINT NOT NULL,
    kind              TEXT NOT NULL CHECK (kind IN ('PAID', 'PROMO')),
    amount_micros     BIGINT NOT NULL CHECK (amount_micros > 0),
    remaining_micros  BIGINT NOT NULL
                      CHECK (remaining_micros >= 0 AND remaining_micros <= amount_micros),
    expires_at        TIMESTAMPTZ,
    -- The Stripe Checkout session of a top-up, else the credit's key.
    source            TEXT NOT NULL,
    -- A top-up's payment: its refunds and disputes take from it first.
    stripe_payment_id TEXT,
    -- The credit that created it; NULL for a balance migrated below.
    transaction_id    UUID,
    -- That credit's seq (0 when migrated): the "oldest first" of the order.
    seq               BIGINT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (kind = 'PROMO' OR expires_at IS NULL)
);
-- An account loads the grants it can still spend.
CREATE INDEX credit_grants_active ON credit_grants (user_id) WHERE remaining_micros > 0;

ALTER TABLE credit_transactions ADD COLUMN paid_by JSONB;
ALTER TABLE credit_usages ADD COLUMN paid_by JSONB;

-- The unspent, unheld remainder of a grant, debited when it expires.
ALTER TABLE credit_transactions DROP CONSTRAINT credit_transactions_type_check;
ALTER TABLE credit_transactions ADD CONSTRAINT credit_transactions_type_check CHECK (type IN
    ('SIGNUP_BONUS', 'TOP_UP', 'PROMO_BONUS', 'REFUND', 'DISPUTE', 'ADJUSTMENT', 'EXPIRED'));

-- Balances from before grants existed: what an account holds becomes one
-- paid grant (it never expires), so Σ remaining − debt = balance holds.
INSERT INTO credit_grants (id, user_id, kind, amount_micros, remaining_micros, expires_at,
       source, stripe_payment_id, transaction_id, seq, created_at)
SELECT gen_random_uuid(), user_id, 'PAID', balance_micros, balance_micros, NULL,
       'migrated', NULL, NULL, 0, now()
  FROM credit_balances
 WHERE balance_micros > 0;
