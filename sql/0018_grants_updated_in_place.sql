-- Spending from a grant rewrites its remaining amount, on every chat that
-- draws from it. While an index's predicate named remaining_micros, each of
-- those updates wrote a new entry into every index of the table (no HOT
-- update), and a busy account's lookups waded through its grant's dead
-- entries. The index now names only the account: an account has a few
-- grants, and its load filters those with money left; the updates change
-- no indexed column and, with free room on each page, stay on the page.
DROP INDEX credit_grants_active;
CREATE INDEX credit_grants_user ON credit_grants (user_id);
ALTER TABLE credit_grants SET (fillfactor = 70);
