"""The router: routing choices, queue limits and ages, bounces, back-off, idle close,
and streams closing with stanzas waiting."""

from __future__ import annotations

from s2sproxy.core.routing import Bounce, Close, LinkState, Open, Router, Write
from s2sproxy.core.stanza import Stanza

PAIR = ("local.example", "remote.example")


def st(n: int, type_: str = "chat") -> Stanza:
    return Stanza("message", f"<m{n}/>".encode(), "romeo@local.example",
                  "juliet@remote.example", type_, str(n), None, *PAIR)


def router(**kw) -> Router:
    args = dict(queue_limit=3, max_age=10, idle_timeout=60, backoff_after=2,
                backoff_base=5, backoff_max=40)
    args.update(kw)
    return Router(**args)


def test_router_first_stanza_opens_a_stream_and_waits():
    """No link yet: the stanza waits and a stream is opened, once."""
    r = router()
    assert r.send(PAIR, [st(1)], 0) == [Open(PAIR)]
    assert r.send(PAIR, [st(2)], 1) == []
    assert r.links[PAIR].state is LinkState.CONNECTING


def test_router_ready_flushes_queue_in_order_with_one_write():
    """When the stream is ready, everything waiting goes out in one write, in order."""
    r = router()
    r.send(PAIR, [st(1), st(2)], 0)
    assert r.stream_ready(PAIR, "s1", 1) == [Write("s1", b"<m1/><m2/>")]
    assert r.send(PAIR, [st(3)], 2) == [Write("s1", b"<m3/>")]


def test_router_queue_limit_bounces_resource_constraint():
    """Beyond queue_limit the stanza is bounced at once."""
    r = router()
    ops = r.send(PAIR, [st(i) for i in range(5)], 0)
    assert [type(o) for o in ops] == [Bounce, Bounce, Open]
    assert [o.stanza.id for o in ops[:2]] == ["3", "4"]
    assert ops[0].condition == "resource-constraint"


def test_router_age_limit_bounces_remote_server_timeout():
    """A stanza waiting max_age seconds is bounced with remote-server-timeout."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    r.send(PAIR, [st(2)], 5)
    assert r.tick(9.9) == []
    ops = r.tick(10)
    assert [(type(o), o.stanza.id, o.condition, o.text) for o in ops] == \
        [(Bounce, "1", "remote-server-timeout", "not delivered within 10 s")]
    assert [s.id for s, _ in r.links[PAIR].queue] == ["2"]


def test_router_failure_bounces_waiting_and_next_stanza_retries():
    """A failed stream bounces what waited with its condition; the next stanza retries."""
    r = router()
    r.send(PAIR, [st(1), st(2)], 0)
    ops = r.stream_failed(PAIR, "remote-server-not-found", "no such host", 1)
    assert [(o.stanza.id, o.condition) for o in ops] == \
        [("1", "remote-server-not-found"), ("2", "remote-server-not-found")]
    assert r.send(PAIR, [st(3)], 2) == [Open(PAIR)]


def test_router_repeated_failures_back_off_then_retry():
    """After two failures in a row, stanzas bounce at once until the back-off ends."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    r.stream_failed(PAIR, "remote-server-not-found", "", 1)
    r.tick(2)                                   # the failure is not forgotten
    r.send(PAIR, [st(2)], 3)
    r.stream_failed(PAIR, "remote-server-timeout", "", 4)
    ops = r.send(PAIR, [st(3)], 5)
    assert [(type(o), o.condition) for o in ops] == [(Bounce, "remote-server-timeout")]
    assert r.send(PAIR, [st(4)], 9) == [Open(PAIR)]      # back-off of 5 s is over


def test_router_back_off_grows_and_is_capped():
    """Each further failure doubles the wait, up to backoff_max."""
    r = router()
    t = 0.0
    waits = []
    for _ in range(6):
        r.send(PAIR, [st(1)], t)
        r.stream_failed(PAIR, "remote-server-not-found", "", t)
        waits.append(r.links[PAIR].retry_at - t if r.links[PAIR].state is LinkState.BACKOFF
                     else 0)
        t = r.links[PAIR].retry_at if waits[-1] else t + 1
    assert waits == [0, 5, 10, 20, 40, 40]


def test_router_stream_closed_with_waiting_stanzas_reopens():
    """A stream that closes does not take waiting stanzas with it: a new one opens."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    r.stream_ready(PAIR, "s1", 1)
    assert r.stream_closed("s1", 2) == []           # nothing waiting: nothing to do
    assert r.send(PAIR, [st(2)], 3) == [Open(PAIR)]  # next stanza opens a new stream
    assert r.stream_ready(PAIR, "s2", 4) == [Write("s2", b"<m2/>")]


def test_router_prefers_remote_bidi_stream_over_ours():
    """A borrowed bidi stream replaces ours, which is closed; ours never replaces it.
    Until ours has closed (the peer's </stream:stream>: everything written on it was
    read), stanzas wait, then go on the bidi stream in order (defect 16)."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    r.stream_ready(PAIR, "ours", 1)
    assert r.stream_ready(PAIR, "bidi", 2, borrowed=True) == [Close("ours")]
    assert r.links[PAIR].state is LinkState.DRAINING
    assert r.send(PAIR, [st(2), st(3)], 3) == []               # waits, opens nothing
    assert r.ready_handle(PAIR) is None
    assert r.stream_closed("ours", 4) == [Write("bidi", b"<m2/><m3/>")]
    assert r.send(PAIR, [st(4)], 5) == [Write("bidi", b"<m4/>")]
    assert r.stream_ready(PAIR, "ours2", 6) == [Close("ours2")]
    assert r.ready_handle(PAIR) == "bidi"


def test_router_bidi_before_ours_is_ready_takes_over_at_once():
    """A borrowed bidi stream that comes first carries the queue; ours, when ready, is
    closed without having carried anything."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    assert r.stream_ready(PAIR, "bidi", 1, borrowed=True) == [Write("bidi", b"<m1/>")]
    assert r.stream_ready(PAIR, "ours", 2) == [Close("ours")]


def test_router_bidi_lost_while_draining_reopens_for_waiting_stanzas():
    """If the bidi stream goes while ours drains, the stanzas wait for ours to close,
    then a new stream is opened for them."""
    r = router()
    r.stream_ready(PAIR, "ours", 0)
    r.stream_ready(PAIR, "bidi", 1, borrowed=True)
    r.send(PAIR, [st(1)], 2)
    assert r.stream_closed("bidi", 3) == []
    assert r.stream_closed("ours", 4) == [Open(PAIR)]
    assert r.stream_ready(PAIR, "new", 5) == [Write("new", b"<m1/>")]


def test_router_closes_idle_stream_of_ours_but_not_borrowed():
    """Our stream idle for idle_timeout is closed; a remote's bidi stream is not ours
    to close."""
    r = router()
    r.stream_ready(PAIR, "ours", 0)
    r.activity(PAIR, 30)
    assert r.tick(89) == []
    assert r.tick(90) == [Close("ours")]
    other = ("local.example", "other.example")
    r.stream_ready(other, "bidi", 0, borrowed=True)
    assert r.tick(1000) == []


def test_router_forgets_idle_links():
    """Links with nothing queued, no stream and no recent failure are dropped."""
    r = router()
    r.send(PAIR, [st(1)], 0)
    r.stream_ready(PAIR, "ours", 0)
    r.tick(60)
    assert PAIR not in r.links


def test_router_pairs_are_independent():
    """Several local domains and several remotes: each pair has its own stream, queue
    and failures; one failing pair does not touch the others."""
    r = router()
    a = ("one.example", "remote.example")
    b = ("two.example", "remote.example")
    c = ("one.example", "other.example")
    assert [r.send(p, [st(1)], 0) for p in (a, b, c)] == [[Open(a)], [Open(b)], [Open(c)]]
    r.stream_ready(a, "sa", 1)
    assert [o.condition for o in r.stream_failed(b, "remote-server-not-found", "", 1)] == \
        ["remote-server-not-found"]
    assert r.send(a, [st(2)], 2) == [Write("sa", b"<m2/>")]
    assert r.links[c].state is LinkState.CONNECTING
    assert r.stream_ready(c, "sc", 3) == [Write("sc", b"<m1/>")]


def big(n: int, size: int, pair=PAIR) -> Stanza:
    return Stanza("message", b"<m>" + b"x" * (size - 7) + b"</m>", "a@" + pair[0],
                  "b@" + pair[1], "chat", str(n), None, *pair)


def test_router_queue_bytes_bounded_per_pair():
    """Beyond max_bytes waiting for a pair, stanzas bounce with resource-constraint,
    however few they are (defect 9); written stanzas free their bytes."""
    r = router(queue_limit=1000, max_bytes=1000)
    ops = r.send(PAIR, [big(1, 400), big(2, 400), big(3, 400)], 0)
    assert [type(o) for o in ops] == [Bounce, Open]
    assert (ops[0].stanza.id, ops[0].condition, ops[0].text) == \
        ("3", "resource-constraint", "more than 1000 bytes waiting")
    assert r.budget.used == 800
    r.stream_ready(PAIR, "s1", 1)
    assert r.budget.used == 0 and r.links[PAIR].queued_bytes == 0


def test_router_queue_bytes_bounded_in_total_across_routers():
    """One budget for every queue of both routers: beyond it, any pair bounces;
    bounced and aged-out stanzas free their bytes."""
    from s2sproxy.core.routing import ByteBudget
    budget = ByteBudget(1000)
    a, b = router(queue_limit=1000, budget=budget), router(queue_limit=1000, budget=budget)
    other = ("local.example", "other.example")
    a.send(PAIR, [big(1, 600)], 0)
    ops = b.send(other, [big(2, 600, other)], 0)
    assert [(type(o), getattr(o, "text", "")) for o in ops] == [
        (Bounce, "more than 1000 bytes waiting in all queues")]
    a.tick(10)                     # max_age: the first one ages out
    assert budget.used == 0
    assert b.send(other, [big(3, 600, other)], 10) == [Open(other)]
    b.stream_failed(other, "remote-server-not-found", "", 11)
    assert budget.used == 0


def test_router_bidi_replacing_a_lost_one_while_draining_stays_borrowed():
    """ours drains for bidi B; B goes; bidi C comes while ours still closes: C is the
    remote's stream (never idle-closed by us)."""
    r = router()
    r.stream_ready(PAIR, "ours", 0)
    r.stream_ready(PAIR, "B", 1, borrowed=True)
    r.stream_closed("B", 2)
    assert r.stream_ready(PAIR, "C", 3, borrowed=True) == []
    r.stream_closed("ours", 4)
    assert r.ready_handle(PAIR) == "C" and r.links[PAIR].borrowed
    assert r.tick(1000) == []


def sized(n: int, size: int) -> Stanza:
    return Stanza("message", f"<m{n}>{'x' * size}</m{n}>".encode(), "romeo@local.example",
                  "juliet@remote.example", "chat", str(n), None, *PAIR)


def test_router_peer_max_bytes_bounces_larger_stanzas_queued_or_not():
    """Rule 8 (XEP-0478): what waited while the stream was set up is held to the
    peer's max-bytes too, and so is what comes later; what fits goes in one write."""
    r = router(queue_limit=10)
    small, large = st(1), sized(2, 200)
    r.send(PAIR, [small, large, st(3)], 0)
    ops = r.stream_ready(PAIR, "s1", 1, peer_max_bytes=100)
    assert ops[0] == Write("s1", b"<m1/><m3/>") and ops[0].stanzas == 2
    assert ops[1:] == [Bounce(large, "policy-violation",
                              "209 bytes, more than the 100 remote.example accepts "
                              "(XEP-0478)")]
    later = sized(4, 300)
    assert r.send(PAIR, [later], 2) == [Bounce(later, "policy-violation",
                                               "309 bytes, more than the 100 "
                                               "remote.example accepts (XEP-0478)")]
    assert r.send(PAIR, [st(5)], 3) == [Write("s1", b"<m5/>")]
    r.stream_closed("s1", 4)
    assert r.peer_max == {}
    r.stream_ready(PAIR, "s2", 5)           # a new stream without limits
    assert r.send(PAIR, [later], 6) == [Write("s2", later.raw)]
