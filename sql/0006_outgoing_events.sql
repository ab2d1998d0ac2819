-- The outbox of outgoing events (balance alerts, top-ups). Each row is
-- written by the journal writer in the same transaction as the balance
-- change that caused it, so there is no event without its change and no
-- change without its event. A background sender delivers them, in order per
-- account: (seq, ordinal) is the account's journal order.
CREATE TABLE outgoing_events (
    id              UUID PRIMARY KEY,
    user_id         BIGINT NOT NULL REFERENCES users (id),
    -- The journal seq of the change that caused it, and its place among
    -- the events of that change.
    seq             BIGINT NOT NULL,
    ordinal         INTEGER NOT NULL CHECK (ordinal >= 0),
    type            TEXT NOT NULL,
    data            JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    status          TEXT NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'DELIVERED', 'FAILED')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Retries stop (FAILED) once the event has been pending this long
    -- since here (its creation, or its last manual redelivery).
    pending_since   TIMESTAMPTZ NOT NULL,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    delivered_at    TIMESTAMPTZ,
    UNIQUE (user_id, seq, ordinal)
);

-- The sender's read path: each account's earliest pending event.
CREATE INDEX outgoing_events_pending ON outgoing_events (user_id, seq, ordinal)
    WHERE status = 'PENDING';

-- An account's alert state is derived from its last alert events on load.
CREATE INDEX outgoing_events_alerts ON outgoing_events (user_id, seq DESC, ordinal DESC)
    WHERE type IN ('balance.low', 'balance.depleted', 'balance.recovered');

-- The admin listing, newest first.
CREATE INDEX outgoing_events_created ON outgoing_events (created_at DESC, id);
