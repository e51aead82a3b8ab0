"""Outgoing connections on Twisted's memory reactor: the plan executed (every address,
refusals, DNS errors), our own connection coming back, a failure inside the
connector, the periodic tick, and dialback verification toward a secure domain."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError, TimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.names import dns, error
from twisted.python.failure import Failure

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.inbound import Role
from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.service import Proxy
from tests.adapters.test_backend import settings

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"


def header(frm: str, sid: str = "r1") -> bytes:
    return (f"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
            f"streams' xmlns:db='jabber:server:dialback' from='{frm}' to='local.example' "
            f"id='{sid}' version='1.0'>").encode()


class FakeDns:
    """The parts of twisted.names' client.Resolver the proxy uses, answered from dicts.
    ``getHostByName`` answers as Twisted's does (one address, AAAA first), so that the
    code before this change can be driven by the same data."""

    def __init__(self, srv=None, a=None, aaaa=None, srv_error=None):
        self.srv, self.a, self.aaaa = srv or {}, a or {}, aaaa or {}
        self.srv_error = srv_error
        self.queries: list[tuple[str, bytes]] = []

    def lookupService(self, name, timeout=None):  # noqa: N802
        self.queries.append(("SRV", name))
        if self.srv_error is not None:
            return defer.fail(self.srv_error())
        if name not in self.srv:
            return defer.fail(error.DNSNameError(name))
        return defer.succeed(([dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(
            prio, weight, port, target)) for prio, weight, port, target in self.srv[name]],
            [], []))

    def _addresses(self, table, rtype, record, name):
        self.queries.append((dns.QUERY_TYPES[rtype], name))
        return defer.succeed(([dns.RRHeader(name, rtype, payload=record(a))
                               for a in table.get(name, [])], [], []))

    def lookupAddress(self, name, timeout=None):  # noqa: N802
        return self._addresses(self.a, dns.A, dns.Record_A, name)

    def lookupIPV6Address(self, name, timeout=None):  # noqa: N802
        return self._addresses(self.aaaa, dns.AAAA, dns.Record_AAAA, name)

    def getHostByName(self, name, timeout=None, effort=10):  # noqa: N802
        self.queries.append(("ANY", name.encode()))
        found = self.aaaa.get(name.encode()) or self.a.get(name.encode())
        return defer.succeed(found[0]) if found else defer.fail(error.DNSNameError(name))


def outgoing(n: int = 1, to: str = "remote.example") -> Stanza:
    return Stanza("message", b"<message/>", "romeo@local.example", f"juliet@{to}/x",
                  "chat", f"m{n}", None, "local.example", to)


def proxy_with(tmp_path, fake: FakeDns | None = None, **tables):
    reactor = MemoryReactorClock()
    p = Proxy(settings(tmp_path, **tables), reactor)
    if fake is not None:
        p.resolver.dns = fake
    bounced: list[tuple[str, str, str]] = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition, text))
    return p, reactor, bounced


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def connect(reactor, index: int = -1, local=("192.0.2.100", 40000)):
    """Make the memory reactor's connection attempt ``index`` succeed."""
    factory = reactor.tcpClients[index][2]
    proto = factory.buildProtocol(None)
    transport = StringTransport(hostAddress=IPv4Address("TCP", *local))
    proto.makeConnection(transport)
    return proto, transport


# -- defect 1: a remote's DNS must not make s2sproxy talk to itself -------------------------

OWN = "one of s2sproxy's own listeners"


@pytest.mark.parametrize("allow_private, port, why", [
    (False, 15270, OWN), (True, 15270, OWN),
    (False, 15999, "loopback address from DNS (dns.allow_private_targets is false)")])
def test_connector_remote_srv_pointing_at_our_backend_listener_is_refused(
        tmp_path, allow_private, port, why):
    """_xmpp-server._tcp.evil.example SRV 0 0 15270 localhost. (127.0.0.1, our backend
    listener, whose peers are trusted by address): no connection is made, with or
    without dns.allow_private_targets, and the stanza bounces remote-server-not-found
    saying why; another loopback port is refused unless private targets are allowed."""
    dns_table = {"nameservers": ["127.0.0.1:1"]}
    if allow_private:
        dns_table["allow_private_targets"] = True
    p, reactor, bounced = proxy_with(
        tmp_path, FakeDns({b"_xmpp-server._tcp.evil.example": [(0, 0, port, b"localhost")]},
                          a={b"localhost": ["127.0.0.1"]}),
        backend={"trusted_addresses": ["127.0.0.1"]}, dns=dns_table)
    p.route([outgoing(1, "evil.example")])
    assert reactor.tcpClients == []
    [(sid, condition, text)] = bounced
    assert (sid, condition) == ("m1", "remote-server-not-found")
    assert f"127.0.0.1:{port} refused: {why}" in text


def test_connector_own_connection_coming_back_is_never_trusted_by_address(tmp_path, logged):
    """Our outgoing stream, landing on our backend listener from 127.0.0.1 (a trusted
    address), is our own connection coming back: refused with a stream error and one
    warning, never authenticated (else every stanza to that domain loops)."""
    p, reactor, _bounced = proxy_with(
        tmp_path, backend={"trusted_addresses": ["127.0.0.1"]},
        remote={"evil.example": {"starttls": ["192.0.2.1:5269"]}})
    p.route([outgoing(1, "evil.example")])
    connect(reactor, local=("127.0.0.1", 40000))
    incoming = p.listener(Role.BACKEND, False).buildProtocol(None)
    wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    incoming.makeConnection(wire)
    incoming.dataReceived(
        header("local.example").replace(b" to='local.example'", b" to='evil.example'")
        .replace(b" id='r1'", b"") + b"<db:result from='local.example' "
        b"to='evil.example'>key</db:result>")
    assert incoming.stream.authenticated == set()
    assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in wire.value()
    warnings = [e for e in logged if e.get("log_level") is LogLevel.warn
                and "own outgoing connection" in e.get("log_format", "")]
    assert len(warnings) == 1


def test_connector_same_local_port_for_another_pair_is_not_our_own(tmp_path, logged):
    """ejabberd's connection to our backend listener may come from the local end of
    one of our outgoing connections (Linux reuses an ephemeral port toward another
    destination): asking for another domain pair, it is not ours come back, and is
    trusted by address as configured (the world test saw it refused before)."""
    p, reactor, _bounced = proxy_with(
        tmp_path, backend={"trusted_addresses": ["127.0.0.1"]},
        remote={"evil.example": {"starttls": ["192.0.2.1:5269"]}})
    p.route([outgoing(1, "evil.example")])
    connect(reactor, local=("127.0.0.1", 40000))
    incoming = p.listener(Role.BACKEND, False).buildProtocol(None)
    wire = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    incoming.makeConnection(wire)
    incoming.dataReceived(
        header("local.example").replace(b" to='local.example'", b" to='other.example'")
        .replace(b" id='r1'", b"") + b"<db:result from='local.example' "
        b"to='other.example'>key</db:result>")
    assert incoming.stream.authenticated == {("local.example", "other.example")}
    assert b"policy-violation" not in wire.value()
    assert not [e for e in logged if "own outgoing connection" in e.get("log_format", "")]


# -- defect 2: every address, A and AAAA, DNS errors ----------------------------------------

REMOTE_SRV = {b"_xmpp-server._tcp.remote.example": [(0, 0, 5269, b"xmpp.remote.example")]}


def test_connector_tries_every_address_ipv6_first_then_bounces(tmp_path):
    """A and AAAA are asked separately (no ANY), and a refused connect, a stream error
    before ready and a connect timeout each move on to the next address; when none
    is left the stanza bounces with what happened to each."""
    fake = FakeDns(REMOTE_SRV, a={b"xmpp.remote.example": ["192.0.2.1", "192.0.2.2"]},
                   aaaa={b"xmpp.remote.example": ["2001:db8::1"]})
    p, reactor, bounced = proxy_with(tmp_path, fake)
    p.route([outgoing(1)])
    assert ("ANY", b"xmpp.remote.example") not in fake.queries
    assert [c[:2] for c in reactor.tcpClients] == [("2001:db8::1", 5269)]
    assert reactor.tcpClients[0][3] == 3.0          # short: another address is known
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert [c[:2] for c in reactor.tcpClients][1:] == [("192.0.2.1", 5269)]
    proto, _t = connect(reactor)
    proto.dataReceived(header("remote.example") + b"<stream:error><host-unknown "
                       b"xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>")
    assert [c[:2] for c in reactor.tcpClients][2:] == [("192.0.2.2", 5269)]
    assert reactor.tcpClients[2][3] == 10.0         # the last one: timeouts.connect
    assert bounced == []
    reactor.tcpClients[2][2].clientConnectionFailed(None, Failure(TimeoutError()))
    [(sid, condition, text)] = bounced
    assert (sid, condition) == ("m1", "remote-server-not-found")
    assert "[2001:db8::1]:5269 unreachable: Connection was refused" in text
    assert "192.0.2.1:5269 stream error from peer: host-unknown" in text
    assert "192.0.2.2:5269 connect timed out" in text


def test_connector_dialback_refused_by_remote_does_not_move_on(tmp_path):
    """The remote's dialback answer type='invalid' is final: the stanza bounces at
    once and no other address is tried."""
    fake = FakeDns(REMOTE_SRV, a={b"xmpp.remote.example": ["192.0.2.1", "192.0.2.2"]})
    p, reactor, bounced = proxy_with(tmp_path, fake)
    p.start_tls = lambda proto, server_name: None       # TLS itself is not under test
    p.route([outgoing(1)])
    proto, _t = connect(reactor)
    proto.dataReceived(header("remote.example") + f"<stream:features><starttls "
                       f"xmlns='{NS_TLS}'/></stream:features><proceed xmlns='{NS_TLS}'/>"
                       .encode())
    proto.handle(E.TlsEstablished(False, None))
    proto.dataReceived(header("remote.example", "r2") + b"<stream:features><dialback "
                       b"xmlns='urn:xmpp:features:dialback'/></stream:features>"
                       b"<db:result from='remote.example' to='local.example' "
                       b"type='invalid'/>")
    assert len(reactor.tcpClients) == 1
    [(sid, condition, text)] = bounced
    assert (sid, condition) == ("m1", "remote-server-not-found")
    assert text.endswith("192.0.2.1:5269 dialback refused: invalid key")


@pytest.mark.parametrize("srv_error", [
    error.DNSNameError, error.DNSFormatError, error.DNSServerError,
    error.DNSNotImplementedError, error.DNSQueryRefusedError, error.DNSQueryTimeoutError])
def test_connector_srv_dns_error_falls_back_to_domain_on_5269(tmp_path, srv_error):
    """FORMERR, NOTIMP, SERVFAIL, REFUSED and timeouts of the SRV lookups fall back to
    the domain on 5269, as NXDOMAIN does."""
    fake = FakeDns(a={b"remote.example": ["192.0.2.5"]}, srv_error=srv_error)
    p, reactor, bounced = proxy_with(tmp_path, fake)
    p.route([outgoing(1)])
    assert [c[:2] for c in reactor.tcpClients] == [("192.0.2.5", 5269)]
    assert bounced == []


# -- defect 10: an exception in the connector, in the tick ----------------------------------

def test_connector_exception_fails_the_attempt_and_bounces(tmp_path, logged):
    """A client TLS context that cannot be made (our certificate file became
    unreadable) fails the attempt: what waits is bounced at once, one traceback is
    logged, and the link does not stay connecting."""
    p, reactor, bounced = proxy_with(
        tmp_path, remote={"remote.example": {"direct_tls": ["192.0.2.1:5270"],
                                             "starttls": ["192.0.2.1:5269"]}})
    (tmp_path / "l.crt").unlink()
    p.route([outgoing(1)])
    [(sid, condition, text)] = bounced
    assert (sid, condition) == ("m1", "internal-server-error")
    assert "internal error" in text
    assert p.to_remote.links[("local.example", "remote.example")].state.value != "connecting"
    assert reactor.tcpClients == []
    tracebacks = [e for e in logged if e.get("log_failure") is not None]
    assert len(tracebacks) == 1


def test_tick_survives_an_exception_and_logs_once_per_tick(tmp_path, logged):
    """An exception in one part of the periodic tick is logged once per tick with its
    traceback; the other parts still run and the ticker keeps ticking."""
    p, reactor, bounced = proxy_with(tmp_path, queue={"max_age": 2})

    def broken(now):
        raise RuntimeError("boom")
    p.to_backend.tick = broken
    p.to_remote.send(("local.example", "remote.example"), [outgoing(1)], 0)
    p._ticker.start(1.0, now=False)
    for _ in range(3):
        reactor.advance(1)
    assert p._ticker.running
    p._ticker.stop()
    assert len([e for e in logged if e.get("log_failure") is not None]) == 3
    assert bounced == [("m1", "remote-server-timeout", "not delivered within 2 s")]


# -- defect 14: the verification connection obeys the trust settings ------------------------

class Requester:
    """A stand-in for the public stream whose db:result is being verified."""

    def __init__(self):
        self.stream, self.peer, self.label = object(), "192.0.2.9:4000", "public"
        self.events: list = []

    def handle(self, event):
        self.events.append(event)


@pytest.mark.parametrize("trust", [{"secure_domains": ["remote.example"]},
                                   {"require_valid_certificates": True}])
def test_verify_dialback_toward_secure_domain_needs_tls(tmp_path, trust):
    """For a domain that must present a valid certificate, the authoritative server's
    answer over a plain stream is never asked for: the verdict is an error."""
    p, reactor, _b = proxy_with(tmp_path, trust=trust,
                                remote={"remote.example": {"starttls": ["192.0.2.1:5269"]}})
    requester = Requester()
    defer.ensureDeferred(p.verifier.verify(
        requester, A.VerifyDialback("remote.example", "local.example", "in-1", "key")))
    proto, wire = connect(reactor)
    proto.dataReceived(header("remote.example") + b"<stream:features><dialback "
                       b"xmlns='urn:xmpp:features:dialback'/></stream:features>")
    assert b"<db:verify" not in wire.value()
    assert requester.events == [E.DialbackVerdict("remote.example", "local.example", None,
                                                  "remote-server-not-found")]


def test_connector_listener_bound_on_port_zero_is_never_a_target(tmp_path):
    """A listener's real bound address (port 0 made real) joins our own listeners: an
    operator override naming it is refused."""
    p, reactor, bounced = proxy_with(
        tmp_path, remote={"remote.example": {"starttls": ["127.0.0.1:34567"]}})
    port = type("Port", (), {"getHost": lambda self: IPv4Address("TCP", "127.0.0.1", 34567)})()
    assert p._bound(port) is port
    p.route([outgoing(1)])
    assert reactor.tcpClients == []
    assert "127.0.0.1:34567 refused: one of s2sproxy's own listeners" in bounced[0][2]


class CnameDns(FakeDns):
    """www -> alias (answer section carries alias's A); far -> elsewhere (no address in
    the answer: asked again)."""

    def lookupAddress(self, name, timeout=None):  # noqa: N802
        self.queries.append(("A", name))
        cname = lambda frm, to: dns.RRHeader(frm, dns.CNAME, payload=dns.Record_CNAME(to))
        a = lambda n, ip: dns.RRHeader(n, dns.A, payload=dns.Record_A(ip))
        answers = {b"www.remote.example": [cname(b"www.remote.example", b"alias.example"),
                                           a(b"alias.example", "192.0.2.3")],
                   b"far.remote.example": [cname(b"far.remote.example", b"elsewhere.example")],
                   b"elsewhere.example": [a(b"elsewhere.example", "192.0.2.4")]}
        return defer.succeed((answers.get(name, []), [], []))


def test_resolver_follows_cnames_in_the_answer_and_by_asking_again(tmp_path):
    """CNAMEs are followed as twisted.names does: through the answer section, then by
    asking for the chain's last name."""
    p, _reactor, _b = proxy_with(tmp_path, CnameDns())
    got = []
    defer.ensureDeferred(p.resolver.addresses("www.remote.example")).addCallback(got.append)
    defer.ensureDeferred(p.resolver.addresses("far.remote.example")).addCallback(got.append)
    assert got == [([], ["192.0.2.3"], ""), ([], ["192.0.2.4"], "")]
    assert ("A", b"elsewhere.example") in p.resolver.dns.queries


def _requester(peer: str = "192.0.2.7:40000"):
    got = []
    r = type("R", (), {})()
    r.stream, r.peer, r.label, r.closing = None, peer, "public", False
    r.handle = got.append
    return r, got


def test_dialback_verifications_in_flight_are_bounded_and_stop_with_their_stream(
        tmp_path, monkeypatch):
    """Beyond MAX_VERIFICATIONS in flight the extra db:result gets resource-constraint
    at once; a verification whose asking stream has gone tries no further address."""
    import s2sproxy.tx.verify as V
    monkeypatch.setattr(V, "MAX_VERIFICATIONS", 1)
    reactor = MemoryReactorClock()
    p = Proxy(settings(tmp_path, remote={"far.example": {
        "starttls": ["192.0.2.1:5269", "192.0.2.2:5269"]}}), reactor)
    first, got1 = _requester()
    second, got2 = _requester("192.0.2.8:40000")
    req = A.VerifyDialback("far.example", "local.example", "sid", "key")
    defer.ensureDeferred(p.verifier.verify(first, req))
    defer.ensureDeferred(p.verifier.verify(second, req))
    assert [c[:2] for c in reactor.tcpClients] == [("192.0.2.1", 5269)]
    assert got2 == [E.DialbackVerdict("far.example", "local.example", None,
                                      "resource-constraint")]
    first.closing = True
    reactor.tcpClients[0][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert len(reactor.tcpClients) == 1             # 192.0.2.2 never tried
    assert got1 and got1[0].valid is None
    assert p.verifier.in_flight == 0
