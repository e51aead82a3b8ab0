"""PROXY protocol listeners (``haproxy:tcp:...``, tx.proxyprotocol) on the memory
reactor: the stream starts with the address the header gives, STARTTLS completes
behind the wrapper, a connection without a header is dropped in time, and one that
closes before it (or right after it: a health check) leaves nothing behind."""

from __future__ import annotations

import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from s2sproxy.core.inbound import Role
from s2sproxy.core.limits import PROXY_HEADER_TIMEOUT
from s2sproxy.tx.proxyprotocol import ProxyHeaderFactory, split
from tests.adapters.helpers import HEADER, REMOTE, STARTTLS, Transport, proxy


def v2(src: str, sport: int, dst: str = "203.0.113.1", dport: int = 5269) -> bytes:
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", 12)
            + socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport))


def wrapped(p):
    f = ProxyHeaderFactory(p.listener(Role.PUBLIC, False), p.reactor)
    w = f.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    t = Transport("127.0.0.1", 50000)
    w.makeConnection(t)
    return w, t


def test_split_haproxy_prefix():
    assert split("haproxy:tcp:5269:interface=10.0.0.1") == (True,
                                                             "tcp:5269:interface=10.0.0.1")
    assert split("tcp:5269") == (False, "tcp:5269")


def test_stream_starts_with_the_real_peer_and_completes_starttls(tmp_path):
    p, reactor = proxy(tmp_path)
    w, t = wrapped(p)
    assert p.streams == set()                      # nothing before the header
    w.dataReceived(v2("192.0.2.9", 41000) + HEADER % REMOTE.encode())
    (proto,) = p.streams
    assert proto.peer == "192.0.2.9:41000"
    assert len(p.admission) == 1
    assert b"<starttls" in t.value()
    w.dataReceived(STARTTLS)
    assert b"<proceed" in t.value() and proto.tls_started
    # the TLS layer tells the wrapper; the wrapper tells the stream
    w.handshakeCompleted()
    assert proto.tls_done
    assert proto.stream.secure


def test_header_split_across_reads(tmp_path):
    p, reactor = proxy(tmp_path)
    w, t = wrapped(p)
    data = v2("198.51.100.7", 1234) + HEADER % REMOTE.encode()
    for i in range(0, len(data), 5):
        w.dataReceived(data[i:i + 5])
    (proto,) = p.streams
    assert proto.peer == "198.51.100.7:1234" and b"<stream:features>" in t.value()


def test_no_header_is_dropped_in_time_and_leaves_nothing(tmp_path):
    p, reactor = proxy(tmp_path)
    w, t = wrapped(p)
    w.dataReceived(b"\r\n\r\n\x00")               # a beginning, never finished
    reactor.advance(PROXY_HEADER_TIMEOUT - 0.1)
    assert not t.aborted
    reactor.advance(0.2)
    assert t.aborted
    w.connectionLost(None)
    assert p.streams == set() and len(p.admission) == 0


def test_health_check_is_no_stream_and_logs_at_debug(tmp_path):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        p, reactor = proxy(tmp_path)
        w, t = wrapped(p)
        w.dataReceived(v2("127.0.0.1", 50000))     # HAProxy's check: header, close
        w.connectionLost(None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert p.streams == set() and len(p.admission) == 0
    info = [formatEvent(e) for e in events if e.get("log_level") is LogLevel.info
            and "s2sproxy" in e.get("log_namespace", "")]
    assert not [x for x in info if "stream" in x], info
