-- Shop webhooks: endpoints, where each one has read up to in the event stream, the
-- deliveries still to retry and the log of every attempt.
--
-- Redemption events come from the redemptions table itself (no events row per redemption
-- on the hot path): `txid` is the id of the transaction that wrote the redemption, and
-- `rb_txid` the one that rolled it back. A reader takes only rows below its snapshot's
-- xmin, where every transaction has ended, so a row that commits late is never skipped.
-- The column is added without a default first (rows already there keep NULL and count as
-- older than any position; no table rewrite), then given one for every row to come.
-- BRIN: near-free to maintain on the group commit (txid grows with the table's order, the
-- unsummarised tail is always scanned, which is where unread rows are), and it does not
-- stop HOT updates. Rollbacks are rare: a partial b-tree.
ALTER TABLE redemptions ADD COLUMN txid bigint, ADD COLUMN rb_txid bigint;
ALTER TABLE redemptions ALTER COLUMN txid SET DEFAULT txid_current();
CREATE INDEX redemptions_txid_brin ON redemptions USING brin (txid) WITH (pages_per_range = 16);
CREATE INDEX redemptions_rb_txid_idx ON redemptions (rb_txid) WHERE rb_txid IS NOT NULL;

CREATE TABLE webhook_endpoints (
    id           text PRIMARY KEY,
    url          text NOT NULL,
    secret       text NOT NULL,
    events       text[] NOT NULL,
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- position in the event stream: (transaction, kind, event id) of the last event taken
    pos_txid     bigint NOT NULL,
    pos_kind     smallint NOT NULL DEFAULT -1,
    pos_id       text NOT NULL DEFAULT ''
);

-- A delivery that failed and waits for its next attempt (the event is read again by id).
CREATE TABLE webhook_retries (
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id     text NOT NULL,
    attempts     int NOT NULL,
    next_at      timestamptz NOT NULL,
    PRIMARY KEY (endpoint_id, event_id)
);
CREATE INDEX webhook_retries_due_idx ON webhook_retries (next_at);

-- Every attempt: outcome 'succeeded', 'retrying' (another attempt is scheduled) or
-- 'failed' (attempts used up, given up).
CREATE TABLE webhook_deliveries (
    id           bigserial PRIMARY KEY,
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id     text NOT NULL,
    event_type   text NOT NULL,
    attempt      int NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    outcome      text NOT NULL,
    status_code  int,
    error        text,
    duration_ms  int NOT NULL
);
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, id);
