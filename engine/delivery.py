"""The delivery queue's contract, shared by the producers (issuance) and the senders
(delivery workers): the message and its idempotency key (the streams' names are in
``engine/keys.py``).

One Redis stream per channel (so each channel has its own send rate and backlog), one
consumer group of workers on each, a dead-letter stream for messages that used up their
attempts. A message's ``id`` is its idempotency key: the same campaign x customer x
channel always gives the same id, which is the primary key of its row in ``deliveries``
and the key the sender passes to the provider, so a replayed message is never sent twice.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

Channel = Literal["email", "sms", "push"]
CHANNELS: tuple[Channel, ...] = ("email", "sms", "push")

# Field of the stream entry that holds the msgpack-encoded DeliveryMessage.
FIELD = "m"


def message_id(campaign_id: str, customer_id: str, channel: str) -> str:
    """Deterministic id of the one message a customer gets for a campaign on a channel."""
    digest = hashlib.blake2b(
        f"{campaign_id}\0{customer_id}\0{channel}".encode(), digest_size=12
    ).hexdigest()
    return f"msg_{digest}"


class DeliveryMessage(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    campaign_id: str
    customer_id: str
    channel: Channel
    recipient: str  # email address, E.164 phone number or push token
    code: str
    locale: str = "en"
    name: str | None = None  # the customer's name, for the template
    job_id: str | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DeliveryMessage)


def encode(msg: DeliveryMessage) -> bytes:
    return _encoder.encode(msg)


def decode(blob: bytes) -> DeliveryMessage:
    return _decoder.decode(blob)


def new_message(
    campaign_id: str,
    customer_id: str,
    channel: Channel,
    recipient: str,
    code: str,
    *,
    locale: str = "en",
    name: str | None = None,
    job_id: str | None = None,
) -> DeliveryMessage:
    return DeliveryMessage(
        id=message_id(campaign_id, customer_id, channel),
        campaign_id=campaign_id,
        customer_id=customer_id,
        channel=channel,
        recipient=recipient,
        code=code,
        locale=locale,
        name=name,
        job_id=job_id,
    )
