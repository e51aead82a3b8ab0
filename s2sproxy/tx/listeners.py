"""The listeners: public (STARTTLS, Direct TLS, optionally behind the PROXY protocol),
the backend listener for ejabberd's outgoing streams, the backend DNS responder, and
the metrics endpoint.  Each accepted connection gets a stream made with the
configuration in force when it is accepted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.application import internet, strports
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory

from s2sproxy.core.inbound import InboundStream, Role
from s2sproxy.tx import proxyprotocol
from s2sproxy.tx.backend_dns import make_factories
from s2sproxy.tx.protocol import StreamProtocol
from s2sproxy.tx.tls import ContextFactory

if TYPE_CHECKING:
    from s2sproxy.tx.service import Proxy


class Listener(Factory):
    """An accepting listener: each connection gets a stream made with the
    configuration in force when it is accepted (a reload applies from the next one)."""

    noisy = False       # no "Starting factory <...>" lines

    def __init__(self, proxy: "Proxy", role: Role, direct_tls: bool) -> None:
        self.proxy = proxy
        self.role = role
        self.direct_tls = direct_tls
        self.label = {Role.PUBLIC: "public", Role.BACKEND: "backend-in"}[role]

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's "... starting on PORT")
        if self.role is Role.BACKEND:
            return "s2sproxy backend listener (ejabberd's outgoing streams)"
        return f"s2sproxy public {'Direct TLS' if self.direct_tls else 'STARTTLS'} listener"

    def buildProtocol(self, addr):  # noqa: N802
        p = self.proxy
        # in proxy.streams once admitted (Proxy.admit, at connectionMade)
        return StreamProtocol(InboundStream(p.inbound_config(self.role, self.direct_tls)),
                              p, p.reactor, self.label)


def build(self: "Proxy") -> None:
    s = self.settings
    for desc, direct in [(d, False) for d in s.starttls_listeners] + \
            [(d, True) for d in s.direct_tls_listeners]:
        proxy_header, desc = proxyprotocol.split(desc)
        f = Listener(self, Role.PUBLIC, direct)
        if direct:
            f = TLSMemoryBIOFactory(
                ContextFactory(lambda: self.direct_ctx.for_domain(None)), False, f)
            f.noisy = False
        if proxy_header:        # the PROXY header comes first, before any TLS
            f = proxyprotocol.ProxyHeaderFactory(f, self.reactor, s.proxy_sources)
        strports.service(desc, f, reactor=self.reactor).setServiceParent(self)
    strports.service(s.backend.listen, Listener(self, Role.BACKEND, False),
                     reactor=self.reactor).setServiceParent(self)
    tcp_f, udp_p = make_factories(s.backend.srv_target, s.backend.srv_port)
    # There is no "udp:" endpoint string in Twisted; the DNS responder is
    # configured by address and port instead.
    internet.UDPServer(s.backend.dns_port, udp_p, interface=s.backend.dns_address,
                       reactor=self.reactor).setServiceParent(self)
    internet.TCPServer(s.backend.dns_port, tcp_f, interface=s.backend.dns_address,
                       reactor=self.reactor).setServiceParent(self)
    if s.metrics_listen:
        from prometheus_client.twisted import MetricsResource
        from twisted.web.resource import Resource
        from twisted.web.server import Site
        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.metrics.registry))
        site = Site(root)
        site.noisy = False
        site.logPrefix = lambda: "s2sproxy metrics"
        site.log = lambda request: None     # no access-log line per scrape
        strports.service(s.metrics_listen, site,
                         reactor=self.reactor).setServiceParent(self)
