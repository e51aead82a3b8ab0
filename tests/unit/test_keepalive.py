"""policy.keepalive with a fake clock (plain numbers, no reactor): whitespace and ping
timing, which stanzas answer a ping (issue 7, defect 13), dead peers, and the bound on
the ping registry."""

from __future__ import annotations

import itertools

import pytest

from s2sproxy.core.inbound import InboundState, Role
from s2sproxy.core.jid import domain_of
from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundState, OutboundStream
from s2sproxy.core.stanza import Stanza
from s2sproxy.policy.keepalive import (Keepalive, KeepaliveConfig, Ping, SendPing,
                                       SendWhitespace, StreamDead, established, ping_ends)
from tests.unit.helpers import KEYS, LOCAL, REMOTE, inbound

CONFIG = KeepaliveConfig(whitespace=60, ping=300, timeout=60)
OURS = (LOCAL, REMOTE)          # a ping we send as local.example to remote.example
BACKEND = (REMOTE, LOCAL)       # one we send to ejabberd, posing as remote.example


def keepalive(config: KeepaliveConfig = CONFIG) -> Keepalive:
    counter = itertools.count(1)
    return Keepalive(config, lambda: f"p{next(counter)}")


def ping_bytes(pid: str, frm: str, to: str) -> bytes:
    return (f"<iq type='get' id='{pid}' from='{frm}' to='{to}'>"
            f"<ping xmlns='urn:xmpp:ping'/></iq>").encode()


def answer(pid: str, frm: str, to: str, type_: str | None = "result",
           kind: str = "iq") -> Stanza:
    """A stanza as a stream delivers it: domains canonical (``domain_of``)."""
    return Stanza(kind, b"<iq/>", frm, to, type_, pid, None, domain_of(frm), domain_of(to))


def pinged(ka: Keepalive, stream: str = "s", ends=OURS, at: float = 300) -> Ping:
    """``stream`` silent since 0 and written to at ``at``: pinged at ``at``."""
    (d,) = ka.poll(stream, at, at, 0, ends)
    assert type(d) is SendPing
    return d.ping


# -- whitespace --------------------------------------------------------------------------

@pytest.mark.parametrize("ends", [OURS, None])
def test_keepalive_whitespace_after_silence_from_us(ends):
    """A single space once we have written nothing for keepalive.whitespace, on any
    stream (one-way inbound streams included)."""
    ka = keepalive()
    assert ka.poll("s", 59.9, 0, 59.9, ends) == []
    assert ka.poll("s", 60, 0, 60, ends) == [SendWhitespace()]
    assert SendWhitespace().data == b" "


# -- pings -------------------------------------------------------------------------------

def test_keepalive_ping_after_silence_from_the_peer():
    """After keepalive.ping without a byte from the peer, one ping with the injected
    id, from and to the stream's ends."""
    ka = keepalive()
    assert ka.poll("s", 299, 299, 0, OURS) == []
    (d,) = ka.poll("s", 300, 300, 0, OURS)
    assert d == SendPing(Ping("p1", LOCAL, REMOTE, 300), ping_bytes("p1", LOCAL, REMOTE))
    assert ka.outstanding("s") == Ping("p1", LOCAL, REMOTE, 300)
    assert len(ka) == 1


def test_keepalive_whitespace_and_ping_together_whitespace_first():
    """Both due on the same poll: the space, then the ping (as the shell did before)."""
    ka = keepalive()
    assert [type(d) for d in ka.poll("s", 300, 0, 0, OURS)] == [SendWhitespace, SendPing]


def test_keepalive_one_way_inbound_stream_is_never_pinged():
    """ends None (a remote's or ejabberd's one-way stream): whitespace only."""
    ka = keepalive(KeepaliveConfig(whitespace=1000, ping=300, timeout=60))
    assert ka.poll("s", 10_000, 9_999, 0, None) == []
    assert len(ka) == 0


def test_keepalive_at_most_one_outstanding_ping_per_stream():
    """While a ping waits, later polls send no other one."""
    ka = keepalive()
    pinged(ka)
    for now in (301, 330, 359.9):
        assert ka.poll("s", now, now, 0, OURS) == []
    assert len(ka) == 1


def test_keepalive_ends_are_canonical_domains():
    """The ping's ends are compared in canonical form: an answer with the stream's
    canonical domains counts although the ends were given in another case."""
    ka = keepalive()
    p = pinged(ka, ends=("Local.Example.", "REMOTE.example"))
    assert (p.frm, p.to) == (LOCAL, REMOTE)
    assert ka.answered(answer("p1", REMOTE, f"romeo@{LOCAL}")) == "s"


# -- answers -----------------------------------------------------------------------------

@pytest.mark.parametrize("type_", ["result", "error"])
def test_keepalive_answer_settles_the_ping(type_):
    """A result or error with the ping's id, from the pinged domain to the pinging
    one, names the pinged stream; its ping is settled and its id retired."""
    ka = keepalive()
    pinged(ka)
    assert ka.answered(answer("p1", REMOTE, LOCAL, type_)) == "s"
    assert ka.outstanding("s") is None and len(ka) == 0
    assert ka.poll("s", 400, 400, 0, OURS) == []      # no dead peer at 360 or later


def test_keepalive_answers_found_across_streams():
    """Two streams pinged at once (our one-way stream to ejabberd, a remote's bidi
    stream): each answer names its own stream, whichever stream delivered it."""
    ka = keepalive()
    pinged(ka, "backend", BACKEND)
    pinged(ka, "bidi", OURS)
    # ejabberd answers on its own stream, the remote on its bidi stream: the
    # registry does not care which stream carried the answer.
    assert ka.answered(answer("p2", REMOTE, LOCAL)) == "bidi"
    assert ka.answered(answer("p1", LOCAL, REMOTE)) == "backend"
    assert len(ka) == 0


@pytest.mark.parametrize("forged", [
    answer("p1", "evil.example", LOCAL),             # another domain
    answer("p1", LOCAL, REMOTE),                     # the pinging domain itself
    answer("p1", REMOTE, "other.example"),           # to a domain that did not ping
    answer("p1", REMOTE, LOCAL, "get"),              # a request, not an answer
    answer("p1", REMOTE, LOCAL, "set"),
    answer("p1", REMOTE, LOCAL, None),
    answer("p1", REMOTE, LOCAL, "result", "message"),
    answer("p2", REMOTE, LOCAL),                     # an id we never sent
    answer(None, REMOTE, LOCAL),
])
def test_keepalive_stanza_that_is_no_answer_is_ordinary(forged):
    """Anything but the real answer is an ordinary stanza: the ping still waits, and
    the stream is still declared dead in time."""
    ka = keepalive()
    pinged(ka)
    assert ka.answered(forged) is None
    assert ka.outstanding("s") is not None
    assert ka.poll("s", 360, 360, 0, OURS) == [StreamDead(REMOTE, 60)]


def test_keepalive_second_answer_is_ordinary():
    """The id is retired by its answer: a repeat of it is an ordinary stanza."""
    ka = keepalive()
    pinged(ka)
    assert ka.answered(answer("p1", REMOTE, LOCAL)) == "s"
    assert ka.answered(answer("p1", REMOTE, LOCAL)) is None


def test_keepalive_stream_answered_elsewhere_is_pinged_once_per_interval():
    """A one-way stream hears nothing itself (its answers come on the peer's stream):
    the next ping comes keepalive.ping after the answered one, not on every poll."""
    ka = keepalive()
    pinged(ka, ends=BACKEND)
    ka.answered(answer("p1", LOCAL, REMOTE))
    for now in (301, 450, 599):
        assert ka.poll("s", now, now, 0, BACKEND) == []
    (d,) = ka.poll("s", 600, 600, 0, BACKEND)
    assert type(d) is SendPing and d.ping.id == "p2"
    assert len(ka) == 1


# -- alive and dead ----------------------------------------------------------------------

def test_keepalive_any_byte_after_the_ping_settles_it():
    """A byte heard after the ping (last_rx > sent_at) proves the peer alive; the next
    ping comes keepalive.ping after that byte."""
    ka = keepalive()
    pinged(ka)
    assert ka.poll("s", 361, 361, 300.5, OURS) == []
    assert ka.outstanding("s") is None
    assert ka.poll("s", 600.4, 600.4, 300.5, OURS) == []
    (d,) = ka.poll("s", 600.5, 600.5, 300.5, OURS)
    assert d.ping.id == "p2"


def test_keepalive_byte_heard_at_the_send_instant_does_not_settle():
    """Only bytes after the ping count (last_rx == sent_at is from before it)."""
    ka = keepalive()
    pinged(ka)
    assert ka.poll("s", 360, 360, 300, OURS) == [StreamDead(REMOTE, 60)]


def test_keepalive_late_answer_after_settling_bytes_is_still_consumed():
    """Settled by other bytes, the ping's answer within keepalive.timeout is still
    ours (not an unsolicited response); after that its id is retired."""
    ka = keepalive()
    pinged(ka)
    ka.poll("s", 310, 310, 305, OURS)
    assert ka.answered(answer("p1", REMOTE, LOCAL)) == "s"
    pinged(ka, at=605)
    ka.poll("s", 610, 610, 606, OURS)
    assert len(ka) == 1
    ka.poll("s", 665, 665, 606, OURS)
    assert len(ka) == 0
    assert ka.answered(answer("p2", REMOTE, LOCAL)) is None


def test_keepalive_dead_after_timeout():
    """Neither answer nor byte keepalive.timeout after the ping: the stream is dead
    (the pinged domain and the timeout are the log facts), and its ping is dropped."""
    ka = keepalive()
    pinged(ka)
    assert ka.poll("s", 359.9, 359.9, 0, OURS) == []
    dead = ka.poll("s", 360, 360, 0, OURS)
    assert dead == [StreamDead(REMOTE, 60, "connection-timeout",
                               "no answer to keepalive ping")]
    assert ka.outstanding("s") is None and len(ka) == 0


# -- bound -------------------------------------------------------------------------------

def test_keepalive_forget_removes_the_streams_ping():
    """A closed stream takes its ping with it; its answer is then ordinary."""
    ka = keepalive()
    pinged(ka)
    ka.forget("s")
    ka.forget("never-seen")
    assert len(ka) == 0 and ka.answered(answer("p1", REMOTE, LOCAL)) is None


def test_keepalive_stream_that_stops_carrying_pings_is_forgotten():
    """Polled without ends (it can no longer carry our stanzas): its ping goes."""
    ka = keepalive()
    pinged(ka)
    ka.poll("s", 301, 301, 0, None)
    assert len(ka) == 0 and ka.outstanding("s") is None


def test_keepalive_registry_is_bounded_by_the_streams():
    """Many streams, pinged and answered over and over: never more than one entry per
    live stream, and none once they are forgotten."""
    ka = keepalive()
    streams = [f"s{i}" for i in range(200)]
    for cycle in range(1, 6):
        now = 300.0 * cycle
        for s in streams:
            (d,) = ka.poll(s, now, now, 0, OURS)
            assert len(ka._pings) <= len(streams)
            if cycle % 2:
                ka.answered(answer(d.ping.id, REMOTE, LOCAL))
        assert len(ka) <= len(streams)
        for s in streams:                      # settled: the id retires in time
            ka.poll(s, now + 60, now + 60, now + 1, OURS)
        assert len(ka) == 0
    for s in streams:
        ka.forget(s)
    assert ka._pings == {} and len(ka) == 0


def test_keepalive_duplicate_id_from_the_generator_is_not_reused():
    """Ids are unique in the registry even if the generator repeats itself."""
    ids = iter(["same", "same", "other"])
    ka = Keepalive(CONFIG, lambda: next(ids))
    assert pinged(ka, "a").id == "same"
    assert pinged(ka, "b").id == "other"


# -- which streams -----------------------------------------------------------------------

def test_keepalive_ping_ends_of_each_kind_of_stream():
    """Our outgoing streams ping from originating to receiving; a remote's bidi
    stream from our domain to the remote's; one-way inbound streams not at all."""
    out = OutboundStream(OutboundConfig(Mode.ORIGINATE, REMOTE, LOCAL, KEYS, 10000, 16))
    assert ping_ends(out) == (REMOTE, LOCAL)
    public = inbound()
    public.authenticated = {(REMOTE, LOCAL)}
    assert ping_ends(public) is None
    public.bidi = True
    assert ping_ends(public) == (LOCAL, REMOTE)
    backend = inbound(Role.BACKEND)
    backend.bidi, backend.authenticated = True, {(LOCAL, REMOTE)}
    assert ping_ends(backend) is None


def test_keepalive_only_established_streams_are_polled():
    """Open (inbound) or ready (outbound) streams we have not begun to close."""
    s = inbound()
    assert not established(s)
    s.state = InboundState.OPEN
    assert established(s)
    s.local_closed = True
    assert not established(s)
    out = OutboundStream(OutboundConfig(Mode.ORIGINATE, REMOTE, LOCAL, KEYS, 10000, 16))
    out.state = OutboundState.READY
    assert established(out)


def test_parser_idle_after_the_release_delay():
    """Rule 7: silent for PARSER_RELEASE_IDLE seconds, not a moment before."""
    from s2sproxy.core.limits import PARSER_RELEASE_IDLE
    from s2sproxy.policy.keepalive import parser_idle
    assert not parser_idle(100 + PARSER_RELEASE_IDLE - 0.1, 100)
    assert parser_idle(100 + PARSER_RELEASE_IDLE, 100)


def test_buffers_idle_needs_silence_both_ways_and_enough_bytes_since_the_renewal():
    """Rule 7: TLS buffers are renewed after PARSER_RELEASE_IDLE seconds with neither a
    read nor a write, once TLS_RENEW_MIN_BYTES moved since the last renewal."""
    from s2sproxy.core.limits import PARSER_RELEASE_IDLE as IDLE, TLS_RENEW_MIN_BYTES as N
    from s2sproxy.policy.keepalive import buffers_idle
    assert buffers_idle(100 + IDLE, 100, 90, N)
    assert not buffers_idle(100 + IDLE - 0.1, 100, 90, N)     # read lately
    assert not buffers_idle(100 + IDLE - 0.1, 90, 100, N)     # written lately
    assert not buffers_idle(100 + IDLE, 100, 90, N - 1)       # too little moved
    assert not buffers_idle(100 + IDLE, 100, 90, 0)


def test_trim_due_at_most_once_per_interval():
    from s2sproxy.core.limits import MEMORY_TRIM_INTERVAL as EVERY
    from s2sproxy.policy.keepalive import trim_due
    assert trim_due(5.0, float("-inf"))
    assert not trim_due(100 + EVERY - 0.1, 100)
    assert trim_due(100 + EVERY, 100)
