-- What a shop keeps on its records, the events it hears of, and who changed what.
--
-- Vouchers: `active` (a code switched off on its own is refused with voucher_disabled),
-- its own window `starts_at`/`expires_at` (narrowing its campaign's) and `metadata`.
-- Adding columns with constant defaults rewrites no row, whatever the bank's size.
ALTER TABLE vouchers
    ADD COLUMN active    boolean NOT NULL DEFAULT true,
    ADD COLUMN starts_at timestamptz,
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN metadata  jsonb;
-- A shard reloads the few codes with a switch or window of their own through this index.
CREATE INDEX vouchers_controlled_idx ON vouchers (bucket)
    WHERE NOT active OR starts_at IS NOT NULL OR expires_at IS NOT NULL;

ALTER TABLE redemptions ADD COLUMN metadata jsonb;
ALTER TABLE reservations ADD COLUMN metadata jsonb;  -- carried into its redemption

-- A customer record may be linked to the user account that signs in as that customer,
-- so "my vouchers" finds the codes assigned to an imported customer.
ALTER TABLE customers
    ADD COLUMN metadata jsonb,
    ADD COLUMN user_id  text UNIQUE;

-- Every state change a shop cares about, with a stable id (receivers deduplicate by it).
-- `txid` is the writing transaction's id: a reader that remembers the snapshot it last
-- read at takes exactly the rows committed since (visible now, not visible then), however
-- late a transaction that started earlier commits.
CREATE TABLE events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    campaign_id  text,
    resource_id  text,
    data         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    txid         xid8 NOT NULL DEFAULT pg_current_xact_id()
);
CREATE INDEX events_txid_idx ON events (txid);
CREATE INDEX events_created_idx ON events (created_at, id);
CREATE INDEX events_type_created_idx ON events (type, created_at, id);

-- Who (a user or an API key) did what to which resource, and the change: written in the
-- same transaction as the change itself.
CREATE TABLE audit_log (
    id             bigserial PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT now(),
    actor_kind     text NOT NULL,
    actor_id       text NOT NULL,
    actor_key_id   text,
    action         text NOT NULL,
    resource_type  text NOT NULL,
    resource_id    text NOT NULL,
    change         jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_resource_idx ON audit_log (resource_type, resource_id, id);
CREATE INDEX audit_actor_idx ON audit_log (actor_id, id);
