-- The gateway's API keys (`/v1/*`): a person's keys for the apps they
-- build. Only the SHA-256 of a key is stored; `prefix` (the key's first
-- characters, shown in lists) finds its row. A revoked key stays, so its
-- usages keep naming it.
CREATE TABLE api_keys (
    id                 UUID PRIMARY KEY,
    user_id            BIGINT NOT NULL REFERENCES users (id),
    prefix             TEXT NOT NULL,
    key_sha256         BYTEA NOT NULL UNIQUE,
    name               TEXT NOT NULL,
    spend_limit_micros BIGINT CHECK (spend_limit_micros > 0),
    expires_at         TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at       TIMESTAMPTZ,
    revoked_at         TIMESTAMPTZ
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);
CREATE INDEX api_keys_user ON api_keys (user_id, created_at DESC);

-- A hold made with a key names it, so that an account loaded again counts
-- it against the key's limit.
ALTER TABLE credit_holds ADD COLUMN api_key_id UUID;

-- Each usage names the key it was made with (none: a Clerk session). A
-- key's spend is read from its usages, when the account loads and when
-- keys are listed.
ALTER TABLE credit_usages ADD COLUMN api_key_id UUID;
CREATE INDEX credit_usages_api_key ON credit_usages (user_id, api_key_id)
    WHERE api_key_id IS NOT NULL;
