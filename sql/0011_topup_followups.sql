-- A paid Checkout top-up's follow-ups: saving the card it was paid with
-- (auto-recharge charges it) and reading its invoice link. They used to
-- run inside the webhook, before and after the credit, so a Stripe API
-- incident held the credit back; now the credit commits at once and the
-- top-up's transaction row is itself the record of its follow-up job.
--
-- No credit without its job, no job without its credit: the job is the
-- row the journal writer inserts in the batch transaction that credits
-- the top-up (a Checkout top-up is the only transaction with a
-- `stripe_session_id`), and the per-account undo of a refused batch
-- deletes it with its row. A redelivered event replays the credit's key
-- and inserts nothing: no second credit, no second job.
--
-- A job is open while neither `followup_done_at` nor `followup_failed_at`
-- is set; the worker (one per database, under an advisory lock) takes the
-- open ones whose `followup_next_at` has come (none: at once), retries a
-- failure with backoff (`followup_attempts`, `followup_last_error`), and
-- after `stripe.followup_max_attempts` marks it FAILED for the operators.
ALTER TABLE credit_transactions
    ADD COLUMN followup_attempts   INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN followup_next_at    TIMESTAMPTZ,
    ADD COLUMN followup_last_error TEXT,
    ADD COLUMN followup_done_at    TIMESTAMPTZ,
    ADD COLUMN followup_failed_at  TIMESTAMPTZ;

-- Top-ups credited before this migration had both done inside the webhook.
UPDATE credit_transactions SET followup_done_at = created_at
 WHERE stripe_session_id IS NOT NULL;

-- The worker's scan: open jobs by due time (only open ones are indexed, so
-- the index stays as small as the backlog).
CREATE INDEX credit_transactions_followups_open
    ON credit_transactions ((COALESCE(followup_next_at, created_at)))
    WHERE stripe_session_id IS NOT NULL
      AND followup_done_at IS NULL AND followup_failed_at IS NULL;
