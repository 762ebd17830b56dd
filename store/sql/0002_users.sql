-- Users, their roles, and API keys for server-to-server callers.
-- Emails are stored normalised (trimmed, lower-case), so the plain unique index is the
-- case-insensitive one. Roles are checked here too: a typo cannot grant or hide a role.

CREATE TABLE users (
    id             text PRIMARY KEY,
    email          text NOT NULL UNIQUE CHECK (email = lower(email)),
    name           text,
    password_hash  text,
    roles          text[] NOT NULL DEFAULT '{}'
                   CHECK (roles <@ ARRAY['admin', 'manager', 'analyst', 'integration', 'customer']::text[]),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- id is the key_id of `vk_<key_id>_<secret>`: every authentication is one primary-key
-- look-up (joined to the owner by primary key), so revocation is seen at once everywhere.
-- secret_hash is sha256(secret) in hex; the plaintext key is never stored.
CREATE TABLE api_keys (
    id            text PRIMARY KEY,
    owner_id      text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          text NOT NULL,
    secret_hash   text NOT NULL,
    roles         text[] NOT NULL
                  CHECK (roles <@ ARRAY['admin', 'manager', 'analyst', 'integration', 'customer']::text[]),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz,
    last_used_at  timestamptz
);
CREATE INDEX api_keys_owner_idx ON api_keys (owner_id);
