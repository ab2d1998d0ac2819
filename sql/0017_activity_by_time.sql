-- The platform's last hour for the operator console: chats, spend, top-ups
-- and refunds read by time. BRIN indexes: the journal appends these rows in
-- time order, so a summary per range of pages finds the last hour, and an
-- insert costs next to nothing (a B-tree on a time column would cost every
-- chat's write).
CREATE INDEX credit_usages_created_brin ON credit_usages USING brin (created_at);
CREATE INDEX credit_transactions_created_brin ON credit_transactions USING brin (created_at);
