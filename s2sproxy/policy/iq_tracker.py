"""Which iq get/set are waiting for an answer (RFC 6120 section 8.2.3: every request
gets exactly one result or error).

Entries are keyed by (requester JID, id): an answer arrives with ``to`` = requester and
the same id, from the responder's domain, on any stream of that domain pair.  Entries
expire after ``timeout``; the shell answers expired ones (and those whose stream died)
with ``remote-server-timeout`` so no requester waits forever.  At most ``max_entries``
are kept: beyond that the oldest is forgotten (and counted), never answered early.
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
        self._pending: OrderedDict[tuple[str, str], Pending] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._pending)

    def request(self, stanza: Stanza, now: float, node: str | None = None) -> None:
        key = (stanza.from_, stanza.id or "")
        slim = Stanza("iq", b"", stanza.from_, stanza.to, stanza.type, stanza.id,
                      stanza.child_ns, stanza.from_domain, stanza.to_domain)
        self._pending[key] = Pending(slim, now + self.timeout, node)
        self._pending.move_to_end(key)
        while len(self._pending) > self.max_entries:
            self._pending.popitem(last=False)
            self.evicted += 1

    def response(self, stanza: Stanza) -> Pending | None:
        """The request ``stanza`` (a result or error) answers, removed; or None."""
        key = (stanza.to, stanza.id or "")
        p = self._pending.get(key)
        if p is None or p.request.to_domain != stanza.from_domain:
            return None
        del self._pending[key]
        return p

    def expire(self, now: float) -> list[Pending]:
        """Requests whose deadline passed (constant timeout: insertion order is
        deadline order, so this stops at the first live one)."""
        out = []
        while self._pending:
            key, p = next(iter(self._pending.items()))
            if p.deadline > now:
                break
            del self._pending[key]
            out.append(p)
        return out

    def fail_all(self) -> list[Pending]:
        """Every request still waiting (s2sproxy is stopping)."""
        out = list(self._pending.values())
        self._pending.clear()
        return out

    def fail_pair(self, pair: tuple[str, str]) -> list[Pending]:
        """Requests sent over a domain pair whose stream died."""
        gone = [k for k, p in self._pending.items()
                if (p.request.from_domain, p.request.to_domain) == pair]
        return [self._pending.pop(k) for k in gone]
