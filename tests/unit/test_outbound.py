"""Outgoing URLs: the internal-address classifier (engine.urls) and the connection that only
goes to the address checked (actors.outbound), with a fake resolver and a listener on
127.0.0.1. No Ray, no database."""

from __future__ import annotations

import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from actors import outbound
from actors.providers import WebhookAdapter
from engine import errors, urls
from engine.delivery import DeliveryMessage
from engine.sending import PermanentError
from engine.settings import Settings
from engine.templates import Rendered

INTERNAL_LITERALS = {
    # IPv4, in every notation inet_aton reads
    "127.0.0.1": "loopback",
    "127.0.0.53": "loopback",
    "2130706433": "loopback",
    "0x7f.1": "loopback",
    "0x7f000001": "loopback",
    "017700000001": "loopback",
    "0177.0.0.1": "loopback",
    "127.1": "loopback",
    "127.0.1": "loopback",
    "0.0.0.0": "unspecified",
    "0": "unspecified",
    "10.0.0.5": "private",
    "172.16.3.4": "private",
    "192.168.1.1": "private",
    "169.254.169.254": "metadata",
    "0xa9fea9fe": "metadata",
    "169.254.1.1": "link-local",
    "100.64.0.1": "shared",
    "100.100.100.200": "metadata",
    "224.0.0.1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    # IPv6, and IPv6 carrying an IPv4 address
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fc00::1": "unique-local",
    "fd12:3456::1": "unique-local",
    "fd00:ec2::254": "metadata",
    "ff02::1": "multicast",
    "fec0::1": "site-local",
    "::ffff:127.0.0.1": "loopback",
    "::ffff:7f00:1": "loopback",
    "::ffff:169.254.169.254": "metadata",
    "::ffff:10.0.0.1": "private",
    "::127.0.0.1": "loopback",
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
    "64:ff9b::a9fe:a9fe": "metadata",  # NAT64 of 169.254.169.254
}


@pytest.mark.parametrize(("host", "kind"), sorted(INTERNAL_LITERALS.items()))
def test_internal_literals_are_classified(host: str, kind: str) -> None:
    ip = urls.literal_ip(host)
    assert ip is not None, host
    why = urls.classify(ip)
    assert why is not None and kind in why, (host, why)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "1.1.1.1", "134744072", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_public_addresses_pass(host: str) -> None:
    ip = urls.literal_ip(host)
    assert ip is not None and urls.classify(ip) is None


def test_inet_aton_forms_mean_what_the_socket_layer_reads() -> None:
    for text, want in [
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1.258", "10.1.1.2"),
        ("0x7f.0.0.1.", "127.0.0.1"),  # trailing dot
    ]:
        assert urls.literal_ip(text) == ipaddress.ip_address(want), text
    for text in ("256.1.1.1", "1.2.3.4.5", "08.1.1.1", "hooks.example", "4294967296", "1..1"):
        assert urls.literal_ip(text) is None, text


URL_FORMS = [
    "http://127.0.0.1:6379",
    "http://127.0.0.1:8000/v1/admin",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]:8000/",
    "http://[fd00:ec2::254]/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://127.1/",
    "http://0.0.0.0/",
    "http://0/",
    "http://10.0.0.1/hook",
    "http://100.64.0.1/hook",
    "http://localhost:5432",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://localhost.localdomain/",
    "http://ip6-localhost/",
    "https://127.0.0.1./",
    "http://\uff11\uff12\uff17.0.0.1/",  # full-width digits, which IDNA folds to 127.0.0.1
    "http://127\u30020\u30020\u30021/",  # ideographic full stops
    "http://0177.1/",
]


def _refusal(url: str, addresses: list[str], allow: str = "") -> errors.InternalAddress | None:
    target = urls.parse(url)
    ips: list[urls.IP] = [ipaddress.ip_address(a) for a in addresses]
    literal = target.literal
    return urls.refusal(target, [literal] if literal else ips, urls.parse_allow(allow))


@pytest.mark.parametrize("url", URL_FORMS)
def test_internal_url_forms_are_refused_saying_why(url: str) -> None:
    refused = _refusal(url, ["127.0.0.1"])  # what a name would resolve to
    assert isinstance(refused, errors.InternalAddress)
    assert refused.message.startswith("url: ")
    assert "internal addresses are refused" in refused.message


def test_a_name_is_refused_when_any_address_is_internal() -> None:
    assert _refusal("https://hooks.example/x", ["93.184.216.34"]) is None
    refused = _refusal("https://hooks.example/x", ["93.184.216.34", "10.0.0.7"])
    assert refused is not None and "hooks.example resolves to 10.0.0.7, a private address" in refused.message
    assert _refusal("https://hooks.example/x", []) is not None


@pytest.mark.parametrize(
    "bad",
    ["ftp://x/", "file:///etc/passwd", "gopher://127.0.0.1:6379/_", "http://user:pw@hooks.example/",
     "http://@hooks.example/", "http:///path", "http://hooks.example:99999/", "", "  ", None, 7],
)
def test_only_plain_http_urls_with_a_host(bad: Any) -> None:
    with pytest.raises(errors.InvalidInput) as info:
        urls.parse(bad)
    assert not isinstance(info.value, errors.InternalAddress)
    assert "url" in info.value.message


def test_host_is_normalised() -> None:
    t = urls.parse("  HTTPS://Hooks.Example.:8443/a?b=c ")
    assert (t.scheme, t.host, t.port) == ("https", "hooks.example", 8443)
    assert urls.parse("http://[::1]/").host == "::1"
    assert urls.parse("http://bücher.example/").host == "xn--bcher-kva.example"


def test_allow_list_entries() -> None:
    allow = "127.0.0.1:8025, [::1]:9000, 10.20.0.0/16, 192.168.5.0/24:8080, hooks.internal, localhost:7000"
    assert _refusal("http://127.0.0.1:8025/sms", [], allow) is None
    assert _refusal("http://2130706433:8025/sms", [], allow) is None  # same address, other notation
    assert _refusal("http://127.0.0.1:8026/sms", [], allow) is not None  # other port
    assert _refusal("http://127.0.0.1:6379/", [], allow) is not None
    assert _refusal("http://[::1]:9000/", [], allow) is None
    assert _refusal("http://[::1]:9001/", [], allow) is not None
    assert _refusal("http://10.20.3.4:1234/", [], allow) is None
    assert _refusal("http://10.21.3.4/", [], allow) is not None
    assert _refusal("http://192.168.5.9:8080/", [], allow) is None
    assert _refusal("http://192.168.5.9:8081/", [], allow) is not None
    assert _refusal("http://hooks.internal/", ["10.9.9.9"], allow) is None  # the name is trusted
    assert _refusal("http://HOOKS.internal.:8080/", ["10.9.9.9"], allow) is None
    assert _refusal("http://other.internal/", ["10.9.9.9"], allow) is not None
    assert _refusal("http://localhost:7000/", ["127.0.0.1"], allow) is None
    assert _refusal("http://localhost:7001/", ["127.0.0.1"], allow) is not None
    # a name resolving into an allowed block passes; outside it does not
    assert _refusal("http://a.example/", ["10.20.0.1"], allow) is None
    assert _refusal("http://a.example/", ["10.20.0.1", "127.0.0.1"], allow) is not None


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "host:port", "[::1", "a b", "h:70000"])
def test_bad_allow_entries_are_a_config_error(bad: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        Settings.from_env({"VOUCHER_OUTBOUND_ALLOW": bad})
    assert "VOUCHER_OUTBOUND_ALLOW" in info.value.message


def test_sinks_are_allowed_by_exactly_their_address() -> None:
    s = outbound.allowing(Settings(outbound_allow="hooks.internal"), ["http://127.0.0.1:40001/sms"])
    assert s.outbound_allow == "hooks.internal,127.0.0.1:40001"
    allow = outbound.allow_of(s)
    assert _refusal("http://127.0.0.1:40001/push", [], s.outbound_allow) is None
    assert _refusal("http://127.0.0.1:40002/push", [], s.outbound_allow) is not None
    assert allow == urls.parse_allow(s.outbound_allow)


# --- connecting only to the checked address --------------------------------------------


class _Listener:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[dict[str, str]] = []
        box = self.received

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                box.append({"host": self.headers.get("Host") or "", "path": self.path})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def listener() -> Iterator[_Listener]:
    lis = _Listener()
    yield lis
    lis.server.shutdown()
    lis.server.server_close()


class _Rebinding:
    """A resolver that answers a public address first and 127.0.0.1 afterwards."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[urls.IP]:
        self.calls += 1
        return [ipaddress.ip_address("93.184.216.34" if self.calls == 1 else "127.0.0.1")]


async def test_rebinding_name_passes_registration_and_is_refused_at_connect(listener: _Listener) -> None:
    resolver = _Rebinding()
    url = f"http://rebind.example:{listener.port}/hook"
    await outbound.check_url(url, (), resolver)  # registration: public, accepted
    async with outbound.client((), timeout=5, resolver=resolver) as http:
        with pytest.raises(errors.InternalAddress) as info:
            await http.post(url, content=b"{}")
    assert "rebind.example resolves to 127.0.0.1, a loopback address" in info.value.message
    assert resolver.calls == 2
    assert listener.received == []


async def test_connection_goes_to_the_checked_address_with_the_name_as_host(listener: _Listener) -> None:
    """The name does not resolve anywhere but in the resolver given: the request reaching
    the listener proves the connection used the checked address, not a second lookup."""
    seen: list[str] = []

    async def resolver(host: str, port: int) -> list[urls.IP]:
        seen.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    allow = urls.parse_allow(f"127.0.0.1:{listener.port}")
    async with outbound.client(allow, timeout=5, resolver=resolver) as http:
        r = await http.post(f"http://hooks.invalid:{listener.port}/hook", content=b"{}")
    assert r.status_code == 200
    assert seen == ["hooks.invalid"]
    assert listener.received == [{"host": f"hooks.invalid:{listener.port}", "path": "/hook"}]


async def test_redirects_are_not_followed() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/"})

    async def resolver(host: str, port: int) -> list[urls.IP]:
        return [ipaddress.ip_address("93.184.216.34")]

    http = outbound.client((), timeout=5, resolver=resolver)
    assert isinstance(http._transport, outbound.PinnedTransport)
    http._transport.connect_to = lambda host: httpx.MockTransport(handler)  # type: ignore[method-assign]
    async with http:
        r = await http.post("http://hooks.example/hook", content=b"{}")
    assert r.status_code == 302 and calls == ["http://93.184.216.34/hook"]


async def test_provider_webhook_to_an_internal_address_fails_permanently(listener: _Listener) -> None:
    msg = DeliveryMessage(id="msg_1", campaign_id="c", customer_id="u", channel="sms",
                          recipient="+4915100000000", code="CODE")
    rendered = Rendered(subject=None, body="hi")
    adapter = WebhookAdapter(f"http://127.0.0.1:{listener.port}/sms", connections=1, timeout_s=5)
    with pytest.raises(PermanentError) as info:
        await adapter.send(msg, rendered)
    assert "loopback" in str(info.value)
    await adapter.close()
    allowed = WebhookAdapter(
        f"http://127.0.0.1:{listener.port}/sms", connections=1, timeout_s=5,
        allow=urls.parse_allow(f"127.0.0.1:{listener.port}"),
    )
    await allowed.send(msg, rendered)
    await allowed.close()
    assert [r["path"] for r in listener.received] == ["/sms"]


def _tls_listener(tmp_path: Any, name: str) -> tuple[ThreadingHTTPServer, ssl.SSLContext, list[str]]:
    """An HTTPS server on 127.0.0.1 whose certificate names only ``name``; records the SNI."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    sni: list[str] = []
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server_ctx.sni_callback = lambda sock, server_name, ctx: sni.append(server_name or "") or None  # type: ignore[func-returns-value]
    lis = _Listener(server_ctx)
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return lis.server, client_ctx, sni


async def test_tls_goes_to_the_checked_address_but_verifies_the_name(tmp_path: Any) -> None:
    server, client_ctx, sni = _tls_listener(tmp_path, "hooks.test")
    port = int(server.server_address[1])

    async def resolver(host: str, port: int) -> list[urls.IP]:
        return [ipaddress.ip_address("127.0.0.1")]

    allow = urls.parse_allow(f"127.0.0.1:{port}")
    try:
        async with outbound.client(allow, timeout=5, resolver=resolver, verify=client_ctx) as http:
            r = await http.post(f"https://hooks.test:{port}/hook", content=b"{}")
            assert r.status_code == 200
            assert sni == ["hooks.test"]  # SNI and the certificate check used the name
            # the same server reached by its address: the certificate does not name it
            with pytest.raises(httpx.ConnectError):
                await http.post(f"https://127.0.0.1:{port}/hook", content=b"{}")
    finally:
        server.shutdown()
        server.server_close()
