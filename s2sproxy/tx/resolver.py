"""Where is a remote domain's server?  Static overrides, then SRV (XEP-0368), then
the domain itself on 5269 (RFC 6120 section 3.2.2)."""

from __future__ import annotations

import random

from twisted.internet import defer
from twisted.names import client, dns, error
from s2sproxy.logs import get_logger

from s2sproxy.config import RemoteOverride
from s2sproxy.core.srv import Target, order

log = get_logger(__name__)


class RemoteResolver:
    def __init__(self, overrides: dict[str, RemoteOverride],
                 nameservers: tuple[tuple[str, int], ...], reactor,
                 rng: random.Random | None = None) -> None:
        self.overrides = overrides
        self.rng = rng or random.SystemRandom()
        if nameservers:
            self.dns = client.Resolver(servers=list(nameservers), reactor=reactor)
        else:
            self.dns = client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)

    async def resolve(self, domain: str) -> list[Target]:
        o = self.overrides.get(domain)
        if o is not None:
            return ([Target(h, p, True) for h, p in o.direct_tls]
                    + [Target(h, p, False) for h, p in o.starttls])
        records: list[Target] = []
        for service, direct in ((b"_xmpps-server._tcp.", True), (b"_xmpp-server._tcp.", False)):
            try:
                answers, _auth, _add = await self.dns.lookupService(
                    service + domain.encode("idna"), timeout=(2, 5))
            except (error.DomainError, error.DNSNameError, error.DNSServerError,
                    defer.TimeoutError, error.DNSQueryRefusedError) as e:
                log.debug("SRV {service}{domain}: {err}", service=service.decode(),
                          domain=domain, err=type(e).__name__)
                continue
            for rr in answers:
                if rr.type == dns.SRV:
                    p = rr.payload
                    records.append(Target(str(p.target), p.port, direct, p.priority,
                                          p.weight))
        ordered = order(records, self.rng.uniform) if records else []
        if not records:
            ordered = [Target(domain, 5269, False)]
        return ordered
