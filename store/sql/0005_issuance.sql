-- Issuance jobs, assignments served from another shard's bank, and the notification
-- fan-out (email to admins/managers, signed webhooks) with its delivery attempts.

-- An assignment whose code came from another shard's bank (the deciding shard's bank was
-- empty). bucket = bucket_of(assignment_key(campaign, customer)): the deciding shard
-- reloads these rows, so a re-run after a restart returns the same code.
CREATE TABLE assignments (
    campaign_id  text NOT NULL,
    customer_id  text NOT NULL,
    code         text NOT NULL,
    bucket       smallint NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, customer_id)
);
CREATE INDEX assignments_bucket_idx ON assignments (bucket);

-- Keyset pagination of an issuance over "all customers" / a tag walks the primary key;
-- a tag selection uses the GIN index of 0004.
CREATE TABLE issuance_jobs (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL,
    selection    jsonb NOT NULL,
    channels     text[] NOT NULL,
    state        text NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    counts       jsonb NOT NULL DEFAULT '{}',
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX issuance_jobs_campaign_idx ON issuance_jobs (campaign_id);

-- Fan-out: a dispatcher claims rows with dispatched_at IS NULL (whoever inserted them).
ALTER TABLE notifications ADD COLUMN dispatched_at timestamptz;
CREATE INDEX notifications_undispatched_idx ON notifications (id) WHERE dispatched_at IS NULL;

-- One row per threshold (e.g. 'bank_low:<campaign>'): `armed` goes false when the
-- notification fires and true again when the value recovers, so one crossing, one notice.
CREATE TABLE notification_thresholds (
    key         text PRIMARY KEY,
    armed       boolean NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE notification_webhooks (
    id          text PRIMARY KEY,
    url         text NOT NULL,
    secret      text NOT NULL,
    kinds       text[],                 -- NULL: every kind
    active      boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One send of one notification to one target ('email' or 'webhook:<id>').
CREATE TABLE notification_sends (
    id               bigserial PRIMARY KEY,
    notification_id  bigint NOT NULL REFERENCES notifications (id) ON DELETE CASCADE,
    target           text NOT NULL,
    state            text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_at          timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    sent_at          timestamptz,
    UNIQUE (notification_id, target)
);
CREATE INDEX notification_sends_due_idx ON notification_sends (next_at) WHERE state = 'pending';

CREATE TABLE notification_attempts (
    id          bigserial PRIMARY KEY,
    send_id     bigint NOT NULL REFERENCES notification_sends (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    ok          boolean NOT NULL,
    status      integer,                -- HTTP status or SMTP reply code, when there was one
    error       text
);
CREATE INDEX notification_attempts_send_idx ON notification_attempts (send_id);
