"""Per-remote rate limits (``[ratelimit]``, issue 11): bytes and stanzas per second
per remote domain and per connection, with bursts, enforced by pausing reading from
the remote's streams (TCP back-pressure, as Prosody's ``limits`` module does): nothing
is dropped, and other remotes are not slowed.  ejabberd's own streams are never
limited.  A remote that stays over its limit for ``flag_after`` seconds is flagged
(``rate-limited``), and, with ``close_after``, its streams are closed with
``policy-violation`` after that long.

Sans-IO: ``Limiter.account`` is told what a read brought and answers how long to stop
reading; the tx side pauses and resumes the transport.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from s2sproxy.core.limits import RATE_LIMITED_DOMAINS

REASON = "rate-limited"


@dataclass(frozen=True)
class RateConfig:
    bytes_per_second: float = 0.0       # 0: no limit
    stanzas_per_second: float = 0.0
    burst_seconds: float = 2.0          # a bucket holds this many seconds of rate
    flag_after: float = 30.0            # over the limit this long: one flag
    close_after: float = 0.0            # and this long: streams closed (0: never)

    @property
    def active(self) -> bool:
        return self.bytes_per_second > 0 or self.stanzas_per_second > 0


class Bucket:
    """A token bucket that may go negative: a read is never refused (it was already
    read); the debt is how long reading pauses."""

    __slots__ = ("rate", "capacity", "tokens", "at")

    def __init__(self, rate: float, burst_seconds: float, now: float) -> None:
        self.rate = rate
        self.capacity = rate * burst_seconds
        self.tokens = self.capacity
        self.at = now

    def take(self, n: float, now: float) -> float:
        """Take ``n``; the seconds until the bucket is out of debt (0: none)."""
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


@dataclass
class Decision:
    pause: float = 0.0          # seconds to stop reading (0: read on)
    flag: bool = False          # first time over for flag_after: flag it
    close: bool = False         # over for close_after: close its streams


class _Remote:
    __slots__ = ("bytes", "stanzas", "over_since", "flagged")

    def __init__(self, cfg: RateConfig, now: float) -> None:
        self.bytes = Bucket(cfg.bytes_per_second, cfg.burst_seconds, now) \
            if cfg.bytes_per_second > 0 else None
        self.stanzas = Bucket(cfg.stanzas_per_second, cfg.burst_seconds, now) \
            if cfg.stanzas_per_second > 0 else None
        self.over_since: float | None = None
        self.flagged = False

    def take(self, nbytes: int, nstanzas: int, now: float) -> float:
        wait = 0.0
        if self.bytes is not None:
            wait = self.bytes.take(nbytes, now)
        if self.stanzas is not None and nstanzas:
            wait = max(wait, self.stanzas.take(nstanzas, now))
        return wait


class Limiter:
    """One bucket pair per remote domain (the most recently active
    ``RATE_LIMITED_DOMAINS``: an idle one is forgotten, which only refills it) and
    one per connection (kept by the connection itself)."""

    def __init__(self, domain: RateConfig, connection: RateConfig) -> None:
        self.domain = domain
        self.connection = connection
        self._remotes: OrderedDict[str, _Remote] = OrderedDict()

    def configure(self, domain: RateConfig, connection: RateConfig) -> bool:
        """New limits (a reload).  Unchanged: nothing changes.  Changed: each remote's
        buckets are made anew at the new rates, keeping what they owed (a reload is
        no way out of a debt).  True when the connection limits changed (the shell
        then gives each stream new connection buckets)."""
        if (domain, connection) == (self.domain, self.connection):
            return False
        changed = connection != self.connection
        self.domain, self.connection = domain, connection
        for name, old in list(self._remotes.items()):
            if not domain.active:
                del self._remotes[name]
                continue
            new = self._remotes[name] = _Remote(domain, old.bytes.at if old.bytes else
                                                old.stanzas.at if old.stanzas else 0.0)
            for attr in ("bytes", "stanzas"):
                a, b = getattr(old, attr), getattr(new, attr)
                if a is not None and b is not None:
                    b.tokens = min(b.capacity, a.tokens)
            new.over_since, new.flagged = old.over_since, old.flagged
        return changed

    @property
    def active(self) -> bool:
        return self.domain.active or self.connection.active

    def new_connection(self, now: float) -> _Remote | None:
        return _Remote(self.connection, now) if self.connection.active else None

    def account(self, remote: str, conn: _Remote | None, nbytes: int, nstanzas: int,
                now: float) -> Decision:
        """A read from ``remote`` on a connection (``conn`` from ``new_connection``):
        its bytes (before they are handled) or its stanzas (after)."""
        if not ((nbytes and (self.domain.bytes_per_second
                             or self.connection.bytes_per_second))
                or (nstanzas and (self.domain.stanzas_per_second
                                  or self.connection.stanzas_per_second))):
            return Decision()       # nothing limited was counted: the state stands
        wait = 0.0
        r = None
        if self.domain.active:
            r = self._remotes.get(remote)
            if r is None:
                r = self._remotes[remote] = _Remote(self.domain, now)
                while len(self._remotes) > RATE_LIMITED_DOMAINS:
                    self._remotes.popitem(last=False)
            else:
                self._remotes.move_to_end(remote)
            wait = r.take(nbytes, nstanzas, now)
        if conn is not None:
            wait = max(wait, conn.take(nbytes, nstanzas, now))
        d = Decision(pause=wait)
        state = r if r is not None else conn
        if state is None:
            return d
        cfg = self.domain if r is not None else self.connection
        if wait > 0:
            if state.over_since is None:
                state.over_since = now
            over = now - state.over_since
            if over >= cfg.flag_after and not state.flagged:
                state.flagged = d.flag = True
            if cfg.close_after and over >= cfg.close_after:
                d.close = True
        else:
            state.over_since = None
            state.flagged = False
        return d
