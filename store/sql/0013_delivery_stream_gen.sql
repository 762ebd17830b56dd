-- Which incarnation of the delivery streams holds a queued message.
--
-- Redis is not the record of what must be sent: a Valkey that restarts without its data
-- (or with an older snapshot, or a replica that takes over), or is down while a message is
-- recorded, loses stream entries. A message added to a stream records the Redis server's
-- run_id (it changes with every restart or failover). A `queued` row whose run_id is not
-- the current server's (NULL: never added) may have no entry to be read from, and the
-- workers add it again. The claim in Postgres still decides who sends, so a message added
-- twice is sent once.
ALTER TABLE deliveries ADD COLUMN stream_gen text;

CREATE INDEX deliveries_queued_idx ON deliveries (channel, id) WHERE state = 'queued';
-- Rows recorded but not (yet) added: looked for every second, so kept in an index of their own.
CREATE INDEX deliveries_not_added_idx ON deliveries (channel, id)
    WHERE state = 'queued' AND stream_gen IS NULL;
