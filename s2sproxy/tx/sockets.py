"""Writes that leave at once.

Twisted's TCP transport never sends in ``write``: it keeps the bytes, asks the
reactor to watch the socket for writability (an ``epoll_ctl``), and sends in
``doWrite`` at the reactor's next iteration, after which it stops watching (another
``epoll_ctl``).  A relay writes in answer to a read, when the socket is almost always
writable, so that costs two system calls, one more ``epoll_wait`` and a reactor
iteration per read: about a tenth of s2sproxy's CPU per stanza at 10k stanzas/s
(issue 9).  ``write_now`` sends at once when nothing waits in Twisted's buffer, and
hands Twisted whatever the socket did not take; Twisted's own ``writeSomeData``
does the sending, so its handling of a full buffer is kept, and a lost connection
is left to ``doWrite`` to find and report as before.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper

try:    # the transport of Twisted's TLS layer after ``startTLS``
    from twisted.internet._newtls import _BypassTLS
except ImportError:     # pragma: no cover
    _BypassTLS = None


def tcp_connection(transport: object) -> Connection | None:
    """The TCP connection that bytes written to ``transport`` go to unchanged: a
    plain TCP transport, the one under a TLS layer's bypass (``startTLS``), or the
    one under a protocol wrapper that passes writes through as they are (the PROXY
    protocol's, ``tx.proxyprotocol``).  None for anything else (a TCP transport that
    encrypts after STARTTLS, a wrapper that counts or changes writes, a test's memory
    transport): those are written to as they are."""
    while (type(transport).write is ProtocolWrapper.write
           and not transport.disconnecting):
        transport = transport.transport
    if _BypassTLS is not None and type(transport) is _BypassTLS:
        transport = transport._connection
        return transport if isinstance(transport, Connection) else None
    if isinstance(transport, Connection) and not transport.TLS:
        return transport
    return None


def write_now(transport: object, data: bytes) -> None:
    """``transport.write(data)``, sent now when it can be (see the module's text).
    Order is kept: only when Twisted holds nothing, and only on a connection that is
    not closing (nor aborted: Twisted drops what is written after
    ``abortConnection``), is anything sent here.  A pull producer on the connection
    is asked for more only by ``doWrite``: then Twisted writes, as it would."""
    tcp = tcp_connection(transport)
    if (tcp is None or not tcp.connected or tcp.disconnecting or tcp._tempDataLen
            or tcp.offset != len(tcp.dataBuffer) or tcp._writeDisconnecting
            or tcp._writeDisconnected or getattr(tcp, "_aborting", False)
            or (tcp.producer is not None and not tcp.streamingProducer) or not data):
        transport.write(data)
        return
    sent = tcp.writeSomeData(data)
    if not isinstance(sent, int) or sent < 0:
        # Lost.  The send took the socket's pending error (ECONNRESET), so a read
        # now would find a clean end of file: reading stops, and the write below
        # lets doWrite meet the error and report the connection lost, as it was.
        tcp.stopReading()
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)
