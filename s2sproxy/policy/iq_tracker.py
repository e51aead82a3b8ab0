"""Which iq get/set are waiting for an answer (RFC 6120 section 8.2.3: every request
gets exactly one result or error).

Requests are found by (requester JID, id, responder JID as addressed): one requester may
use one id for several requests at once, even the same request twice (RFC 6120 section 8.1.3 asks uniqueness per
stream only; Prosody's PEP sends ``id='disco'`` to every resource of a contact).  An
answer arrives with ``to`` = requester, the same id and ``from`` = the responder, on any
stream of that domain pair.  An answer from the responder in other letter case, or
from a full JID of a bare JID asked, matches the oldest such request; an answer from
another resource never matches a request to a full JID.  Entries expire after ``timeout``; the shell answers
expired ones (and those whose stream died) with ``remote-server-timeout`` so no
requester waits forever.  At most ``max_entries`` are kept: beyond that the oldest is
forgotten (and counted), never answered early.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from s2sproxy.core.stanza import Stanza


@dataclass(slots=True)
class Pending:
    request: Stanza          # raw dropped: only the addressing is kept
    deadline: float
    node: str | None         # disco#info node of the request, if any


class IqTracker:
    def __init__(self, timeout: float, max_entries: int) -> None:
        self.timeout = timeout
        self.max_entries = max_entries
        # in insertion (= deadline) order; a sequence number keys each request, since the
        # same request may be pending twice (each gets its answer)
        self._pending: OrderedDict[int, Pending] = OrderedDict()
        # (requester, id) -> (responder, seq) of each pending request, oldest first
        self._index: dict[tuple[str, str], list[tuple[str, int]]] = {}
        self._seq = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def request(self, stanza: Stanza, now: float, node: str | None = None) -> None:
        self._seq = seq = self._seq + 1
        slim = Stanza("iq", b"", stanza.from_, stanza.to, stanza.type, stanza.id,
                      stanza.child_ns, stanza.from_domain, stanza.to_domain)
        self._pending[seq] = Pending(slim, now + self.timeout, node)
        self._index.setdefault((stanza.from_, stanza.id or ""), []).append((stanza.to, seq))
        while len(self._pending) > self.max_entries:
            self._forget(next(iter(self._pending)))
            self.evicted += 1

    def response(self, stanza: Stanza) -> Pending | None:
        """The request ``stanza`` (a result or error) answers, removed; or None."""
        waiting = self._index.get((stanza.to, stanza.id or ""))
        if not waiting:
            return None
        answering = stanza.from_
        for responder, seq in waiting:
            if responder == answering:
                return self._forget(seq)
        answering = answering.lower()
        bare = answering.split("/", 1)[0]
        for responder, seq in waiting:
            r = responder.lower()
            if r == answering or ("/" not in r and r == bare):
                return self._forget(seq)
        return None

    def _forget(self, seq: int) -> Pending:
        p = self._pending.pop(seq)
        key = (p.request.from_, p.request.id or "")
        waiting = self._index[key]
        waiting.remove((p.request.to, seq))
        if not waiting:
            del self._index[key]
        return p

    def set_timeout(self, timeout: float, now: float) -> None:
        """A reloaded ``policy.iq_timeout``: requests already waiting keep their
        deadlines.  A shorter one puts later requests' deadlines before earlier ones'
        until those are gone; ``expire`` scans them all until then."""
        if timeout < self.timeout and self._pending:
            self._unordered_until = max(self._unordered_until,
                                        max(p.deadline for p in self._pending.values()))
        self.timeout = timeout

    _unordered_until = 0.0

    def expire(self, now: float) -> list[Pending]:
        """Requests whose deadline passed (constant timeout: insertion order is
        deadline order, so this stops at the first live one; after a shorter timeout
        was set, every one is looked at until the older deadlines passed)."""
        out = []
        while self._pending:
            seq, p = next(iter(self._pending.items()))
            if p.deadline > now:
                break
            out.append(self._forget(seq))
        if self._unordered_until and self._pending:
            if now >= self._unordered_until:
                self._unordered_until = 0.0
            late = [seq for seq, p in self._pending.items() if p.deadline <= now]
            out.extend(self._forget(seq) for seq in late)
        return out

    def oldest(self, n: int) -> list[Pending]:
        """The ``n`` requests waiting longest (``s2sproxy status``)."""
        out = []
        for p in self._pending.values():
            if len(out) >= n:
                break
            out.append(p)
        return out

    def fail_all(self) -> list[Pending]:
        """Every request still waiting (s2sproxy is stopping)."""
        out = list(self._pending.values())
        self._pending.clear()
        self._index.clear()
        return out

    def fail_pair(self, pair: tuple[str, str]) -> list[Pending]:
        """Requests sent over a domain pair whose stream died."""
        gone = [s for s, p in self._pending.items()
                if (p.request.from_domain, p.request.to_domain) == pair]
        return [self._forget(s) for s in gone]
