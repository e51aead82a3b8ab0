"""Routing: one link per (from_domain, to_domain) pair, each with a bounded, aged queue.

A link is the way stanzas for one domain pair leave s2sproxy: a stream we opened
(toward ejabberd, or toward a remote server), or a remote's bidi stream that we borrow
("borrowed": the remote opened it and negotiated XEP-0288 on it).  The shell keeps one
``Router`` per direction and runs the ``Op``s it returns.

Rules:

1. A stanza goes out at once on a READY link; otherwise it waits in the link's queue
   (at most ``queue_limit`` entries and ``max_bytes`` bytes, each at most ``max_age``
   seconds; all queues of both routers together at most ``budget.limit`` bytes) while
   the link is opened.  What does not fit, or ages out, is bounced:
   ``resource-constraint``, ``remote-server-timeout``.
2. A borrowed bidi stream is preferred to a stream of ours: attaching one replaces our
   stream on the link.  Ours is closed cleanly and the link *drains*: stanzas wait
   until ours has closed (the peer answered our ``</stream:stream>``, so it has read
   everything written before it), then go on the bidi stream.  Nothing written is
   lost in the switch, and nothing overtakes what was written before it (RFC 6120
   section 10.1) -- unless the drained stream ends without the peer's close (our
   close timer, a reset): what it carried is then the peer's to have read or not.
3. When opening fails, everything queued is bounced with the failure's condition.  The
   next stanza tries again, except after ``backoff_after`` failures in a row: then the
   link waits (exponential, capped at ``backoff_max``) and bounces meanwhile.
4. A stream that closes takes nothing queued with it: a link with waiting stanzas opens
   a new stream.  An idle stream of ours (no traffic for ``idle_timeout``) is closed.
5. Nothing here reads a clock: every call is given ``now``.
6. After ``shutdown()`` nothing waits and nothing is opened: what is queued is bounced
   at once, and so is every later stanza without a ready link.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Hashable

from s2sproxy.core.stanza import Stanza

Pair = tuple[str, str]
SHUTDOWN_TEXT = "s2sproxy is shutting down"


class LinkState(enum.Enum):
    IDLE = "idle"               # no stream, none being opened
    CONNECTING = "connecting"
    READY = "ready"
    BACKOFF = "backoff"         # recent failures: bounce until retry_at
    DRAINING = "draining"       # switching to ``handle``; ``draining`` is closing


@dataclass(frozen=True, slots=True)
class Write:
    handle: Hashable
    data: bytes


@dataclass(frozen=True, slots=True)
class Open:
    pair: Pair


@dataclass(frozen=True, slots=True)
class Close:
    handle: Hashable


@dataclass(frozen=True, slots=True)
class Bounce:
    stanza: Stanza
    condition: str
    text: str = ""


Op = Write | Open | Close | Bounce


class ByteBudget:
    """Bytes waiting in every queue of the routers sharing this budget."""
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Link:
    __slots__ = ("pair", "state", "handle", "borrowed", "queue", "failures", "retry_at",
                 "condition", "last_used", "failed_at", "queued_bytes", "draining")

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.state = LinkState.IDLE
        self.handle: Any = None
        self.borrowed = False
        self.queue: deque[tuple[Stanza, float]] = deque()
        self.failures = 0
        self.retry_at = 0.0
        self.condition = ""
        self.last_used = 0.0
        self.failed_at = 0.0
        self.queued_bytes = 0
        self.draining: Any = None      # DRAINING: the stream being closed


class Router:
    def __init__(self, queue_limit: int, max_age: float, idle_timeout: float,
                 backoff_after: int = 2, backoff_base: float = 5.0,
                 backoff_max: float = 300.0, max_bytes: int = 2 * 1024 * 1024,
                 budget: ByteBudget | None = None) -> None:
        self.queue_limit = queue_limit
        self.max_bytes = max_bytes
        self.budget = budget if budget is not None else ByteBudget(64 * max_bytes)
        self.max_age = max_age
        self.idle_timeout = idle_timeout
        self.backoff_after = backoff_after
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.links: dict[Pair, Link] = {}
        self.closing = False

    # -- stanzas -------------------------------------------------------------------------

    def send(self, pair: Pair, stanzas: list[Stanza], now: float) -> list[Op]:
        link = self.links.get(pair)
        if link is None:
            link = self.links[pair] = Link(pair)
        if link.state is LinkState.READY:
            link.last_used = now
            return [Write(link.handle, b"".join(s.raw for s in stanzas))]
        if self.closing:
            return [Bounce(s, "remote-server-timeout", SHUTDOWN_TEXT) for s in stanzas]
        if link.state is LinkState.BACKOFF:
            if now < link.retry_at:
                text = f"{link.condition}; not retrying for {link.retry_at - now:.0f} s"
                return [Bounce(s, link.condition, text) for s in stanzas]
            link.state = LinkState.IDLE
        ops: list[Op] = []
        budget = self.budget
        for s in stanzas:
            size = len(s.raw)
            if len(link.queue) >= self.queue_limit:
                ops.append(Bounce(s, "resource-constraint",
                                  f"more than {self.queue_limit} stanzas waiting"))
            elif link.queued_bytes + size > self.max_bytes:
                ops.append(Bounce(s, "resource-constraint",
                                  f"more than {self.max_bytes} bytes waiting"))
            elif budget.used + size > budget.limit:
                ops.append(Bounce(s, "resource-constraint",
                                  f"more than {budget.limit} bytes waiting in all queues"))
            else:
                link.queue.append((s, now))
                link.queued_bytes += size
                budget.used += size
        if link.state is LinkState.IDLE and link.queue:
            link.state = LinkState.CONNECTING
            ops.append(Open(pair))
        return ops

    def shutdown(self) -> list[Op]:
        """s2sproxy is stopping: bounce everything waiting (rule 6).  Ready links
        keep their streams until the shell reports them closed."""
        self.closing = True
        ops: list[Op] = []
        for link in self.links.values():
            ops += [Bounce(s, "remote-server-timeout", SHUTDOWN_TEXT) for s, _ in link.queue]
            self._clear(link)
        return ops

    def activity(self, pair: Pair, now: float) -> None:
        """Traffic from the peer on this link's stream keeps it from idling out."""
        link = self.links.get(pair)
        if link is not None:
            link.last_used = now

    # -- streams -------------------------------------------------------------------------

    def stream_ready(self, pair: Pair, handle: Hashable, now: float,
                     borrowed: bool = False) -> list[Op]:
        """A stream for ``pair`` is authenticated (ours) or a bidi stream of the remote
        covers it (``borrowed``)."""
        link = self.links.get(pair)
        if link is None:
            link = self.links[pair] = Link(pair)
        ops: list[Op] = []
        if self.closing and borrowed:
            return []       # rule 6: no stream is taken on any more
        if link.state is LinkState.DRAINING:
            if not borrowed:
                return [Close(handle)]          # the bidi stream is taking over
            link.handle, link.borrowed = handle, True
            return []
        if link.state is LinkState.READY and link.handle != handle:
            if link.borrowed and not borrowed:
                return [Close(handle)]          # keep the remote's bidi stream
            if not link.borrowed:
                # rule 2 (or a duplicate of ours): drain ours before using the new one
                link.state = LinkState.DRAINING
                link.draining, link.handle, link.borrowed = link.handle, handle, borrowed
                link.failures = 0
                return [Close(link.draining)]
        link.state = LinkState.READY
        link.handle = handle
        link.borrowed = borrowed
        link.failures = 0
        link.last_used = now
        if link.queue:
            ops.append(Write(handle, b"".join(s.raw for s, _ in link.queue)))
            self._clear(link)
        return ops

    def stream_failed(self, pair: Pair, condition: str, text: str, now: float) -> list[Op]:
        """Opening a stream for ``pair`` failed before it was ready."""
        link = self.links.get(pair)
        if link is None or link.state is not LinkState.CONNECTING:
            return []
        ops: list[Op] = [Bounce(s, condition, text) for s, _ in link.queue]
        self._clear(link)
        link.failures += 1
        link.failed_at = now
        link.condition = condition
        if link.failures >= self.backoff_after:
            delay = min(self.backoff_base * 2 ** (link.failures - self.backoff_after),
                        self.backoff_max)
            link.state = LinkState.BACKOFF
            link.retry_at = now + delay
        else:
            link.state = LinkState.IDLE
        return ops

    def stream_closed(self, handle: Hashable, now: float) -> list[Op]:
        """A ready stream went away (closed by the peer, dead, or closed by us)."""
        ops: list[Op] = []
        for link in self.links.values():
            if link.state is LinkState.DRAINING:
                if link.draining is handle:
                    link.draining = None
                    if link.handle is not None:
                        link.state = LinkState.CONNECTING
                        ops += self.stream_ready(link.pair, link.handle, now, link.borrowed)
                        continue
                    link.state = LinkState.IDLE
                    if link.queue and not self.closing:
                        link.state = LinkState.CONNECTING
                        ops.append(Open(link.pair))
                elif link.handle is handle:
                    link.handle = None          # the new stream went first: wait
                    link.borrowed = False
                continue
            if link.handle is handle and link.state is LinkState.READY:
                link.handle = None
                link.borrowed = False
                link.state = LinkState.IDLE
                if link.queue and not self.closing:
                    link.state = LinkState.CONNECTING
                    ops.append(Open(link.pair))
        return ops

    def _clear(self, link: Link) -> None:
        link.queue.clear()
        self.budget.used -= link.queued_bytes
        link.queued_bytes = 0

    def pairs_of(self, handle: Hashable) -> list[Pair]:
        """The pairs a ready stream carries."""
        return [p for p, link in self.links.items()
                if link.handle is handle and link.state is LinkState.READY]

    def ready_handle(self, pair: Pair) -> Any:
        link = self.links.get(pair)
        return link.handle if link is not None and link.state is LinkState.READY else None

    # -- time ----------------------------------------------------------------------------

    def tick(self, now: float) -> list[Op]:
        """Age limits, idle streams, and forgetting links with nothing to remember."""
        ops: list[Op] = []
        for pair, link in list(self.links.items()):
            q = link.queue
            while q and now - q[0][1] >= self.max_age:
                s, _ = q.popleft()
                link.queued_bytes -= len(s.raw)
                self.budget.used -= len(s.raw)
                ops.append(Bounce(s, "remote-server-timeout",
                                  f"not delivered within {self.max_age:g} s"))
            if (link.state is LinkState.READY and not link.borrowed
                    and now - link.last_used >= self.idle_timeout):
                ops.append(Close(link.handle))
                link.state = LinkState.IDLE
                link.handle = None
            if link.state is LinkState.BACKOFF and now >= link.retry_at:
                link.state = LinkState.IDLE
            # Failures are remembered for backoff_max, so that back-off can build up.
            forgettable = not link.failures or now - link.failed_at >= self.backoff_max
            if link.state is LinkState.IDLE and not q and forgettable:
                del self.links[pair]
        return ops
