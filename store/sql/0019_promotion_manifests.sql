-- Which promotions a redemption with apply_promotions asked, in order, under its
-- idempotency key: the first attempt writes it, every retry asks exactly these (whatever
-- the catalog says by then), so a retry answers what the first attempt gave. Kept as long
-- as the key's idempotency record; swept by the shard that owns the key's bucket.
CREATE TABLE promotion_manifests (
    key          text PRIMARY KEY,
    bucket       smallint NOT NULL,
    fingerprint  bytea NOT NULL,
    promotions   text[] NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX promotion_manifests_bucket_created_idx ON promotion_manifests (bucket, created_at);
