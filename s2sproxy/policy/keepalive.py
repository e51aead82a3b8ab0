"""Keepalive and dead-peer rules, sans-IO: the shell reports what each established
stream last sent and heard and the time; this module says what to send and which
stream is dead, and recognises the answers to its own pings.

Rules:

1. Whitespace: a stream we have written nothing to for ``whitespace`` seconds gets
   one space (RFC 6120 section 4.6.1), whatever kind of stream it is.
2. Ping: a stream that can carry our stanzas (``ends`` = the ping's (from, to)
   domains: our own outgoing streams, and a remote's bidi stream) gets one XEP-0199
   ping when the peer has been silent for ``ping`` seconds, silence counted from the
   last byte heard on the stream or from our last ping that was answered (so a
   one-way stream, whose answers come elsewhere, is pinged once per ``ping`` seconds,
   not on every poll).  At most one ping per stream is outstanding.
3. Alive: any byte heard on the stream after its ping was sent (``last_rx >
   sent_at``), or the ping's answer wherever it arrives, settles the ping.  On a
   one-way stream the answer comes on the peer's own stream to us, so answers are
   looked up across streams, in this one registry.
4. Dead: a ping still unsettled ``timeout`` seconds after it was sent ends the
   stream (``StreamDead``); its entry is removed then.
5. An answer counts only if it is an iq of type result or error, with the ping's id,
   from the pinged domain (the ping's ``to``) to the pinging domain (the ping's
   ``from``), domains compared canonically.  Ids are random (the shell injects the
   generator), so they cannot be guessed either.  Anything else, a second answer
   included, is an ordinary stanza.  This is what Prosody's ``module:send_iq``
   (core/moduleapi.lua) checks of an iq answer (type, id, and ``from`` equal to the
   request's ``to``); ejabberd's ``ejabberd_iq`` makes its iq ids random too.
6. Bounded: one entry per stream the shell has polled and not forgotten (its latest
   ping).  Its id is recognised until the answer comes, or, once the ping was
   settled by other bytes, until ``timeout`` has passed since it was sent (a late
   answer within that time is still consumed, not forwarded as an unsolicited
   response).  A stream that closes or can no longer carry pings is forgotten.

7. Idle parser: a stream silent for ``PARSER_RELEASE_IDLE`` seconds may drop its
   framer's expat parser (``parser_idle``); the framer itself refuses while anything
   is half-parsed, and makes a new parser at the next read.  A TLS stream that has
   neither read nor written for as long, and has carried ``TLS_RENEW_MIN_BYTES``
   since its buffers were last renewed (the shell renews them once at its first read
   after the handshake, whose certificates filled them), gets new empty TLS memory
   buffers (``buffers_idle``): OpenSSL's memory BIOs keep the largest size they ever
   held (a 16 KiB burst leaves 24 KiB per stream behind, measured), so an idle
   stream would hold its busiest moment.
   Once any of these were released, the freed memory is handed back to the system
   at a tick, at most every ``MEMORY_TRIM_INTERVAL`` seconds (``trim_due``): the C
   allocator keeps freed blocks amid live ones in the process's resident memory
   otherwise.

Rule 1 is Prosody's (plugins/mod_s2s.lua, ``keepalive`` on ``s2s-read-timeout``:
one space).  Neither Prosody nor ejabberd pings s2s peers (ejabberd's ``s2s_timeout``
is an idle timeout, ``ejabberd_s2s:get_idle_timeout``); a dead peer there is found by
TCP or XEP-0198.  Our ping finds a peer that holds the connection open but no longer
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

from s2sproxy.core.inbound import InboundState, InboundStream, Role
from s2sproxy.core.jid import nameprep_domain
from s2sproxy.core.limits import (MEMORY_TRIM_INTERVAL, PARSER_RELEASE_IDLE,
                                  TLS_RENEW_MIN_BYTES)
from s2sproxy.core.outbound import OutboundState, OutboundStream
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.stanza import Stanza

NS_PING = "urn:xmpp:ping"

Ends = tuple[str, str]          # (from, to) of our pings on a stream


@dataclass(frozen=True, slots=True)
class KeepaliveConfig:
    whitespace: float       # seconds of silence from us before a space
    ping: float             # seconds of silence from the peer before a ping
    timeout: float          # seconds after the ping before the stream is dead


@dataclass(slots=True)
class Ping:
    """One ping of ours: its id, canonical (from, to) domains and send time."""
    id: str
    frm: str
    to: str
    sent_at: float
    settled: bool = False   # answered, or the stream heard from after it (rule 3)

    @property
    def data(self) -> bytes:
        return (f"<iq type='get' id='{xml_escape(self.id)}' from='{xml_escape(self.frm)}' "
                f"to='{xml_escape(self.to)}'><ping xmlns='{NS_PING}'/></iq>").encode()


# -- decisions (orders to the shell) ------------------------------------------------

@dataclass(frozen=True, slots=True)
class SendWhitespace:
    data: bytes = b" "


@dataclass(frozen=True, slots=True)
class SendPing:
    ping: Ping
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamDead:
    """End the stream with a stream error; ``remote`` and ``timeout`` are the log
    facts (the pinged domain, the seconds waited)."""
    remote: str
    timeout: float
    condition: str = "connection-timeout"
    text: str = "no answer to keepalive ping"


Decision = SendWhitespace | SendPing | StreamDead


class Keepalive:
    """The keepalive decisions and the one registry of our pings.

    ``stream`` arguments are the shell's opaque, hashable handles (one per
    connection)."""

    def __init__(self, config: KeepaliveConfig, new_ping_id: Callable[[], str]) -> None:
        self.config = config
        self.new_ping_id = new_ping_id
        self._pings: dict[Hashable, Ping] = {}     # stream -> its latest ping
        self._by_id: dict[str, Hashable] = {}      # ids whose answer is still ours

    def __len__(self) -> int:
        """Pings whose answer would be consumed (0: no stanza can be one)."""
        return len(self._by_id)

    def outstanding(self, stream: Hashable) -> Ping | None:
        """The stream's ping if it is still waiting to be settled."""
        p = self._pings.get(stream)
        return None if p is None or p.settled else p

    def poll(self, stream: Hashable, now: float, last_tx: float, last_rx: float,
             ends: Ends | None) -> list[Decision]:
        """What to do on an established stream now, given when we last wrote to it
        and last heard from it, and the ends of our pings on it (None: it cannot
        carry our stanzas, whitespace only)."""
        c = self.config
        out: list[Decision] = []
        if now - last_tx >= c.whitespace:
            out.append(SendWhitespace())
        if ends is None:
            self.forget(stream)
            return out
        p = self._pings.get(stream)
        heard = last_rx
        if p is not None:
            if last_rx > p.sent_at:
                p.settled = True
            if not p.settled:
                if now - p.sent_at >= c.timeout:
                    self.forget(stream)
                    out.append(StreamDead(p.to, c.timeout))
                return out
            if now - p.sent_at >= c.timeout:
                self._by_id.pop(p.id, None)    # rule 6: too late to be its answer
            heard = max(last_rx, p.sent_at)
        if now - heard >= c.ping:
            p = self._register(stream, ends, now)
            out.append(SendPing(p, p.data))
        return out

    def answered(self, s: Stanza) -> Hashable | None:
        """The stream whose ping ``s`` answers (the ping is then settled and its id
        retired), or None: ``s`` is an ordinary stanza (rule 5)."""
        stream = self._by_id.get(s.id) if s.kind == "iq" else None
        if stream is None:
            return None
        p = self._pings[stream]
        if s.type not in ("result", "error") or s.from_domain != p.to \
                or s.to_domain != p.frm:
            return None
        del self._by_id[p.id]
        p.settled = True
        return stream

    def without_answers(self, stanzas: list[Stanza]) -> list[Stanza]:
        """``stanzas`` less the answers to our pings (consumed, as ``answered``): the
        same list when there is none, which is the per-stanza hot path."""
        by_id = self._by_id
        if by_id:
            for s in stanzas:
                if s.kind == "iq" and s.id in by_id:
                    answered = self.answered
                    return [s for s in stanzas if answered(s) is None]
        return stanzas

    def forget(self, stream: Hashable) -> None:
        """The stream is gone (or can no longer carry pings): drop its ping."""
        p = self._pings.pop(stream, None)
        if p is not None:
            self._by_id.pop(p.id, None)

    def _register(self, stream: Hashable, ends: Ends, now: float) -> Ping:
        self.forget(stream)     # the new ping replaces the settled one
        pid = self.new_ping_id()
        while pid in self._by_id:
            pid = self.new_ping_id()
        p = Ping(pid, nameprep_domain(ends[0]), nameprep_domain(ends[1]), now)
        self._pings[stream] = p
        self._by_id[pid] = stream
        return p


def parser_idle(now: float, last_rx: float, after: float = PARSER_RELEASE_IDLE) -> bool:
    """Rule 7: the stream has been silent long enough to hold no parser."""
    return now - last_rx >= after


def buffers_idle(now: float, last_rx: float, last_tx: float, moved: int,
                 after: float = PARSER_RELEASE_IDLE) -> bool:
    """Rule 7: neither read nor written for ``after`` seconds, and at least
    ``TLS_RENEW_MIN_BYTES`` moved either way since the buffers were last renewed
    (``moved``): a keepalive's byte a minute never makes a stream renew its buffers
    again and again."""
    last = last_rx if last_rx > last_tx else last_tx
    return now - last >= after and moved >= TLS_RENEW_MIN_BYTES


def trim_due(now: float, trimmed_at: float, every: float = MEMORY_TRIM_INTERVAL) -> bool:
    """Rule 7: memory was released since ``trimmed_at``; hand it back unless that
    was done lately."""
    return now - trimmed_at >= every


def established(st: object) -> bool:
    """The stream is open for stanzas and we have not begun closing it."""
    return not st.local_closed and st.state in (InboundState.OPEN, OutboundState.READY)


def ping_ends(st: object) -> Ends | None:
    """(from, to) for a keepalive ping on a stream that can carry our stanzas: our own
    outgoing streams, and a remote's authenticated bidi stream; None for one-way
    inbound streams (remotes' and ejabberd's), where we may not send stanzas."""
    if isinstance(st, OutboundStream):
        return st.config.originating, st.config.receiving
    if isinstance(st, InboundStream) and st.role is Role.PUBLIC and st.bidi \
            and st.authenticated:
        originating, receiving = min(st.authenticated)
        return receiving, originating
    return None
