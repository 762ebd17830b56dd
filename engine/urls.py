"""Outgoing URLs: which ones the engine may request. Pure: parsing and classification only;
``actors/outbound.py`` resolves names and connects to the address checked here.

A webhook URL names a host the engine will POST to from inside the deployment, so a URL
naming an internal address (the Redis port on loopback, the cloud metadata service, a
database on the private network) would let whoever registers it make the engine talk to
services nobody outside should reach. The rule:

* only ``http``/``https``, a host, no ``user:password@``;
* refused when the host is a ``localhost`` name, or when ANY address it resolves to is
  loopback, link-local, private, unique-local, unspecified, multicast, reserved, shared
  (100.64/10), a metadata service, or otherwise not globally routable. IPv4 written the
  ways ``inet_aton`` reads it (``2130706433``, ``0x7f.1``, ``017700000001``, ``127.1``)
  and IPv6 that carries an IPv4 address (``::ffff:127.0.0.1``, ``::127.0.0.1``, 6to4,
  NAT64) are judged by the IPv4 address they mean;
* unless ``VOUCHER_OUTBOUND_ALLOW`` names it: ``host``, ``host:port``, ``ip``,
  ``ip:port``, ``[v6]:port`` or a CIDR (optionally ``CIDR:port`` for IPv4), comma-separated.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from engine.errors import InternalAddress, InvalidInput

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}

METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
SHARED = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True)
class Target:
    """A parsed outgoing URL: ``host`` is lowercase, without brackets or a trailing dot."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def literal(self) -> IP | None:
        return literal_ip(self.host)


def parse(url: object, field: str = "url") -> Target:
    """The target of ``url``; ``InvalidInput`` naming ``field`` when it is not one the engine
    may request (scheme, credentials, host). Addresses are judged by :func:`refusal`."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"{field} is required")
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"{field} is not a valid URL: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise InvalidInput(f"{field} must be an absolute http:// or https:// URL")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidInput(f"{field} must not carry credentials (user:password@)")
    host = normalise_host(parts.hostname)
    if not host:
        raise InvalidInput(f"{field} has no usable host")
    return Target(text, parts.scheme, host, port or DEFAULT_PORTS[parts.scheme])


def normalise_host(host: str) -> str:
    """Lowercase, no brackets, no trailing dots, IDNA-encoded (``""`` if it cannot be)."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if not host or literal_ip(host) is not None:
        return host
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return ""
    return name if _NAME.match(name) else ""


_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


_V4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 in every form ``inet_aton`` accepts: 1 to 4 parts, each decimal, octal (leading
    0) or hex (0x); the last part fills the remaining bytes (``127.1``, ``2130706433``)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_V4_PART.match(p) for p in parts):
        return None
    nums = []
    for p in parts:
        if p[:2].lower() == "0x":
            nums.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p[0] == "0":
            nums.append(int(p, 8))
        else:
            nums.append(int(p))
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    value = value * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(value)


def literal_ip(host: str) -> IP | None:
    """The address a host written as an IP literal means, in any notation; else None."""
    h = host.strip().strip("[]").rstrip(".")
    if ":" in h:
        try:
            return ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            return None
    return _inet_aton(h)


def embedded_v4(ip: IP) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, compatible, 6to4, NAT64)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    packed = int(ip)
    if packed >> 32 == 0 and packed > 1:  # ::a.b.c.d (deprecated IPv4-compatible)
        return ipaddress.IPv4Address(packed)
    return None


def classify(ip: IP) -> str | None:
    """Why ``ip`` is internal (``"a loopback address"``...), or None for a public one."""
    inner = embedded_v4(ip)
    if inner is not None:
        why = classify(inner)
        return f"{why} ({inner})" if why else None
    if ip in METADATA:
        return "a cloud metadata address"
    checks = (
        (ip.is_unspecified, "an unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in SHARED, "a shared (carrier-grade NAT) address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.ip_network("fc00::/7"),
         "a unique-local address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_reserved, "a reserved address"),
        (ip.is_private, "a private address"),
        (not ip.is_global, "not a public address"),
    )
    for hit, why in checks:
        if hit:
            return why
    return None


def is_localhost_name(host: str) -> bool:
    h = host.lower().rstrip(".")
    return h in LOCALHOST_NAMES or h.endswith(".localhost")


@dataclass(frozen=True)
class AllowEntry:
    host: str | None = None
    net: Net | None = None
    port: int | None = None


_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]+\]|[^:\[\]]+)(?::(?P<port>\d{1,5}))?$")


def parse_allow(spec: str) -> tuple[AllowEntry, ...]:
    """``VOUCHER_OUTBOUND_ALLOW``: comma-separated ``host[:port]``, ``ip[:port]``,
    ``[v6]:port``, ``CIDR`` (``v4CIDR:port``). Raises ValueError naming a bad entry."""
    out: list[AllowEntry] = []
    for raw in (s.strip() for s in spec.split(",")):
        if not raw:
            continue
        out.append(_allow_entry(raw))
    return tuple(out)


def _allow_entry(raw: str) -> AllowEntry:
    text, port = raw, None
    if "/" in raw:  # CIDR, IPv4 ones may end in :port
        net_text = raw
        m = re.fullmatch(r"([0-9.]+/\d+):(\d{1,5})", raw)
        if m:
            net_text, port = m.group(1), int(m.group(2))
        try:
            net = ipaddress.ip_network(net_text.strip("[]"), strict=False)
        except ValueError:
            raise ValueError(f"{raw!r} is not a CIDR block") from None
        return AllowEntry(net=net, port=_port(port, raw))
    if text.count(":") > 1 and not text.startswith("["):  # bare IPv6
        ip = literal_ip(text)
        if ip is None:
            raise ValueError(f"{raw!r} is not an address")
        return AllowEntry(net=ipaddress.ip_network(ip), port=None)
    m = _HOST_PORT.match(text)
    if m is None:
        raise ValueError(f"{raw!r} is not host[:port], ip[:port] or a CIDR block")
    port = int(m.group("port")) if m.group("port") else None
    ip = literal_ip(m.group("host"))
    if ip is not None:
        return AllowEntry(net=ipaddress.ip_network(ip), port=_port(port, raw))
    host = normalise_host(m.group("host"))
    if not host:
        raise ValueError(f"{raw!r} has no usable host")
    return AllowEntry(host=host, port=_port(port, raw))


def _port(port: int | None, raw: str) -> int | None:
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"{raw!r} has a port outside 1..65535")
    return port


def allow_entries_for(urls: list[str] | tuple[str, ...]) -> str:
    """``VOUCHER_OUTBOUND_ALLOW`` entries naming exactly the host:port of each URL (how the
    embedded sinks are let through)."""
    out = []
    for url in urls:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        shown = f"[{host}]" if ":" in host else host
        out.append(f"{shown}:{port}" if port else shown)
    return ",".join(out)


def name_allowed(target: Target, allow: tuple[AllowEntry, ...]) -> bool:
    return any(e.host == target.host and e.port in (None, target.port) for e in allow)


def address_allowed(ip: IP, port: int, allow: tuple[AllowEntry, ...]) -> bool:
    for e in allow:
        if e.net is None or e.port not in (None, port):
            continue
        if ip.version == e.net.version and ip in e.net:
            return True
    return False


def refusal(target: Target, addresses: list[IP], allow: tuple[AllowEntry, ...],
            field: str = "url") -> InternalAddress | None:
    """The error to raise if the engine must not connect to ``target`` at ``addresses``
    (all of them, as resolved), else None."""
    if name_allowed(target, allow):
        return None
    if is_localhost_name(target.host):
        return InternalAddress(
            f"{field}: {target.host} is a localhost name; requests to internal addresses are "
            "refused (VOUCHER_OUTBOUND_ALLOW can allow it)"
        )
    if not addresses:
        return InternalAddress(f"{field}: {target.host} resolves to no address")
    for ip in addresses:
        if address_allowed(ip, target.port, allow):
            continue
        why = classify(ip)
        if why is not None:
            if str(ip) == target.host:
                shown = target.host
            elif target.literal is not None:
                shown = f"{target.host} is {ip}"
            else:
                shown = f"{target.host} resolves to {ip}"
            return InternalAddress(
                f"{field}: {shown}, {why}; requests to internal addresses are refused "
                "(VOUCHER_OUTBOUND_ALLOW can allow it)"
            )
    return None
