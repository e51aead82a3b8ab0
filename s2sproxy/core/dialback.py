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
