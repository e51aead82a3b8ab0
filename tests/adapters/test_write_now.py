"""``tx.sockets.write_now``: a write that leaves at once instead of at the reactor's
next iteration (issue 9), on real loopback sockets.  The other end is a plain blocking
socket read without giving the reactor a turn, so bytes it finds were sent inside
the call."""

from __future__ import annotations

import socket
import ssl

import pytest_twisted
from twisted.internet import defer, protocol, task, threads
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHandshakeListener, IPullProducer
from zope.interface import implementer

from s2sproxy.tx.sockets import tcp_connection, write_now
from s2sproxy.tx.tls import BatchingTLS, batch_tls

LOOPBACK = "127.0.0.1"


class Server(protocol.Protocol):
    def connectionMade(self):  # noqa: N802
        self.lost = None
        self.received = b""
        self.factory.accepted.callback(self)

    def dataReceived(self, data):  # noqa: N802
        self.received += data

    def connectionLost(self, reason=None):  # noqa: N802
        self.lost = reason


async def pair():
    """(Twisted's accepted protocol, a blocking client socket, the listening port)."""
    from twisted.internet import reactor
    f = protocol.Factory.forProtocol(Server)
    f.accepted = defer.Deferred()
    port = reactor.listenTCP(0, f, interface=LOOPBACK)
    client = socket.create_connection((LOOPBACK, port.getHost().port), timeout=5)
    server = await f.accepted
    return server, client, port


def recv_exactly(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"closed after {len(out)} of {n} bytes"
        out += chunk
    return out


async def until(found, timeout: float = 10.0):
    from twisted.internet import reactor
    deadline = reactor.seconds() + timeout
    while not found():
        assert reactor.seconds() < deadline, "timed out"
        await task.deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_plain_tcp_transport_is_sent_within_the_call():
    server, client, port = await pair()
    try:
        tcp = server.transport
        assert tcp_connection(tcp) is tcp
        write_now(tcp, b"<presence/>")
        assert tcp._tempDataLen == 0 and not tcp.dataBuffer   # Twisted holds nothing
        assert recv_exactly(client, 11) == b"<presence/>"      # no reactor turn taken
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_waits_in_twisted_and_order_is_kept():
    """A peer that does not read: the kernel's buffers fill, the rest goes to
    Twisted's buffer, and later writes queue behind it (none jumps ahead); loseConnection
    afterwards still writes everything before closing."""
    server, client, port = await pair()
    try:
        tcp = server.transport
        chunk = bytes(range(256)) * 1024                     # 256 KiB, numbered
        sent = []
        for i in range(64):                                  # far more than buffers hold
            data = bytes([i]) + chunk
            write_now(tcp, data)
            sent.append(data)
            if tcp._tempDataLen:
                break
        assert tcp._tempDataLen, "the socket took 16 MiB without blocking"
        for i in range(3):
            data = b"after %d" % i
            write_now(tcp, data)
            sent.append(data)
        tcp.loseConnection()
        want = b"".join(sent)
        got = await threads.deferToThread(lambda: recv_all(client))
        assert got == want
    finally:
        client.close()
        await port.stopListening()


def recv_all(sock) -> bytes:
    out = []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return b"".join(out)
        out.append(chunk)


@pytest_twisted.ensureDeferred
async def test_a_write_to_a_reset_connection_is_left_to_twisted_to_report():
    """The peer is gone (RST): the send fails, nothing is raised here, and the reactor
    reports the loss to the protocol as for any write."""
    from twisted.internet import reactor
    server, client, port = await pair()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                          b"\x00\x00\x00\x00")
        client.close()                                       # RST
        for _ in range(20):
            write_now(server.transport, b"x" * 1000)
            if server.lost is not None:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        await until(lambda: server.lost is not None)
        # the send took the socket's error: a read after it would have found a clean
        # end of file and reported the reset as a clean close
        assert server.lost.check(ConnectionLost) and not server.lost.check(ConnectionDone), \
            server.lost
    finally:
        await port.stopListening()


LAST_WORDS = b"<message>last words</message></stream:stream>"


@pytest_twisted.ensureDeferred
async def test_what_the_peer_sent_before_a_reset_is_read_and_the_reset_reported():
    """The peer's last bytes, then an RST, then our write: its bytes reach the
    protocol and the end is a loss, even when reading was paused and resumed in
    between (resumeProducing turns reading back on)."""
    import time
    for pause in (False, True):
        server, client, port = await pair()
        try:
            if pause:
                server.transport.pauseProducing()
            client.sendall(LAST_WORDS)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00"
                              b"\x00\x00\x00\x00")
            client.close()                                   # RST after the bytes
            time.sleep(0.05)                                 # it has arrived
            write_now(server.transport, b"<presence/>")
            if pause:
                server.transport.resumeProducing()
            await until(lambda: server.lost is not None)
            assert server.received == LAST_WORDS, (pause, server.received)
            assert server.lost.check(ConnectionLost) and not server.lost.check(
                ConnectionDone), (pause, server.lost)
        finally:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_peer_that_closed_is_read_to_the_end_before_the_loss_is_reported():
    """The peer sends its last bytes and closes (FIN); two writes follow before the
    reactor reads (the first draws an RST, the second EPIPE): its bytes are read
    first, then the end is reported as lost: the second write never reached it.
    (Twisted alone merged both writes into one send, which the peer's RST
    answered after the fact, and called it a clean close.)"""
    import time
    server, client, port = await pair()
    try:
        client.sendall(LAST_WORDS)
        client.close()
        time.sleep(0.05)
        write_now(server.transport, b"<presence/>")
        time.sleep(0.05)
        write_now(server.transport, b"<presence/>")
        await until(lambda: server.lost is not None)
        assert server.received == LAST_WORDS
        assert server.lost.check(ConnectionLost), server.lost
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_nothing_written_after_abort_connection_reaches_the_peer():
    """Twisted's abortConnection closes at the next reactor turn and drops what is
    written meanwhile: so does write_now."""
    server, client, port = await pair()
    try:
        server.transport.abortConnection()
        write_now(server.transport, b"after the abort")
        got = await threads.deferToThread(recv_until_closed, client)
        assert got == b""
    finally:
        client.close()
        await port.stopListening()


def recv_until_closed(sock) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out


@pytest_twisted.ensureDeferred
async def test_a_pull_producer_leaves_writes_to_twisted():
    """A non-streaming producer is asked for more only by doWrite."""
    @implementer(IPullProducer)
    class Pull:
        def resumeProducing(self):  # noqa: N802
            pass

        def stopProducing(self):  # noqa: N802
            pass

    server, client, port = await pair()
    try:
        server.transport.registerProducer(Pull(), False)
        write_now(server.transport, b"<r/>")
        assert server.transport._tempDataLen == 4
        assert await threads.deferToThread(recv_exactly, client, 4) == b"<r/>"
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_after_starttls_batching_tls_sends_its_records_within_the_write(tmp_path):
    """STARTTLS on the Twisted side (the TLS layer's transport is Twisted's bypass),
    the layer made a BatchingTLS: a write is encrypted and on the socket before the
    call returns, read by a blocking TLS client without a reactor turn."""
    from s2sproxy.tx.tls import ContextFactory, _base_context, _load_identity
    from tests.unit.helpers import certificate
    from tests.unit.test_config import pem

    _ca, _ck, leaf, key = certificate("local.example")
    (tmp_path / "l.crt").write_bytes(pem(leaf))
    (tmp_path / "l.key").write_bytes(pem(key))
    ctx = _base_context()
    _load_identity(ctx, tmp_path / "l.crt", tmp_path / "l.key")
    server, client, port = await pair()
    try:
        server.transport.startTLS(ContextFactory(ctx))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls_client = await threads.deferToThread(ctx.wrap_socket, client)
        tls = server.transport.protocol
        # the handshake's last flight (TLS 1.3 tickets) was written the Twisted way
        await until(lambda: tls._handshakeDone and not server.transport._tempDataLen)
        assert batch_tls(server.transport, server) and type(tls) is BatchingTLS
        assert tcp_connection(tls.transport) is server.transport
        server.transport.write(b"<message/>")
        assert server.transport._tempDataLen == 0 and not server.transport.dataBuffer
        assert recv_exactly(tls_client, 10) == b"<message/>"
        tls_client.close()
    finally:
        client.close()
        await port.stopListening()


def test_anything_that_is_not_a_plain_tcp_connection_is_written_to_as_it_is():
    from twisted.internet.testing import StringTransport
    t = StringTransport()
    assert tcp_connection(t) is None
    write_now(t, b"abc")
    assert t.value() == b"abc"


@pytest_twisted.ensureDeferred
async def test_a_stream_of_ours_writes_within_the_call(tmp_path):
    """StreamProtocol.write on the socket the backend listener accepted (plain TCP):
    the bytes are on the wire before the reactor has a turn."""
    from twisted.internet import reactor
    from tests.adapters.test_nodelay import started, stopped, stream, until as poll

    p, ports = await started(tmp_path)
    client = socket.create_connection((LOOPBACK, ports["backend"]), timeout=5)
    try:
        proto = await poll(reactor, stream(p, "backend-in"))
        proto.write(b"<!-- -->")
        assert proto.transport._tempDataLen == 0
        assert recv_exactly(client, 8) == b"<!-- -->"
    finally:
        client.close()
        await stopped(p)


@pytest_twisted.ensureDeferred
async def test_a_pass_through_wrapper_is_seen_through_and_one_that_counts_is_not():
    """The PROXY protocol's wrapper passes writes through: write_now reaches the TCP
    connection under it.  A wrapper with its own ``write`` (here Twisted's
    throttling one, which counts bytes) is written to as it is."""
    from twisted.internet import reactor
    from twisted.protocols.policies import ProtocolWrapper, ThrottlingFactory, WrappingFactory

    from s2sproxy.tx.proxyprotocol import ProxyHeaderWrapper

    assert ProxyHeaderWrapper.write is ProtocolWrapper.write
    for wrapping, seen_through in ((WrappingFactory, True), (ThrottlingFactory, False)):
        f = protocol.Factory.forProtocol(Server)
        f.accepted = defer.Deferred()
        port = reactor.listenTCP(0, wrapping(f), interface=LOOPBACK)
        client = socket.create_connection((LOOPBACK, port.getHost().port), timeout=5)
        try:
            server = await f.accepted
            wrapper = server.transport
            assert (tcp_connection(wrapper) is wrapper.transport) is seen_through
            write_now(wrapper, b"<iq/>")
            if seen_through:
                assert recv_exactly(client, 5) == b"<iq/>"      # no reactor turn
            else:
                assert wrapper.factory.writtenThisSecond == 5   # its write counted it
                await until(lambda: not wrapper.transport._tempDataLen)
                assert recv_exactly(client, 5) == b"<iq/>"
        finally:
            client.close()
            await port.stopListening()


# -- Direct TLS (BatchingTLS over the TCP transport) ------------------------------------

@implementer(IHandshakeListener)
class TlsServer(Server):
    def connectionMade(self):  # noqa: N802
        self.lost = None

    def handshakeCompleted(self):  # noqa: N802
        assert batch_tls(self.transport, self)
        self.factory.accepted.callback(self)


class MemoryTlsClient:
    """A TLS client over a blocking socket through memory BIOs, so that what came
    on the wire (a close_notify or not) can be told."""

    def __init__(self, sock) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        self.sock, self.into, self.out = sock, ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.into, self.out)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.out.read())
                self.into.write(self.sock.recv(65536))
        self.sock.sendall(self.out.read())

    def read_to_end(self) -> tuple[bytes, str]:
        """(plaintext, how it ended: "close_notify", "eof" or "reset")."""
        got = b""
        for _ in range(10_000):             # bounded: the socket has a timeout too
            try:
                data = self.tls.read(65536)
                if not data:                # Python's answer to a close_notify
                    return got, "close_notify"
                got += data
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return got, "close_notify"
            try:
                raw = self.sock.recv(65536)
            except ConnectionResetError:
                return got, "reset"
            if not raw:
                return got, "eof"
            self.into.write(raw)
        raise AssertionError("no end")


async def direct_tls(tmp_path):
    """(our BatchingTLS layer, its protocol, a MemoryTlsClient, the port)."""
    from twisted.internet import reactor
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from s2sproxy.tx.tls import ContextFactory, _base_context, _load_identity
    from tests.unit.helpers import certificate
    from tests.unit.test_config import pem

    _ca, _ck, leaf, key = certificate("local.example")
    (tmp_path / "l.crt").write_bytes(pem(leaf))
    (tmp_path / "l.key").write_bytes(pem(key))
    ctx = _base_context()
    _load_identity(ctx, tmp_path / "l.crt", tmp_path / "l.key")
    inner = protocol.Factory.forProtocol(TlsServer)
    inner.accepted = defer.Deferred()
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(ContextFactory(ctx), False, inner),
                             interface=LOOPBACK)
    sock = socket.create_connection((LOOPBACK, port.getHost().port), timeout=5)
    client = await threads.deferToThread(MemoryTlsClient, sock)
    proto = await inner.accepted
    tls = proto.transport
    await until(lambda: not tls.transport._tempDataLen)    # the handshake's last flight
    return tls, proto, client, port


@pytest_twisted.ensureDeferred
async def test_aborting_a_direct_tls_stream_sends_no_close_notify(tmp_path):
    """An abort is no clean close: Twisted's TLS layer writes a close_notify on its
    way to abortConnection, and it must stay in the buffer that the abort drops."""
    tls, proto, client, port = await direct_tls(tmp_path)
    try:
        from twisted.internet import reactor
        reading = threads.deferToThread(client.read_to_end)    # waiting in recv
        await task.deferLater(reactor, 0.2, lambda: None)
        tls.abortConnection()
        got, end = await reading
        assert end != "close_notify", (got, end)
    finally:
        client.sock.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_long_tls_write_leaves_in_one_send(tmp_path, monkeypatch):
    """Twisted encrypts 16 KiB per record and flushed after each; the records of one
    write are sent together."""
    import s2sproxy.tx.tls as tls_module

    tls, proto, client, port = await direct_tls(tmp_path)
    sends = []
    real = tls_module.write_now
    monkeypatch.setattr(tls_module, "write_now",
                        lambda t, d: (sends.append(len(d)), real(t, d))[1])
    try:
        big = b"<x>" + b"y" * 50_000 + b"</x>"
        proto.transport.write(big)
        assert len(sends) == 1 and sends[0] > len(big), sends
        proto.transport.loseConnection()
        got, end = await threads.deferToThread(client.read_to_end)
        assert got == big and end == "close_notify"
    finally:
        client.sock.close()
        await port.stopListening()


def test_a_long_tls_write_leaves_the_send_buffer_one_record_large(tmp_path):
    """The records of a long write are taken out of OpenSSL's send BIO one by one
    (a memory BIO keeps the largest size it held), though sent together: after a
    256 KiB write the BIO holds no more memory than after a 16 KiB one."""
    import ctypes
    import gc

    from s2sproxy.tx.tls import renew_buffers
    from tests.adapters.helpers import direct_tls_pair

    class MallInfo(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd "
                                                   "usmblks fsmblks uordblks fordblks "
                                                   "keepcost").split()]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo

    def used() -> int:
        gc.collect()
        m = libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def kept_by_the_bios(size: int) -> int:
        """What renewing the BIOs frees after one write of ``size`` bytes."""
        freed = []
        for i in range(7):
            _p, _r, server, _client, app, pump = direct_tls_pair(tmp_path / f"{size}-{i}")
            server.write(b"x" * size)
            pump.flush()
            assert len(app.received) >= size
            app.received = b""
            before = used()
            assert renew_buffers(server, server.wrappedProtocol)
            freed.append(before - used())
        return sorted(freed)[3]

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    for size in (16_000, 256 * 1024):
        for i in range(7):
            (tmp_path / f"{size}-{i}").mkdir()
    small, large = kept_by_the_bios(16_000), kept_by_the_bios(256 * 1024)
    assert large < small + 8192, (small, large)
