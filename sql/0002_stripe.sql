-- Stripe: refunds and disputes name a payment intent; the top-up it paid
-- for (and the clawbacks already taken from it) are found by that id.
CREATE INDEX credit_transactions_stripe_payment ON credit_transactions (stripe_payment_id)
    WHERE stripe_payment_id IS NOT NULL;

-- Stripe does not deliver events in order: the creation time of the
-- subscription event that last set users.plan, so an older one arriving
-- late changes nothing.
ALTER TABLE users ADD COLUMN stripe_subscription_event_at TIMESTAMPTZ;
