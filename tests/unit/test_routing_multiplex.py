"""The router's side of XEP-0220 sender multiplexing: a further pair toward a remote
that one of our ready streams can take is asked for on it instead of opening a
connection; what waits is written only once that stream is verified for the pair;
fallbacks (not shareable, the bound, a failure), the shared stream closing, idling,
retiring, and the per-pair rule under random sequences."""

from __future__ import annotations

import re
import sys

from hypothesis import example, given, settings, strategies as hs

from s2sproxy.core.routing import (Bounce, Close, LinkState, Multiplex, Open, Router,
                                   Write)
from s2sproxy.core.stanza import Stanza

R = "remote.example"
A = ("local.example", R)
B = ("other.example", R)
C = ("third.example", R)
ELSEWHERE = ("other.example", "elsewhere.example")


def st(pair, n: int) -> Stanza:
    tag = {A: "a", B: "b", C: "c"}.get(pair, "x")
    return Stanza("message", f"<{tag}{n}/>".encode(), f"u@{pair[0]}", f"v@{pair[1]}",
                  "chat", f"{tag}{n}", None, *pair)


def router(**kw) -> Router:
    args = dict(queue_limit=10, max_age=10, idle_timeout=60, backoff_after=2,
                backoff_base=5, backoff_max=40, max_pairs=64, holdoff=100)
    args.update(kw)
    return Router(**args)


def shared(**kw) -> Router:
    """A router whose stream "s" is ready for A and may take further pairs."""
    r = router(**kw)
    r.send(A, [st(A, 1)], 0)
    assert r.stream_ready(A, "s", 0, shareable=True) == [Write("s", b"<a1/>")]
    return r


def test_router_second_pair_to_the_remote_is_asked_for_on_the_ready_stream():
    """B -> the same remote: no new connection, the pair is asked for on "s"; its
    stanzas wait (nothing written) until "s" is verified for B, then go in one write."""
    r = shared()
    assert r.send(B, [st(B, 1)], 1) == [Multiplex(B, "s")]
    assert r.send(B, [st(B, 2)], 2) == []
    assert r.links[B].state is LinkState.CONNECTING
    assert r.send(A, [st(A, 2)], 2) == [Write("s", b"<a2/>")]      # A goes on meanwhile
    assert r.pair_ready(B, "s", 3) == [Write("s", b"<b1/><b2/>")]
    assert r.send(B, [st(B, 3)], 4) == [Write("s", b"<b3/>")]
    assert sorted(r.pairs_of("s")) == [A, B]


def test_router_multiplexing_needs_a_shareable_stream_of_ours_to_the_same_remote():
    """A new connection as before when the ready stream is not shareable (its peer
    advertised no dialback, ...), goes to another remote, is the remote's bidi stream
    (borrowed), or multiplexing is off (max_pairs 1)."""
    r = router()
    r.stream_ready(A, "s", 0, shareable=False)
    assert r.send(B, [st(B, 1)], 1) == [Open(B)]
    r = shared()
    assert r.send(ELSEWHERE, [st(ELSEWHERE, 1)], 1) == [Open(ELSEWHERE)]
    r = router()
    r.stream_ready(A, "bidi", 0, borrowed=True, shareable=True)
    assert r.send(B, [st(B, 1)], 1) == [Open(B)]
    r = shared(max_pairs=1)
    assert r.send(B, [st(B, 1)], 1) == [Open(B)]


def test_router_multiplexing_bound_opens_a_new_connection_beyond_it():
    """At most max_pairs pairs per stream, the first and the waiting ones included;
    the next pair opens a connection of its own, which then takes pairs in turn."""
    r = shared(max_pairs=2)
    assert r.send(B, [st(B, 1)], 1) == [Multiplex(B, "s")]
    assert r.send(C, [st(C, 1)], 1) == [Open(C)]
    r.stream_ready(C, "t", 2, shareable=True)
    d = ("fourth.example", R)
    assert r.send(d, [st(d, 1)], 3) == [Multiplex(d, "t")]


def test_router_multiplexed_pair_failure_bounces_and_holds_multiplexing_off():
    """The remote refused the pair (invalid, error, no answer): what waited bounces
    with the stream's condition and it counts as a failed attempt; toward that remote
    no pair is multiplexed for ``holdoff`` seconds (a new connection instead)."""
    r = shared()
    r.send(B, [st(B, 1), st(B, 2)], 1)
    ops = r.pair_failed(B, "s", "remote-server-timeout", "dialback error: x", 2)
    assert [(o.stanza.id, o.condition, o.text) for o in ops] == [
        ("b1", "remote-server-timeout", "dialback error: x"),
        ("b2", "remote-server-timeout", "dialback error: x")]
    assert r.links[B].failures == 1 and r.links[B].state is LinkState.IDLE
    assert r.send(B, [st(B, 3)], 3) == [Open(B)]
    assert r.send(C, [st(C, 1)], 3) == [Open(C)]
    assert r.send(A, [st(A, 2)], 3) == [Write("s", b"<a2/>")]     # A is not touched
    d = ("fourth.example", R)
    assert r.send(d, [st(d, 1)], 102) == [Multiplex(d, "s")]       # holdoff is over


def test_router_pair_not_tried_opens_its_own_stream_and_keeps_the_queue():
    """The stream could not ask (it began closing, hit its bound): nothing was refused,
    nothing bounces, the pair opens a connection of its own."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    assert r.pair_failed(B, "s", "", "the stream is closing", 1, tried=False) == [Open(B)]
    assert r.stream_ready(B, "u", 2) == [Write("u", b"<b1/>")]


def test_router_shared_stream_closing_reopens_every_pair_on_demand():
    """The shared stream goes: each pair on it is a link whose stream closed (rule 4):
    waiting stanzas reopen, an idle pair opens again with its next stanza.  A pair
    still waiting for its answer gets a connection of its own (keeping its queue),
    and multiplexing toward the remote is held off (the remote may have closed the
    stream over our db:result)."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.pair_ready(B, "s", 1)
    r.send(C, [st(C, 1)], 2)
    assert r.stream_closed("s", 3) == [Open(C)]
    assert r.pairs_of("s") == []
    assert r.send(A, [st(A, 2)], 4) == [Open(A)]
    r.stream_ready(A, "s2", 5, shareable=True)
    assert r.send(B, [st(B, 2)], 5) == [Open(B)]          # held off
    assert r.stream_ready(C, "c", 6) == [Write("c", b"<c1/>")]


def test_router_shared_stream_closing_with_only_ready_pairs_holds_nothing_off():
    """A shared stream that closes with no pair waiting for its answer (an idle close,
    a restart) says nothing against multiplexing: the next pairs multiplex again."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.pair_ready(B, "s", 1)
    assert r.stream_closed("s", 2) == []
    assert r.send(A, [st(A, 2)], 3) == [Open(A)]
    r.stream_ready(A, "s2", 4, shareable=True)
    assert r.send(B, [st(B, 2)], 5) == [Multiplex(B, "s2")]


def from_remote(pair, n: int) -> Stanza:
    """A stanza the remote sent to ``pair``'s local domain (on a bidi stream)."""
    return Stanza("message", f"<r{n}/>".encode(), f"v@{pair[1]}", f"u@{pair[0]}", "chat",
                  f"r{n}", None, pair[1], pair[0])


def test_router_shared_stream_closes_only_when_every_pair_on_it_is_idle():
    """Idle close is per stream: "s" stays while any pair on it has traffic (the
    remote's stanzas to a pair's domain count, ``activity_from``), and is closed once
    when all have been idle for idle_timeout."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.pair_ready(B, "s", 1)
    r.activity_from([from_remote(B, 1), from_remote(B, 2)], 50)
    assert r.tick(60) == []                 # A idle, B not: "s" stays
    assert r.send(A, [st(A, 2)], 61) == [Write("s", b"<a2/>")]
    assert r.tick(110) == []                # B idle now, A not
    assert r.tick(121) == [Close("s")]
    assert r.links.get(A) is None or r.links[A].state is LinkState.IDLE
    assert r.send(B, [st(B, 2)], 122) == [Open(B)]


def test_router_shared_stream_with_a_waiting_pair_is_not_idle():
    """A pair waiting for its answer on "s" keeps it open even if A is idle."""
    r = shared()
    r.send(B, [st(B, 1)], 55)
    assert r.tick(60) == []
    r.pair_failed(B, "s", "remote-server-timeout", "", 61)
    assert r.tick(62) == [Close("s")]


def test_router_remote_bidi_does_not_take_a_pair_off_a_shared_stream():
    """Rule 2 drains and closes a stream of ours for the remote's bidi stream; a shared
    stream carries other pairs, so the pair stays on it and nothing is closed."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.pair_ready(B, "s", 1)
    assert r.stream_ready(B, "bidi", 2, borrowed=True) == []
    assert r.send(B, [st(B, 2)], 3) == [Write("s", b"<b2/>")]


def test_router_remote_bidi_while_the_pair_waits_then_late_valid_closes_nothing():
    """The remote's bidi stream comes while B waits for its answer on "s": B's queue
    goes on the bidi stream; the late 'valid' on "s" leaves B there and does not close
    "s", which still carries A."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    assert r.stream_ready(B, "bidi", 2, borrowed=True) == [Write("bidi", b"<b1/>")]
    assert r.pair_ready(B, "s", 3) == []
    assert r.send(B, [st(B, 2)], 4) == [Write("bidi", b"<b2/>")]
    assert r.send(A, [st(A, 2)], 4) == [Write("s", b"<a2/>")]
    assert r.pairs_of("s") == [A]


def test_router_pair_answers_for_the_wrong_stream_or_pair_write_nothing():
    """A 'valid' reported from a stream the pair was not asked for on, for a pair never
    asked for, or after the stream closed, makes nothing ready there."""
    r = shared()
    r.stream_ready(("x.example", R), "t", 0, shareable=True)
    r.send(B, [st(B, 1)], 1)
    assert r.pair_ready(B, "t", 2) == []
    assert r.pair_ready(C, "s", 2) == []
    assert r.links[B].state is LinkState.CONNECTING
    r.stream_closed("s", 3)
    assert r.pair_ready(B, "s", 4) == []
    assert r.send(C, [st(C, 1)], 5)[0] != Write("s", b"<c1/>")


def test_router_retired_stream_drains_its_pairs_then_they_reopen():
    """The stream retires (the remote refused a pair with 'invalid'): it is closed
    cleanly; its ready pairs write nothing more on it and wait until it has closed
    (rule 2's drain), then reopen; a pair waiting for its answer there opens its
    own connection at once."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.pair_ready(B, "s", 1)
    r.send(C, [st(C, 1)], 2)
    ops = r.retire("s", 3)
    assert ops == [Open(C), Close("s")]
    assert r.send(A, [st(A, 2)], 4) == []
    assert r.links[A].state is LinkState.DRAINING
    assert r.stream_closed("s", 5) == [Open(A)]
    assert r.stream_ready(A, "s2", 6, shareable=True) == [Write("s2", b"<a2/>")]


def test_router_shutdown_while_a_pair_waits_bounces_it_and_opens_nothing():
    """Rule 6 holds for a pair asked for on a shared stream: its queue bounces, and
    when the stream then retires or closes, nothing is opened for it."""
    r = shared()
    r.send(B, [st(B, 1)], 1)
    assert [(o.stanza.id, o.condition) for o in r.shutdown()] == [
        ("b1", "remote-server-timeout")]
    assert r.retire("s", 2) == [Close("s")]
    r = shared()
    r.send(B, [st(B, 1)], 1)
    r.shutdown()
    assert r.stream_closed("s", 2) == []



def drained_into_a_late_attempt() -> Router:
    """A is ready on our "X" when an older attempt of ours for A, "H", comes up late:
    rule 2 closes "X" and A drains into "H"."""
    r = router()
    r.send(A, [st(A, 1)], 0)                                  # Open(A): attempt "H"
    assert r.stream_ready(A, "S", 1, borrowed=True) == [Write("S", b"<a1/>")]
    r.stream_closed("S", 2)                                   # the remote's bidi goes
    assert r.send(A, [st(A, 2)], 3) == [Open(A)]              # attempt "X"
    assert r.stream_ready(A, "X", 4, shareable=True) == [Write("X", b"<a2/>")]
    assert r.stream_ready(A, "H", 5, shareable=True) == [Close("X")]
    assert r.links[A].state is LinkState.DRAINING
    return r


def test_router_stream_drained_into_takes_no_pair_before_the_drain_completes():
    """Nothing is asked for on "H" while A drains into it (B opens a stream of its
    own): "H" is not written on before "X" has closed, so it is no carrier yet.  Once
    the drain completes, "H" is A's stream, shareable as it was reported."""
    r = drained_into_a_late_attempt()
    assert r.send(B, [st(B, 1)], 6) == [Open(B)]
    assert "H" not in r.carriers
    assert r.send(A, [st(A, 3)], 7) == []
    assert r.stream_closed("X", 8) == [Write("H", b"<a3/>")]
    assert r.send(C, [st(C, 1)], 9) == [Multiplex(C, "H")]


def test_router_retiring_the_stream_a_pair_drains_into_writes_nothing_on_it():
    """"H" retires (closed by us) while A still drains into it: A keeps waiting for
    "X" to close, then opens a new stream; nothing is ever written on "H"."""
    r = drained_into_a_late_attempt()
    assert r.retire("H", 7) == [Close("H")]
    assert r.send(A, [st(A, 3)], 8) == []
    assert r.stream_closed("X", 9) == [Open(A)]
    assert r.stream_closed("H", 10) == []
    assert r.stream_ready(A, "Y", 11) == [Write("Y", b"<a3/>")]



def test_router_bidi_stream_taking_over_a_drain_closes_the_stream_drained_into():
    """The remote's bidi stream comes while A drains into "H": the bidi stream takes
    A over (rule 2), and "H", which carries nothing now, is closed at once, never left
    open and unused."""
    r = drained_into_a_late_attempt()
    assert r.stream_ready(A, "S", 6, borrowed=True) == [Close("H")]
    assert r.send(A, [st(A, 3)], 7) == []
    assert r.stream_closed("X", 8) == [Write("S", b"<a3/>")]
    assert r.stream_closed("H", 9) == [] and "H" not in r.carriers
    assert r.tick(10_000) == []


# -- the per-pair rule, under random sequences ---------------------------------------

PAIRS = [A, B, C]
_TAG = re.compile(rb"<([abc])(\d+)/>")
_BY_TAG = {b"a": A, b"b": B, b"c": C}
# What the harness does next: mostly sends and the outcomes of what the router asked
# for (a stream opened, a pair asked for on one), also reports that correlate with
# nothing, streams closing and retiring, the remote's bidi streams, time passing.
STEPS = (["send"] * 4 + ["opened"] * 2 + ["answer"] * 3 + ["stray"] * 2
         + ["open_failed", "closed", "retire", "borrowed", "tick"])


@hs.composite
def sequences(draw):
    return [(draw(hs.sampled_from(STEPS)), draw(hs.sampled_from(PAIRS)),
             draw(hs.integers(0, 7)), draw(hs.integers(0, 3)))
            for _ in range(draw(hs.integers(1, 50)))]


@settings(max_examples=200, deadline=None)
@given(sequences())
# A drains from "ours3" into a late attempt "ours4", where B was asked for, refused,
# and "ours4" retired: A's queue must not be written on "ours4" once "ours3" closed.
@example([("send", A, 0, 0), ("borrowed", A, 0, 0), ("closed", A, 0, 0),
          ("send", A, 0, 0), ("opened", A, 0, 1), ("opened", A, 0, 1),
          ("send", B, 0, 0), ("answer", B, 0, 0), ("retire", A, 1, 0),
          ("send", A, 0, 0), ("closed", A, 0, 0)])
# The remote's bidi stream takes A over while it drains into "ours4": "ours4" must
# not stay open, unused.
@example([("send", A, 0, 0), ("borrowed", A, 0, 0), ("closed", A, 0, 0),
          ("send", A, 0, 0), ("opened", A, 0, 1), ("opened", A, 0, 1),
          ("borrowed", A, 0, 0)])
def test_router_never_writes_a_pair_on_a_stream_not_authenticated_for_it(steps):
    """The router is driven as the shell drives it, answering what it asks for in any
    order, with stray reports (a 'valid' for a pair never asked for on that stream, or
    after it closed) and streams that close, retire or are the remote's bidi streams:
    every stanza written on a stream is for a pair that stream is authenticated for
    (its first pair, a pair asked for on it and answered 'valid', or the remote's
    bidi stream), never on a stream the router closed; no stanza is lost (each is
    written once, bounced once, or still waiting); and no stream of ours is left open
    that carries nothing and is waited for by nothing."""
    r = router(max_pairs=2, queue_limit=100, max_age=1000)
    authenticated: dict[str, set] = {}
    live: list[str] = []                 # streams up, ours and the remote's
    closed_by_router: set[str] = set()
    opens: list = []                     # pairs with an Open outstanding
    asks: list = []                      # (pair, stream) with a Multiplex outstanding
    written, bounced, sent = [], [], []
    count = iter(range(10 ** 6))
    now = 0.0

    def run(ops):
        for op in ops:
            if isinstance(op, Write):
                assert op.handle not in closed_by_router, op
                for tag, n in _TAG.findall(op.data):
                    assert _BY_TAG[tag] in authenticated[op.handle], (op, authenticated)
                    written.append(tag + n)
            elif isinstance(op, Bounce):
                bounced.append(op.stanza.raw[1:-2])
            elif isinstance(op, Close):
                closed_by_router.add(op.handle)
            elif isinstance(op, Open):
                opens.append(op.pair)
            elif isinstance(op, Multiplex):
                assert op.handle in live and op.handle not in closed_by_router, op
                assert not op.handle.startswith("bidi"), op
                asks.append((op.pair, op.handle))

    def new(kind: str) -> str:
        h = sys.intern(f"{kind}{next(count)}")
        live.append(h)
        authenticated[h] = set()
        return h

    for kind, pair, i, j in steps:
        now += 1
        if kind == "send":
            stanza = st(pair, next(count))
            sent.append(stanza.raw[1:-2])
            run(r.send(pair, [stanza], now))
        elif kind == "opened" and opens:
            p = opens.pop(i % len(opens))
            h = new("ours")
            authenticated[h].add(p)
            run(r.stream_ready(p, h, now, shareable=j > 0))
        elif kind == "open_failed" and opens:
            run(r.stream_failed(opens.pop(i % len(opens)), "remote-server-not-found", "",
                                now))
        elif kind == "answer" and asks:
            p, h = asks.pop(i % len(asks))
            if j == 0:
                run(r.pair_failed(p, h, "remote-server-timeout", "", now))
            elif j == 1:
                run(r.pair_failed(p, h, "", "not tried", now, tried=False))
            elif h not in closed_by_router:      # a closing stream reports no 'valid'
                authenticated[h].add(p)
                run(r.pair_ready(p, h, now))
        elif kind == "stray" and live:
            h = live[i % len(live)]
            if (pair, h) not in asks and pair not in authenticated[h]:
                run(r.pair_ready(pair, h, now))
        elif kind == "closed" and live:
            h = live.pop(i % len(live))
            asks = [(p, x) for p, x in asks if x is not h]
            run(r.stream_closed(h, now))
        elif kind == "retire" and live:
            h = live[i % len(live)]
            if not h.startswith("bidi") and h not in closed_by_router:
                run(r.retire(h, now))
        elif kind == "borrowed":
            h = new("bidi")
            authenticated[h].add(pair)
            run(r.stream_ready(pair, h, now, borrowed=True))
        elif kind == "tick":
            now += 30 * j
            run(r.tick(now))
    waiting = [s.raw[1:-2] for link in r.links.values() for s, _ in link.queue]
    assert sorted(written + bounced + waiting) == sorted(sent)
    for h in live:              # no stream of ours is left open for nothing
        if h.startswith("ours") and h not in closed_by_router:
            assert h in r.carriers or any(link.handle is h or link.via is h
                                          for link in r.links.values()), h
