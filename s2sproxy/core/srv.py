"""Order SRV targets (RFC 2782) merged across services (XEP-0368).

``_xmpps-server`` (Direct TLS) and ``_xmpp-server`` (STARTTLS) records are merged and
sorted by priority; within one priority, targets are drawn by weight, with the random
source injected so that tests are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    direct_tls: bool
    priority: int = 0
    weight: int = 0


def order(targets: list[Target], uniform: Callable[[float, float], float]) -> list[Target]:
    """RFC 2782 order.  A single record with target "." means "no service here"."""
    if len(targets) == 1 and targets[0].host in (".", ""):
        return []
    out: list[Target] = []
    for prio in sorted({t.priority for t in targets}):
        group = [t for t in targets if t.priority == prio]
        # zero-weight records first, so that they have a (small) chance (RFC 2782)
        group.sort(key=lambda t: t.weight != 0)
        while group:
            total = sum(t.weight for t in group)
            pick = uniform(0, total) if total else 0
            acc = 0
            for i, t in enumerate(group):
                acc += t.weight
                if acc >= pick:
                    out.append(group.pop(i))
                    break
    return out
