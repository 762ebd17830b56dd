-- Ownership epochs (fencing tokens) of the single writers, and the shard topology.
--
-- Every single writer (each shard, the coordinator, the issuer) claims an epoch here when
-- it loads: the claim bumps the row, which waits for the share lock of the old owner's
-- in-flight commit, and the new owner reads its state only after the claim committed.
-- Every write then calls voucher_fence() inside its own statement or transaction: a
-- stale epoch aborts the write, so an old owner's commit is either visible to the new
-- owner's load or refused. Owner names carry the deployment (the Ray namespace).

CREATE TABLE owners (
    name        text PRIMARY KEY,
    epoch       bigint NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);

-- The shard count of a deployment. A change bumps `version` and, in the same transaction,
-- the epoch of every shard owner, which fences every old shard at once.
CREATE TABLE topology (
    deployment  text PRIMARY KEY,
    shards      integer NOT NULL CHECK (shards BETWEEN 1 AND 1024),
    version     bigint NOT NULL DEFAULT 1,
    changed_at  timestamptz NOT NULL DEFAULT now()
);

-- Raises SQLSTATE VF001 unless `p_owner` still holds `p_epoch`; keeps a share lock on the
-- owner row until the caller's transaction ends, so no claim commits in between.
CREATE FUNCTION voucher_fence(p_owner text, p_epoch bigint) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM 1 FROM owners WHERE name = p_owner AND epoch = p_epoch FOR SHARE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'writer % at epoch % is fenced: a newer owner holds it', p_owner, p_epoch
            USING ERRCODE = 'VF001';
    END IF;
    RETURN 1;
END
$$;
