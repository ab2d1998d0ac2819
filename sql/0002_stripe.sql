-- Stripe: refunds and disputes name a payment intent; the top-up it paid
-- for (and the clawbacks already taken from it) are found by that id.
CREATE INDEX credit_transactions_stripe_payment ON credit_transactions (stripe_payment_id)
    WHERE stripe_payment_id IS NOT NULL;
