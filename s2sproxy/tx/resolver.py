"""DNS for outgoing connections: SRV records and A/AAAA addresses, asked of s2sproxy's
own resolver (``dns.nameservers``, else /etc/resolv.conf; never the system's libc, so
that a test's or an operator's DNS choice holds).  What to do with the answers is
``core.connect``'s decision; this module only asks and reports.

1. A and AAAA are separate queries, sent in parallel: ``getHostByName`` sends QTYPE
   ANY, which RFC 8482 resolvers answer with a lone HINFO record, and keeps a single
   address.
2. CNAMEs are followed as twisted.names' ``extractRecord`` does: through the answer
   section first, then by asking again for the last name of the chain (at most
   ``CNAME_DEPTH`` names).
3. Every DNS error (NXDOMAIN, FORMERR, SERVFAIL, NOTIMP, REFUSED, timeout, and
   anything else the client raises) is reported as an error text, never raised.
"""

from __future__ import annotations

import random
import socket

from twisted.internet import defer
from twisted.names import client, dns, error

from s2sproxy.config import RemoteOverride
from s2sproxy.core.connect import SrvAnswer
from s2sproxy.core.jid import dns_name
from s2sproxy.core.limits import CNAME_DEPTH, DNS_TIMEOUT
from s2sproxy.core.srv import Target
from s2sproxy.logs import get_logger

log = get_logger(__name__)


_ERRORS = [(error.DNSNameError, "NXDOMAIN"), (error.DNSFormatError, "FORMERR"),
           (error.DNSServerError, "SERVFAIL"), (error.DNSNotImplementedError, "NOTIMP"),
           (error.DNSQueryRefusedError, "REFUSED"), (error.DNSQueryTimeoutError, "timeout"),
           (defer.TimeoutError, "timeout"), (error.DomainError, "DNS error")]


def dns_error_text(e: BaseException) -> str:
    for cls, text in _ERRORS:
        if isinstance(e, cls):
            return text
    return f"lookup failed ({type(e).__name__})"


def system_nameservers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf, read at start and at each reload (not
    watched by Twisted's resolver, which logs a line each time it re-reads the file);
    none, or no file: 127.0.0.1, as Twisted's resolver and libc assume."""
    servers = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].split("%", 1)[0], 53))
    except OSError:
        pass
    return servers or [("127.0.0.1", 53)]


class RemoteResolver:
    def __init__(self, overrides: dict[str, RemoteOverride],
                 nameservers: tuple[tuple[str, int], ...], reactor,
                 rng: random.Random | None = None) -> None:
        self.overrides = overrides
        self.rng = rng or random.SystemRandom()
        servers = list(nameservers) or system_nameservers()
        self.dns = client.Resolver(servers=servers, reactor=reactor)

    def override(self, domain: str) -> list[Target] | None:
        """The operator's targets for ``domain`` (``remote."DOMAIN"``), or None."""
        o = self.overrides.get(domain)
        if o is None:
            return None
        return ([Target(h, p, True) for h, p in o.direct_tls]
                + [Target(h, p, False) for h, p in o.starttls])

    async def srv(self, domain: str) -> tuple[SrvAnswer, SrvAnswer]:
        """(``_xmpps-server``, ``_xmpp-server``) records of ``domain``, asked in parallel."""
        direct = defer.ensureDeferred(self._srv(b"_xmpps-server._tcp.", domain, True))
        starttls = defer.ensureDeferred(self._srv(b"_xmpp-server._tcp.", domain, False))
        return await direct, await starttls

    async def _srv(self, service: bytes, domain: str, direct_tls: bool) -> SrvAnswer:
        try:
            answers, _auth, _add = await self.dns.lookupService(
                service + dns_name(domain).encode("ascii"), timeout=DNS_TIMEOUT)
        except Exception as e:  # noqa: BLE001 (the tx boundary: rule 3)
            text = dns_error_text(e)
            log.debug("SRV {service}{domain}: {err}", service=service.decode(),
                      domain=domain, err=text)
            return SrvAnswer(error=text)
        records = tuple(Target(str(rr.payload.target).rstrip(".") or ".", rr.payload.port,
                               direct_tls, rr.payload.priority, rr.payload.weight)
                        for rr in answers if rr.type == dns.SRV)
        log.debug("SRV {service}{domain}: {records}", service=service.decode(),
                  domain=domain, records=records)
        return SrvAnswer(records)

    async def addresses(self, host: str) -> tuple[list[str], list[str], str]:
        """(IPv6 addresses, IPv4 addresses, error text when neither lookup answered)."""
        v6 = defer.ensureDeferred(self._addresses(host, dns.AAAA))
        v4 = defer.ensureDeferred(self._addresses(host, dns.A))
        (ipv6, err6), (ipv4, err4) = await v6, await v4
        err = "" if ipv6 or ipv4 else "; ".join(
            f"{kind} {e}" for kind, e in (("AAAA", err6), ("A", err4)) if e)
        return ipv6, ipv4, err

    async def _addresses(self, host: str, rtype: int) -> tuple[list[str], str]:
        lookup = self.dns.lookupIPV6Address if rtype == dns.AAAA else self.dns.lookupAddress
        family = socket.AF_INET6 if rtype == dns.AAAA else socket.AF_INET
        try:
            # An SRV target comes from DNS, ASCII already; the fallback host is the
            # domain itself, canonical (U-labels): its A-label form is asked.
            name = dns.Name(host.encode("ascii") if host.isascii()
                            else dns_name(host).encode("ascii"))
            hops = 0
            while hops < CNAME_DEPTH:
                answers, _auth, _add = await lookup(name.name, timeout=DNS_TIMEOUT)
                asked = name
                while hops < CNAME_DEPTH:
                    found = [socket.inet_ntop(family, rr.payload.address) for rr in answers
                             if rr.name == name and rr.type == rtype]
                    if found:
                        return found, ""
                    cname = next((rr.payload.name for rr in answers
                                  if rr.name == name and rr.type == dns.CNAME), None)
                    if cname is None:
                        break
                    name, hops = cname, hops + 1
                if name == asked:
                    return [], ""          # no record of this type (NODATA)
            return [], "CNAME chain too long"
        except Exception as e:  # noqa: BLE001 (the tx boundary: rule 3)
            return [], dns_error_text(e)
