"""The backend DNS responder ejabberd's resolver asks (inetrc ``nameserver``).

Every ``_xmpp-server._tcp.<domain>`` SRV query is answered with the backend listener,
so each outgoing s2s connection of ejabberd (including its dialback verification
connections) lands on s2sproxy.  ``_xmpps-server`` gets NXDOMAIN (the backend listener
speaks STARTTLS only), and so does everything else: this is not a general resolver.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase
from s2sproxy.logs import get_logger

log = get_logger(__name__)

PREFIX = b"_xmpp-server._tcp."


class BackendSrvResolver(ResolverBase):
    def __init__(self, target: str, port: int) -> None:
        super().__init__()
        self.target = target
        self.port = port
        self.answered = 0

    def _lookup(self, name, cls, type_, timeout):  # noqa: ANN001 (twisted.names API)
        lname = name.lower()
        if type_ == dns.SRV and cls == dns.IN and lname.startswith(PREFIX) \
                and len(lname) > len(PREFIX):
            self.answered += 1
            log.debug("backend DNS: SRV {name} -> {target}:{port}", name=name.decode(),
                      target=self.target, port=self.port)
            rr = dns.RRHeader(name=name, type=dns.SRV, cls=dns.IN, ttl=0, auth=True,
                              payload=dns.Record_SRV(0, 0, self.port, self.target, ttl=0))
            return defer.succeed(([rr], [], []))
        return defer.fail(error.DomainError(name))


class _Factory(server.DNSServerFactory):
    noisy = False

    def logPrefix(self) -> str:  # noqa: N802 (Twisted's "... starting on PORT")
        return "s2sproxy backend DNS responder (TCP)"

    def _responseFromMessage(self, message, **kwargs):  # noqa: N802 (Twisted's name)
        # RFC 1035 section 4.1.1: RD is copied into the response.  Twisted leaves it
        # clear, and Erlang's inet_res rejects such answers ({error, unknown}), which
        # would fail every outgoing s2s lookup of ejabberd.
        response = super()._responseFromMessage(message, **kwargs)
        response.recDes = message.recDes
        return response


def make_factories(target: str, port: int) -> tuple[server.DNSServerFactory,
                                                    dns.DNSDatagramProtocol]:
    resolver = BackendSrvResolver(target, port)
    factory = _Factory(authorities=[resolver], verbose=0)
    udp = dns.DNSDatagramProtocol(factory)
    udp.noisy = False
    udp.logPrefix = lambda: "s2sproxy backend DNS responder (UDP)"
    return factory, udp
