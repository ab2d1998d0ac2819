-- Each event's `sequence`: its place among its account's events as the
-- receiver sees them, 1, 2, 3… per account with no gap. The sender gives it
-- when it first hands the event over (the account's highest + 1, in the
-- account's (seq, ordinal) order), and the event keeps it for good: an event
-- that ends FAILED still owns its number (the receiver sees the gap), and
-- its redelivery carries it again (the receiver sees it is late).
ALTER TABLE outgoing_events ADD COLUMN sequence BIGINT CHECK (sequence > 0);

-- The events handed over before sequences existed get theirs, in their
-- accounts' order, so an old FAILED event redelivered keeps its place.
UPDATE outgoing_events e
   SET sequence = n.sequence
  FROM (SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY seq, ordinal) AS sequence
          FROM outgoing_events
         WHERE status <> 'PENDING' OR attempts > 0) AS n
 WHERE e.id = n.id;

-- Two senders (one holds the lock, but a lock can be lost) can never give
-- one number twice: the second to commit is refused and tries again.
ALTER TABLE outgoing_events
    ADD CONSTRAINT outgoing_events_sequence UNIQUE (user_id, sequence),
    -- Nothing reaches a receiver without its number.
    ADD CONSTRAINT outgoing_events_sequenced
        CHECK (sequence IS NOT NULL OR (status = 'PENDING' AND attempts = 0));

-- The sender's read path: each account's next event, those already
-- numbered (retried, redelivered) before those not yet handed over.
DROP INDEX outgoing_events_pending;
CREATE INDEX outgoing_events_pending ON outgoing_events (user_id, sequence, seq, ordinal)
    WHERE status = 'PENDING';
