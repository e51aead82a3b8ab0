"""Real sockets, one process: a twisted.names DNS server on 127.0.0.1 (a free port)
that answers like an RFC 8482 resolver, and a remote "server" listening on ::1 only.
The outgoing stream must find it through SRV and AAAA and connect over IPv6."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.names import common, dns, error, server

from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.service import Proxy
from tests.adapters.test_backend import settings


class Rfc8482Zone(common.ResolverBase):
    """remote.example's zone: SRV to xmpp.remote.example, which has only an AAAA
    record (::1); QTYPE ANY is answered with a lone HINFO (RFC 8482 section 4.2)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
        self.asked: list[tuple[bytes, int]] = []

    def _lookup(self, name, cls, type, timeout):
        self.asked.append((name, type))
        name = name.lower()
        if name == b"_xmpp-server._tcp.remote.example" and type == dns.SRV:
            rr = [dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(
                0, 0, self.port, b"xmpp.remote.example"))]
        elif name == b"xmpp.remote.example" and type == dns.AAAA:
            rr = [dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA("::1"))]
        elif name == b"xmpp.remote.example" and type == dns.ALL_RECORDS:
            rr = [dns.RRHeader(name, dns.HINFO, payload=dns.Record_HINFO(b"RFC8482", b""))]
        elif name == b"xmpp.remote.example":
            rr = []                                    # NODATA (the A query)
        else:
            return defer.fail(error.DomainError(name))
        return defer.succeed((rr, [], []))


class Remote(protocol.Protocol):
    def dataReceived(self, data):  # noqa: N802
        self.factory.received.append(data)
        if not self.factory.first.called:
            self.factory.first.callback(data)
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_outgoing_stream_reaches_ipv6_only_remote_through_srv_and_aaaa(tmp_path):
    """SRV -> a name with only an AAAA record (ANY answers HINFO): the stream header
    arrives at the listener on ::1, and the failed attempt ends in one bounce."""
    from twisted.internet import reactor
    remote_factory = protocol.Factory.forProtocol(Remote)
    remote_factory.received, remote_factory.first = [], defer.Deferred()
    listener = reactor.listenTCP(0, remote_factory, interface="::1")
    zone = Rfc8482Zone(listener.getHost().port)
    dns_port = reactor.listenUDP(0, dns.DNSDatagramProtocol(
        server.DNSServerFactory(clients=[zone])), interface="127.0.0.1")
    try:
        p = Proxy(settings(tmp_path, dns={
            "nameservers": [f"127.0.0.1:{dns_port.getHost().port}"],
            "allow_private_targets": True}), reactor)
        bounced = defer.Deferred()
        p.bounce = lambda s, condition, text="": bounced.callback((s.id, condition, text))
        p.route([Stanza("message", b"<message/>", "romeo@local.example",
                        "juliet@remote.example", "chat", "m1", None, "local.example",
                        "remote.example")])
        first = await remote_factory.first.addTimeout(10, reactor)
        assert first.startswith(b"<?xml version='1.0'?><stream:stream xmlns='jabber:server'")
        assert b"from='local.example' to='remote.example'" in first
        sid, condition, text = await bounced.addTimeout(10, reactor)
        assert (sid, condition) == ("m1", "remote-server-not-found")
        assert f"[::1]:{listener.getHost().port} connection lost" in text
        assert (b"xmpp.remote.example", dns.ALL_RECORDS) not in zone.asked
    finally:
        await listener.stopListening()
        await dns_port.stopListening()
