"""Handing freed memory back to the system (``policy.keepalive`` rule 7).

When idle streams drop their parsers and TLS buffers, the memory goes back to the C
allocator, not to the system: glibc keeps freed blocks that lie amid live ones in the
process's resident memory, to be reused.  After 1,000 streams that each carried a
16 KiB burst went idle, RSS stayed at 111 KiB per stream; with ``malloc_trim`` it
fell to 60 KiB (``bench/bench_e2e.py --idle 1000 --burst 16384``).  ``trim`` calls
glibc's ``malloc_trim(0)``; on another C library it does nothing."""

from __future__ import annotations

import ctypes
import time

from s2sproxy.logs import get_logger
from s2sproxy.policy import keepalive as K

log = get_logger(__name__)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim     # the C library s2sproxy runs on
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
if _MALLOC_TRIM is not None:
    _MALLOC_TRIM.argtypes = [ctypes.c_size_t]
    _MALLOC_TRIM.restype = ctypes.c_int

#: Whether ``trim`` can hand memory back here (glibc).
AVAILABLE = _MALLOC_TRIM is not None


def trim() -> bool:
    """``malloc_trim(0)``: True if memory was handed back to the system."""
    if _MALLOC_TRIM is None:
        return False
    t0 = time.perf_counter()
    released = bool(_MALLOC_TRIM(0))
    log.debug("memory handed back to the system: {released} ({ms:.1f} ms)",
              released="some" if released else "none", ms=(time.perf_counter() - t0) * 1e3)
    return released


class IdleMemory:
    """Rule 7 of ``policy.keepalive`` at each keepalive tick: an idle stream drops its
    parser and renews its TLS buffers; once any were released, the freed memory is
    handed back (``trim``) at most every ``MEMORY_TRIM_INTERVAL`` seconds."""

    def __init__(self) -> None:
        self.trimmed_at = float("-inf")
        self.untrimmed = 0          # releases since the last hand-back

    def release(self, proto, now: float) -> None:
        """What an established stream (a StreamProtocol) may release now."""
        if not K.parser_idle(now, proto.last_rx):
            return
        self.untrimmed += proto.stream.release_parser()
        if proto.tls_done and K.buffers_idle(
                now, proto.last_rx, proto.last_tx,
                proto.rx_bytes + proto.tx_bytes - proto.renewed_bytes):
            self.untrimmed += proto.renew_buffers()

    def tick_done(self, now: float) -> None:
        if self.untrimmed and K.trim_due(now, self.trimmed_at):
            self.trimmed_at, self.untrimmed = now, 0
            trim()
