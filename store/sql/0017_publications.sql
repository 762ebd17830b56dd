-- Publications: one customer given a campaign's code on request. One row per
-- campaign x customer (the unique key makes every repeat, however concurrent, the same
-- publication); `deliveries` records, per requested channel, the message queued for it
-- (its id in `deliveries`) or why none was (no address, no consent).
CREATE TABLE publications (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL,
    customer_id  text NOT NULL REFERENCES customers (id),
    code         text NOT NULL,
    channels     text[] NOT NULL DEFAULT '{}',
    deliveries   jsonb NOT NULL DEFAULT '[]',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (campaign_id, customer_id)
);
CREATE INDEX publications_customer_idx ON publications (customer_id);

-- `GET /v1/customers?metadata=key=value` asks `metadata @> {"key": value}`.
CREATE INDEX customers_metadata_idx ON customers USING gin (metadata jsonb_path_ops)
    WHERE metadata IS NOT NULL;
