"""Keepalive pings through the Proxy on the memory reactor: which answers count (issue
7, defect 13), on which stream they may arrive, and what a dead peer leaves behind."""

from __future__ import annotations

import re

import pytest
from twisted.logger import formatEvent, globalLogPublisher

from s2sproxy.core import actions as A
from s2sproxy.core.inbound import Role
from s2sproxy.core.stanza import Stanza
from tests.adapters.helpers import LOCAL, REMOTE, Transport, message, proxy, public_stream
from tests.adapters.test_backend import _ready_backend_stream

KA = {"whitespace": 1000, "ping": 10, "timeout": 5}
PING = re.compile(rb"<iq type='get' id='([^']+)' from='([^']+)' to='([^']+)'>"
                  rb"<ping xmlns='urn:xmpp:ping'/></iq>")
EJ_HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
             b"streams' xmlns:db='jabber:server:dialback' from='local.example' "
             b"to='remote.example' version='1.0'>")
TIMEOUT = b"<connection-timeout xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"


def iq(frm: str, to: str, id_: str, type_: str = "result") -> bytes:
    return f"<iq type='{type_}' id='{id_}' from='{frm}' to='{to}'/>".encode()


def pinged_backend(tmp_path):
    """Our backend stream remote.example -> local.example, pinged after 10 s of
    silence (5 s to answer); ejabberd's own streams are trusted from 127.0.0.1."""
    p, reactor = proxy(tmp_path, keepalive=KA,
                       backend={"trusted_addresses": ["127.0.0.1"]})
    proto, transport = _ready_backend_stream(p, reactor)
    reactor.advance(10)
    p._keepalive(reactor.seconds())
    m = PING.fullmatch(transport.value())
    assert m is not None, transport.value()
    assert m.group(2, 3) == (REMOTE.encode(), LOCAL.encode())
    transport.clear()
    return p, reactor, proto, transport, m.group(1).decode()


def backend_in(p, reactor):
    """ejabberd's own outgoing stream local.example -> remote.example, authenticated
    by its source address."""
    proto = p.listener(Role.BACKEND, False).buildProtocol(None)
    transport = Transport("127.0.0.1", 40001)
    proto.makeConnection(transport)
    proto.dataReceived(EJ_HEADER + b"<db:result from='local.example' "
                       b"to='remote.example'>key</db:result>")
    assert (LOCAL, REMOTE) in proto.stream.authenticated
    transport.clear()
    return proto, transport


def bidi_public_stream(p, reactor, remote: str = REMOTE):
    """remote's authenticated bidi stream to us (certificate, XEP-0288)."""
    proto, transport = public_stream(p, reactor, remote, authenticate=False)
    proto.dataReceived(f"<bidi xmlns='urn:xmpp:bidi'/><db:result from='{remote}' "
                       f"to='{LOCAL}'>k</db:result>".encode())
    assert proto.stream.bidi and (remote, LOCAL) in proto.stream.authenticated
    transport.clear()
    return proto, transport


@pytest.mark.parametrize("sender", ["evil.example", REMOTE])
def test_keepalive_forged_answer_is_an_ordinary_stanza(tmp_path, sender):
    """A result with our ping's id from a domain other than the pinged one (another
    remote, or the pinging domain itself) is not consumed: it is classified and
    routed like any stanza (unsolicited-iq-response), and the pinged stream is still
    declared dead when its time is up."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    forger, _ = public_stream(p, reactor, sender)
    forger.dataReceived(iq(sender, LOCAL, pid))
    assert p.flags.count == 1
    if sender == REMOTE:    # forwarded to ejabberd on the pinged stream itself
        assert transport.value() == iq(sender, LOCAL, pid)
    else:                   # waiting for a backend stream of its own
        assert [s.id for s, _ in p.to_backend.links[(sender, LOCAL)].queue] == [pid]
    assert p.keepalive.outstanding(proto) is not None
    reactor.advance(5)
    p._keepalive(reactor.seconds())
    assert TIMEOUT in transport.value() and proto.closing


def test_keepalive_guessed_sequential_id_is_not_ours(tmp_path):
    """Ping ids are random: the old sequential id, even from the right domain on the
    right stream, is an ordinary (unsolicited) response."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    assert pid != "s2sproxy-ping-1"
    ej, _ = backend_in(p, reactor)
    ej.dataReceived(iq(LOCAL, REMOTE, "s2sproxy-ping-1"))
    assert p.flags.count == 1
    assert p.keepalive.outstanding(proto) is not None


def test_keepalive_answer_on_the_peers_own_stream_keeps_link(tmp_path):
    """ejabberd answers our ping on its own outgoing stream: the answer is consumed
    (never routed, never flagged) and the backend stream outlives the timeout."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    ej, _ = backend_in(p, reactor)
    ej.dataReceived(iq(LOCAL, REMOTE, pid))
    assert p.flags.count == 0 and len(p.keepalive) == 0
    assert (LOCAL, REMOTE) not in p.to_remote.links
    reactor.advance(6)
    p._keepalive(reactor.seconds())
    assert not proto.closing and transport.value() == b""


def test_keepalive_error_answer_counts(tmp_path):
    """An error answer (e.g. service-unavailable from a server without XEP-0199) also
    proves the peer alive."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    ej, _ = backend_in(p, reactor)
    ej.dataReceived(iq(LOCAL, REMOTE, pid, "error"))
    assert p.flags.count == 0 and p.keepalive.outstanding(proto) is None


def test_keepalive_answer_on_the_same_bidi_stream_is_consumed(tmp_path):
    """On a remote's bidi stream the ping goes local -> remote; its answer on that
    stream is consumed while the message after it in the same read is routed."""
    p, reactor = proxy(tmp_path, keepalive=KA)
    proto, transport = bidi_public_stream(p, reactor)
    reactor.advance(10)
    p._keepalive(reactor.seconds())
    m = PING.fullmatch(transport.value())
    assert m is not None and m.group(2, 3) == (LOCAL.encode(), REMOTE.encode())
    proto.dataReceived(iq(REMOTE, LOCAL, m.group(1).decode())
                       + message(f"a@{REMOTE}", f"b@{LOCAL}", "m1"))
    assert [s.id for s, _ in p.to_backend.links[(REMOTE, LOCAL)].queue] == ["m1"]
    assert p.flags.count == 0 and len(p.keepalive) == 0


def test_keepalive_unanswered_ping_ends_stream_with_log_and_metric(tmp_path):
    """No answer and no byte within keepalive.timeout: connection-timeout, the README's
    log line, s2sproxy_dead_peers_total{peer} counted, and the ping forgotten."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        reactor.advance(5)
        p._keepalive(reactor.seconds())
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert TIMEOUT in transport.value() and proto.closing
    lines = [formatEvent(e) for e in seen if "dead" in e.get("log_format", "")]
    assert lines == ["backend stream 192.168.1.1:54321 to local.example dead: no answer "
                     "to a keepalive ping in 5 s"]
    assert p.metrics.registry.get_sample_value(
        "s2sproxy_dead_peers_total", {"peer": LOCAL}) == 1
    assert len(p.keepalive) == 0


def test_keepalive_any_byte_after_the_ping_keeps_stream(tmp_path):
    """Anything heard on the pinged stream after the ping (a whitespace keepalive
    here) proves the peer alive; the answer arriving later is still consumed."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    reactor.advance(1)
    proto.dataReceived(b" ")
    reactor.advance(3)
    p._keepalive(reactor.seconds())
    assert p.keepalive.outstanding(proto) is None
    ej, _ = backend_in(p, reactor)
    ej.dataReceived(iq(LOCAL, REMOTE, pid))
    assert p.flags.count == 0
    reactor.advance(2)
    p._keepalive(reactor.seconds())
    assert not proto.closing and transport.value() == b""


def test_keepalive_closed_stream_forgets_its_ping(tmp_path):
    """A stream that closes takes its outstanding ping out of the registry."""
    p, reactor, proto, transport, pid = pinged_backend(tmp_path)
    assert len(p.keepalive) == 1
    proto.connectionLost(None)
    assert len(p.keepalive) == 0


def test_keepalive_answer_is_no_traffic_for_an_idle_link(tmp_path):
    """An answer to our ping on our own (bidi) stream to a remote does not keep the
    link from idling out; a message in the same read does."""
    p, reactor = proxy(tmp_path, keepalive=KA)
    pair = (LOCAL, REMOTE)
    ours = type("P", (), {"factory": type("F", (), {"label": "remote", "pair": pair})(),
                          "closing": False})()
    p.to_remote.stream_ready(pair, ours, 0)
    (ping,) = p.keepalive.poll(ours, 10, 10, 0, pair)
    reactor.advance(12)
    result = Stanza("iq", b"<iq/>", REMOTE, LOCAL, "result", ping.ping.id, None, REMOTE,
                    LOCAL)
    p.stream_action(ours, A.DeliverStanzas([result]))
    assert p.to_remote.links[pair].last_used == 0 and len(p.keepalive) == 0
    p.stream_action(ours, A.DeliverStanzas([Stanza(
        "message", message(f"a@{REMOTE}", f"b@{LOCAL}", "m1"), f"a@{REMOTE}", f"b@{LOCAL}",
        "chat", "m1", None, REMOTE, LOCAL)]))
    assert p.to_remote.links[pair].last_used == 12


def test_idle_stream_drops_its_parser_and_reads_on(tmp_path):
    """A public stream silent for PARSER_RELEASE_IDLE seconds holds no expat parser
    after the keepalive tick (issue 9, memory); the next stanza is read by a new one and
    routed as before; a stream heard from recently keeps its parser."""
    from s2sproxy.core.limits import PARSER_RELEASE_IDLE
    p, reactor = proxy(tmp_path, keepalive=KA)
    idle, _t = public_stream(p, reactor)
    busy, _t2 = public_stream(p, reactor, remote="other.example", port=40001)
    reactor.advance(PARSER_RELEASE_IDLE - 1)
    busy.dataReceived(b" ")
    reactor.advance(1)
    p._keepalive(reactor.seconds())
    assert not idle.stream.parser.holds_parser
    assert busy.stream.parser.holds_parser
    routed = []
    p.route = lambda stanzas, source=None: routed.extend(stanzas)
    idle.dataReceived(message(f"juliet@{REMOTE}", f"romeo@{LOCAL}", "m1"))
    assert [s.id for s in routed] == ["m1"]
    assert routed[0].raw == message(f"juliet@{REMOTE}", f"romeo@{LOCAL}", "m1")
