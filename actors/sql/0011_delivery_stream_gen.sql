-- Which incarnation of the delivery streams holds a queued message.
--
-- Redis is not the record of what must be sent: a Valkey that restarts without its data,
-- or is down while a message is recorded, loses stream entries. The queue's incarnation is
-- a random token kept in Redis next to the streams (engine.delivery.INCARNATION_KEY); a
-- message added to a stream records the token it was added under. A `queued` row whose
-- token is not the current one (NULL: never added) has no entry to be read from, and the
-- workers' sweep adds it again. The claim in Postgres still decides who sends, so a
-- message added twice is sent once.
ALTER TABLE deliveries ADD COLUMN stream_gen text;

CREATE INDEX deliveries_queued_idx ON deliveries (channel, id) WHERE state = 'queued';
