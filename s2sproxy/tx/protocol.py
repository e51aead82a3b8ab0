"""The Twisted protocol around one core stream: bytes in, actions out.

It knows sockets, TLS and timers; every protocol decision is the core's.  Actions
that concern more than this connection (authenticated, deliver stanzas, verify a
dialback key, ...) go to ``self.owner``, the service that routes between streams.

Every s2s connection is one of these, accepted or ours (public STARTTLS and Direct
TLS listeners, the backend listener, streams to remotes and to ejabberd, dialback
verification), so ``connectionMade`` is where each socket gets ``TCP_NODELAY``.
"""

from __future__ import annotations

from typing import Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol
from s2sproxy.logs import get_logger
from twisted.python.failure import Failure
from zope.interface import implementer

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.limits import CLOSE_GRACE, TLS_RENEW_MIN_BYTES
from s2sproxy.tx.sockets import write_now
from s2sproxy.tx.tls import batch_tls, renew_buffers, tls_connection_of

log = get_logger(__name__)

_OUTCOMES = (A.StreamFailed, E.DialbackVerdict, A.AuthFailed, A.DialbackAnswered)


class Owner(TypingProtocol):
    def admit(self, proto: "StreamProtocol") -> bool: ...
    def stream_action(self, proto: "StreamProtocol", action: Any) -> None: ...
    def start_tls(self, proto: "StreamProtocol", server_name: str | None) -> None: ...
    def check_peer(self, proto: "StreamProtocol") -> E.TlsEstablished: ...
    def stream_lost(self, proto: "StreamProtocol") -> None: ...
    def tls_failed(self, proto: "StreamProtocol") -> None: ...


def no_delay(transport: object) -> None:
    """Turn Nagle's algorithm off on the TCP socket under ``transport``: a stanza is
    written as soon as it is read, and with Nagle the peer's delayed ACK held small
    writes back (1.4 ms at p50, 10.7 ms at p99 at 10k stanzas/s; issue 9).  Behind
    TLSMemoryBIOProtocol (Direct TLS) the call reaches the TCP transport through the
    wrapper's attribute delegation.  A transport without the method (a test's memory
    transport) is left alone, and a failure to set it is no reason to drop the
    connection (Twisted's TCP transport logs and ignores its own ``OSError``)."""
    try:
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
    except Exception:  # noqa: BLE001 (a latency option, never worth the connection)
        log.failure("cannot set TCP_NODELAY")


def _short(reason: str) -> str:
    """Twisted's connection-lost text, as the closing log line gives it."""
    if reason.startswith("Connection was closed cleanly"):
        return "connection closed"
    if reason.startswith("Connection to the other side was lost"):
        return "connection lost"
    return reason.rstrip(".") or "connection closed"


@implementer(IHandshakeListener)
class StreamProtocol(Protocol):
    def __init__(self, stream: Any, owner: Owner, clock: IReactorTime, label: str) -> None:
        self.stream = stream
        self.owner = owner
        self.clock = clock
        self.label = label
        self.timers: dict[str, IDelayedCall] = {}
        self.peer = ""
        self.closing = False
        now = clock.seconds()
        self.opened_at = now
        self.last_rx = now          # what policy.keepalive is told (its pings are
        self.last_tx = now          # in its own registry, see Proxy._keepalive)
        # what ``s2sproxy status`` and the closing log line report
        self.rx_bytes = self.tx_bytes = self.rx_stanzas = self.tx_stanzas = 0
        self.close_reason = ""      # the stream error of a CloseConnection, if any
        self.admitted = False
        self.rate: Any = None       # [ratelimit]: (remote domain, connection bucket)
        self.paused = False
        self._held: list[bytes] = []   # read while paused: handled at resume
        self._paid = False             # the first held read is already accounted
        self.tls_started = False    # STARTTLS begun (Direct TLS: from the start)
        self.tls_done = False
        # TLS: the records one TCP read brings, handled as one read (tls.BatchingTLS)
        self._batch: list[bytes] | None = None
        # rx + tx bytes at the last TLS buffer renewal; below 0 until the first, due
        # at the first read after the handshake (BatchingTLS.dataReceived): its
        # certificates filled the buffers, uncounted in rx_bytes and tx_bytes
        self.renewed_bytes = -TLS_RENEW_MIN_BYTES

    # -- Twisted callbacks -----------------------------------------------------------

    def connectionMade(self) -> None:  # noqa: N802
        p = self.transport.getPeer()
        self.peer = f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"
        if not self.owner.admit(self):
            self.transport.abortConnection()    # refused before reading a byte
            return
        self.admitted = True
        no_delay(self.transport)
        if self.factory_label() is not None:
            log.info("{label} stream {peer} connected", label=self.label, peer=self.peer)
        # An accepted connection is announced at its first byte: a load balancer's
        # health check (connect, close) is no stream, and logs at debug only.
        start = getattr(self.stream, "start", None)
        if start is not None:
            self.run(start())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._batch is not None:
            self._batch.append(data)    # one TLS record of a TCP read (BatchingTLS)
            return
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        self.last_rx = self.clock.seconds()
        if not self.rx_bytes and self.factory_label() is None:
            log.info("{label} stream {peer} accepted", label=self.label, peer=self.peer)
        self.rx_bytes += len(data)
        if self.rate is None:
            self.handle(E.DataReceived(data))
            return
        self._rate_limited(data)

    # -- [ratelimit] (decided by policy.ratelimit through the owner) -------------------

    def _rate_limited(self, data: bytes) -> None:
        """Bytes are accounted before they are handled: over the limit, they are held
        (with what TLS decodes from the same read after the pause) and reading pauses
        until the budget allows them; stanzas are accounted once handled."""
        if self.paused:
            self._held.append(data)
            return
        self._held = [data]
        self._drain(resume=False)

    def _drain(self, resume: bool = True) -> None:
        """Handle held reads while the budget allows; pause at the first it does not.
        A bug of ours here ends this connection, as in ``handle``."""
        try:
            self._drain_held(resume)
        except Exception:  # noqa: BLE001 (the tx boundary)
            log.failure("{label} stream {peer}: internal error", label=self.label,
                        peer=self.peer)
            self.transport.abortConnection()

    def _flush_held(self) -> None:
        """The connection is going: what was held is handled now, unaccounted."""
        held, self._held = self._held, []
        self.rate = None
        for chunk in held:
            self.handle(E.DataReceived(chunk))

    def _drain_held(self, resume: bool) -> None:
        while self._held and not self.closing:
            data = self._held[0]
            wait = self.owner.account_read(self, len(data), 0) if not self._paid else 0.0
            if wait > 0 and not self.closing:
                self._paid = True           # accounted: handled when the pause ends
                self._pause(wait)
                return
            self._paid = False
            self._held.pop(0)
            before = self.rx_stanzas
            self.handle(E.DataReceived(data))
            n = self.rx_stanzas - before
            if n and not self.closing:
                wait = self.owner.account_read(self, 0, n)
                if wait > 0 and not self.closing:
                    self._pause(wait)
                    return
        if resume and not self.closing and self.transport is not None:
            self.transport.resumeProducing()

    def _pause(self, seconds: float) -> None:
        """Stop reading for ``seconds`` (TCP back-pressure on the peer)."""
        self.paused = True
        self.transport.pauseProducing()
        self._cancel("resume")
        self.timers["resume"] = self.clock.callLater(seconds, self._resume)

    def _resume(self) -> None:
        self.timers.pop("resume", None)
        self.paused = False
        self._drain()

    def handle(self, event: object) -> None:
        """Feed the core one event and run its actions.  This is the tx boundary: a bug
        of ours (an exception here) ends this connection only, with
        internal-server-error and a logged traceback (LocalProtocolError in STYLE)."""
        try:
            self.run(self.stream.handle(event))
        except Exception:  # noqa: BLE001
            log.failure("{label} stream {peer}: internal error", label=self.label,
                        peer=self.peer)
            try:
                self.run(self.stream.fail("internal-server-error"))
            except Exception:  # noqa: BLE001
                self.transport.abortConnection()

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.last_tx = self.clock.seconds()
            self.tx_bytes += len(data)
            write_now(self.transport, data)

    def write_stanzas(self, data: bytes, n: int) -> None:
        """``n`` stanzas' bytes, from a router."""
        if not self.closing:
            self.tx_stanzas += n
            self.write(data)

    def renew_buffers(self) -> bool:
        """New, empty TLS memory buffers for an idle stream (``tls.renew_buffers``).
        True if renewed."""
        if renew_buffers(self.transport, self):
            self.renewed_bytes = self.rx_bytes + self.tx_bytes
            return True
        return False

    def handshakeCompleted(self) -> None:  # noqa: N802
        self.tls_done = True
        batch_tls(self.transport, self)
        self.handle(self.owner.check_peer(self))

    def connectionLost(self, reason: Failure = None) -> None:  # noqa: N802
        if self._batch:                 # the TLS read that ended it brought these first
            batch, self._batch = self._batch, None
            self._receive(b"".join(batch))
        self._batch = None
        self.connected = False          # the transport is gone, its last bytes written
        for call in self.timers.values():
            if call.active():
                call.cancel()
        self.timers.clear()
        if self._held:
            self._flush_held()          # read before the connection went: handled
        text = reason.getErrorMessage() if reason is not None else ""
        direct = getattr(getattr(self.stream, "config", None), "direct_tls", False)
        if self.admitted and (self.tls_started or direct) and not self.tls_done:
            tls_failed = getattr(self.owner, "tls_failed", None)
            if tls_failed is not None:
                tls_failed(self)
        self.handle(E.ConnectionLost(text))
        self._gone()
        quiet = not self.rx_bytes and self.factory_label() is None
        (log.debug if quiet else log.info)(
                 "{label} stream {peer} closed: {reason} (after {age:.1f} s; in "
                 "{rx_stanzas} stanzas, {rx_bytes} bytes; out {tx_stanzas} stanzas, "
                 "{tx_bytes} bytes)", label=self.label, peer=self.peer,
                 reason=self.close_reason or getattr(self.stream, "end_reason", "")
                 or _short(text),
                 age=self.clock.seconds() - self.opened_at, rx_stanzas=self.rx_stanzas,
                 rx_bytes=self.rx_bytes, tx_stanzas=self.tx_stanzas,
                 tx_bytes=self.tx_bytes)

    def factory_label(self) -> str | None:
        """``backend``, ``remote`` or ``verify`` for a connection we opened."""
        f = getattr(self, "factory", None)
        return getattr(f, "label", None)

    def _gone(self) -> None:
        """From the first CloseConnection on, nothing may be routed to this stream."""
        if not self.closing:
            self.closing = True
            self.owner.stream_lost(self)

    # -- running actions -----------------------------------------------------------------

    def run(self, actions: list) -> None:
        for a in actions:
            t = type(a)
            if t is A.DeliverStanzas and not self.closing:
                self.rx_stanzas += len(a.stanzas)
                self.owner.stream_action(self, a)       # the usual action of a read
            elif t is A.SendBytes:
                self.write(a.data)
            elif t is A.StartTls:
                self.tls_started = True
                self.owner.start_tls(self, a.server_name)
            elif t is A.CloseConnection:
                if a.condition and not self.close_reason:
                    # logged with the rest when the connection is gone
                    self.close_reason = f"{a.condition} {a.text}".rstrip()
                self._gone()
                if a.abort:
                    self.transport.abortConnection()
                    continue
                self.transport.loseConnection()
                if "abort" not in self.timers:
                    self.timers["abort"] = self.clock.callLater(CLOSE_GRACE, self._abort)
            elif t is A.SetTimer:
                self._cancel(a.name)
                self.timers[a.name] = self.clock.callLater(a.seconds, self._fire, a.name)
            elif t is A.CancelTimer:
                self._cancel(a.name)
            elif not self.closing or t in _OUTCOMES:
                # Once the stream is closed (a policy close may come in the middle of
                # one read's actions), what the rest of the read said is void: only
                # the stream's outcome (failed, a dialback verdict) is still reported.
                self.owner.stream_action(self, a)

    def _cancel(self, name: str) -> None:
        call = self.timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _fire(self, name: str) -> None:
        self.timers.pop(name, None)
        self.handle(E.TimerFired(name))

    def _abort(self) -> None:
        """The peer did not let the connection close in CLOSE_GRACE seconds."""
        self.timers.pop("abort", None)
        self.transport.abortConnection()

    def close(self) -> None:
        if self.rate is not None:
            # a stream we close is read to its end, unpaused: the peer's last stanzas
            # and its </stream:stream> are not held back by a rate limit
            self._cancel("resume")
            self._flush_held()
            if self.paused:
                self.paused = False
                self.transport.resumeProducing()
        self.run(self.stream.close())

    def tls_connection(self):
        return tls_connection_of(self.transport)
