-- The unredeemed codes of a campaign per bucket: what an ended campaign's void still has
-- to do. Rows leave the index as they are redeemed or voided, so a void chunk finds its
-- next rows at once, and a restart finds a finished void finished without a scan.
CREATE INDEX vouchers_unsold_idx ON vouchers (campaign_id, bucket) WHERE status IN (0, 1);
