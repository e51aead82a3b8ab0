"""Two served domains talking to one remote over one connection (XEP-0220 sender
multiplexing), through the Proxy on Twisted's memory reactor: the second domain's
db:result on the ready stream, its stanzas written only after 'valid', the remote's
bidi stanzas to it, a refusal, the stream closing, and outgoing.multiplex = false."""

from __future__ import annotations

import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from s2sproxy.config import parse
from s2sproxy.core import events as E
from s2sproxy.core.stanza import Stanza
from s2sproxy.tx.service import Proxy
from tests.unit.helpers import certificate
from tests.unit.test_config import pem

LOCAL, OTHER, REMOTE = "local.example", "other.example", "remote.example"
NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
FEATURES = (b"<stream:features><bidi xmlns='urn:xmpp:features:bidi'/><dialback "
            b"xmlns='urn:xmpp:features:dialback'><errors/></dialback></stream:features>")


def proxy(tmp_path, **tables):
    """local.example and other.example served; remote.example at a static address."""
    domains = []
    for name in (LOCAL, OTHER):
        _ca, _ck, leaf, key = certificate(name)
        (tmp_path / f"{name}.crt").write_bytes(pem(leaf))
        (tmp_path / f"{name}.key").write_bytes(pem(key))
        domains.append({"name": name, "certificate": f"{name}.crt", "key": f"{name}.key"})
    settings = parse(dict({
        "secret_file": "secret", "domain": domains,
        "dns": {"nameservers": ["127.0.0.1:1"]},
        "remote": {REMOTE: {"starttls": ["192.0.2.1:5269"]}},
    }, **tables), base=tmp_path)
    reactor = MemoryReactorClock()
    p = Proxy(settings, reactor)
    p.start_tls = lambda proto, server_name: None       # TLS itself is not under test
    return p, reactor


@pytest.fixture
def logged():
    lines: list[str] = []

    def observe(event):
        lines.append(formatEvent(event))
    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def header(sid: str) -> bytes:
    return (f"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
            f"streams' xmlns:db='jabber:server:dialback' from='{REMOTE}' to='{LOCAL}' "
            f"id='{sid}' version='1.0'>").encode()


def message(local: str, n: int) -> Stanza:
    raw = f"<message from='u@{local}' to='v@{REMOTE}' type='chat' id='m{n}'/>".encode()
    return Stanza("message", raw, f"u@{local}", f"v@{REMOTE}", "chat", f"m{n}", None,
                  local, REMOTE)


def remote_connections(reactor) -> list:
    return [c for c in reactor.tcpClients if c[:2] == ("192.0.2.1", 5269)]


def ready_stream(p, reactor, index: int = 0, features: bytes = FEATURES):
    """Our stream for local.example -> remote.example (the remote's index-th
    connection attempt), through STARTTLS and dialback, bidi negotiated."""
    factory = remote_connections(reactor)[index][2]
    proto = factory.buildProtocol(None)
    wire = StringTransport(hostAddress=IPv4Address("TCP", "192.0.2.100", 40000 + index),
                           peerAddress=IPv4Address("TCP", "192.0.2.1", 5269))
    proto.makeConnection(wire)
    proto.dataReceived(header("r1") + f"<stream:features><starttls xmlns='{NS_TLS}'/>"
                       f"</stream:features><proceed xmlns='{NS_TLS}'/>".encode())
    proto.handle(E.TlsEstablished(False, None))
    proto.dataReceived(header("r2") + features)
    key = p.keys.key(REMOTE, LOCAL, "r2")
    limits = (f"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>{p.settings.max_stanza_size}"
              f"</max-bytes></limits>")
    assert wire.value().endswith(f"<bidi xmlns='urn:xmpp:bidi'>{limits}</bidi><db:result "
                                 f"from='{LOCAL}' to='{REMOTE}'>{key}</db:result>".encode())
    proto.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>".encode())
    return proto, wire


def valid(local: str) -> bytes:
    return f"<db:result from='{REMOTE}' to='{local}' type='valid'/>".encode()


def test_two_served_domains_share_one_connection_to_the_remote(tmp_path, logged):
    """other.example's first stanza to remote.example opens no connection: its
    db:result (XEP-0185 key over the stream's id) goes on local.example's ready
    stream, its stanzas wait, and after 'valid' they go on that stream; on this bidi
    stream the remote may then send to other.example, which is routed to ejabberd.
    Two log lines say so."""
    p, reactor = proxy(tmp_path)
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    assert wire.value().endswith(message(LOCAL, 1).raw)
    wire.clear()
    p.route([message(OTHER, 2)])
    p.route([message(OTHER, 3)])
    assert len(remote_connections(reactor)) == 1
    key = p.keys.key(REMOTE, OTHER, "r2")
    assert wire.value() == f"<db:result from='{OTHER}' to='{REMOTE}'>{key}</db:result>" \
        .encode()
    wire.clear()
    p.route([message(LOCAL, 4)])                  # local.example goes on meanwhile
    assert wire.value() == message(LOCAL, 4).raw
    wire.clear()
    proto.dataReceived(valid(OTHER))
    assert wire.value() == message(OTHER, 2).raw + message(OTHER, 3).raw
    assert sorted(p.to_remote.pairs_of(proto)) == [(LOCAL, REMOTE), (OTHER, REMOTE)]
    proto.dataReceived(f"<message from='v@{REMOTE}' to='u@{OTHER}' type='chat' id='r1'/>"
                       .encode())
    assert not proto.closing
    assert [c[:2] for c in reactor.tcpClients][-1] == ("127.0.0.1", 15269)
    assert [s.id for s, _ in p.to_backend.links[(REMOTE, OTHER)].queue] == ["r1"]
    assert len(remote_connections(reactor)) == 1
    assert "remote stream r2 multiplexing other.example -> remote.example (dialback) " \
           "peer=192.0.2.1:5269" in logged
    assert "remote stream r2 multiplexing other.example -> remote.example: valid" in logged


def test_multiplexed_pair_refused_bounces_and_the_stream_carries_on(tmp_path, logged):
    """A dialback error for other.example bounces what waited for it with
    remote-server-timeout (XEP-0220), logs one line, and local.example's stanzas still
    go on the stream; other.example's next stanza opens a connection of its own."""
    p, reactor = proxy(tmp_path)
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition, text))
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    wire.clear()
    proto.dataReceived(f"<db:result from='{REMOTE}' to='{OTHER}' type='error'><error "
                       f"type='cancel'><not-authorized xmlns='urn:ietf:params:xml:ns:"
                       f"xmpp-stanzas'/></error></db:result>".encode())
    assert bounced == [("m2", "remote-server-timeout",
                        "dialback error from remote.example: not-authorized")]
    assert wire.value() == b"" and not proto.closing
    p.route([message(LOCAL, 3)])
    assert wire.value() == message(LOCAL, 3).raw
    p.route([message(OTHER, 4)])
    assert len(remote_connections(reactor)) == 2
    assert [line for line in logged if "multiplexing other.example" in line][-1] == (
        "remote stream r2 multiplexing other.example -> remote.example: error "
        "not-authorized (dialback error from remote.example: not-authorized)")


def test_multiplexed_stream_closing_reopens_each_pair(tmp_path):
    """The shared stream goes away: each pair on it opens a new stream with its next
    stanza (nothing is bounced)."""
    p, reactor = proxy(tmp_path)
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append(s.id)
    p.route([message(LOCAL, 1)])
    proto, _wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    proto.dataReceived(valid(OTHER))
    proto.connectionLost(None)
    assert p.to_remote.pairs_of(proto) == []
    p.route([message(OTHER, 3)])
    assert len(remote_connections(reactor)) == 2
    assert bounced == []


def test_peer_without_the_dialback_feature_gets_a_connection_per_domain_pair(tmp_path):
    """A remote that offers no dialback feature (an RFC 3920 server, which may end the
    stream over a further db:result) is not multiplexed to."""
    p, reactor = proxy(tmp_path)
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor, features=re.sub(
        rb"<dialback xmlns='urn:xmpp:features:dialback'>.*?</dialback>", b"", FEATURES))
    wire.clear()
    p.route([message(OTHER, 2)])
    assert len(remote_connections(reactor)) == 2
    assert wire.value() == b""


def test_multiplex_false_opens_a_connection_per_domain_pair(tmp_path):
    """outgoing.multiplex = false: today's behaviour, one connection per pair."""
    p, reactor = proxy(tmp_path, outgoing={"multiplex": False})
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    wire.clear()
    p.route([message(OTHER, 2)])
    assert len(remote_connections(reactor)) == 2
    assert wire.value() == b""


def test_multiplexed_pair_invalid_retires_the_stream_without_losing_anything(tmp_path,
                                                                              logged):
    """'invalid' for other.example: what waited for it bounces with
    internal-server-error; the stream is closed cleanly (the remote MUST close it, and
    we SHOULD NOT write for other pairs on it), local.example's next stanza waits for
    the close to complete and then goes on a new connection."""
    p, reactor = proxy(tmp_path)
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition))
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    wire.clear()
    proto.dataReceived(f"<db:result from='{REMOTE}' to='{OTHER}' type='invalid'/>"
                       .encode())
    assert bounced == [("m2", "internal-server-error")]
    assert wire.value() == b"</stream:stream>"
    p.route([message(LOCAL, 3)])
    assert wire.value() == b"</stream:stream>" and len(remote_connections(reactor)) == 1
    proto.dataReceived(b"</stream:stream>")
    assert len(remote_connections(reactor)) == 2
    _proto2, wire2 = ready_stream(p, reactor, 1)
    assert wire2.value().endswith(message(LOCAL, 3).raw)
    assert bounced == [("m2", "internal-server-error")]
    assert "remote stream r2 retired: remote.example refused other.example's dialback " \
           "key (the remote closes the stream after 'invalid')" in logged


def test_multiplexed_pair_invalid_after_its_timeout_retires_the_stream(tmp_path, logged):
    """The remote answers 'invalid' for other.example after our timeouts.auth (its
    stanzas were bounced then): the remote closes the stream after 'invalid', so it
    retires all the same: closed cleanly, local.example's next stanza waits for the
    close and goes on a new connection, nothing more is bounced."""
    p, reactor = proxy(tmp_path)
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition))
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    reactor.advance(p.settings.auth_timeout + 1)          # the pair's timer fires
    assert bounced == [("m2", "remote-server-timeout")]
    wire.clear()
    proto.dataReceived(f"<db:result from='{REMOTE}' to='{OTHER}' type='invalid'/>"
                       .encode())
    assert wire.value() == b"</stream:stream>"
    p.route([message(LOCAL, 3)])                          # the remote is closing it
    assert wire.value() == b"</stream:stream>"
    proto.dataReceived(b"</stream:stream>")
    _proto2, wire2 = ready_stream(p, reactor, 1)
    assert wire2.value().endswith(message(LOCAL, 3).raw)
    assert bounced == [("m2", "remote-server-timeout")]
    assert "remote stream r2 retired: remote.example refused other.example's dialback " \
           "key (the remote closes the stream after 'invalid')" in logged


def test_multiplexed_pair_valid_after_its_timeout_then_bidi_stanza_is_routed(tmp_path):
    """A slow remote answers 'valid' for other.example after our timeouts.auth (its
    stanzas were bounced then), and then, over bidi, sends to other.example: the
    stanza is routed to ejabberd, and the stream carrying local.example stays."""
    p, reactor = proxy(tmp_path)
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition))
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    reactor.advance(p.settings.auth_timeout + 1)          # the pair's timer fires
    assert bounced == [("m2", "remote-server-timeout")]
    proto.dataReceived(valid(OTHER))                      # the remote's late answer
    proto.dataReceived(f"<message from='v@{REMOTE}' to='u@{OTHER}' type='chat' "
                       f"id='r1'/>".encode())
    assert not proto.closing
    assert [s.id for s, _ in p.to_backend.links[(REMOTE, OTHER)].queue] == ["r1"]
    wire.clear()
    p.route([message(LOCAL, 3)])
    assert wire.value() == message(LOCAL, 3).raw


def test_one_batch_for_two_pairs_on_one_stream_is_one_write(tmp_path):
    """One read's stanzas of two pairs carried by one stream of ours reach its
    transport in one write (one TLS record), each pair's stanzas in order."""
    p, reactor = proxy(tmp_path)
    p.route([message(LOCAL, 1)])
    proto, wire = ready_stream(p, reactor)
    p.route([message(OTHER, 2)])
    proto.dataReceived(valid(OTHER))
    assert sorted(p.to_remote.pairs_of(proto)) == [(LOCAL, REMOTE), (OTHER, REMOTE)]
    wire.clear()
    writes = []
    wire.write = writes.append
    p.route([message(LOCAL, 3), message(OTHER, 4), message(LOCAL, 5)])
    assert writes == [message(LOCAL, 3).raw + message(LOCAL, 5).raw
                      + message(OTHER, 4).raw]
