-- Alert and receipt emails, sent from the outbox. Each outgoing event of a
-- kind that becomes an email gets one delivery row, inserted by a trigger in
-- the transaction that inserts the event (the journal batch, or the
-- transaction of `Engine::record_events`): no email without its event, and
-- the event's id as primary key makes it at most one email per event. The
-- email sender (one per database, under an advisory lock) sends each
-- account's PENDING deliveries in the account's journal order, retries a
-- failure with backoff and marks it FAILED after `email.retry_for_hours`;
-- a delivery it decides not to send (opted out, deleted account, no
-- address, too old) is SKIPPED with the reason. The webhook sender never
-- reads this table: an SMTP server down holds back no webhook.
CREATE TABLE email_deliveries (
    event_id        UUID PRIMARY KEY REFERENCES outgoing_events (id) ON DELETE CASCADE,
    user_id         BIGINT NOT NULL REFERENCES users (id),
    -- The event's place in its account's journal order.
    seq             BIGINT NOT NULL,
    ordinal         INTEGER NOT NULL,
    type            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'PENDING'
                    CHECK (status IN ('PENDING', 'SENT', 'FAILED', 'SKIPPED')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    -- Why a SKIPPED delivery was not sent (`opted_out`, `account_deleted`,
    -- `no_address`, `too_old`, `announced_with_failure`).
    skipped_reason  TEXT,
    -- The address it went to.
    recipient       TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    sent_at         TIMESTAMPTZ
);

-- The sender's read path: each account's earliest pending delivery.
CREATE INDEX email_deliveries_pending ON email_deliveries (user_id, seq, ordinal)
    WHERE status = 'PENDING';

-- The operators' listing, newest first.
CREATE INDEX email_deliveries_created ON email_deliveries (created_at DESC, seq DESC, ordinal DESC);

-- One delivery row per event that may become an email. A per-row trigger
-- on the journal's outbox insert fires only for these kinds (rare next to
-- chats: alerts, top-ups, auto-recharges).
CREATE FUNCTION email_delivery_for_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO email_deliveries (event_id, user_id, seq, ordinal, type, next_attempt_at, created_at)
    VALUES (NEW.id, NEW.user_id, NEW.seq, NEW.ordinal, NEW.type, NEW.created_at, NEW.created_at)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER outgoing_events_email
    AFTER INSERT ON outgoing_events
    FOR EACH ROW
    WHEN (NEW.type IN ('balance.low', 'balance.depleted', 'topup.succeeded',
                       'auto_recharge.succeeded', 'auto_recharge.failed',
                       'auto_recharge.disabled'))
    EXECUTE FUNCTION email_delivery_for_event();

-- A person's choice: alert emails (low balance, depleted, auto-recharge
-- failed or switched off) on or off. Receipts are always sent.
ALTER TABLE users ADD COLUMN alert_emails BOOLEAN NOT NULL DEFAULT TRUE;

-- Operators' actions, each with who did it: the console and the admin API
-- record every change they make (credits and debits, ceilings, redeliveries)
-- and every console sign-in. `operator` is `token:<name given at sign-in>`
-- or `clerk:<Clerk user id>`.
CREATE TABLE operator_actions (
    id        BIGSERIAL PRIMARY KEY,
    at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    operator  TEXT NOT NULL,
    action    TEXT NOT NULL,
    -- The account acted on (Clerk id), if any.
    clerk_id  TEXT,
    reason    TEXT,
    detail    JSONB NOT NULL DEFAULT '{}'
);
CREATE INDEX operator_actions_at ON operator_actions (at DESC);
CREATE INDEX operator_actions_account ON operator_actions (clerk_id, at DESC)
    WHERE clerk_id IS NOT NULL;

-- The console's platform view counts what failed (kept for good, so an
-- index of its own keeps the count as small as the failures).
CREATE INDEX outgoing_events_failed ON outgoing_events (created_at) WHERE status = 'FAILED';
CREATE INDEX email_deliveries_failed ON email_deliveries (created_at) WHERE status = 'FAILED';
