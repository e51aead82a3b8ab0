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
7. Sender multiplexing (XEP-0220 section 2.6.1), with ``max_pairs`` > 1 (the router
   toward remotes): a link to open is first asked for on a ready stream of ours to the
   same remote that was ready as shareable (``core.outbound`` decides that) and
   carries fewer than ``max_pairs`` pairs, the waiting ones included (``Multiplex``);
   only without one is a new stream opened.  Never on a borrowed stream.  The link
   waits, as for a stream being opened, until the shell reports ``pair_ready`` for
   exactly that stream; until then nothing of the pair is written on it (the per-pair
   rule: a stanza goes only on a stream authenticated for its pair).  A pair that
   fails there bounces what waited (rule 3); one that could not be asked opens a
   stream of its own.  So does one whose stream closes (or retires) while it waits
   for its answer, keeping its queue: a deliberate deviation from XEP-0220 section
   2.1.1, which treats that like a dialback error (what waited bounced with
   ``remote-server-timeout``).  Nothing was refused -- the stream ended (the remote's
   idle close or restart, the network; ``core.outbound`` asks only peers that handle
   dialback errors, which answer a refusal with one, not by ending the stream) --
   and the new stream asks with a key of its own, so bouncing would lose stanzas it
   most likely delivers.  What waits too long still bounces (``max_age``), and so
   does what waited if that stream fails (rule 3).  A failure, or the stream closing
   while a pair waits for its answer, stops multiplexing toward that remote for
   ``holdoff`` seconds.  A stream carrying several pairs is idle only when all of
   them are, is never drained for a borrowed bidi stream of one of them (the others
   would lose it), and when it retires (``retire``) its pairs drain as in rule 2.
   A stream a pair drains into takes further pairs only once that drain completed.
8. XEP-0478: a stream whose peer announced a ``max-bytes`` (``stream_ready``'s
   ``peer_max_bytes``) is written no larger stanza, whether it comes while the link
   is ready or waited in its queue: it is bounced ``policy-violation`` instead of
   getting the stream closed by the peer.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

from s2sproxy.core.limits import MULTIPLEX_HOLDOFF
from s2sproxy.core.stanza import Stanza

Pair = tuple[str, str]
SHUTDOWN_TEXT = "s2sproxy is shutting down"


class LinkState(enum.Enum):
    IDLE = "idle"               # no stream, none being opened
    CONNECTING = "connecting"
    READY = "ready"
    BACKOFF = "backoff"         # recent failures: bounce until retry_at
    DRAINING = "draining"       # switching to ``handle``; ``draining`` is closing


@dataclass(slots=True)   # not frozen: made per read, and frozen costs
class Write:
    handle: Hashable
    data: bytes
    # how many stanzas ``data`` holds (per-stream counts; not part of equality)
    stanzas: int = field(default=1, compare=False)


@dataclass(frozen=True, slots=True)
class Open:
    pair: Pair


@dataclass(frozen=True, slots=True)
class Multiplex:
    """Ask for ``pair`` on ``handle``, a ready stream of ours to the same remote
    (rule 7); the shell reports ``pair_ready`` or ``pair_failed``."""
    pair: Pair
    handle: Hashable


@dataclass(frozen=True, slots=True)
class Close:
    handle: Hashable


@dataclass(frozen=True, slots=True)
class Bounce:
    stanza: Stanza
    condition: str
    text: str = ""


Op = Write | Open | Multiplex | Close | Bounce


class ByteBudget:
    """Bytes waiting in every queue of the routers sharing this budget."""
    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Link:
    __slots__ = ("pair", "state", "handle", "borrowed", "queue", "failures", "retry_at",
                 "condition", "last_used", "failed_at", "queued_bytes", "draining", "via",
                 "shareable")

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
        self.shareable = False         # DRAINING: ``handle`` may take more pairs after
        self.via: Any = None           # CONNECTING by Multiplex: the stream asked on


class Carrier:
    """A stream of ours (never a borrowed one) as rule 7 sees it: the pairs ready on
    it, those asked for on it, and whether it may take more."""
    __slots__ = ("handle", "remote", "pairs", "pending", "shareable")

    def __init__(self, handle: Hashable, remote: str, shareable: bool) -> None:
        self.handle = handle
        self.remote = remote
        self.pairs: dict[Pair, None] = {}       # ordered sets
        self.pending: dict[Pair, None] = {}
        self.shareable = shareable


class Router:
    def __init__(self, queue_limit: int, max_age: float, idle_timeout: float,
                 backoff_after: int = 2, backoff_base: float = 5.0,
                 backoff_max: float = 300.0, max_bytes: int = 2 * 1024 * 1024,
                 budget: ByteBudget | None = None, max_pairs: int = 1,
                 holdoff: float = MULTIPLEX_HOLDOFF) -> None:
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
        self.max_pairs = max_pairs          # rule 7 (1: no multiplexing)
        self.holdoff = holdoff
        self.carriers: dict[Any, Carrier] = {}
        self._carriers_to: dict[str, dict[Any, Carrier]] = {}    # by remote domain
        self.held_off: dict[str, float] = {}     # remote -> no multiplexing until
        self.peer_max: dict[Any, int] = {}       # rule 8: stream -> its peer's max-bytes

    def configure(self, queue_limit: int, max_age: float, idle_timeout: float,
                  backoff_after: int, backoff_base: float, backoff_max: float,
                  max_bytes: int, max_pairs: int = 1) -> None:
        """New limits (a reloaded configuration): what is queued stays queued, and is
        held to them from the next stanza and the next tick on."""
        self.queue_limit = queue_limit
        self.max_age = max_age
        self.idle_timeout = idle_timeout
        self.backoff_after = backoff_after
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_bytes = max_bytes
        self.max_pairs = max_pairs

    # -- stanzas -------------------------------------------------------------------------

    def send(self, pair: Pair, stanzas: list[Stanza], now: float) -> list[Op]:
        link = self.links.get(pair)
        if link is None:
            link = self.links[pair] = Link(pair)
        if link.state is LinkState.READY:
            link.last_used = now
            if self.peer_max:
                limit = self.peer_max.get(link.handle)
                if limit is not None:
                    return self._write_fitting(link.handle, stanzas, limit, pair)
            if len(stanzas) == 1:
                return [Write(link.handle, stanzas[0].raw)]
            return [Write(link.handle, b"".join([s.raw for s in stanzas]), len(stanzas))]
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
            ops.append(self._open(link, now))
        return ops

    @staticmethod
    def _write_fitting(handle: Hashable, stanzas: list[Stanza], limit: int,
                       pair: Pair) -> list[Op]:
        """Rule 8: what the peer accepts is written (one write), the rest bounced."""
        ops: list[Op] = []
        fit = []
        for s in stanzas:
            if len(s.raw) > limit:
                ops.append(Bounce(s, "policy-violation", f"{len(s.raw)} bytes, more than "
                                  f"the {limit} {pair[1]} accepts (XEP-0478)"))
            else:
                fit.append(s)
        if fit:
            ops.insert(0, Write(handle, b"".join([s.raw for s in fit]), len(fit)))
        return ops

    def _open(self, link: Link, now: float) -> Open | Multiplex:
        """Rule 7, else a new stream: ``link`` is connecting from now on."""
        link.state = LinkState.CONNECTING
        remote = link.pair[1]
        if self.max_pairs > 1 and now >= self.held_off.get(remote, 0.0):
            for c in self._carriers_to.get(remote, {}).values():
                if c.shareable and len(c.pairs) + len(c.pending) < self.max_pairs:
                    c.pending[link.pair] = None
                    link.via = c.handle
                    return Multiplex(link.pair, c.handle)
        return Open(link.pair)

    def take_queued(self, pair: Pair) -> list[Stanza]:
        """What waits for ``pair``, taken out (it may not go: its remote was denied
        meanwhile, and the caller bounces it); the link keeps its state."""
        link = self.links.get(pair)
        if link is None or not link.queue:
            return []
        stanzas = [s for s, _ in link.queue]
        self._clear(link)
        return stanzas

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

    def activity_from(self, stanzas: list[Stanza], now: float) -> None:
        """Stanzas the peer sent on a stream of ours (bidi): each is traffic on the
        link of its pair the other way round, (its ``to`` domain, its ``from``)."""
        for pair in {(s.to_domain, s.from_domain) for s in stanzas}:
            self.activity(pair, now)

    # -- streams -------------------------------------------------------------------------

    def stream_ready(self, pair: Pair, handle: Hashable, now: float,
                     borrowed: bool = False, shareable: bool = False,
                     peer_max_bytes: int | None = None) -> list[Op]:
        """A stream for ``pair`` is authenticated (ours) or a bidi stream of the remote
        covers it (``borrowed``).  ``shareable``: that stream of ours may take further
        pairs (rule 7) -- once it carries ``pair``, not while ``pair`` drains into it.
        ``peer_max_bytes``: the largest stanza the peer accepts on it (rule 8)."""
        if peer_max_bytes is not None:
            self.peer_max[handle] = peer_max_bytes
        link = self.links.get(pair)
        if link is None:
            link = self.links[pair] = Link(pair)
        ops: list[Op] = []
        if self.closing and borrowed:
            return []       # rule 6: no stream is taken on any more
        if link.via is not None and link.via is not handle:
            ops += self._release(link.via, pair)     # asked for there, ready here
        link.via = None
        if link.state is LinkState.DRAINING:
            if not borrowed:
                return ops + self._unused(handle, pair)    # it already switches
            if link.handle is not None and not link.borrowed:
                ops += self._unused(link.handle, pair)     # the bidi stream takes over
            link.handle, link.borrowed = handle, True
            return ops
        if link.state is LinkState.READY and link.handle != handle:
            if link.borrowed and not borrowed:
                return ops + self._unused(handle, pair)    # keep the remote's bidi stream
            if not link.borrowed:
                old = link.handle
                if self._carries_others(old, pair):
                    # rule 7: a shared stream of ours stays, the others need it
                    return ops + ([] if borrowed else self._unused(handle, pair))
                # rule 2 (or a duplicate of ours): drain ours before using the new one,
                # which becomes a carrier only then (nothing is asked for on it before)
                self._forget_carrier(old)
                link.state = LinkState.DRAINING
                link.draining, link.handle, link.borrowed = old, handle, borrowed
                link.shareable = shareable
                link.failures = 0
                return ops + [Close(old)]
        link.state = LinkState.READY
        link.handle = handle
        link.borrowed = borrowed
        link.failures = 0
        link.last_used = now
        if not borrowed:
            carrier = self._carrier(handle, pair[1], shareable)
            carrier.pending.pop(pair, None)
            carrier.pairs[pair] = None
        if link.queue:
            limit = self.peer_max.get(handle) if self.peer_max else None
            if limit is not None:
                ops += self._write_fitting(handle, [s for s, _ in link.queue], limit, pair)
            else:
                ops.append(Write(handle, b"".join(s.raw for s, _ in link.queue),
                                 len(link.queue)))
            self._clear(link)
        return ops

    # -- sender multiplexing (rule 7) ----------------------------------------------------

    def pair_ready(self, pair: Pair, handle: Hashable, now: float) -> list[Op]:
        """The remote verified ``pair`` on ``handle``, where it was asked for."""
        if handle not in self.carriers:
            return []           # closed or retired since: its pairs went elsewhere
        link = self.links.get(pair)
        if link is not None and link.handle is handle \
                and link.state in (LinkState.READY, LinkState.DRAINING):
            return []           # told twice
        if link is None or link.state is not LinkState.CONNECTING or link.via is not handle:
            return self._release(handle, pair)      # no longer waiting for it there
        return self.stream_ready(pair, handle, now)

    def pair_failed(self, pair: Pair, handle: Hashable, condition: str, text: str,
                    now: float, tried: bool = True) -> list[Op]:
        """``pair`` was not verified on ``handle``: the remote refused it or did not
        answer (``tried``), or the stream could not ask for it."""
        c = self.carriers.get(handle)
        if tried:
            self.held_off[pair[1]] = now + self.holdoff
        elif c is not None:
            c.shareable = False     # the stream itself said it takes no more
        link = self.links.get(pair)
        waiting = link is not None and link.state is LinkState.CONNECTING \
            and link.via is handle
        ops = self._release(handle, pair) if c is not None and not (
            link is not None and link.handle is handle) else []
        if not waiting:
            return ops
        link.via = None
        if not tried:
            return ops + self._own_stream(link)
        return ops + self.stream_failed(pair, condition, text, now)

    def retire(self, handle: Hashable, now: float) -> list[Op]:
        """``handle`` must carry nothing more (the remote refused a pair on it with
        'invalid', and closes it): it is closed cleanly; its ready pairs drain as in
        rule 2 and reopen once it has closed, pairs asked for on it open at once, and a
        pair draining into it waits for its own drain, then opens a new stream."""
        used = self.carriers.get(handle) is not None
        ops: list[Op] = []
        for link in self.links.values():
            if link.state is LinkState.CONNECTING and link.via is handle:
                link.via = None
                ops += self._own_stream(link)
                used = True
            elif link.state is LinkState.READY and link.handle is handle:
                link.state = LinkState.DRAINING
                link.draining, link.handle, link.borrowed = handle, None, False
                used = True
            elif link.state is LinkState.DRAINING and link.handle is handle:
                used = True         # (``_close`` makes it wait for its drain)
        return (ops + self._close(handle)) if used else ops

    def _own_stream(self, link: Link) -> list[Op]:
        """``link`` was asked for on a stream that cannot answer any more: it opens a
        stream of its own for what waits (rule 4), or rests."""
        if link.queue and not self.closing:
            return [Open(link.pair)]
        link.state = LinkState.IDLE
        return []

    def _carrier(self, handle: Hashable, remote: str, shareable: bool) -> Carrier:
        c = self.carriers.get(handle)
        if c is None:
            c = self.carriers[handle] = Carrier(handle, remote, shareable)
            self._carriers_to.setdefault(remote, {})[handle] = c
        return c

    def _forget_carrier(self, handle: Hashable) -> Carrier | None:
        c = self.carriers.pop(handle, None)
        if c is not None:
            to = self._carriers_to[c.remote]
            del to[handle]
            if not to:
                del self._carriers_to[c.remote]
        return c

    def _carries_others(self, handle: Hashable, pair: Pair) -> bool:
        c = self.carriers.get(handle)
        return c is not None and any(p != pair for p in (*c.pairs, *c.pending))

    def _release(self, handle: Hashable, pair: Pair) -> list[Op]:
        """Our stream ``handle`` does not carry ``pair`` (any more): it is closed when
        it carries nothing else."""
        c = self.carriers.get(handle)
        if c is None:
            return []
        c.pairs.pop(pair, None)
        c.pending.pop(pair, None)
        if c.pairs or c.pending:
            return []
        return self._close(handle)

    def _unused(self, handle: Hashable, pair: Pair) -> list[Op]:
        """A stream of ours that came up for ``pair`` is not used for it: released if
        it carries pairs (rule 7), else closed."""
        if handle in self.carriers:
            return self._release(handle, pair)
        return self._close(handle)

    def _close(self, handle: Hashable) -> list[Op]:
        """Close our stream ``handle``: it is no carrier any more, and a link draining
        into it waits for its drain to complete and then opens a new stream (rule 4)
        -- nothing is written on it after its ``Close``."""
        self._forget_carrier(handle)
        for link in self.links.values():
            if link.state is LinkState.DRAINING and link.handle is handle:
                link.handle = None
        return [Close(handle)]

    def stream_failed(self, pair: Pair, condition: str, text: str, now: float) -> list[Op]:
        """Opening a stream for ``pair`` failed before it was ready."""
        link = self.links.get(pair)
        if link is None or link.state is not LinkState.CONNECTING or link.via is not None:
            return []       # (a stale attempt: the link now waits for a Multiplex)
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
        self.peer_max.pop(handle, None)
        c = self._forget_carrier(handle)
        if c is not None and c.pending:
            # Rule 7: the remote may have ended the stream over our db:result.
            self.held_off[c.remote] = now + self.holdoff
        for link in self.links.values():
            if link.state is LinkState.DRAINING:
                if link.draining is handle:
                    link.draining = None
                    if link.handle is not None:
                        link.state = LinkState.CONNECTING
                        ops += self.stream_ready(link.pair, link.handle, now, link.borrowed,
                                                 link.shareable)
                        continue
                    link.state = LinkState.IDLE
                    if link.queue and not self.closing:
                        ops.append(self._open(link, now))
                elif link.handle is handle:
                    link.handle = None          # the new stream went first: wait
                    link.borrowed = False
                continue
            if link.state is LinkState.CONNECTING and link.via is handle:
                link.via = None             # asked for on it, unanswered
                ops += self._own_stream(link)
                continue
            if link.handle is handle and link.state is LinkState.READY:
                link.handle = None
                link.borrowed = False
                link.state = LinkState.IDLE
                if link.queue and not self.closing:
                    ops.append(self._open(link, now))
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
                ops += self._idle_close(link, now)
            if link.state is LinkState.BACKOFF and now >= link.retry_at:
                link.state = LinkState.IDLE
            # Failures are remembered for backoff_max, so that back-off can build up.
            forgettable = not link.failures or now - link.failed_at >= self.backoff_max
            if link.state is LinkState.IDLE and not q and forgettable:
                del self.links[pair]
        for remote, until in list(self.held_off.items()):
            if now >= until:
                del self.held_off[remote]
        return ops

    def _idle_close(self, link: Link, now: float) -> list[Op]:
        """Rule 4: close our idle stream; one carrying several pairs (rule 7) only once
        none of them has had traffic for ``idle_timeout``, and none waits for its
        answer on it."""
        handle = link.handle
        c = self.carriers.get(handle)
        on_it = [link]
        if c is not None:
            if c.pending:
                return []
            for p in c.pairs:
                other = self.links.get(p)
                if other is None or other is link or other.handle is not handle \
                        or other.state is not LinkState.READY:
                    continue
                if now - other.last_used < self.idle_timeout:
                    return []
                on_it.append(other)
        for other in on_it:
            other.state = LinkState.IDLE
            other.handle = None
        return self._close(handle)
