"""Admission: how many unauthenticated connections a peer may make us hold.

An accepted connection on a public listener is *unauthenticated* until its first domain
pair authenticates (or it closes).  Two bounds apply at accept time, before a byte is
read, so that refusing is cheap (the shell drops the TCP connection):

1. at most ``max_total`` unauthenticated connections at once;
2. at most ``max_per_source`` from one source: an IPv4 address, or an IPv6 /64 (one
   host usually holds a whole /64, so counting single IPv6 addresses bounds nothing).

Combined with the authentication timeout (from accept) and the pre-authentication
element limits of ``core.inbound``, this bounds the memory, sockets and time an
unauthenticated peer can take.  Refusals are counted; ``log_due`` rate-limits the log
line about them, so that a flood does not become a flood of log lines too.

Nothing here reads a clock or a socket: the shell passes addresses and ``now``.
"""

from __future__ import annotations

import ipaddress
from typing import Hashable

from s2sproxy.core.limits import REFUSED_LOG_INTERVAL

TOTAL = "total"
PER_SOURCE = "per-source"
LOG_INTERVAL = REFUSED_LOG_INTERVAL


def source_key(host: str) -> str:
    """The unit a per-source bound counts: an IPv4 address (IPv4-mapped IPv6 included),
    or the /64 of an IPv6 address.  Anything else (a Unix socket) is its own key."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Admission:
    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._held: dict[Hashable, str] = {}      # handle -> source key
        self._per_source: dict[str, int] = {}
        self.refused = {TOTAL: 0, PER_SOURCE: 0}
        self._unlogged = 0
        self._logged_at: float | None = None

    def __len__(self) -> int:
        return len(self._held)

    def admit(self, handle: Hashable, host: str) -> str | None:
        """Count a new connection from ``host``; None if admitted, else the bound it
        hit (``TOTAL`` or ``PER_SOURCE``), and then it is not counted."""
        key = source_key(host)
        if len(self._held) >= self.max_total:
            reason = TOTAL
        elif self._per_source.get(key, 0) >= self.max_per_source:
            reason = PER_SOURCE
        else:
            self._held[handle] = key
            self._per_source[key] = self._per_source.get(key, 0) + 1
            return None
        self.refused[reason] += 1
        self._unlogged += 1
        return reason

    def release(self, handle: Hashable) -> None:
        """The connection authenticated or closed (idempotent)."""
        key = self._held.pop(handle, None)
        if key is None:
            return
        n = self._per_source[key] - 1
        if n:
            self._per_source[key] = n
        else:
            del self._per_source[key]

    def log_due(self, now: float) -> int:
        """How many refusals to report now (0: stay quiet).  The first refusal is
        reported at once, later ones at most once per ``LOG_INTERVAL``."""
        if not self._unlogged:
            return 0
        if self._logged_at is not None and now - self._logged_at < LOG_INTERVAL:
            return 0
        n, self._unlogged, self._logged_at = self._unlogged, 0, now
        return n
