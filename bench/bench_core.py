"""Per-stanza cost of the sans-IO inbound path: framing, checks, DeliverStanzas, and
then the stanza policy's classification (what ``Proxy.route`` adds per stanza).

    python bench/bench_core.py [N]

Feeds N ~250-byte messages (the DESIGN.md figure's size) to an authenticated public
stream in 16 KiB reads, as TLS records would deliver them, and prints stanzas/s and
microseconds per stanza (best of 5), the same with one stanza per read (as ejabberd
writes them), plus the retained size of an idle stream.
"""

from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

# The tree this script is in, not an installed copy (``python bench/bench_core.py``
# puts only bench/ on sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from s2sproxy.core import events as E  # noqa: E402
from tests.unit.test_memory import authenticated as authenticated_stream  # noqa: E402
from s2sproxy.policy.classify import Policy, PolicyConfig  # noqa: E402

MSG = (b"<message from='juliet@remote.example/balcony' to='romeo@local.example/orchard' "
       b"type='chat' id='%08d'><body>Wherefore art thou, Romeo? Deny thy father and refuse "
       b"thy name.</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>")


def authenticated():
    """The test suite's authenticated public stream (tests/unit/test_memory.py), before
    any stanza."""
    return authenticated_stream(stanza=False)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    payload = b"".join(MSG % i for i in range(n))
    size = len(MSG % 0)
    chunks = [payload[i:i + 16384] for i in range(0, len(payload), 16384)]
    best = float("inf")
    for _ in range(5):
        s = authenticated()
        t0 = time.perf_counter()
        delivered = 0
        for c in chunks:
            for a in s.handle(E.DataReceived(c)):
                delivered += len(getattr(a, "stanzas", ()))
        best = min(best, time.perf_counter() - t0)
        assert delivered == n, delivered
    policy = Policy(PolicyConfig(), frozenset({"local.example"}))
    best_policy = float("inf")
    for _ in range(5):
        s = authenticated()
        t0 = time.perf_counter()
        check = policy.check
        for c in chunks:
            for a in s.handle(E.DataReceived(c)):
                for st in getattr(a, "stanzas", ()):
                    check(st, 0.0)
        best_policy = min(best_policy, time.perf_counter() - t0)
    # One stanza per read, as ejabberd writes them: the per-read cost of the core.
    single = [MSG % i for i in range(min(n, 50_000))]
    best_single = float("inf")
    for _ in range(5):
        s = authenticated()
        t0 = time.perf_counter()
        for m in single:
            s.handle(E.DataReceived(m))
        best_single = min(best_single, time.perf_counter() - t0)
    print(f"stanza size {size} B, {n} stanzas, 16 KiB reads")
    print(f"inbound core: {n / best:,.0f} stanzas/s, {best / n * 1e6:.2f} us/stanza")
    print(f"inbound core + policy: {n / best_policy:,.0f} stanzas/s, "
          f"{best_policy / n * 1e6:.2f} us/stanza")
    print(f"inbound core, one stanza per read: {best_single / len(single) * 1e6:.2f} us/read")
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    streams = [authenticated() for _ in range(200)]
    after = tracemalloc.take_snapshot()
    total = sum(st.size_diff for st in after.compare_to(before, "filename"))
    per_stream = total / len(streams) / 1024
    print(f"idle authenticated stream (core only, Python heap): {per_stream:.1f} KiB")


if __name__ == "__main__":
    main()
