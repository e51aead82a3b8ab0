"""Events: facts the Twisted shell reports to a stream state machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)   # not frozen: made per read, and frozen costs
class DataReceived:
    data: bytes


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """The TLS handshake finished.  ``chain_valid`` says whether the peer's certificate
    chain verified against the configured trust anchors (checked by the shell, which
    owns the trust store); ``certificate`` is the peer's leaf (a
    ``cryptography.x509.Certificate``) or None when it sent none."""
    chain_valid: bool
    certificate: Any = None


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DialbackVerdict:
    """The authoritative server's answer to a ``VerifyDialback`` action.

    ``valid`` is True/False, or None when it could not be asked; ``condition`` then
    names the XEP-0220 error (``remote-server-not-found``, ``remote-server-timeout``).
    """
    originating: str
    receiving: str
    valid: bool | None
    condition: str = ""


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str
