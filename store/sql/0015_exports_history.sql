-- Lists of a campaign's codes, their CSV exports, and the redemption history.
--
-- A campaign's codes are listed and exported in code order, a page at a time from the
-- last code seen (keyset): the campaign index gains the code as its second column, so a
-- page is one index range however large the campaign is. It replaces the campaign-only
-- index (every query by campaign uses the wider one as well), so the bank keeps the same
-- number of indexes to maintain on every write.
CREATE INDEX vouchers_campaign_code_idx ON vouchers (campaign_id, code);
DROP INDEX vouchers_campaign_idx;

-- The redemption history is looked up by customer and by order. Two indexes on the hot
-- redemptions table and no more: a campaign reuses redemptions_campaign_idx, a code its
-- bucket (redemptions_bucket_idx), and pages go in id order along the primary key.
CREATE INDEX redemptions_customer_idx ON redemptions (customer_id) WHERE customer_id IS NOT NULL;
CREATE INDEX redemptions_order_idx ON redemptions (order_id) WHERE order_id IS NOT NULL;

-- A CSV field (RFC 4180): quoted when it holds a quote, comma or line break, or is empty
-- (so an empty text differs from an absent one, which is nothing at all).
CREATE FUNCTION csv_field(t text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN CASE
        WHEN t IS NULL THEN ''
        WHEN t = '' OR strpos(t, '"') > 0 OR strpos(t, ',') > 0 OR strpos(t, E'\n') > 0
             OR strpos(t, E'\r') > 0
            THEN '"' || replace(t, '"', '""') || '"'
        ELSE t
    END;

-- An export of a campaign's codes: a job that writes the CSV as numbered chunks, each in
-- one transaction with the export's progress (`after`: the last code written), so the
-- process running it may stop anywhere and a successor continues from `after`.
-- `runner`/`lease_until`: who runs it, and until when nobody else may take it over.
-- state: running, done, failed
CREATE TABLE exports (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL,
    format       text NOT NULL,
    status       smallint,                -- only codes of this status (vouchers.status)
    state        text NOT NULL DEFAULT 'running',
    total        bigint NOT NULL,         -- codes matching when it started (for progress)
    rows         bigint NOT NULL DEFAULT 0,
    bytes        bigint NOT NULL DEFAULT 0,
    chunks       integer NOT NULL DEFAULT 0,
    after        text NOT NULL DEFAULT '',
    runner       text,
    lease_until  timestamptz,
    error        text,
    created_by   text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX exports_running_idx ON exports (lease_until) WHERE state = 'running';

CREATE TABLE export_chunks (
    export_id  text NOT NULL,
    seq        integer NOT NULL,
    rows       integer NOT NULL,
    body       text NOT NULL,
    PRIMARY KEY (export_id, seq)
);
