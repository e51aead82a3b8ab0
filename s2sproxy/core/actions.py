"""Actions: orders a stream state machine gives the Twisted shell."""

from __future__ import annotations

from dataclasses import dataclass

from s2sproxy.core.stanza import Stanza


@dataclass(slots=True)   # not frozen: made per read, and frozen costs
class SendBytes:
    data: bytes


@dataclass(frozen=True, slots=True)
class StartTls:
    """Begin TLS now.  ``server_name``: for a server role, the certificate to present
    when the client sends no SNI; for a client role, the SNI to send."""
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the TCP connection (after the bytes already ordered are written).
    ``condition`` is the stream error that ended the stream, for the log.  ``abort``:
    drop it at once, nothing can be written (a TLS handshake that never completed)."""
    condition: str = ""
    text: str = ""
    abort: bool = False


@dataclass(frozen=True, slots=True)
class AuthFailed:
    """A peer's authentication was refused on this stream (for the metrics):
    ``method`` "external" or "dialback", ``condition`` the SASL failure or the
    dialback error (``invalid`` for a key that did not verify)."""
    method: str
    condition: str


@dataclass(frozen=True, slots=True)
class DialbackAnswered:
    """A peer asked us (as authoritative server) whether a key we issued is valid
    (``db:verify``), and was answered: for the log, since with several instances
    behind a load balancer the answer may come from one that did not issue it."""
    originating: str
    receiving: str
    valid: bool


@dataclass(frozen=True, slots=True)
class Authenticated:
    """``originating`` proved its identity on this stream to send as it to ``receiving``."""
    originating: str
    receiving: str
    method: str          # "external" | "dialback"


@dataclass(frozen=True, slots=True)
class BidiNegotiated:
    """The peer asked to use this stream in both directions (XEP-0288)."""


@dataclass(slots=True)   # not frozen: made per read, and frozen costs
class DeliverStanzas:
    """Stanzas accepted on this stream, in order, to be routed."""
    stanzas: list[Stanza]


@dataclass(frozen=True, slots=True)
class VerifyDialback:
    """Ask ``originating``'s authoritative server whether ``key`` is its key for
    (``receiving``, ``originating``, ``stream_id``); answer with ``DialbackVerdict``."""
    originating: str
    receiving: str
    stream_id: str
    key: str


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    name: str


@dataclass(frozen=True, slots=True)
class StreamReady:
    """An outgoing stream is authenticated and may carry stanzas now."""


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """An outgoing stream could not be set up; ``condition`` is the stanza error
    condition for bouncing what waited for it."""
    condition: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class PairReady:
    """A further domain pair is authenticated on this outgoing stream (XEP-0220 sender
    multiplexing): the remote answered 'valid' to our ``db:result`` for it."""
    originating: str
    receiving: str


@dataclass(frozen=True, slots=True)
class PairFailed:
    """A further domain pair was not authenticated on this outgoing stream.
    ``outcome`` is what happened ("invalid", "error CONDITION", "timeout", or "not
    tried" when the stream could not ask, ``tried`` False: nothing was refused, the
    pair needs a stream of its own); ``condition`` is the stanza error for what waited
    for the pair."""
    originating: str
    receiving: str
    outcome: str
    condition: str
    text: str = ""
    tried: bool = True


@dataclass(frozen=True, slots=True)
class RetireStream:
    """This outgoing stream should carry nothing more: stop writing on it and close it
    cleanly; the pairs it carried go on other streams."""
    text: str = ""


@dataclass(frozen=True, slots=True)
class Flag:
    """Something unexpected, with its stable reason code and the action taken
    (forward, drop, bounce, close).  ``raw`` is the offending element, if any."""
    reason: str
    action: str
    detail: str = ""
    kind: str = ""
    type: str | None = None
    id: str | None = None
    from_: str | None = None
    to: str | None = None
    raw: bytes = b""


Action = (SendBytes | StartTls | CloseConnection | AuthFailed | DialbackAnswered
          | Authenticated
          | BidiNegotiated
          | DeliverStanzas | VerifyDialback | SetTimer | CancelTimer | StreamReady
          | StreamFailed | PairReady | PairFailed | RetireStream | Flag)
