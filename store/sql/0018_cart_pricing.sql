-- Orders with lines: how a redemption's discount falls on the order's lines and shipping
-- ({"items": [{"line", "sku", "discount"}], "shipping_discount"}), and what a reservation
-- keeps of its order (lines, shipping, customer tags) so its confirm prices the order it
-- held. NULL for amount-only orders.
ALTER TABLE redemptions ADD COLUMN detail jsonb;
ALTER TABLE reservations ADD COLUMN detail jsonb, ADD COLUMN cart jsonb;
