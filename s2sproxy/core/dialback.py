"""Server Dialback keys (XEP-0220) derived per XEP-0185.

    key = HEX( HMAC-SHA256( SHA256(secret), receiving + ' ' + originating + ' ' + id ) )

The key is stateless: any s2sproxy instance holding the same secret recognises a key
another instance issued, which is what lets several instances stand behind one load
balancer.
"""

from __future__ import annotations

import hashlib
import hmac


class DialbackKeys:
    def __init__(self, secret: bytes) -> None:
        self._k = hashlib.sha256(secret).hexdigest().encode()

    def key(self, receiving: str, originating: str, stream_id: str) -> str:
        msg = f"{receiving} {originating} {stream_id}".encode("utf-8")
        return hmac.new(self._k, msg, hashlib.sha256).hexdigest()

    def check(self, receiving: str, originating: str, stream_id: str, key: str) -> bool:
        """Constant-time comparison of a presented key with the derived one."""
        expected = self.key(receiving, originating, stream_id)
        return hmac.compare_digest(expected.encode(), key.strip().encode("utf-8", "replace"))


class Verification:
    """How a key another server gave us is to be checked (``verification_route``)."""
    REFUSE = "refuse"       # our own outgoing connection came back: never trusted
    TRUSTED = "trusted"     # ejabberd's stream from a trusted backend address
    BUSY = "busy"           # MAX_VERIFICATIONS in flight: resource-constraint
    ASK = "ask"             # ask the authoritative server (or ejabberd itself)


def verification_route(*, own_connection: bool, backend: bool, peer_host: str,
                       trusted_addresses: frozenset[str] | tuple[str, ...],
                       in_flight: int, bound: int) -> str:
    """A connection of ours that came back to us (a remote's DNS pointing at our
    listener) is refused, never trusted by address: it would loop every stanza.  A
    backend stream from ``trusted_addresses`` is trusted without asking.  Otherwise at
    most ``bound`` verifications are in flight."""
    if own_connection:
        return Verification.REFUSE
    if backend and peer_host in trusted_addresses:
        return Verification.TRUSTED
    if in_flight >= bound:
        return Verification.BUSY
    return Verification.ASK
