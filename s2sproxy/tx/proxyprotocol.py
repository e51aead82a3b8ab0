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

from ipaddress import ip_address, ip_network

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
    _connected_inner = False
    _timer = None

    def makeConnection(self, transport) -> None:  # noqa: N802 (Twisted's name)
        # ProtocolWrapper.makeConnection without connecting the wrapped protocol yet
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if not self.factory.trusted(transport.getPeer()):
            # anyone else could claim any address in the header
            self.factory.refused += 1
            self.disconnecting = 1
            transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(PROXY_HEADER_TIMEOUT, self._no_header)

    def abortConnection(self) -> None:  # noqa: N802
        self.disconnecting = 1      # nothing more reaches the wrapped protocol
        self.transport.abortConnection()

    def _no_header(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        if self._connected_inner:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
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
            if self.disconnecting:          # refused by admission, or failed at once
                break
            inner.dataReceived(chunk)

    def handshakeCompleted(self) -> None:  # noqa: N802
        if self._connected_inner and IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason) -> None:  # noqa: N802
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._connected_inner:
            ProtocolWrapper.connectionLost(self, reason)
        else:
            self.factory.unregisterProtocol(self)


class _Capture:
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.into.append(data)


class ProxyHeaderFactory(HAProxyWrappingFactory):
    """``sources``: the networks a PROXY header is taken from (``public.proxy_sources``,
    the load balancers); a connection from anywhere else is dropped at accept."""

    protocol = ProxyHeaderWrapper
    noisy = False

    def __init__(self, wrapped, clock, sources=(ip_network("127.0.0.0/8"),
                                                 ip_network("::1"))) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.sources = tuple(sources)
        self.refused = 0

    def trusted(self, peer) -> bool:
        try:
            ip = ip_address(str(getattr(peer, "host", "")).split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == n.version and ip in n for n in self.sources)
