"""Writes that leave at once.

Twisted's TCP transport never sends in ``write``: it keeps the bytes, asks the
reactor to watch the socket for writability (an ``epoll_ctl``), and sends in
``doWrite`` at the reactor's next iteration, after which it stops watching (another
``epoll_ctl``).  A relay writes in answer to a read, when the socket is almost always
writable, so that costs two system calls, one more ``epoll_wait`` and a reactor
iteration per read: about a tenth of s2sproxy's CPU per stanza at 10k stanzas/s
(issue 9).  ``write_now`` sends at once when nothing waits in Twisted's buffer, and
hands Twisted whatever the socket did not take, as Twisted's ``writeSomeData``
would (a full buffer is no error); a lost connection is still found and reported by
the reactor, with the reason it gave before.
"""

from __future__ import annotations

from errno import ENOBUFS, EPIPE, EWOULDBLOCK

from twisted.internet import main
from twisted.internet.error import ConnectionDone
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
            or tcp._writeDisconnected or tcp._aborting
            or (tcp.producer is not None and not tcp.streamingProducer) or not data):
        transport.write(data)
        return
    try:    # Twisted's writeSomeData, which would hide the error's number
        sent = tcp.socket.send(data if len(data) <= tcp.SEND_LIMIT
                               else memoryview(data)[:tcp.SEND_LIMIT])
    except OSError as e:
        sent = 0
        if e.errno not in (EWOULDBLOCK, ENOBUFS, EPIPE):
            _reset_taken(tcp)
    if sent < len(data):
        # the rest, or all of it when the connection is lost: doWrite meets the
        # error (EPIPE from now on) unless a read reports the end first
        transport.write(data[sent:] if sent else data)


def _reset_taken(tcp: Connection) -> None:
    """The send took the socket's pending error (ECONNRESET): what the peer sent
    before it is still read, but the read after it finds a clean end of file, which
    Twisted would report as ConnectionDone.  It is reported lost, as a read would
    have reported the reset.  (EPIPE takes nothing: the peer's FIN and RST came
    before, the reactor reads what the peer sent, and then doWrite meets EPIPE with
    what was written here.)"""
    read = tcp.doRead

    def do_read() -> object:
        why = read()
        return main.CONNECTION_LOST if isinstance(why, ConnectionDone) else why
    tcp.doRead = do_read       # as Twisted's abortConnection replaces it
