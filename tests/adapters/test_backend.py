"""The backend leg's queue and bounces, and the backend DNS responder, on Twisted's
memory reactor: no sockets, the clock advanced by hand."""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.error import ConnectionRefusedError
from twisted.names import dns, error
from twisted.python.failure import Failure

from twisted.internet import defer

from s2sproxy.config import parse
from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.inbound import InboundConfig, InboundStream, Role
from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.backend_dns import BackendSrvResolver
from s2sproxy.tx.service import Proxy
from tests.unit.test_config import pem
from tests.unit.helpers import certificate


def settings(tmp_path, **tables):
    """Settings for local.example with a test certificate, plus ``tables``."""
    _ca, _ck, leaf, key = certificate("local.example")
    (tmp_path / "l.crt").write_bytes(pem(leaf))
    (tmp_path / "l.key").write_bytes(pem(key))
    return parse(dict({
        "secret_file": "secret",
        "domain": [{"name": "local.example", "certificate": "l.crt", "key": "l.key"}],
        "dns": {"nameservers": ["127.0.0.1:1"]},
    }, **tables), base=tmp_path)


@pytest.fixture
def proxy(tmp_path):
    reactor = MemoryReactorClock()
    p = Proxy(settings(tmp_path, queue={"limit": 2, "max_age": 5}), reactor)
    p._ticker.start(1.0, now=False)     # MemoryReactor has no UDP: only the ticker
    # remote.example's bidi stream, where bounces to it go
    bidi = type("P", (), {"close": lambda self: None,
                          "write": lambda self, data: self.transport.write(data),
                          "write_stanzas": lambda self, data, n: self.transport.write(data)})()
    bidi.transport = StringTransport()
    p.to_remote.stream_ready(("local.example", "remote.example"), bidi, 0, borrowed=True)
    yield p, reactor, bidi.transport
    p._ticker.stop()


def message(n: int, type_: str = "chat") -> Stanza:
    return Stanza("message", b"<message/>", "juliet@remote.example/x", "romeo@local.example",
                  type_, f"m{n}", None, "remote.example", "local.example")


def test_backend_queue_over_limit_bounces_resource_constraint(proxy):
    """Beyond queue_limit, stanzas are bounced at once with resource-constraint."""
    p, reactor, bounces = proxy
    p.route([message(1), message(2), message(3)])
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 15269)]
    assert bounces.value() == (
        b"<message from='romeo@local.example' to='juliet@remote.example/x' type='error' "
        b"id='m3'><error type='wait'><resource-constraint "
        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text "
        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>more than 2 stanzas waiting</text>"
        b"</error></message>")


def test_backend_not_ready_in_time_bounces_remote_server_timeout(proxy):
    """A stanza waiting max_age for the backend stream is bounced with
    remote-server-timeout (error stanzas are not); a later one waits on the same
    connection attempt."""
    p, reactor, bounces = proxy
    p.route([message(1), message(2, "error")])
    reactor.advance(4)
    assert bounces.value() == b""
    reactor.advance(1)
    assert bounces.value().count(b"<remote-server-timeout ") == 1
    assert b"id='m1'" in bounces.value() and b"id='m2'" not in bounces.value()
    p.route([message(3)])
    assert len(reactor.tcpClients) == 1
    link = p.to_backend.links[("remote.example", "local.example")]
    assert [s.id for s, _ in link.queue] == ["m3"]


def test_backend_connection_refused_bounces_remote_server_not_found(proxy):
    """A refused connection to ejabberd bounces what waited with remote-server-not-found."""
    p, reactor, bounces = proxy
    p.route([message(1)])
    factory = reactor.tcpClients[0][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert b"<remote-server-not-found " in bounces.value()
    assert b"backend 127.0.0.1:15269 unreachable: Connection was refused" in bounces.value()


@pytest.mark.parametrize("name, answered", [
    (b"_xmpp-server._tcp.remote.example", True),
    (b"_XMPP-Server._tcp.Remote.Example", True),
    (b"_xmpps-server._tcp.remote.example", False),
    (b"remote.example", False),
])
def test_backend_dns_answers_only_xmpp_server_srv(name, answered):
    """_xmpp-server SRV for any domain points at the backend listener; everything else,
    _xmpps-server included, is NXDOMAIN."""
    r = BackendSrvResolver("localhost", 15270)
    d = r.lookupService(name)
    results = []
    d.addBoth(results.append)
    if answered:
        (rr,), _auth, _add = results[0]
        assert (rr.type, rr.payload.target.name, rr.payload.port) == \
            (dns.SRV, b"localhost", 15270)
    else:
        results[0].trap(error.DomainError)


def _backend_requester(peer: str):
    stream = InboundStream(InboundConfig(Role.BACKEND, frozenset({"local.example"}),
                                         DialbackKeys(b"k" * 32), lambda: "sid", 10000, 16))
    stream.handle(E.DataReceived(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
        b"streams' xmlns:db='jabber:server:dialback' from='local.example' "
        b"to='remote.example' version='1.0'><db:result from='local.example' "
        b"to='remote.example'>key</db:result>"))
    ran = []
    requester = type("R", (), {"stream": stream, "peer": peer,
                               "handle": lambda self, ev: ran.extend(stream.handle(ev))})()
    return requester, ran


@pytest.mark.parametrize("peer, trusted", [("127.0.0.1:40000", True),
                                           ("127.0.0.2:40000", False)])
def test_backend_db_result_trusted_by_source_address(tmp_path, peer, trusted):
    """With backend.trusted_addresses, ejabberd's db:result from that address is
    accepted without a db:verify; from elsewhere, ejabberd is asked."""
    reactor = MemoryReactorClock()
    p = Proxy(settings(tmp_path, backend={"trusted_addresses": ["127.0.0.1"]}), reactor)
    requester, ran = _backend_requester(peer)
    defer.ensureDeferred(p.verifier.verify(
        requester, A.VerifyDialback("local.example", "remote.example", "sid", "key")))
    if trusted:
        assert reactor.tcpClients == []
        assert A.Authenticated("local.example", "remote.example", "dialback") in ran
    else:
        assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 15269)]
        assert ran == []


def _ready_backend_stream(p: Proxy, reactor) -> tuple:
    """A real backend StreamProtocol driven to READY over a StringTransport."""
    from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundStream
    from s2sproxy.tx.service import _OutboundFactory
    pair = ("remote.example", "local.example")
    stream = OutboundStream(OutboundConfig(Mode.ORIGINATE, *pair, p.keys, 10000, 16,
                                           tls="never"))
    factory = _OutboundFactory(p, stream, "backend", p.to_backend, pair)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
        b"streams' xmlns:db='jabber:server:dialback' id='e1' version='1.0'>"
        b"<stream:features/><db:result from='local.example' to='remote.example' "
        b"type='valid'/>")
    assert p.to_backend.ready_handle(pair) is proto
    transport.clear()
    return proto, transport


def _pinged_backend(tmp_path):
    """A ready backend stream that has just sent its keepalive ping (ping after 10 s
    of silence, 5 s to answer)."""
    reactor = MemoryReactorClock()
    p = Proxy(settings(tmp_path, keepalive={"whitespace": 1000, "ping": 10,
                                            "timeout": 5}), reactor)
    p.keepalive.new_ping_id = lambda: "s2sproxy-ping-1"     # random in service
    proto, transport = _ready_backend_stream(p, reactor)
    reactor.advance(10)
    p._keepalive(reactor.seconds())
    return p, reactor, proto, transport


def test_backend_keepalive_ping_answered_on_another_stream_keeps_link(tmp_path):
    """ejabberd answers our keepalive ping on its own outgoing stream: the answer is
    consumed there (never forwarded, never flagged) and the backend link stays up."""
    p, reactor, proto, transport = _pinged_backend(tmp_path)
    sent = transport.value()
    assert sent.startswith(b"<iq type='get' id='s2sproxy-ping-1' from='remote.example' "
                           b"to='local.example'><ping xmlns='urn:xmpp:ping'/></iq>")
    answer = Stanza("iq", b"<iq/>", "local.example", "remote.example", "result",
                    "s2sproxy-ping-1", None, "local.example", "remote.example")
    p.stream_action(None, A.DeliverStanzas([answer]))
    assert p.flags.count == 0 and len(p.keepalive) == 0
    reactor.advance(6)
    p._keepalive(reactor.seconds())
    assert not proto.closing


def test_backend_keepalive_ping_unanswered_ends_stream(tmp_path):
    """No answer to the keepalive ping within keepalive.timeout: connection-timeout."""
    p, reactor, proto, transport = _pinged_backend(tmp_path)
    reactor.advance(5)
    p._keepalive(reactor.seconds())
    assert b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" \
        in transport.value()
    assert proto.closing
    assert p.to_backend.ready_handle(("remote.example", "local.example")) is None
