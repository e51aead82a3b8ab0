"""The outgoing-connection plan: which addresses to try for a remote domain, in which
order, which to refuse, and what to do after each kind of failure.

The shell (``tx.connector``) runs the plan: it asks ``next()`` what to do, performs it
(an SRV lookup, an A/AAAA lookup, a connection attempt) and reports the answer back.
Nothing here does I/O, reads a clock or draws randomness it was not handed.

Rules:

1. Targets (RFC 6120 section 3.2, XEP-0368): ``remote."DOMAIN"`` overrides, else the
   ``_xmpps-server`` (Direct TLS) and ``_xmpp-server`` (STARTTLS) SRV records merged
   by priority and weight (``core.srv.order``), else the domain itself on 5269.  A DNS
   error (FORMERR, SERVFAIL, NOTIMP, REFUSED, timeout) counts as NXDOMAIN: the
   fallback to the domain on 5269 applies when ``_xmpp-server`` yields no record.  A
   single SRV record with target "." means "no service" (RFC 2782): no fallback for
   that service.  Prosody does the same (net/resolvers/service.lua: "zero SRV records
   found" -> the domain on the default port; "service explicitly unavailable" for ".").
2. Addresses: A and AAAA are asked separately (never QTYPE ANY, which RFC 8482
   resolvers answer with HINFO), and every address is tried, IPv6 and IPv4 interleaved
   starting with IPv6 (RFC 8305 section 4; Prosody's net/resolvers/basic.lua merges
   its targets the same way).  Attempts are sequential: the TCP connect of an address
   that is not the last one known is bounded by ``ADDRESS_CONNECT_TIMEOUT``.
3. Refusals (a refused address is skipped like an unreachable one):

   a. never one of our own listeners (an unspecified bind, ``0.0.0.0`` or ``::``,
      matches every address of this host on that port), nor ejabberd's internal
      listener: a remote's DNS must not make s2sproxy talk to itself;
   b. an address found through DNS that is not public (loopback, unspecified,
      link-local, private RFC 1918 / ULA, CGNAT, multicast, reserved, and the
      IPv4-mapped forms of these) unless ``dns.allow_private_targets``;
   c. addresses an operator wrote in ``remote."DOMAIN"`` (or that its host names
      resolve to) are the operator's choice and always allowed, except by rule a.

4. After a failure before the stream is ready (TCP connect refused, unreachable or
   timed out; TLS handshake failed; connection lost; stream error from the peer; no
   STARTTLS offered; certificate not acceptable; set-up timeout) the next address is
   tried, then the next target (RFC 6120 section 3.2.1, step 7).  Failures that do
   NOT move on (``FailureKind.FINAL``):

   a. the remote's explicit dialback answer to our key (``type='invalid'`` or
      ``type='error'``): it is the receiving domain's verdict, reached by asking our
      own authoritative server; every address of that domain asks the same server and
      would answer the same, so trying them all only multiplies the load (XEP-0220
      section 2.4 puts the retry decision with the originating server);
   b. a local error (an exception of ours, e.g. a certificate file that became
      unreadable): it would fail the same way for every address.

5. At most ``MAX_TARGETS`` targets are looked up and ``MAX_ATTEMPTS`` connections
   made per plan, whatever a remote's DNS publishes.
6. Exhausted: ``remote-server-timeout`` when every attempt timed out, else
   ``remote-server-not-found``; the text says what was tried and why each failed.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Sequence

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.limits import ADDRESS_CONNECT_TIMEOUT, MAX_ATTEMPTS, MAX_TARGETS
from s2sproxy.core.srv import Target, order

XMPP_PORT = 5269
_MAX_TEXT_ITEMS = 6

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# Rule 3b: not publicly routable.  Written out rather than ``is_private``/``is_global``,
# whose coverage changed between Python releases, and so that the documentation
# ranges (192.0.2.0/24, 2001:db8::/32) stay usable as "public" addresses in tests.
_NON_PUBLIC = [(ipaddress.ip_network(n), why) for n, why in [
    ("0.0.0.0/8", "unspecified"), ("127.0.0.0/8", "loopback"),
    ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"), ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("fc00::/7", "private (ULA)"),
    ("fe80::/10", "link-local"), ("fec0::/10", "site-local"), ("ff00::/8", "multicast"),
]]


def parse_ip(text: str) -> IP | None:
    """The address, with IPv4-mapped IPv6 (``::ffff:127.0.0.1``) as its IPv4 form."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def non_public(ip: IP) -> str | None:
    """Why ``ip`` is not a public address, or None."""
    for net, why in _NON_PUBLIC:
        if ip.version == net.version and ip in net:
            return why
    return None


@dataclass
class AddressRules:
    """Rule 3.  ``own`` holds our listeners (and ejabberd's internal one) as (address,
    port); ``local`` the addresses of this host the shell knows of.  Both are sets the
    shell may grow while running (bound ports, local ends of our connections)."""
    own: set[tuple[IP, int]] = field(default_factory=set)
    local: set[IP] = field(default_factory=set)
    allow_private: bool = False

    def add_own(self, address: str, port: int) -> None:
        ip = parse_ip(address or "0.0.0.0")
        if ip is not None:
            self.own.add((ip, port))

    def is_own(self, ip: IP, port: int) -> bool:
        for own_ip, own_port in self.own:
            if own_port != port:
                continue
            if own_ip == ip:
                return True
            if own_ip.is_unspecified and (ip.is_loopback or ip.is_unspecified
                                          or ip in self.local):
                return True
        return False

    def refusal(self, ip: IP, port: int, from_dns: bool) -> str | None:
        """Why an attempt to ``ip``:``port`` is refused, or None."""
        if self.is_own(ip, port):
            return "one of s2sproxy's own listeners"
        if from_dns and not self.allow_private:
            why = non_public(ip)
            if why is not None:
                return f"{why} address from DNS (dns.allow_private_targets is false)"
        return None


class FailureKind(enum.Enum):
    CONNECT = "connect"     # TCP connect refused or unreachable
    TIMEOUT = "timeout"     # TCP connect or stream set-up timed out
    SETUP = "setup"         # TLS, lost, stream error, certificate: try the next address
    FINAL = "final"         # rule 4a/4b: do not try further addresses


@dataclass(frozen=True)
class AttemptFailed:
    kind: FailureKind
    condition: str
    text: str


@dataclass(frozen=True)
class SrvAnswer:
    """One SRV lookup's outcome: its records, or ``error`` (NXDOMAIN, SERVFAIL, ...)."""
    records: tuple[Target, ...] = ()
    error: str = ""


# -- steps: what the shell is to do next ------------------------------------------------

@dataclass(frozen=True)
class LookupSrv:
    domain: str


@dataclass(frozen=True)
class LookupAddresses:
    host: str


@dataclass(frozen=True)
class Attempt:
    host: str               # the target's name (SNI is always the domain)
    address: str            # an IP literal
    port: int
    direct_tls: bool
    connect_timeout: float


@dataclass(frozen=True)
class Exhausted:
    condition: str
    text: str


Step = LookupSrv | LookupAddresses | Attempt | Exhausted


class ConnectPlan:
    def __init__(self, domain: str, rules: AddressRules,
                 uniform: Callable[[float, float], float],
                 override: Sequence[Target] | None = None, connect_timeout: float = 10.0,
                 max_attempts: int = MAX_ATTEMPTS) -> None:
        self.domain = domain
        self.rules = rules
        self.uniform = uniform
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self.from_dns = override is None
        self._targets: list[Target] | None = None if override is None else list(override)
        self._current: Target | None = None
        self._queue: list[Attempt] = []
        self._seen: set[tuple[str, int, bool]] = set()
        self._pending: Step | None = None
        self._final: Exhausted | None = None
        self._notes: list[str] = []
        self.attempts = 0
        self._timeouts = 0
        self._looked_up = 0

    # -- what next --------------------------------------------------------------------

    def next(self) -> Step:
        """The next thing to do; the same step again until it is answered."""
        if self._final is not None:
            return self._final
        if self._pending is not None:
            return self._pending
        if self._targets is None:
            self._pending = LookupSrv(self.domain)
            return self._pending
        while True:
            if self._queue:
                if self.attempts >= self.max_attempts:
                    self._note(f"not trying more than {self.max_attempts} addresses")
                    return self._exhaust()
                attempt = self._queue.pop(0)
                if self._queue or self._targets:    # not the last one known: rule 2
                    attempt = Attempt(attempt.host, attempt.address, attempt.port,
                                      attempt.direct_tls,
                                      min(self.connect_timeout, ADDRESS_CONNECT_TIMEOUT))
                self.attempts += 1
                self._pending = attempt
                return attempt
            if not self._targets:
                return self._exhaust()
            if self._looked_up >= MAX_TARGETS:
                self._note(f"not looking up more than {MAX_TARGETS} targets")
                self._targets = []
                continue
            target = self._targets.pop(0)
            self._current = target
            if parse_ip(target.host) is not None:
                self._add(target, [target.host])
                continue
            self._looked_up += 1
            self._pending = LookupAddresses(target.host)
            return self._pending

    # -- answers ----------------------------------------------------------------------

    def srv_answered(self, direct_tls: SrvAnswer, starttls: SrvAnswer) -> None:
        """The ``_xmpps-server`` and ``_xmpp-server`` lookups (rule 1)."""
        self._pending = None
        records: list[Target] = []
        no_service = []
        for service, answer in (("_xmpps-server", direct_tls), ("_xmpp-server", starttls)):
            usable = [t for t in answer.records if t.host not in (".", "")]
            if answer.records and not usable:
                no_service.append(service)
                self._note(f"{service}: no service (SRV target '.')")
            elif answer.error:
                self._note(f"{service}: {answer.error}")
            records += usable
        self._targets = order(records, self.uniform) if records else []
        if not any(t.direct_tls is False for t in records) \
                and "_xmpp-server" not in no_service:
            self._targets.append(Target(self.domain, XMPP_PORT, False))

    def addresses_answered(self, host: str, ipv6: Iterable[str], ipv4: Iterable[str],
                           error: str = "") -> None:
        """The AAAA and A lookups for the current target (rule 2)."""
        self._pending = None
        target = self._current
        v6, v4 = list(ipv6), list(ipv4)
        merged = [a for pair in zip(v6, v4) for a in pair]
        merged += v6[len(v4):] + v4[len(v6):]
        if not merged:
            self._note(f"{host}: {error or 'no address'}")
            return
        if target is not None:
            self._add(target, merged)

    def attempt_failed(self, attempt: Attempt, failure: AttemptFailed) -> None:
        self._pending = None
        self._note(f"{_where(attempt.address, attempt.port)} {failure.text}")
        if failure.kind is FailureKind.TIMEOUT:
            self._timeouts += 1
        if failure.kind is FailureKind.FINAL:
            self._final = Exhausted(failure.condition, self._text())

    # -- helpers ----------------------------------------------------------------------

    def _add(self, target: Target, addresses: Iterable[str]) -> None:
        for text in addresses:
            ip = parse_ip(text)
            if ip is None:
                self._note(f"{target.host}: not an address: {text!r}")
                continue
            why = self.rules.refusal(ip, target.port, self.from_dns)
            if why is not None:
                self._note(f"{_where(str(ip), target.port)} refused: {why}")
                continue
            key = (str(ip), target.port, target.direct_tls)
            if key not in self._seen:
                self._seen.add(key)
                self._queue.append(Attempt(target.host, str(ip), target.port,
                                           target.direct_tls, self.connect_timeout))

    def _note(self, text: str) -> None:
        self._notes.append(text)

    def _text(self) -> str:
        notes = self._notes[:_MAX_TEXT_ITEMS]
        if len(self._notes) > _MAX_TEXT_ITEMS:
            notes.append(f"and {len(self._notes) - _MAX_TEXT_ITEMS} more")
        return f"{self.domain}: {'; '.join(notes) or 'nothing to try'}"

    def _exhaust(self) -> Exhausted:
        timeout = self.attempts > 0 and self._timeouts == self.attempts
        self._final = Exhausted("remote-server-timeout" if timeout
                                else "remote-server-not-found", self._text())
        return self._final


def connect_failed(timed_out: bool, message: str) -> AttemptFailed:
    """The TCP connection was not made (rule 4)."""
    if timed_out:
        return AttemptFailed(FailureKind.TIMEOUT, "remote-server-timeout", "connect timed out")
    return AttemptFailed(FailureKind.CONNECT, "remote-server-not-found",
                         f"unreachable: {message}")


def attempt_outcome(action: object, refused_by_peer: bool) -> AttemptFailed | None:
    """What an attempt's stream reported: None for success (ready, or a dialback
    verdict), else the kind of failure (rule 4; ``refused_by_peer``: the remote's own
    dialback answer to our key, rule 4a)."""
    if isinstance(action, A.StreamReady):
        return None
    if isinstance(action, E.DialbackVerdict):
        if action.valid is not None:
            return None
        kind = FailureKind.TIMEOUT if action.condition == "remote-server-timeout" \
            else FailureKind.SETUP
        return AttemptFailed(kind, action.condition, f"no verdict: {action.condition}")
    assert isinstance(action, A.StreamFailed), action
    if refused_by_peer:
        return AttemptFailed(FailureKind.FINAL, action.condition, action.text)
    kind = FailureKind.TIMEOUT if action.condition == "remote-server-timeout" \
        else FailureKind.SETUP
    return AttemptFailed(kind, action.condition, action.text)


def _where(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def rules_from(listeners: Collection[tuple[str, int]], allow_private: bool) -> AddressRules:
    rules = AddressRules(allow_private=allow_private)
    for address, port in listeners:
        rules.add_own(address, port)
    return rules
