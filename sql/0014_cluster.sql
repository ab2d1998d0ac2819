-- Several instances on one database. `written_by` names the instance whose
-- journal batch last moved the balance row (NULL: nobody since an instance
-- loaded the account without being its writer). A batch that changes it
-- notifies the other instances (channel `creditd_accounts`), which drop
-- their resident copy of the account: the next request reloads it.
ALTER TABLE credit_balances ADD COLUMN written_by TEXT;
