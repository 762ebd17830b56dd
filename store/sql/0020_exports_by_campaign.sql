-- A campaign's exports are listed newest first, a page at a time from the last one seen
-- (keyset on created_at, then id): one index range per page.
CREATE INDEX exports_campaign_idx ON exports (campaign_id, created_at DESC, id DESC);
