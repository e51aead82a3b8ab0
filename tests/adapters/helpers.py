"""Memory-reactor helpers: a Proxy with test settings and streams driven to the state a
test needs over StringTransports (no sockets; the clock advanced by hand)."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport

from s2sproxy.config import parse
from s2sproxy.core import events as E
from s2sproxy.core.inbound import InboundStream, Role
from s2sproxy.tx.protocol import StreamProtocol
from s2sproxy.tx.service import Proxy
from tests.unit.helpers import certificate
from tests.unit.test_config import pem

LOCAL, REMOTE = "local.example", "remote.example"

HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
          b"streams' xmlns:db='jabber:server:dialback' to='local.example' "
          b"from='%s' version='1.0'>")
STARTTLS = b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"


def settings(tmp_path, **tables):
    """Settings for local.example with a test certificate, plus ``tables``."""
    _ca, _ck, leaf, key = certificate(LOCAL)
    (tmp_path / "l.crt").write_bytes(pem(leaf))
    (tmp_path / "l.key").write_bytes(pem(key))
    return parse(dict({
        "secret_file": "secret",
        "domain": [{"name": LOCAL, "certificate": "l.crt", "key": "l.key"}],
        "dns": {"nameservers": ["127.0.0.1:1"]},
    }, **tables), base=tmp_path)


def proxy(tmp_path, **tables) -> tuple[Proxy, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    return Proxy(settings(tmp_path, **tables), reactor), reactor


class Transport(StringTransport):
    """A StringTransport that accepts startTLS (the handshake is then reported by hand)
    and remembers an abort."""

    def __init__(self, host: str = "192.0.2.7", port: int = 40000) -> None:
        from twisted.internet.address import IPv4Address
        super().__init__(peerAddress=IPv4Address("TCP", host, port))
        self.aborted = False

    def startTLS(self, ctx) -> None:  # noqa: N802 (Twisted's name)
        pass

    def abortConnection(self) -> None:  # noqa: N802
        self.aborted = True
        self.loseConnection()


def public_stream(p: Proxy, reactor, remote: str = REMOTE, host: str = "192.0.2.7",
                  port: int = 40000, authenticate: bool = True):
    """A public StreamProtocol (STARTTLS listener), authenticated for remote -> local
    by a certificate valid for ``remote`` (XEP-0344: no dialback callback needed)."""
    factory = p.listener(Role.PUBLIC, False)
    proto = factory.buildProtocol(None)
    transport = Transport(host, port)
    proto.makeConnection(transport)
    if proto.transport is None or transport.aborted:
        return proto, transport
    proto.dataReceived(HEADER % remote.encode())
    proto.dataReceived(STARTTLS)
    _ca, _ck, leaf, _key = certificate(remote)
    proto.handle(E.TlsEstablished(True, leaf))
    proto.dataReceived(HEADER % remote.encode())
    if authenticate:
        proto.dataReceived(f"<db:result from='{remote}' to='{LOCAL}'>k</db:result>"
                           .encode())
        assert (remote, LOCAL) in proto.stream.authenticated
    transport.clear()
    return proto, transport


def message(frm: str, to: str, id_: str, type_: str = "chat", body: str = "hi") -> bytes:
    return (f"<message from='{frm}' to='{to}' type='{type_}' id='{id_}'><body>{body}"
            f"</body></message>").encode()


__all__ = ["LOCAL", "REMOTE", "Proxy", "StreamProtocol", "InboundStream", "settings",
           "proxy", "public_stream", "message", "Transport"]


class TlsApp:
    """The application on the client end of ``direct_tls_pair``: what it received."""

    def __init__(self) -> None:
        self.received = b""

    def makeConnection(self, transport) -> None:  # noqa: N802
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        pass


def direct_tls_pair(tmp_path, **tables):
    """A Proxy's Direct TLS listener protocol and a TLS client in memory, handshake
    done (real TLS, twisted.test.iosim): (proxy, its reactor, server TLS layer, client
    TLS layer, client app, pump).  The client writes one TLS record per write."""
    from twisted.internet.protocol import Factory
    from twisted.internet.ssl import CertificateOptions
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
    from twisted.test.iosim import FakeTransport, connect

    p, reactor = proxy(tmp_path, **tables)
    server = p.services[1].factory.buildProtocol(None)   # the Direct TLS listener's
    app = TlsApp()
    client_factory = TLSMemoryBIOFactory(CertificateOptions(), True,
                                         Factory.forProtocol(lambda: app))
    client_factory.protocol = TLSMemoryBIOProtocol       # unbuffered: a record a write
    client = client_factory.buildProtocol(None)
    pump = connect(server, FakeTransport(server, True), client,
                   FakeTransport(client, False))
    pump.flush()
    assert server.wrappedProtocol.tls_done
    return p, reactor, server, client, app, pump
