-- Core schema: campaigns, the voucher bank, redemptions, reservations, idempotency.
-- Every table a shard writes carries `bucket` (crc32(code) % 1024) so a restarted
-- shard reloads exactly its buckets, whatever the shard count is.
-- No foreign keys on the hot tables: the shard actor is the single writer and
-- checks references in memory; FK checks would cost on every COPY row.

CREATE TABLE campaigns (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    type        text NOT NULL,
    state       text NOT NULL,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- status: 0 available, 1 assigned, 2 redeemed, 3 void
CREATE TABLE vouchers (
    code         text PRIMARY KEY,
    campaign_id  text NOT NULL,
    bucket       smallint NOT NULL,
    status       smallint NOT NULL DEFAULT 0,
    customer_id  text,
    balance      bigint,
    uses         integer NOT NULL DEFAULT 0,
    updated_at   timestamptz
);
CREATE INDEX vouchers_campaign_idx ON vouchers (campaign_id);

-- status: 0 redeemed, 1 rolled back
CREATE TABLE redemptions (
    id               text PRIMARY KEY,
    campaign_id      text NOT NULL,
    code             text NOT NULL,
    bucket           smallint NOT NULL,
    customer_id      text,
    order_id         text,
    order_amount     bigint NOT NULL,
    currency         text NOT NULL,
    discount_amount  bigint NOT NULL,
    balance_after    bigint,
    status           smallint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL,
    rolled_back_at   timestamptz
);
CREATE INDEX redemptions_bucket_idx ON redemptions (bucket);
CREATE INDEX redemptions_campaign_idx ON redemptions (campaign_id);

-- state: 0 held, 1 confirmed, 2 released, 3 expired
CREATE TABLE reservations (
    id               text PRIMARY KEY,
    campaign_id      text NOT NULL,
    code             text NOT NULL,
    bucket           smallint NOT NULL,
    customer_id      text,
    order_id         text,
    order_amount     bigint NOT NULL,
    currency         text NOT NULL,
    discount_amount  bigint NOT NULL,
    expires_at       timestamptz NOT NULL,
    state            smallint NOT NULL DEFAULT 0,
    redemption_id    text
);
CREATE INDEX reservations_bucket_idx ON reservations (bucket);

CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    bucket       smallint NOT NULL,
    fingerprint  bytea NOT NULL,
    response     bytea NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX idempotency_bucket_idx ON idempotency_keys (bucket);

CREATE TABLE generation_jobs (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL,
    requested    bigint NOT NULL,
    generated    bigint NOT NULL DEFAULT 0,
    state        text NOT NULL,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
