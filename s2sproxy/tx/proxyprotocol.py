"""PROXY protocol (v1 and v2) on a public listener: ``haproxy:tcp:...`` in
``public.starttls`` / ``public.direct_tls``, behind HAProxy (deploy/haproxy/).

Twisted's ``haproxy:`` endpoint is not used as it is, for three reasons this wrapper
fixes:

1. Its wrapper connects our protocol at TCP accept, before the header is read, so the
   peer address a stream starts with (logs, admission per source, ``s2sproxy
   status``) would be HAProxy's.  Here the stream is connected once the header gave
   the real one.
2. It does not pass on the TLS handshake's completion (``IHandshakeListener``), so a
   STARTTLS stream behind it never learnt that TLS was up.
3. A connection that never sends the header would be held without bound: it is
   dropped after ``PROXY_HEADER_TIMEOUT`` seconds.  (And a header whose first read is
   shorter than 16 bytes is read on, not refused.)  A health check (header, then
   close) never reaches the core and is not counted as a stream.
"""

from __future__ import annotations

from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.protocols.policies import ProtocolWrapper
from twisted.internet.protocol import Protocol
from zope.interface import directlyProvides, implementer, providedBy

from s2sproxy.core.limits import PROXY_HEADER_TIMEOUT

PREFIX = "haproxy:"


def split(desc: str) -> tuple[bool, str]:
    """(PROXY protocol wanted, the endpoint description without ``haproxy:``)."""
    if desc.lower().startswith(PREFIX):
        return True, desc[len(PREFIX):]
    return False, desc


@implementer(IHandshakeListener)
class ProxyHeaderWrapper(HAProxyProtocolWrapper):
    def makeConnection(self, transport) -> None:  # noqa: N802 (Twisted's name)
        # ProtocolWrapper.makeConnection without connecting the wrapped protocol yet
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._connected_inner = False
        self._timer = self.factory.clock.callLater(PROXY_HEADER_TIMEOUT, self._no_header)

    def _no_header(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._connected_inner:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            # Twisted's wrapper picks v1 or v2 on the first read and closes the
            # connection if that read is shorter than 16 bytes: wait for them
            self._head = getattr(self, "_head", b"") + data
            if len(self._head) < 16 and not (self._head.startswith(b"PROXY ")
                                             and b"\n" in self._head):
                return
            data, self._head = self._head, b""
        inner = self.wrappedProtocol
        captured: list[bytes] = []
        self.wrappedProtocol = _Capture(captured)      # what follows the header
        try:
            super().dataReceived(data)
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            return          # header incomplete (or refused: the connection is closing)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._connected_inner = True
        inner.makeConnection(self)          # getPeer() is now the remote's address
        for chunk in captured:
            if self.transport is not None and not self.disconnecting:
                inner.dataReceived(chunk)

    def handshakeCompleted(self) -> None:  # noqa: N802
        if self._connected_inner and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason) -> None:  # noqa: N802
        if getattr(self, "_timer", None) is not None and self._timer.active():
            self._timer.cancel()
        if getattr(self, "_connected_inner", False):
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)


class _Capture:
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.into.append(data)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    protocol = ProxyHeaderWrapper
    noisy = False

    def __init__(self, wrapped, clock) -> None:
        super().__init__(wrapped)
        self.clock = clock
