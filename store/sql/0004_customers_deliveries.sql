-- Customers and one delivery record per message.

CREATE TABLE customers (
    id             text PRIMARY KEY,
    email          text,
    phone          text,            -- E.164, e.g. +4915112345678
    push_token     text,
    name           text,
    locale         text NOT NULL DEFAULT 'en',
    time_zone      text NOT NULL DEFAULT 'UTC',
    consent_email  boolean NOT NULL DEFAULT false,
    consent_sms    boolean NOT NULL DEFAULT false,
    consent_push   boolean NOT NULL DEFAULT false,
    tags           text[] NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customers_tags_idx ON customers USING gin (tags);

-- id: the message's idempotency key, engine.delivery.message_id(campaign, customer, channel).
-- state: queued (in the stream), sent, failed (last attempt failed, will retry),
-- dead (moved to the dead-letter stream after the last attempt).
CREATE TABLE deliveries (
    id           text PRIMARY KEY,
    campaign_id  text NOT NULL,
    customer_id  text NOT NULL,
    channel      text NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    recipient    text NOT NULL,
    code         text NOT NULL,
    job_id       text,
    state        text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'sent', 'failed', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text,
    queued_at    timestamptz NOT NULL DEFAULT now(),
    sent_at      timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deliveries_campaign_idx ON deliveries (campaign_id, state);
CREATE INDEX deliveries_job_idx ON deliveries (job_id) WHERE job_id IS NOT NULL;
