-- Idempotency keys decided across shards.
--
-- A key is claimed before its request is decided: the claiming shard inserts the row with
-- no response (pending) and a fresh `claim_token`, and the group commit that persists the
-- decision stores the response into that row. One row per key for the whole deployment,
-- so the same key sent with two bodies to two shards runs once. A pending row's decision
-- was never committed when its holder is gone: the owner of its bucket (or anyone, once
-- it is stale) takes it over. Rows older than the TTL are deleted by their shard's
-- housekeeping, chunk by chunk, through the (bucket, created_at) index.

ALTER TABLE idempotency_keys ALTER COLUMN response DROP NOT NULL;
ALTER TABLE idempotency_keys ADD COLUMN claim_token bytea;

DROP INDEX idempotency_bucket_idx;
CREATE INDEX idempotency_bucket_created_idx ON idempotency_keys (bucket, created_at);
