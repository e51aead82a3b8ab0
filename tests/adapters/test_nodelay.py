"""TCP_NODELAY on every s2s socket (issue 9: Nagle plus delayed ACKs added 1.4 ms at
p50 and 10.7 ms at p99).  Real sockets on 127.0.0.1 (free ports), one process: a
Proxy listening, plain TCP peers on the other ends; the option is read back from the
socket s2sproxy holds."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import defer, protocol, task
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOProtocol

from s2sproxy.core import actions as A
from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.protocol import no_delay
from s2sproxy.tx.service import Proxy
from tests.adapters.helpers import (direct_tls_pair, proxy as memory_proxy, public_stream,
                                    settings)

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Peer(protocol.Protocol):
    """The other end: remembers that it is connected, sends nothing by itself."""

    def connectionMade(self):  # noqa: N802
        self.factory.connected.append(self)


def peer_factory() -> protocol.ClientFactory:
    f = protocol.ClientFactory.forProtocol(Peer)     # a listener's or a client's
    f.connected = []
    return f


def tcp_of(proto):
    """The TCP transport under a StreamProtocol (under the TLS wrapper for Direct TLS:
    its own ``getHandle()`` is the pyOpenSSL connection)."""
    t = proto.transport
    return t.transport if isinstance(t, TLSMemoryBIOProtocol) else t


def nodelay(proto) -> int:
    return tcp_of(proto).getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def until(reactor, found, timeout: float = 10.0):
    """Poll ``found()`` until it returns something (or fail after ``timeout``)."""
    deadline = reactor.seconds() + timeout
    while True:
        value = found()
        if value:
            return value
        assert reactor.seconds() < deadline, "timed out"
        await task.deferLater(reactor, 0.01, lambda: None)


def stream(p: Proxy, label: str):
    return lambda: next((s for s in p.streams
                         if s.label == label and s.transport is not None), None)


async def started(tmp_path, **tables) -> tuple[Proxy, dict[str, int]]:
    """A Proxy on free loopback ports; returns it and its listeners' bound ports."""
    from twisted.internet import reactor
    tables.setdefault("public", {"starttls": [f"tcp:0:interface={LOOPBACK}"],
                                 "direct_tls": [f"tcp:0:interface={LOOPBACK}"]})
    backend = tables.setdefault("backend", {})
    backend.setdefault("listen", f"tcp:0:interface={LOOPBACK}")
    backend.setdefault("srv_port", 15270)
    backend.setdefault("dns_port", free_port())
    tables.setdefault("dns", {"nameservers": ["127.0.0.1:1"],
                              "allow_private_targets": True})
    p = Proxy(settings(tmp_path, **tables), reactor)
    p.startService()
    ports = {}
    names = ["starttls", "direct_tls", "backend"]
    for svc in p:
        waiting = getattr(svc, "_waitingForPort", None)
        if waiting is not None and names:
            port = await waiting
            ports[names.pop(0)] = port.getHost().port
    return p, ports


async def stopped(p: Proxy, *others) -> None:
    from twisted.internet import reactor
    for s in list(p.streams):
        if s.transport is not None:
            s.transport.abortConnection()
    await until(reactor, lambda: not any(s.connected for s in p.streams))
    await p.stopService()
    for o in others:
        await o


async def accepted(tmp_path, listener: str) -> int:
    """TCP_NODELAY on the socket a listener of ours accepted from a plain TCP client."""
    from twisted.internet import reactor
    p, ports = await started(tmp_path)
    client = peer_factory()
    conn = reactor.connectTCP(LOOPBACK, ports[listener], client)
    try:
        label = "backend-in" if listener == "backend" else "public"
        proto = await until(reactor, stream(p, label))
        return nodelay(proto)
    finally:
        conn.disconnect()
        await stopped(p)


@pytest_twisted.ensureDeferred
async def test_accepted_starttls_connection_has_tcp_nodelay(tmp_path):
    assert await accepted(tmp_path, "starttls") == 1


@pytest_twisted.ensureDeferred
async def test_accepted_direct_tls_connection_has_tcp_nodelay_under_the_tls_wrapper(
        tmp_path):
    assert await accepted(tmp_path, "direct_tls") == 1


@pytest_twisted.ensureDeferred
async def test_accepted_backend_connection_has_tcp_nodelay(tmp_path):
    """ejabberd's outgoing streams, on the backend listener."""
    assert await accepted(tmp_path, "backend") == 1


def outgoing(frm: str, to: str) -> Stanza:
    return Stanza("message", b"<message/>", f"romeo@{frm}", f"juliet@{to}", "chat",
                  "m1", None, frm, to)


async def connected_out(tmp_path, kind: str) -> int:
    """TCP_NODELAY on a connection of ours: to a remote (by a static STARTTLS or
    Direct TLS address), to ejabberd's internal listener (the backend leg), or a
    dialback verification (to the remote's authoritative server)."""
    from twisted.internet import reactor
    peer = peer_factory()
    listener = reactor.listenTCP(0, peer, interface=LOOPBACK)
    port = listener.getHost().port
    if kind == "backend":
        tables = {"backend": {"host": LOOPBACK, "port": port}}
        stanza, label = outgoing("remote.example", "local.example"), "backend"
    elif kind == "verify":
        tables = {"remote": {"remote.example": {"starttls": [f"{LOOPBACK}:{port}"]}}}
        stanza, label = None, "verify"
    else:
        tables = {"remote": {"remote.example": {kind: [f"{LOOPBACK}:{port}"]}}}
        stanza, label = outgoing("local.example", "remote.example"), "remote"
    p, _ports = await started(tmp_path, **tables)
    p.bounce = lambda *a, **k: None
    try:
        if stanza is None:
            verdict = defer.ensureDeferred(p.connector.verify(A.VerifyDialback(
                "remote.example", "local.example", "sid", "key"), backend=False))
        else:
            p.route([stanza])
        await until(reactor, lambda: peer.connected)
        proto = await until(reactor, stream(p, label))
        wrapped = isinstance(proto.transport, TLSMemoryBIOProtocol)
        assert wrapped == (kind == "direct_tls")
        return nodelay(proto)
    finally:
        await stopped(p, listener.stopListening())
        if stanza is None:
            await verdict       # the attempt failed as the connection was aborted


@pytest_twisted.ensureDeferred
async def test_outgoing_starttls_connection_to_a_remote_has_tcp_nodelay(tmp_path):
    assert await connected_out(tmp_path, "starttls") == 1


@pytest_twisted.ensureDeferred
async def test_outgoing_direct_tls_connection_to_a_remote_has_tcp_nodelay(tmp_path):
    assert await connected_out(tmp_path, "direct_tls") == 1


@pytest_twisted.ensureDeferred
async def test_outgoing_backend_connection_has_tcp_nodelay(tmp_path):
    """Our stream to ejabberd's internal listener."""
    assert await connected_out(tmp_path, "backend") == 1


@pytest_twisted.ensureDeferred
async def test_dialback_verification_connection_has_tcp_nodelay(tmp_path):
    assert await connected_out(tmp_path, "verify") == 1


# -- transports without the option (memory reactor) ----------------------------------


def test_memory_transport_without_set_tcp_nodelay_is_tolerated(tmp_path):
    """A StringTransport has no setTcpNoDelay: the stream is accepted and runs."""
    p, reactor = memory_proxy(tmp_path)
    assert not hasattr(StringTransport(), "setTcpNoDelay")
    proto, transport = public_stream(p, reactor)
    assert not transport.aborted
    assert proto in p.streams


def test_no_delay_is_asked_of_a_transport_that_has_it_and_a_failure_is_tolerated():
    asked = []

    class Tcp:
        def setTcpNoDelay(self, enabled):  # noqa: N802
            asked.append(enabled)

    class Broken:
        def setTcpNoDelay(self, enabled):  # noqa: N802
            raise OSError("not a TCP socket")

    no_delay(Tcp())
    no_delay(Broken())
    no_delay(StringTransport())
    no_delay(None)
    assert asked == [True]


def test_no_delay_reaches_the_tcp_transport_under_a_tls_wrapper(tmp_path):
    """Direct TLS: the protocol's transport is TLSMemoryBIOProtocol, which delegates
    unknown attributes to the TCP transport it wraps."""
    asked = []

    class Tcp(StringTransport):
        def setTcpNoDelay(self, enabled):  # noqa: N802
            asked.append(enabled)

    p, reactor = memory_proxy(tmp_path)
    factory = p.services[1].factory      # the Direct TLS listener's TLSMemoryBIOFactory
    wrapper = factory.buildProtocol(None)
    wrapper.makeConnection(Tcp())
    assert isinstance(wrapper.wrappedProtocol.transport, TLSMemoryBIOProtocol)
    assert asked == [True]


# -- TLS: one read per TCP read, writes out at once (issue 9) --------------------------

def test_tls_records_of_one_tcp_read_are_one_read_and_writes_leave_at_once(tmp_path):
    """Twisted's TLS layer hands each TLS record to the protocol on its own and holds
    writes for the next reactor iteration.  On a Direct TLS stream (in memory, a
    real TLS handshake): three records arriving in one TCP read reach the core as one
    DataReceived, and what the stream writes is on the TCP transport before any
    reactor iteration."""
    from s2sproxy.core import events as E

    _p, _r, server, client, app, pump = direct_tls_pair(tmp_path)
    ours = server.wrappedProtocol
    seen = []
    real = ours.stream.handle
    ours.stream.handle = lambda ev: (seen.append(ev), real(ev))[1]
    for part in (b"<?xml version='1.0'?>", b"<stream:stream xmlns='jabber:server' ",
                 b"xmlns:stream='http://etherx.jabber.org/streams' to='local.example' "
                 b"version='1.0'>"):
        client.write(part)
    pump.pump()         # the three records, in one dataReceived
    reads = [ev for ev in seen if isinstance(ev, E.DataReceived)]
    assert len(reads) == 1 and reads[0].data.endswith(b"version='1.0'>"), reads
    # our answer (header, features), written within that read, is already on the TCP
    # transport: nothing waits in the TLS layer for a later reactor iteration
    assert not server._aggregator._buffer and server.transport.stream
    pump.pump()
    assert b"<stream:features>" in app.received, app.received
    if server._aggregator._scheduled is not None:     # the handshake's, if any
        server._aggregator._scheduled.cancel()
        server._aggregator._scheduled = None
    server.transport.stream.clear()
    ours.write(b" ")
    assert server.transport.stream and not server._aggregator._buffer
    # and nothing was left for a later reactor iteration either (Twisted's aggregator
    # schedules a flush per write)
    assert server._aggregator._scheduled is None


def test_tls_end_of_connection_and_large_writes_with_the_bio_reading_flushes(tmp_path):
    """BatchingTLS reads its BIOs by their fill level instead of Twisted's read until
    WantReadError: a 100 KB write is all on the TCP transport at once and reaches the
    client whole; TCP gone without a TLS close_notify still ends the stream with
    ConnectionLost (the EOF read that tells it is kept)."""
    from twisted.internet.error import ConnectionDone, ConnectionLost
    from twisted.python.failure import Failure

    _p, _r, server, client, app, pump = direct_tls_pair(tmp_path)
    ours = server.wrappedProtocol
    reasons = []
    real_lost = ours.connectionLost
    ours.connectionLost = lambda reason=None: (reasons.append(reason), real_lost(reason))
    big = b"<x>" + b"y" * 100_000 + b"</x>"
    before = len(app.received)
    ours.write(big)
    assert sum(map(len, server.transport.stream)) > len(big)    # all of it, now
    pump.flush()
    assert app.received[before:] == big
    server.connectionLost(Failure(ConnectionDone()))             # TCP closed, no alert
    assert len(reasons) == 1 and reasons[0].check(ConnectionLost), reasons
