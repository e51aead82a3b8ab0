"""Domains leave s2sproxy in their A-label form (DNS queries, SNI) and come back in
(SNI) to the canonical U-label form: one helper, core.jid.dns_name, both ways."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.names import error

from s2sproxy.config import Domain
from s2sproxy.tx.resolver import RemoteResolver
from s2sproxy.tx.tls import ClientContexts, ServerContexts
from tests.unit.helpers import certificate


def test_client_sni_is_the_a_label_form():
    """SNI carries the A-label (RFC 6066 section 3: HostName is ASCII, A-labels),
    whatever spelling of the domain the stream uses."""
    for name in ("bücher.example", "BÜCHER.example", "xn--bcher-kva.example"):
        conn = ClientContexts().creator(name).clientConnectionForTLS(None)
        assert conn.get_servername() == b"xn--bcher-kva.example"
    # IDNA2003 (Python's codec) maps 'ß' to 'ss', another domain; IDNA2008 keeps it.
    conn = ClientContexts().creator("faß.example").clientConnectionForTLS(None)
    assert conn.get_servername() == b"xn--fa-hia.example"


def test_client_sni_of_ascii_domain_is_unchanged_and_of_an_address_is_absent():
    """An ASCII domain is its own A-label form; an IPv6 address is no HostName."""
    conn = ClientContexts().creator("remote.example").clientConnectionForTLS(None)
    assert conn.get_servername() == b"remote.example"
    conn = ClientContexts().creator("::1").clientConnectionForTLS(None)
    assert conn.get_servername() is None


class _RecordingDns:
    """Answers nothing (NXDOMAIN) and remembers every name asked, by query type."""

    def __init__(self) -> None:
        self.names: list[tuple[str, bytes]] = []

    def _ask(self, kind: str, name: bytes):
        self.names.append((kind, name))
        return defer.fail(error.DNSNameError(name))

    def lookupService(self, name, timeout=None):  # noqa: N802 (twisted.names API)
        return self._ask("SRV", name)

    def lookupAddress(self, name, timeout=None):  # noqa: N802
        return self._ask("A", name)

    def lookupIPV6Address(self, name, timeout=None):  # noqa: N802
        return self._ask("AAAA", name)


def _resolver() -> RemoteResolver:
    resolver = RemoteResolver({}, (("127.0.0.1", 53),), MemoryReactorClock())
    resolver.dns = _RecordingDns()
    return resolver


def test_srv_queries_use_the_a_label_form():
    """The SRV names asked are _xmpps-server._tcp. and _xmpp-server._tcp. followed by
    the A-label form of the domain (IDNA2008, not Python's IDNA2003 codec, which
    turns 'faß' into 'fass', another domain)."""
    resolver = _resolver()
    d = defer.ensureDeferred(resolver.srv("faß.example"))
    assert d.called
    assert sorted(resolver.dns.names) == [
        ("SRV", b"_xmpp-server._tcp.xn--fa-hia.example"),
        ("SRV", b"_xmpps-server._tcp.xn--fa-hia.example")]


def test_address_queries_for_the_domain_itself_use_the_a_label_form():
    """Without SRV records the domain itself is the host (RFC 6120 section 3.2.2): its
    A and AAAA queries name the A-label form; an SRV target (ASCII) is asked as is."""
    resolver = _resolver()
    d = defer.ensureDeferred(resolver.addresses("faß.example"))
    assert d.called
    assert sorted(resolver.dns.names) == [("A", b"xn--fa-hia.example"),
                                          ("AAAA", b"xn--fa-hia.example")]
    resolver = _resolver()
    defer.ensureDeferred(resolver.addresses("xmpp_1.Remote.example"))
    assert sorted(resolver.dns.names) == [("A", b"xmpp_1.Remote.example"),
                                          ("AAAA", b"xmpp_1.Remote.example")]


class _SniConnection:
    def __init__(self, name: bytes) -> None:
        self.name = name
        self.context = None

    def get_servername(self) -> bytes:
        return self.name

    def set_context(self, ctx) -> None:
        self.context = ctx


def test_server_sni_in_a_label_form_finds_the_u_label_domain(tmp_path):
    """A remote's SNI 'xn--bcher-kva.example' selects the certificate of the served
    domain 'bücher.example' (the config's canonical, U-label, name)."""
    _ca, _ck, leaf, key = certificate("xn--bcher-kva.example")
    (tmp_path / "c.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    _ca2, _ck2, leaf2, key2 = certificate("other.example")
    (tmp_path / "c2.pem").write_bytes(leaf2.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k2.pem").write_bytes(key2.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    contexts = ServerContexts({
        "other.example": Domain("other.example", tmp_path / "c2.pem", tmp_path / "k2.pem"),
        "bücher.example": Domain("bücher.example", tmp_path / "c.pem", tmp_path / "k.pem"),
    }, alpn=False)
    for sni in (b"xn--bcher-kva.example", b"XN--BCHER-KVA.example."):
        conn = _SniConnection(sni)
        contexts._on_sni(conn)
        assert conn.context is contexts.for_domain("bücher.example")
    conn = _SniConnection(b"\xff\xfe")               # junk: the default context stays
    contexts._on_sni(conn)
    assert conn.context is None
