-- The daily usage chart reads one account's usages over a range of days.
CREATE INDEX credit_usages_user_created ON credit_usages (user_id, created_at);
