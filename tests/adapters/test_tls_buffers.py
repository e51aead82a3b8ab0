"""Idle TLS streams get new, empty memory buffers (``policy.keepalive`` rule 7,
``tls.renew_buffers``): an OpenSSL memory BIO never shrinks, so a stream that once
carried a burst would hold its size for good.  In memory, a real TLS handshake
(twisted.test.iosim) on our Direct TLS listener.  Also the debug line of a handshake
that never completed."""

from __future__ import annotations

from s2sproxy.core import events as E
from s2sproxy.core.limits import PARSER_RELEASE_IDLE, TLS_RENEW_MIN_BYTES
from s2sproxy.tx.tls import renew_buffers
from tests.adapters.helpers import direct_tls_pair

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' to='local.example' "
          b"version='1.0'>")


def opened(tmp_path):
    """A Direct TLS stream, our header and features received by the client (not
    authenticated, and given time for it); the core's DataReceived events recorded."""
    p, reactor, server, client, app, pump = direct_tls_pair(tmp_path,
                                                            timeouts={"auth": 600})
    ours = server.wrappedProtocol
    seen = []
    real = ours.stream.handle
    ours.stream.handle = lambda ev: (seen.append(ev), real(ev))[1]
    client.write(HEADER)
    pump.flush()
    assert b"<stream:features>" in app.received, app.received
    return p, reactor, server, client, app, pump, seen


def bios(server):
    conn = server._tlsConnection
    return conn._into_ssl, conn._from_ssl


def received(seen) -> bytes:
    return b"".join(ev.data for ev in seen if isinstance(ev, E.DataReceived))


def test_renewed_buffers_carry_the_stream_both_ways_and_a_record_split_across(tmp_path):
    """The BIOs are new ones; a TLS record whose first half came before the renewal
    and the rest after arrives whole; what we write after it reaches the client."""
    _p, _r, server, client, app, pump, seen = opened(tmp_path)
    before = bios(server)
    client.write(b" " * 3000 + b"<!--x")      # one record; a comment is refused later
    wire = pump.clientIO.getOutBuffer()
    server.dataReceived(wire[:1000])
    assert renew_buffers(server, server.wrappedProtocol)
    after = bios(server)
    assert after[0] != before[0] and after[1] != before[1]
    server.dataReceived(wire[1000:])
    assert received(seen).endswith(b" " * 3000 + b"<!--x")
    # the comment ends the stream with restricted-xml, written through the new BIO
    pump.flush()
    assert b"<restricted-xml" in app.received, app.received[-300:]


def test_buffers_are_kept_while_bytes_wait_in_them(tmp_path):
    """Bytes in the read BIO not yet taken by OpenSSL, TLS output not yet taken by
    Twisted, or a write Twisted still holds: nothing is renewed (they would be lost
    or reordered)."""
    _p, _r, server, client, _app, pump, _seen = opened(tmp_path)
    conn = server._tlsConnection
    ours = server.wrappedProtocol
    before = bios(server)
    conn.bio_write(b"\x17\x03\x03")         # a record's start, not read by OpenSSL yet
    assert not renew_buffers(server, ours)
    assert bios(server) == before
    server2 = opened(tmp_path)[2]
    conn2 = server2._tlsConnection
    conn2.send(b"<x/>")                       # TLS output Twisted has not read out
    before2 = bios(server2)
    assert not renew_buffers(server2, server2.wrappedProtocol)
    assert bios(server2) == before2
    server3 = opened(tmp_path)[2]
    server3._appSendBuffer.append(b"<x/>")    # a write Twisted holds for OpenSSL
    assert not renew_buffers(server3, server3.wrappedProtocol)
    server3._appSendBuffer.clear()
    assert renew_buffers(server3, server3.wrappedProtocol)


def test_the_handshake_buffers_are_renewed_at_the_first_read_after_it(tmp_path):
    """The handshake's certificates fill both BIOs: they are renewed at the end of
    the first read that follows (nothing waits in them then), once."""
    _p, _r, server, client, app, pump = direct_tls_pair(tmp_path)
    ours = server.wrappedProtocol
    handshake = bios(server)
    assert ours.renewed_bytes < 0
    client.write(HEADER)
    pump.flush()
    assert b"<stream:features>" in app.received
    renewed = bios(server)
    assert renewed != handshake and ours.renewed_bytes >= 0
    client.write(b" ")
    pump.flush()
    assert bios(server) == renewed


def burst(client, pump, n: int = TLS_RENEW_MIN_BYTES) -> None:
    """The client sends ``n`` bytes of whitespace keepalives."""
    client.write(b" " * n)
    pump.flush()


def test_the_keepalive_tick_renews_an_idle_stream_once_it_carried_enough(tmp_path):
    """Rule 7: silent both ways for PARSER_RELEASE_IDLE seconds, and at least
    TLS_RENEW_MIN_BYTES moved since the handshake or the last renewal; not again
    while nothing (or too little) moves; again after the next burst."""
    p, reactor, server, client, app, pump, seen = opened(tmp_path)
    first = bios(server)        # renewed at the first read after the handshake
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())
    assert bios(server) == first                # a stream header each way: too little
    burst(client, pump)
    reactor.advance(PARSER_RELEASE_IDLE / 2)
    p._keepalive(reactor.seconds())
    assert bios(server) == first                # not idle long enough
    reactor.advance(PARSER_RELEASE_IDLE)
    p._keepalive(reactor.seconds())
    second = bios(server)
    assert second != first
    reactor.advance(PARSER_RELEASE_IDLE)
    p._keepalive(reactor.seconds())
    assert bios(server) == second               # nothing moved since
    burst(client, pump, 100)
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())
    assert bios(server) == second               # too little moved since
    burst(client, pump)
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())
    assert bios(server) != second


def test_freed_memory_is_handed_back_after_a_release_at_most_once_a_minute(tmp_path,
                                                                         monkeypatch):
    """Rule 7: once a parser or TLS buffers were released, a tick hands the freed
    memory back (glibc malloc_trim), at most every MEMORY_TRIM_INTERVAL seconds: a
    release during that time is handed back when it has passed; without a release
    since the last hand-back, none."""
    from s2sproxy.core.limits import MEMORY_TRIM_INTERVAL
    from s2sproxy.tx import memory
    calls = []
    monkeypatch.setattr(memory, "trim", lambda: calls.append(1) or True)
    p, reactor, server, client, _app, pump, _seen = opened(tmp_path)
    burst(client, pump)
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())
    assert calls == [1]                         # the buffers were renewed
    burst(client, pump)
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())             # renewed again, but trimmed lately
    assert calls == [1]
    reactor.advance(MEMORY_TRIM_INTERVAL)
    p._keepalive(reactor.seconds())             # that renewal's memory, now
    assert calls == [1, 1]
    reactor.advance(MEMORY_TRIM_INTERVAL)
    p._keepalive(reactor.seconds())             # nothing released since
    assert calls == [1, 1]
    burst(client, pump)
    reactor.advance(PARSER_RELEASE_IDLE + 1)
    p._keepalive(reactor.seconds())
    assert calls == [1, 1, 1]


def test_malloc_trim_is_found_on_this_system():
    """Debian's glibc has malloc_trim: the hand-back works where s2sproxy is deployed."""
    from s2sproxy.tx import memory
    assert memory.AVAILABLE
    assert memory.trim() in (True, False)


def handshake_lines(tmp_path, hello: bytes | None) -> list[str]:
    """The debug line of a Direct TLS connection that goes after ``hello`` (the bytes
    a client sent, or nothing)."""
    from twisted.internet.error import ConnectionDone
    from twisted.logger import formatEvent, globalLogPublisher
    from twisted.python.failure import Failure
    from s2sproxy import logs
    from tests.adapters.helpers import Transport, proxy
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        p, _reactor = proxy(tmp_path)
        logs.set_level("debug")
        server = p.services[1].factory.buildProtocol(None)   # the Direct TLS listener's
        server.makeConnection(Transport())
        if hello:
            server.dataReceived(hello)
        server.connectionLost(Failure(ConnectionDone()))
    finally:
        logs.set_level("info")
        globalLogPublisher.removeObserver(events.append)
    return [formatEvent(e) for e in events if "handshake" in e.get("log_format", "")]


def test_a_tls_handshake_that_never_completed_says_whether_the_peer_spoke(tmp_path):
    """A Direct TLS connection that goes before any ClientHello, and one whose
    ClientHello we refused (TLS 1.2, no cipher we accept): the debug line tells them
    apart, so a stalled peer can be told from a handshake that failed."""
    from OpenSSL import SSL
    assert handshake_lines(tmp_path, None) == [
        "public stream 192.0.2.7:40000: TLS handshake not completed "
        "(no hello from the peer)"]
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_cipher_list(b"AES128-SHA")
    old = SSL.Connection(ctx, None)
    old.set_connect_state()
    try:
        old.do_handshake()
    except SSL.Error:
        pass
    assert handshake_lines(tmp_path, old.bio_read(65536)) == [
        "public stream 192.0.2.7:40000: TLS handshake not completed "
        "(the peer's hello came)"]
