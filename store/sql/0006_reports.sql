-- Reporting rollups, maintained incrementally.
--
-- Statement-level triggers with transition tables turn every write to vouchers,
-- redemptions and deliveries into a few aggregated rows of a change log, in the writer's
-- own transaction (the shard's group commit, a generation COPY, a delivery worker's
-- update): set-based, one INSERT per statement, never a row-at-a-time loop. A rollback
-- (redemptions.status 0 -> 1) is an UPDATE, so it is logged like any other change; no
-- created_at watermark can miss it.
--
-- The refresher (actors/reports.py) folds the logs into the rollup tables and deletes the
-- rows it folded in the same transaction, so each change counts exactly once. Rows of
-- transactions still open are invisible to it and are folded by a later refresh: there is
-- no watermark that a late commit could fall behind.
--
-- Delta rows are "sum over new rows minus sum over old rows", grouped by campaign (and
-- redemption minute and customer, or channel and state): no join needed, and a row whose
-- key changes (a redemption moved in time) moves its counts from the old key to the new.

-- --- change logs -------------------------------------------------------------------------

CREATE TABLE report_voucher_log (
    id           bigserial PRIMARY KEY,
    campaign_id  text NOT NULL,
    d_available  bigint NOT NULL,
    d_assigned   bigint NOT NULL,
    d_redeemed   bigint NOT NULL,
    d_void       bigint NOT NULL,
    d_balance    bigint NOT NULL   -- gift card balance on codes that are not void
);

-- One row per campaign and minute per statement (a group commit makes a handful, not one
-- per redemption); the customers of the rows, with each row's figures, ride along in
-- arrays for the segment rollup.
CREATE TABLE report_redemption_log (
    id            bigserial PRIMARY KEY,
    campaign_id   text NOT NULL,
    minute        timestamptz NOT NULL,   -- the redemption's created_at, to the minute
    first_at      timestamptz,            -- earliest created_at among written rows (a row
                                          -- moved back in time moves the first one back)
    redemptions   bigint NOT NULL,        -- redemptions recorded (rolled back or not)
    rolled_back   bigint NOT NULL,        -- of those, rolled back
    discount      bigint NOT NULL,        -- net of rollbacks
    order_amount  bigint NOT NULL,        -- net of rollbacks
    customers     text[] NOT NULL,        -- per written row: customer (NULL: anonymous)
    c_redemptions bigint[] NOT NULL,      -- and that row's share of the four figures
    c_rolled_back bigint[] NOT NULL,
    c_discount    bigint[] NOT NULL,
    c_order       bigint[] NOT NULL
);

CREATE TABLE report_delivery_log (
    id           bigserial PRIMARY KEY,
    campaign_id  text NOT NULL,
    channel      text NOT NULL,
    state        text NOT NULL,
    n            bigint NOT NULL
);

-- --- rollups -----------------------------------------------------------------------------

CREATE TABLE report_codes (
    campaign_id  text PRIMARY KEY,
    available    bigint NOT NULL DEFAULT 0,
    assigned     bigint NOT NULL DEFAULT 0,
    redeemed     bigint NOT NULL DEFAULT 0,
    void         bigint NOT NULL DEFAULT 0,
    gift_balance bigint NOT NULL DEFAULT 0
);

CREATE TABLE report_totals (
    campaign_id          text PRIMARY KEY,
    redemptions          bigint NOT NULL DEFAULT 0,
    rolled_back          bigint NOT NULL DEFAULT 0,
    discount             bigint NOT NULL DEFAULT 0,
    order_amount         bigint NOT NULL DEFAULT 0,
    first_redemption_at  timestamptz
);

CREATE TABLE report_minutes (
    campaign_id   text NOT NULL,
    minute        timestamptz NOT NULL,
    redemptions   bigint NOT NULL DEFAULT 0,
    rolled_back   bigint NOT NULL DEFAULT 0,
    discount      bigint NOT NULL DEFAULT 0,
    order_amount  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, minute)
);

-- The same per quarter hour (every zone's offset is a multiple of 15 minutes, so local hours
-- and days are sums of quarters): hour/day series and hour-of-day read 96 rows a day.
CREATE TABLE report_quarters (
    campaign_id   text NOT NULL,
    quarter       timestamptz NOT NULL,
    redemptions   bigint NOT NULL DEFAULT 0,
    rolled_back   bigint NOT NULL DEFAULT 0,
    discount      bigint NOT NULL DEFAULT 0,
    order_amount  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, quarter)
);

-- segment: one of the customer's tags (a customer with two tags counts in both),
-- '(untagged)' for a customer without tags or row, '(anonymous)' without a customer.
-- The tag is the one the customer had when the redemption was folded in.
CREATE TABLE report_segments (
    campaign_id   text NOT NULL,
    segment       text NOT NULL,
    redemptions   bigint NOT NULL DEFAULT 0,
    rolled_back   bigint NOT NULL DEFAULT 0,
    discount      bigint NOT NULL DEFAULT 0,
    order_amount  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, segment)
);

CREATE TABLE report_channels (
    campaign_id  text NOT NULL,
    channel      text NOT NULL,
    state        text NOT NULL,
    n            bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, channel, state)
);

-- --- triggers ----------------------------------------------------------------------------
-- A transition table exists only for the statement kinds that have it (no OLD TABLE on
-- INSERT), so each table has one function and one trigger per kind.

CREATE FUNCTION report_vouchers_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_voucher_log
        (campaign_id, d_available, d_assigned, d_redeemed, d_void, d_balance)
    SELECT campaign_id, sum(a), sum(s), sum(r), sum(v), sum(b)
    FROM (
        SELECT campaign_id, (status = 0)::int AS a, (status = 1)::int AS s,
               (status = 2)::int AS r, (status = 3)::int AS v,
               CASE WHEN status <> 3 THEN coalesce(balance, 0) ELSE 0 END AS b
        FROM new_rows
    ) d
    GROUP BY campaign_id
    HAVING sum(a) <> 0 OR sum(s) <> 0 OR sum(r) <> 0 OR sum(v) <> 0 OR sum(b) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_vouchers_insert AFTER INSERT ON vouchers
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_vouchers_insert();

CREATE FUNCTION report_vouchers_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_voucher_log
        (campaign_id, d_available, d_assigned, d_redeemed, d_void, d_balance)
    SELECT campaign_id, sum(a), sum(s), sum(r), sum(v), sum(b)
    FROM (
        SELECT campaign_id, (status = 0)::int AS a, (status = 1)::int AS s,
               (status = 2)::int AS r, (status = 3)::int AS v,
               CASE WHEN status <> 3 THEN coalesce(balance, 0) ELSE 0 END AS b
        FROM new_rows
        UNION ALL
        SELECT campaign_id, -(status = 0)::int AS a, -(status = 1)::int AS s,
               -(status = 2)::int AS r, -(status = 3)::int AS v,
               CASE WHEN status <> 3 THEN -coalesce(balance, 0) ELSE 0 END AS b
        FROM old_rows
    ) d
    GROUP BY campaign_id
    HAVING sum(a) <> 0 OR sum(s) <> 0 OR sum(r) <> 0 OR sum(v) <> 0 OR sum(b) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_vouchers_update AFTER UPDATE ON vouchers
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_vouchers_update();

CREATE FUNCTION report_vouchers_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_voucher_log
        (campaign_id, d_available, d_assigned, d_redeemed, d_void, d_balance)
    SELECT campaign_id, sum(a), sum(s), sum(r), sum(v), sum(b)
    FROM (
        SELECT campaign_id, -(status = 0)::int AS a, -(status = 1)::int AS s,
               -(status = 2)::int AS r, -(status = 3)::int AS v,
               CASE WHEN status <> 3 THEN -coalesce(balance, 0) ELSE 0 END AS b
        FROM old_rows
    ) d
    GROUP BY campaign_id
    HAVING sum(a) <> 0 OR sum(s) <> 0 OR sum(r) <> 0 OR sum(v) <> 0 OR sum(b) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_vouchers_delete AFTER DELETE ON vouchers
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION report_vouchers_delete();

CREATE FUNCTION report_redemptions_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_redemption_log
        (campaign_id, minute, first_at, redemptions, rolled_back, discount, order_amount,
         customers, c_redemptions, c_rolled_back, c_discount, c_order)
    SELECT campaign_id, date_trunc('minute', created_at), min(first_at),
           sum(n), sum(rb), sum(d), sum(o),
           array_agg(customer_id), array_agg(n::bigint), array_agg(rb::bigint),
           array_agg(d::bigint), array_agg(o::bigint)
    FROM (
        SELECT campaign_id, customer_id, created_at, created_at AS first_at, 1 AS n,
               (status = 1)::int AS rb,
               CASE WHEN status = 0 THEN discount_amount ELSE 0 END AS d,
               CASE WHEN status = 0 THEN order_amount ELSE 0 END AS o
        FROM new_rows
    ) d
    GROUP BY campaign_id, date_trunc('minute', created_at)
    HAVING sum(n) <> 0 OR sum(rb) <> 0 OR sum(d) <> 0 OR sum(o) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_redemptions_insert AFTER INSERT ON redemptions
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_redemptions_insert();

CREATE FUNCTION report_redemptions_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_redemption_log
        (campaign_id, minute, first_at, redemptions, rolled_back, discount, order_amount,
         customers, c_redemptions, c_rolled_back, c_discount, c_order)
    SELECT campaign_id, date_trunc('minute', created_at), min(first_at),
           sum(n), sum(rb), sum(d), sum(o),
           array_agg(customer_id), array_agg(n::bigint), array_agg(rb::bigint),
           array_agg(d::bigint), array_agg(o::bigint)
    FROM (
        SELECT campaign_id, customer_id, created_at, created_at AS first_at, 1 AS n,
               (status = 1)::int AS rb,
               CASE WHEN status = 0 THEN discount_amount ELSE 0 END AS d,
               CASE WHEN status = 0 THEN order_amount ELSE 0 END AS o
        FROM new_rows
        UNION ALL
        SELECT campaign_id, customer_id, created_at, NULL::timestamptz AS first_at, -1 AS n,
               -(status = 1)::int AS rb,
               CASE WHEN status = 0 THEN -discount_amount ELSE 0 END AS d,
               CASE WHEN status = 0 THEN -order_amount ELSE 0 END AS o
        FROM old_rows
    ) d
    GROUP BY campaign_id, date_trunc('minute', created_at)
    HAVING sum(n) <> 0 OR sum(rb) <> 0 OR sum(d) <> 0 OR sum(o) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_redemptions_update AFTER UPDATE ON redemptions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_redemptions_update();

CREATE FUNCTION report_redemptions_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_redemption_log
        (campaign_id, minute, first_at, redemptions, rolled_back, discount, order_amount,
         customers, c_redemptions, c_rolled_back, c_discount, c_order)
    SELECT campaign_id, date_trunc('minute', created_at), min(first_at),
           sum(n), sum(rb), sum(d), sum(o),
           array_agg(customer_id), array_agg(n::bigint), array_agg(rb::bigint),
           array_agg(d::bigint), array_agg(o::bigint)
    FROM (
        SELECT campaign_id, customer_id, created_at, NULL::timestamptz AS first_at, -1 AS n,
               -(status = 1)::int AS rb,
               CASE WHEN status = 0 THEN -discount_amount ELSE 0 END AS d,
               CASE WHEN status = 0 THEN -order_amount ELSE 0 END AS o
        FROM old_rows
    ) d
    GROUP BY campaign_id, date_trunc('minute', created_at)
    HAVING sum(n) <> 0 OR sum(rb) <> 0 OR sum(d) <> 0 OR sum(o) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_redemptions_delete AFTER DELETE ON redemptions
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION report_redemptions_delete();

CREATE FUNCTION report_deliveries_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_delivery_log (campaign_id, channel, state, n)
    SELECT campaign_id, channel, state, sum(n)
    FROM (
        SELECT campaign_id, channel, state, 1 AS n FROM new_rows
    ) d
    GROUP BY campaign_id, channel, state
    HAVING sum(n) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_deliveries_insert AFTER INSERT ON deliveries
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_deliveries_insert();

CREATE FUNCTION report_deliveries_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_delivery_log (campaign_id, channel, state, n)
    SELECT campaign_id, channel, state, sum(n)
    FROM (
        SELECT campaign_id, channel, state, 1 AS n FROM new_rows
        UNION ALL
        SELECT campaign_id, channel, state, -1 AS n FROM old_rows
    ) d
    GROUP BY campaign_id, channel, state
    HAVING sum(n) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_deliveries_update AFTER UPDATE ON deliveries
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION report_deliveries_update();

CREATE FUNCTION report_deliveries_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO report_delivery_log (campaign_id, channel, state, n)
    SELECT campaign_id, channel, state, sum(n)
    FROM (
        SELECT campaign_id, channel, state, -1 AS n FROM old_rows
    ) d
    GROUP BY campaign_id, channel, state
    HAVING sum(n) <> 0;
    RETURN NULL;
END $$;
CREATE TRIGGER report_deliveries_delete AFTER DELETE ON deliveries
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION report_deliveries_delete();

-- --- backfill: rows written before this migration ---------------------------------------

INSERT INTO report_codes (campaign_id, available, assigned, redeemed, void, gift_balance)
SELECT campaign_id, count(*) FILTER (WHERE status = 0), count(*) FILTER (WHERE status = 1),
       count(*) FILTER (WHERE status = 2), count(*) FILTER (WHERE status = 3),
       coalesce(sum(balance) FILTER (WHERE status <> 3), 0)
FROM vouchers GROUP BY campaign_id;

INSERT INTO report_redemption_log
    (campaign_id, minute, first_at, redemptions, rolled_back, discount, order_amount,
     customers, c_redemptions, c_rolled_back, c_discount, c_order)
SELECT campaign_id, date_trunc('minute', created_at), min(created_at), count(*),
       count(*) FILTER (WHERE status = 1),
       coalesce(sum(discount_amount) FILTER (WHERE status = 0), 0),
       coalesce(sum(order_amount) FILTER (WHERE status = 0), 0),
       array_agg(customer_id), array_agg(1::bigint), array_agg((status = 1)::int::bigint),
       array_agg(CASE WHEN status = 0 THEN discount_amount ELSE 0 END),
       array_agg(CASE WHEN status = 0 THEN order_amount ELSE 0 END)
FROM redemptions GROUP BY campaign_id, date_trunc('minute', created_at);

INSERT INTO report_delivery_log (campaign_id, channel, state, n)
SELECT campaign_id, channel, state, count(*) FROM deliveries GROUP BY 1, 2, 3;
