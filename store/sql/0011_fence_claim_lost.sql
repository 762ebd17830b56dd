-- A database that went back in time (a failover to an asynchronous standby, a restore)
-- may hold an older epoch than the writer's, or none: the writer is not stale, the server
-- lost its claim. That raises VF002 instead of VF001, so the writer claims and loads again
-- (what it holds in memory may include commits the server lost) instead of retiring.
CREATE OR REPLACE FUNCTION voucher_fence(p_owner text, p_epoch bigint) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    held bigint;
BEGIN
    SELECT epoch INTO held FROM owners WHERE name = p_owner FOR SHARE;
    IF held IS NULL OR held < p_epoch THEN
        RAISE EXCEPTION 'writer % at epoch % lost its claim: the database holds epoch %',
            p_owner, p_epoch, held USING ERRCODE = 'VF002';
    END IF;
    IF held <> p_epoch THEN
        RAISE EXCEPTION 'writer % at epoch % is fenced: a newer owner holds it', p_owner, p_epoch
            USING ERRCODE = 'VF001';
    END IF;
    RETURN 1;
END
$$;
