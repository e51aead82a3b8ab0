"""Bounds on what an unauthenticated peer can make the proxy hold (issue 7, defects 4
and 7), on the memory reactor."""

from __future__ import annotations

from s2sproxy.core.inbound import Role
from s2sproxy.core.limits import CLOSE_GRACE
from tests.adapters.helpers import HEADER, REMOTE, Transport, proxy, public_stream


def _connect(p, host, port):
    proto = p.listener(Role.PUBLIC, False).buildProtocol(None)
    t = Transport(host, port)
    proto.makeConnection(t)
    return proto, t


def test_connections_over_per_source_bound_are_refused_at_accept(tmp_path):
    """Beyond limits.max_unauthenticated_per_source, a new connection from the same
    source is dropped before a byte is read; other sources still get in; an
    authenticated stream no longer counts."""
    p, reactor = proxy(tmp_path, limits={"max_unauthenticated_per_source": 3})
    held = [_connect(p, "192.0.2.1", 1000 + i) for i in range(3)]
    assert not any(t.aborted for _, t in held)
    proto, t = _connect(p, "192.0.2.1", 2000)
    assert t.aborted and t.value() == b""
    assert p.metrics.value("s2sproxy_connections_refused_total", bound="per-source") == 1
    assert not _connect(p, "192.0.2.2", 1000)[1].aborted
    # one of the three authenticates: room for one more from that source
    public_stream(p, reactor, host="192.0.2.1", port=3000)  # refused: still 3 held
    held[0][0].connectionLost(None)
    authed, _t = public_stream(p, reactor, host="192.0.2.1", port=3001)
    assert not _t.aborted and authed.stream.authenticated
    assert not _connect(p, "192.0.2.1", 3002)[1].aborted
    assert p.metrics.value("s2sproxy_unauthenticated_connections") == 4


def test_connections_over_total_bound_are_refused(tmp_path):
    p, reactor = proxy(tmp_path, limits={"max_unauthenticated": 2})
    assert not _connect(p, "192.0.2.1", 1)[1].aborted
    assert not _connect(p, "192.0.2.2", 1)[1].aborted
    assert _connect(p, "192.0.2.3", 1)[1].aborted
    assert p.metrics.value("s2sproxy_connections_refused_total", bound="total") == 1


def test_silent_connection_closed_at_auth_timeout_and_aborted_if_it_lingers(tmp_path):
    """A connection that sends nothing is closed timeouts.auth after accept with
    connection-timeout; if it does not go away (a peer that stops reading), it is
    aborted CLOSE_GRACE later."""
    p, reactor = proxy(tmp_path, timeouts={"auth": 5})
    proto, t = _connect(p, "192.0.2.1", 1)
    proto.dataReceived(b"<")
    reactor.advance(4.9)
    assert t.value() == b"" and not proto.closing
    reactor.advance(0.1)
    assert b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in t.value()
    assert proto.closing and not t.aborted
    reactor.advance(CLOSE_GRACE)
    assert t.aborted


def test_slow_handshake_is_bounded_from_accept(tmp_path):
    """A peer that waits before its header, then restarts after STARTTLS, is still
    closed timeouts.auth after accept (the timer no longer starts at the header)."""
    from s2sproxy.core import events as E
    from tests.adapters.helpers import STARTTLS
    p, reactor = proxy(tmp_path, timeouts={"auth": 5})
    proto, t = _connect(p, "192.0.2.1", 1)
    reactor.advance(3)
    proto.dataReceived(HEADER % REMOTE.encode() + STARTTLS)
    proto.handle(E.TlsEstablished(False, None))
    reactor.advance(1.5)
    proto.dataReceived(HEADER % REMOTE.encode())
    assert not proto.closing
    reactor.advance(0.5)
    assert proto.closing


def _peer_labels(p) -> set[str]:
    return {s.labels["peer"] for m in p.metrics.registry.collect()
            if m.name == "s2sproxy_flags" for s in m.samples}


def test_unauthenticated_from_never_becomes_a_metric_label(tmp_path):
    """Stream-level flags of connections that never authenticated count under one
    fixed peer label, whatever their header's 'from' claimed (defect 8)."""
    p, reactor = proxy(tmp_path)
    for i in range(50):
        proto, t = _connect(p, f"192.0.2.{i}", 1)
        proto.dataReceived(HEADER % f"claimed{i}.example".encode()
                           + b"<message from='a@x' to='b@local.example'/>")
        assert proto.closing
    assert p.flags.count == 50
    assert _peer_labels(p) == {"-"}


def test_authenticated_peer_labels_are_bounded(tmp_path):
    """An authenticated domain is a label value, up to max_peers distinct ones; later
    domains count as 'other' (a wildcard domain can authenticate endless names)."""
    from s2sproxy.metrics import Metrics
    m = Metrics(max_peers=2)
    assert [m.peer(d) for d in ("a.example", "b.example", "c.example", "a.example", "")] \
        == ["a.example", "b.example", "other", "a.example", "-"]
    p, reactor = proxy(tmp_path, policy={"actions": {"unknown-type": "drop"}})
    proto, t = public_stream(p, reactor)
    proto.dataReceived(b"<message from='a@remote.example' to='b@local.example' "
                       b"type='shout'/>")
    assert _peer_labels(p) == {"remote.example"}
