-- Campaign versions and the change feed the shards re-sync from.
--
-- `version` mirrors Campaign.version in `spec` (bumped by every change); the coordinator
-- updates a row only from the version it holds, so a stale writer cannot overwrite a newer
-- one. `revision` orders every change of the table: a shard pulls the rows with a revision
-- above the highest it has seen. For that to miss nothing, revisions must become visible
-- in their order, so every insert or update takes one transaction-level lock before it
-- draws its revision and keeps it until it commits (campaign changes are rare; they queue).

CREATE SEQUENCE campaign_revisions;

ALTER TABLE campaigns
    ADD COLUMN version  bigint NOT NULL DEFAULT 0,
    ADD COLUMN revision bigint NOT NULL DEFAULT 0;

UPDATE campaigns SET version = coalesce((spec->>'version')::bigint, 0);

CREATE FUNCTION campaigns_revision() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.state = 'ended' AND NEW.state <> 'ended' THEN
        RAISE EXCEPTION 'campaign % has ended: ending is final', OLD.id
            USING ERRCODE = 'check_violation';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('voucher.campaign_revisions', 0));
    NEW.revision := nextval('campaign_revisions');
    RETURN NEW;
END
$$;

CREATE TRIGGER campaigns_revision BEFORE INSERT OR UPDATE ON campaigns
    FOR EACH ROW EXECUTE FUNCTION campaigns_revision();

UPDATE campaigns SET revision = 0;  -- the trigger numbers the existing rows

CREATE INDEX campaigns_revision_idx ON campaigns (revision);
