-- Delivery workers: a `sending` claim before a message goes to its provider,
-- the retry schedule, and per-campaign message templates.

ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
    CHECK (state IN ('queued', 'sending', 'sent', 'failed', 'dead'));
-- sending: claimed by worker `claimed_by` at `claimed_at`, outcome not recorded yet.
ALTER TABLE deliveries ADD COLUMN claimed_by text;
ALTER TABLE deliveries ADD COLUMN claimed_at timestamptz;
-- failed: the earliest time the next attempt may be made.
ALTER TABLE deliveries ADD COLUMN next_attempt_at timestamptz;
CREATE INDEX deliveries_dead_idx ON deliveries (updated_at) WHERE state = 'dead';

CREATE TABLE campaign_templates (
    campaign_id  text NOT NULL,
    channel      text NOT NULL CHECK (channel IN ('email', 'sms', 'push')),
    locale       text NOT NULL,
    subject      text,
    body         text NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, channel, locale)
);

-- The campaign's default locale, the fallback after the customer's locale and language.
CREATE TABLE campaign_delivery (
    campaign_id     text PRIMARY KEY,
    default_locale  text NOT NULL
);
