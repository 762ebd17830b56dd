"""The cost of the history's indexes, measured A/B within one run of a benchmark.

Between targets the benchmark drops, in its own throw-away database, the indexes that
migration 0015 adds for the redemption history (``redemptions`` by customer and by order)
and puts the bank's campaign index back to the campaign alone, and afterwards restores
them as the migration has them. The shards send the same statements either way, so the
difference between the targets is what those indexes cost every group commit.
"""

from __future__ import annotations

import asyncpg

_OFF = """
DROP INDEX IF EXISTS redemptions_customer_idx;
DROP INDEX IF EXISTS redemptions_order_idx;
CREATE INDEX IF NOT EXISTS vouchers_campaign_idx ON vouchers (campaign_id);
DROP INDEX IF EXISTS vouchers_campaign_code_idx;
"""

_ON = """
CREATE INDEX IF NOT EXISTS redemptions_customer_idx ON redemptions (customer_id)
    WHERE customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS redemptions_order_idx ON redemptions (order_id) WHERE order_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS vouchers_campaign_code_idx ON vouchers (campaign_id, code);
DROP INDEX IF EXISTS vouchers_campaign_idx;
"""


async def set_history_indexes(dsn: str, *, on: bool) -> None:
    """Give the database the history's indexes (as migration 0015 does) or take them away."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(_ON if on else _OFF)
    finally:
        await conn.close()
