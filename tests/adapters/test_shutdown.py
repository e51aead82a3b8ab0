"""Stopping loses nothing in flight (issue 7, defect 15), on the memory reactor."""

from __future__ import annotations

from twisted.internet import defer

from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.shutdown import SHUTDOWN_WAIT, shut_down
from tests.adapters.helpers import LOCAL, REMOTE, message, proxy, public_stream
from tests.adapters.test_backend import _ready_backend_stream


def _outgoing(n: int) -> Stanza:
    return Stanza("message", b"<message/>", f"romeo@{LOCAL}/r", f"juliet@{REMOTE}",
                  "chat", f"o{n}", None, LOCAL, REMOTE)



def _peer_closes(proto, reactor) -> None:
    """The peer answers our close with its own, and the connection goes."""
    proto.dataReceived(b"</stream:stream>")
    proto.connectionLost(None)
    for _ in range(3):
        reactor.advance(0.05)

def test_shutdown_bounces_queued_and_delivers_what_arrives_while_closing(tmp_path):
    p, reactor = proxy(tmp_path, remote={REMOTE: {"starttls": ["192.0.2.9:5269"]}})
    backend, backend_t = _ready_backend_stream(p, reactor)
    public, public_t = public_stream(p, reactor)
    # ejabberd's stanza waiting for our stream to remote.example: bounced at shutdown
    p.route([_outgoing(1)])
    assert p.to_remote.links[(LOCAL, REMOTE)].queue
    opened = len(reactor.tcpClients)
    done = defer.ensureDeferred(shut_down(p, lambda: defer.succeed(None)))
    # phase 1: the remote's stream is closed first, ours to ejabberd stays open
    assert public_t.value().endswith(b"</stream:stream>")
    assert not backend_t.value().endswith(b"</stream:stream>")
    assert b"id='o1'" in backend_t.value() and b"<remote-server-timeout " \
        in backend_t.value() and b"s2sproxy is shutting down" in backend_t.value()
    # the remote had sent one more message before it read our close: delivered
    public.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "late")
                        + b"</stream:stream>")
    assert b"id='late'" in backend_t.value()
    reactor.advance(0.1)
    assert not backend_t.value().endswith(b"</stream:stream>")   # not flushed yet
    public.connectionLost(None)          # the transport has written its last bytes
    for _ in range(3):
        reactor.advance(0.05)
    # phase 2: now ours to ejabberd is closed
    assert backend_t.value().endswith(b"</stream:stream>")
    _peer_closes(backend, reactor)
    assert done.called and not p.streams
    # nothing opened during shutdown
    p.route([_outgoing(2)])
    assert len(reactor.tcpClients) == opened


def test_shutdown_aborts_peers_that_do_not_close(tmp_path):
    """A peer that never answers our </stream:stream> is aborted after SHUTDOWN_WAIT."""
    p, reactor = proxy(tmp_path)
    public, public_t = public_stream(p, reactor)
    done = defer.ensureDeferred(shut_down(p, lambda: defer.succeed(None)))
    for _ in range(int(SHUTDOWN_WAIT / 0.05) + 2):
        reactor.advance(0.05)
    assert public_t.aborted
    for _ in range(int(SHUTDOWN_WAIT / 0.05) + 2):
        reactor.advance(0.05)
    assert done.called


def test_shutdown_closes_ejabberds_stream_once_it_is_quiet(tmp_path):
    """ejabberd's outgoing stream is closed after the remotes' streams, once it sent
    nothing for SHUTDOWN_QUIET: what ejabberd routes to it until then is read and
    bounced back (ejabberd would write it to the closed socket and lose it), and our
    stream to ejabberd, which carries the bounces, is closed last."""
    from s2sproxy.core.limits import SHUTDOWN_QUIET
    from tests.adapters.test_keepalive import backend_in
    p, reactor = proxy(tmp_path, backend={"trusted_addresses": ["127.0.0.1"]})
    backend, backend_t = _ready_backend_stream(p, reactor)
    ej, ej_t = backend_in(p, reactor)
    public, public_t = public_stream(p, reactor)
    done = defer.ensureDeferred(shut_down(p, lambda: defer.succeed(None)))
    assert public_t.value().endswith(b"</stream:stream>")
    public.dataReceived(b"</stream:stream>")
    public.connectionLost(None)
    # ejabberd keeps sending for a while: its stream stays open, each stanza bounced
    for n in range(5):
        reactor.advance(SHUTDOWN_QUIET / 2)
        ej.dataReceived(message(f"a@{LOCAL}/r", f"b@{REMOTE}", f"late{n}"))
        assert not ej_t.value().endswith(b"</stream:stream>")
        assert f"id='late{n}'".encode() in backend_t.value()      # the bounce
    assert backend_t.value().count(b"s2sproxy is shutting down") == 5
    # quiet: closed now, ours to ejabberd still open (phase 3)
    for _ in range(int(SHUTDOWN_QUIET / 0.05) + 2):
        reactor.advance(0.05)
    assert ej_t.value().endswith(b"</stream:stream>")
    assert not backend_t.value().endswith(b"</stream:stream>")
    _peer_closes(ej, reactor)
    assert backend_t.value().endswith(b"</stream:stream>")
    _peer_closes(backend, reactor)
    assert done.called
