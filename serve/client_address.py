"""The client address the gateway's limits key on, decided by the gateway itself.

Serve's HAProxy ingress connects to the gateway replicas itself and passes the client's
headers through untouched: its configuration template has no ``option forwardfor``, so
it adds no ``X-Forwarded-For`` and strips none. A replica therefore sees the HAProxy of
its node (127.0.0.1, or the node's address on a cluster) as the peer of every request,
and any ``X-Forwarded-For`` it carries is whatever the client wrote, unless a load
balancer in front appended the address it saw.

uvicorn, which serves the replica, would rewrite the peer from ``X-Forwarded-For`` for
any connection from 127.0.0.1 (its default ``FORWARDED_ALLOW_IPS``), so every client
could choose its own address. :func:`disable_uvicorn_rewrite` switches that off in the
replica process (the gateway sees the TCP peer), and :class:`TrustedProxies` makes the
decision here instead:

* the peer is the client unless it is a trusted proxy (``VOUCHER_TRUSTED_PROXIES``);
* from a trusted peer, ``X-Forwarded-For`` is read right to left, and the first entry
  that is not a trusted proxy is the client. Entries left of it were written by the
  client (or by proxies nobody vouches for) and are never used.

Default: nothing is trusted, so a header cannot change the address. Behind the embedded
HAProxy alone every client then shares HAProxy's address (no hop tells the real one).
Behind a load balancer that appends ``X-Forwarded-For``, list the addresses of the
HAProxy hops (127.0.0.1 and the nodes) and of the load balancer; the Serve port must then
be reachable only through the load balancer, or a client connecting to HAProxy directly
writes the entry that the load balancer would have.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections.abc import Iterable

from engine.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN = "unknown"
UNPARSABLE = "unparsable-forwarded-for"
_MAX_HOPS = 32  # entries of X-Forwarded-For read at most (a longer chain is suspect anyway)


def parse_networks(text: str, name: str = "VOUCHER_TRUSTED_PROXIES") -> tuple[Network, ...]:
    """``"127.0.0.1, 10.0.0.0/8, ::1"`` as networks; raises ConfigError naming ``name``."""
    nets: list[Network] = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name}: {item!r} is not an IP address or network (e.g. 127.0.0.1, 10.0.0.0/8)"
            ) from None
    return tuple(nets)


def _address(text: str) -> Address | None:
    """One X-Forwarded-For entry (``1.2.3.4``, ``1.2.3.4:5678``, ``[::1]:80``, ``::1``)."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedProxies:
    """Who may tell the gateway a client's address (see the module docstring)."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)
        self._trusts = functools.lru_cache(maxsize=4096)(self._compute)

    @classmethod
    def parse(cls, text: str) -> TrustedProxies:
        return cls(parse_networks(text))

    def _compute(self, host: str) -> bool:
        addr = _address(host)
        return addr is not None and any(addr in net for net in self.networks)

    def trusts(self, host: str) -> bool:
        return bool(self.networks) and self._trusts(host)

    def client(self, peer: str | None, forwarded_for: Iterable[bytes | str] = ()) -> str:
        """The client's address, from the TCP ``peer`` and the ``X-Forwarded-For`` header
        values (in the order received)."""
        if not peer:
            return UNKNOWN
        if not self.trusts(peer):
            return _canonical(peer)
        hops: list[str] = []
        for value in forwarded_for:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            hops += text.split(",")
        for hop in reversed(hops[-_MAX_HOPS:]):
            addr = _address(hop)
            if addr is None:
                # Not an address where a trusted hop's entry should be: one bucket for all
                # such requests (the text itself would let a client pick its own key).
                return UNPARSABLE
            if not any(addr in net for net in self.networks):
                return str(addr)
        return _canonical(peer)


def _canonical(host: str) -> str:
    addr = _address(host)
    return str(addr) if addr is not None else host


def disable_uvicorn_rewrite() -> None:
    """Stop uvicorn (it reads ``FORWARDED_ALLOW_IPS`` when Serve starts the replica's HTTP
    server, after the deployment's constructor) from replacing the peer with a value of
    ``X-Forwarded-For``: a value that matches no address trusts nothing."""
    os.environ["FORWARDED_ALLOW_IPS"] = "none"
