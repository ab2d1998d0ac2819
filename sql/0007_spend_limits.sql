-- Spending limits per account: the owner's (daily, monthly) and the
-- ceilings an administrator set, each optional (NULL: none). The account's
-- actor loads them with the account and enforces them on every hold; it
-- writes them here before it acknowledges a change. Spend in a window is
-- read from credit_usages (index credit_usages_user_created).
CREATE TABLE credit_limits (
    user_id                BIGINT PRIMARY KEY REFERENCES users (id),
    daily_micros           BIGINT CHECK (daily_micros >= 0),
    monthly_micros         BIGINT CHECK (monthly_micros >= 0),
    daily_ceiling_micros   BIGINT CHECK (daily_ceiling_micros >= 0),
    monthly_ceiling_micros BIGINT CHECK (monthly_ceiling_micros >= 0),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
