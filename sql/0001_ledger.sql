-- The ledger: users, their balance rows and the journal (transactions,
-- usages, holds). Every journal row carries the account's sequence number;
-- the unique (user_id, seq) index orders an account's history in time and
-- pages it by cursor. Other indexes on the journal tables are partial and
-- serve one lookup each: every index costs every write.
--
-- The journal tables carry no foreign keys: a per-row trigger each, on the
-- hottest write path. Their integrity holds by construction (the journal
-- writer inserts rows only in the transaction that moves the account's
-- balance row, which references users, and a usage only with its hold) and
-- `creditd reconcile` checks it (the `orphan` check).

CREATE TABLE users (
    id                     BIGSERIAL PRIMARY KEY,
    clerk_id               TEXT NOT NULL UNIQUE,
    email                  TEXT UNIQUE,
    name                   TEXT,
    image_url              TEXT,
    plan                   TEXT NOT NULL DEFAULT 'FREE'
                           CHECK (plan IN ('FREE', 'STARTER', 'PRO', 'TEAM')),
    stripe_customer_id     TEXT UNIQUE,
    stripe_subscription_id TEXT,
    openai_key_encrypted    BYTEA,
    anthropic_key_encrypted BYTEA,
    deleted_at             TIMESTAMPTZ,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- One row per account. `version` is the seq of the last journal entry applied:
-- every journal write checks it (fencing) and moves it forward. Rewritten by
-- every batch that touches the account, on no indexed column: free room on
-- each page lets those updates stay on the page (HOT) with no index write.
CREATE TABLE credit_balances (
    user_id        BIGINT PRIMARY KEY REFERENCES users (id),
    balance_micros BIGINT NOT NULL DEFAULT 0,
    held_micros    BIGINT NOT NULL DEFAULT 0 CHECK (held_micros >= 0),
    version        BIGINT NOT NULL DEFAULT 0,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
) WITH (fillfactor = 70);

-- Credits and debits. `idempotency_key` is unique per account: the same key
-- can never apply twice, whatever the engine remembers.
CREATE TABLE credit_transactions (
    id                    UUID PRIMARY KEY,
    user_id               BIGINT NOT NULL,
    seq                   BIGINT NOT NULL,
    type                  TEXT NOT NULL CHECK (type IN
                          ('SIGNUP_BONUS', 'TOP_UP', 'PROMO_BONUS', 'REFUND', 'DISPUTE', 'ADJUSTMENT')),
    direction             TEXT NOT NULL CHECK (direction IN ('CREDIT', 'DEBIT')),
    amount_micros         BIGINT NOT NULL CHECK (amount_micros > 0),
    idempotency_key       TEXT NOT NULL,
    description           TEXT,
    stripe_session_id     TEXT,
    stripe_payment_id     TEXT,
    balance_before_micros BIGINT NOT NULL,
    balance_after_micros  BIGINT NOT NULL,
    metadata              JSONB,
    created_at            TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, seq),
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX credit_transactions_stripe_session ON credit_transactions (stripe_session_id)
    WHERE stripe_session_id IS NOT NULL;

-- Holds: created by a reserve, finished by a settle, a release or expiry.
CREATE TABLE credit_holds (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL,
    seq             BIGINT NOT NULL,
    amount_micros   BIGINT NOT NULL CHECK (amount_micros > 0),
    status          TEXT NOT NULL CHECK (status IN ('ACTIVE', 'SETTLED', 'RELEASED', 'EXPIRED')),
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    finished_seq    BIGINT,
    finished_at     TIMESTAMPTZ,
    UNIQUE (user_id, seq),
    CHECK ((status = 'ACTIVE') = (finished_seq IS NULL))
);
CREATE INDEX credit_holds_active ON credit_holds (user_id) WHERE status = 'ACTIVE';

-- Usages: one per settled hold, the real cost of one AI request.
CREATE TABLE credit_usages (
    id                    UUID PRIMARY KEY,
    user_id               BIGINT NOT NULL,
    seq                   BIGINT NOT NULL,
    hold_id               UUID NOT NULL UNIQUE,
    model                 TEXT NOT NULL,
    input_tokens          BIGINT NOT NULL CHECK (input_tokens >= 0),
    output_tokens         BIGINT NOT NULL CHECK (output_tokens >= 0),
    cache_read_tokens     BIGINT NOT NULL CHECK (cache_read_tokens >= 0),
    cache_write_tokens    BIGINT NOT NULL CHECK (cache_write_tokens >= 0),
    total_tokens          BIGINT NOT NULL,
    cost_micros           BIGINT NOT NULL CHECK (cost_micros >= 0),
    held_micros           BIGINT NOT NULL,
    conversation_id       TEXT,
    message_id            TEXT,
    balance_before_micros BIGINT NOT NULL,
    balance_after_micros  BIGINT NOT NULL,
    created_at            TIMESTAMPTZ NOT NULL,
    UNIQUE (user_id, seq)
);

-- Webhook events already handled (Stripe, Clerk): a replay is a no-op.
CREATE TABLE processed_webhook_events (
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source, event_id)
);
