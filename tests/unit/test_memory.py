"""What an idle authenticated stream keeps on the Python heap (issue 9: at most 48 KiB
per idle TLS stream in all).  Counted with tracemalloc, so the figure is exact for a
given code path: a budget, not a timing."""

from __future__ import annotations

import gc
import tracemalloc

from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.inbound import InboundConfig, InboundStream, Role

HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          b"xmlns:stream='http://etherx.jabber.org/streams' "
          b"xmlns:db='jabber:server:dialback' to='local.example' from='remote.example' "
          b"version='1.0'>")
BUDGET = 20 * 1024      # bytes per idle authenticated stream, core only
RELEASED_BUDGET = 6 * 1024   # the same once its expat parser is released


def authenticated(stanza: bool = True) -> InboundStream:
    """A public stream authenticated by dialback for remote.example -> local.example,
    after one stanza (``stanza``: so that its framer made its parser); bench_core.py
    measures the same stream."""
    s = InboundStream(InboundConfig(Role.PUBLIC, frozenset({"local.example"}),
                                    DialbackKeys(b"x" * 32), lambda: "sid", 524288, 64))
    s.handle(E.DataReceived(HEADER))
    s.handle(E.DataReceived(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"))
    s.handle(E.TlsEstablished(False, None))
    s.handle(E.DataReceived(HEADER))
    s.handle(E.DataReceived(b"<db:result from='remote.example' to='local.example'>k"
                            b"</db:result>"))
    s.handle(E.DialbackVerdict("remote.example", "local.example", True))
    if stanza:
        s.handle(E.DataReceived(b"<message from='a@remote.example' to='b@local.example'>"
                                b"<body>hi</body></message>"))
    return s


def heap_per_stream(release: bool) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        streams = [authenticated() for _ in range(100)]
        if release:
            assert all(s.release_parser() for s in streams)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert all(s.authenticated for s in streams)
    return sum(d.size_diff for d in after.compare_to(before, "filename")) / 100


def test_idle_authenticated_stream_stays_within_its_heap_budget():
    """The expat parser's text buffer (buffer_text, 8 KiB, unused: no character-data
    handler is set) is not allocated; 100 idle streams keep at most BUDGET each."""
    per_stream = heap_per_stream(release=False)
    assert per_stream <= BUDGET, f"{per_stream / 1024:.1f} KiB per idle stream"


def test_released_parser_leaves_a_few_kib_per_idle_stream():
    """With its expat parser released (policy.keepalive rule 7) an idle stream keeps
    its state and buffers only: at most RELEASED_BUDGET."""
    per_stream = heap_per_stream(release=True)
    assert per_stream <= RELEASED_BUDGET, f"{per_stream / 1024:.1f} KiB per idle stream"
