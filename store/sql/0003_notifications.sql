-- In-app notifications for admins/managers, and the customer's wallet look-up.

CREATE TABLE notifications (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    campaign_id  text,
    message      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    read_at      timestamptz
);

-- Partial: codes in the bank (no customer yet) stay out of it, so COPY pays nothing.
CREATE INDEX vouchers_customer_idx ON vouchers (customer_id) WHERE customer_id IS NOT NULL;
