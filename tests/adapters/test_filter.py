"""[filter] on the memory reactor (issue 11): a denied remote is refused at
authentication (dialback error forbidden, SASL not-authorized, then policy-violation)
with a denied-domain flag whose peer label is never the claimed domain; ejabberd's
stanzas to it bounce not-allowed with no connection opened; a blocklist file is read,
re-read when it changes, and a stream of a newly denied remote is closed."""

from __future__ import annotations

import os

from tests.adapters.helpers import LOCAL, REMOTE, proxy, public_stream
from tests.adapters.test_connector import logged, outgoing, proxy_with  # noqa: F401


def test_denied_remote_is_refused_at_dialback(tmp_path):
    p, reactor = proxy(tmp_path, filter={"deny": ["*.remote.example"]})
    proto, t = public_stream(p, reactor, authenticate=False)
    proto.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}'>k</db:result>".encode())
    out = t.value()
    assert b"type='error'><error type='auth'><forbidden " in out or \
        b"type='error'><error type='cancel'><forbidden " in out, out
    assert b"<policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in out
    assert not proto.stream.authenticated and not proto.stream.pending_dialback
    assert p.flags.count == 1 and p.flags.last[-1]["reason"] == "denied-domain"
    assert p.metrics.value("s2sproxy_flags_total", reason="denied-domain", peer="-",
                           action="refuse") == 1


def test_denied_remote_is_refused_at_sasl_external(tmp_path):
    p, reactor = proxy(tmp_path, filter={"deny": [REMOTE]})
    proto, t = public_stream(p, reactor, authenticate=False)
    t.clear()
    proto.dataReceived(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                       b"mechanism='EXTERNAL'>=</auth>")
    out = t.value()
    assert out.startswith(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                          b"<not-authorized/></failure>"), out
    assert b"<policy-violation " in out and not proto.stream.authenticated
    assert p.metrics.value("s2sproxy_authentications_total", role="public",
                           method="external", outcome="denied-domain") == 1


def test_allowed_remote_still_federates_and_allow_mode(tmp_path):
    p, reactor = proxy(tmp_path, filter={"deny": ["spam.example"]})
    proto, _t = public_stream(p, reactor)
    assert (REMOTE, LOCAL) in proto.stream.authenticated
    (tmp_path / "b").mkdir()
    p2, reactor2 = proxy(tmp_path / "b", filter={"mode": "allow", "allow": ["friend.example"]})
    proto2, t2 = public_stream(p2, reactor2, authenticate=False)
    proto2.dataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}'>k</db:result>".encode())
    assert b"<policy-violation " in t2.value()


def test_stanzas_to_a_denied_remote_bounce_without_a_connection(tmp_path):
    p, reactor, bounced = proxy_with(
        tmp_path, filter={"deny": ["*.spam.example"]},
        remote={"x.spam.example": {"starttls": ["192.0.2.1:5269"]}})
    p.route([outgoing(1, "x.spam.example"), outgoing(2, "ok.example")])
    assert ("m1", "not-allowed", "x.spam.example may not federate with this server") \
        in bounced
    assert [c[:2] for c in reactor.tcpClients] == [] or all(
        c[0] != "192.0.2.1" for c in reactor.tcpClients)
    assert p.metrics.value("s2sproxy_flags_total", reason="denied-domain", peer="-",
                           action="bounce") == 1


def test_blocklist_file_change_closes_the_stream_of_a_newly_denied_remote(tmp_path):
    lst = tmp_path / "blocklist.txt"
    lst.write_text("# nobody yet\nspam.example\n")
    p, reactor = proxy(tmp_path, filter={"deny_files": ["blocklist.txt"]})
    proto, t = public_stream(p, reactor)
    assert (REMOTE, LOCAL) in proto.stream.authenticated
    t.clear()
    lst.write_text("spam.example\nnot a domain\n" + REMOTE + "\n")
    os.utime(lst, (1, 2))           # a new modification time, whatever the clock
    p._tick()                       # the periodic tick reads it
    assert b"<policy-violation " in t.value()
    assert p.domains.verdict(REMOTE) == f"{lst}: {REMOTE}"
    # back off the list: accepted again
    lst.write_text("spam.example\n")
    os.utime(lst, (3, 4))
    p._tick()
    assert p.domains.verdict(REMOTE) is None
    again, _t = public_stream(p, reactor, host="192.0.2.8")
    assert (REMOTE, LOCAL) in again.stream.authenticated



def test_xep0478_limits_advertised_and_a_remotes_max_bytes_honoured(tmp_path):
    """Our features after TLS carry our limits; a stanza larger than the max-bytes the
    remote advertised inside its <bidi/> is bounced policy-violation, not written."""
    p, reactor = proxy(tmp_path, limits={"max_stanza_size": 100000})
    proto, t = public_stream(p, reactor, authenticate=False)
    assert proto.stream.config.max_size == 100000
    bidi, bt = public_stream(p, reactor, host="192.0.2.9", authenticate=False)
    bidi.dataReceived(f"<bidi xmlns='urn:xmpp:bidi'><limits xmlns='urn:xmpp:stream-limits:0'>"
                      f"<max-bytes>10000</max-bytes></limits></bidi><db:result from='{REMOTE}'"
                      f" to='{LOCAL}'>k</db:result>".encode())
    assert bidi.stream.peer_max_bytes == 10000
    bounced = []
    p.bounce = lambda s, condition, text="": bounced.append((s.id, condition))
    bt.clear()
    big = outgoing(1, REMOTE)
    big.raw = b"<message>" + b"x" * 20000 + b"</message>"
    small = outgoing(2, REMOTE)
    p.route([big, small])
    assert bounced == [("m1", "policy-violation")]
    assert bt.value() == small.raw


def test_ratelimit_pauses_a_remote_and_resumes_it(tmp_path):
    """Over ratelimit.stanzas_per_second, reading from the remote's stream pauses (its
    stanzas are all delivered, later); flagged once after flag_after; ejabberd's own
    streams are never limited."""
    from tests.adapters.helpers import message
    from tests.adapters.test_backend import _ready_backend_stream
    p, reactor = proxy(tmp_path, ratelimit={"stanzas_per_second": 2, "burst_seconds": 1,
                                            "flag_after": 1})
    backend, backend_t = _ready_backend_stream(p, reactor)
    proto, t = public_stream(p, reactor)
    assert proto.rate is not None and proto.rate[0] == REMOTE
    calls = []
    t.pauseProducing = lambda: calls.append("pause")
    t.resumeProducing = lambda: calls.append("resume")
    proto.dataReceived(b"".join(message(f"a@{REMOTE}", f"b@{LOCAL}", f"s{i}")
                                for i in range(6)))
    assert calls == ["pause"] and proto.paused
    assert backend_t.value().count(b"<message") == 6      # what was read is delivered
    reactor.advance(2.0)                                   # 4 over at 2/s
    assert calls == ["pause", "resume"] and not proto.paused
    proto.dataReceived(b"".join(message(f"a@{REMOTE}", f"b@{LOCAL}", f"t{i}")
                                for i in range(6)))
    assert calls[-1] == "pause"
    held = backend_t.value().count(b"<message")
    proto.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "u"))   # while paused: held
    assert backend_t.value().count(b"<message") == held
    reactor.advance(3.5)                   # resumed (6 over at 2/s): the held read is handled
    assert backend_t.value().count(b"id='u'") == 1
    assert p.flags.last and p.flags.last[-1]["reason"] == "rate-limited"
    # ejabberd's stream: never limited
    assert backend.rate is None


def test_ratelimit_held_reads_are_handled_when_the_connection_goes(tmp_path):
    """What was read and held while paused is delivered, not lost, when the peer's
    connection ends (or we close it) before the pause is over."""
    from tests.adapters.helpers import message
    from tests.adapters.test_backend import _ready_backend_stream
    p, reactor = proxy(tmp_path, ratelimit={"bytes_per_second": 100, "burst_seconds": 1})
    backend, backend_t = _ready_backend_stream(p, reactor)
    proto, t = public_stream(p, reactor)
    t.pauseProducing = t.resumeProducing = lambda: None
    proto.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "first"))   # over 100 B
    assert proto.paused and b"id='first'" not in backend_t.value()
    proto.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "second"))
    proto.connectionLost(None)
    assert b"id='first'" in backend_t.value() and b"id='second'" in backend_t.value()


def test_malformed_peer_max_bytes_is_ignored():
    from lxml import etree
    from s2sproxy.core.stream import peer_max_bytes
    for text, want in (("262144", 262144), ("5", 10000), ("²", None), ("1" * 5000, None),
                       ("-3", None), ("", None)):
        tree = etree.fromstring(f"<f><limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>"
                                f"{text}</max-bytes></limits></f>")
        assert peer_max_bytes(tree) == want, text


def test_blocklist_that_is_no_regular_file_or_too_large_keeps_the_last_good_read(
        tmp_path, monkeypatch):
    import s2sproxy.tx.filtering as filtering
    lst = tmp_path / "blocklist.txt"
    lst.write_text(REMOTE + "\n")
    p, reactor = proxy(tmp_path, filter={"deny_files": ["blocklist.txt"]})
    assert p.domains.verdict(REMOTE) is not None
    monkeypatch.setattr(filtering, "MAX_BLOCKLIST_BYTES", 10)
    lst.write_text("spam.example\n" + REMOTE + "\n")     # 35 bytes now
    p._tick()
    assert p.domains.verdict(REMOTE) is not None          # the last good read stands
    assert p.filtering.files[lst][0] == "failed"
    lst.unlink()
    import os
    os.mkfifo(lst)                                        # would block a reader for ever
    p._tick()
    assert p.filtering.files[lst] == ("failed", "not a regular file")
    assert p.domains.verdict(REMOTE) is not None


def test_rtbl_request_that_cannot_be_delivered_is_the_rtbl_s_own_bounce(tmp_path, logged):
    """The service cannot be reached: the bounces of our subscribe and items requests
    come back to the RTBL (a retry is planned), never to ejabberd."""
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    p, reactor = proxy(tmp_path, filter={"rtbl": [{"service": "rtbl.example"}]},
                       remote={"rtbl.example": {"starttls": ["192.0.2.9:5269"]}})
    p._tick()
    link = p.to_remote.links[(LOCAL, "rtbl.example")]
    assert len(link.queue) == 2     # subscribe and items, waiting for the stream
    for _ in range(8):      # every address attempt refused
        if not reactor.tcpClients:
            break
        reactor.tcpClients.pop()[2].clientConnectionFailed(
            None, Failure(ConnectionRefusedError()))
        reactor.advance(0)
    row = p.filtering.rtbl.rows(reactor.seconds())[0]
    assert row["state"] == "failed", row
    assert row["last_error"] == "items: remote-server-not-found", row
    assert row["next_sync_in"] == 5.0       # one failed sync: the first retry delay
    assert not p.to_backend.links, "a bounce of an RTBL request went toward ejabberd"
    text = [e.get("log_format", "") for e in logged]
    assert any("request failed" in t for t in text), text


def test_filter_change_bounces_what_waits_and_refuses_a_stream_that_comes_up(tmp_path):
    """remote.example is denied while a stanza waits for its stream, the TCP connect
    still pending: the stanza bounces not-allowed at once (flagged), and the stream,
    once dialback makes it ready, is closed with policy-violation, nothing written."""
    from s2sproxy.core import events as E
    from s2sproxy.policy.domains import parse_entry
    from tests.adapters.test_connector import FakeDns, REMOTE_SRV, connect, header
    fake = FakeDns(REMOTE_SRV, a={b"xmpp.remote.example": ["192.0.2.1"]})
    p, reactor, bounced = proxy_with(tmp_path, fake)
    p.start_tls = lambda proto, server_name: None
    p.route([outgoing(1)])
    assert bounced == [] and len(reactor.tcpClients) == 1
    p.filtering.configure(("deny", [], [parse_entry("remote.example")]), [])
    assert bounced == [("m1", "not-allowed",
                        "remote.example may not federate with this server")]
    assert p.flags.last[-1]["reason"] == "denied-domain"
    proto, t = connect(reactor)
    ns_tls = "urn:ietf:params:xml:ns:xmpp-tls"
    proto.dataReceived(header("remote.example") + f"<stream:features><starttls "
                       f"xmlns='{ns_tls}'/></stream:features><proceed xmlns='{ns_tls}'/>"
                       .encode())
    proto.handle(E.TlsEstablished(False, None))
    t.clear()
    proto.dataReceived(header("remote.example", "r2") + b"<stream:features><dialback "
                       b"xmlns='urn:xmpp:features:dialback'/></stream:features>")
    proto.dataReceived(b"<db:result from='remote.example' to='local.example' "
                       b"type='valid'/>")
    out = t.value()
    assert b"<policy-violation " in out, out
    assert p.to_remote.ready_handle((LOCAL, "remote.example")) is None
