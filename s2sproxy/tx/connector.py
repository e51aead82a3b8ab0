"""Outgoing connections: the backend leg, streams to remote servers, and dialback
verification, executed for ``core.connect.ConnectPlan``; and further domain pairs asked
for on a ready stream of ours (XEP-0220 sender multiplexing, decided by
``core.routing`` and ``core.outbound``).

The plan decides which addresses to try, which to refuse and what to do after each
failure; this module does the DNS queries (``tx.resolver``), ``connectTCP`` and TLS,
and reports each attempt's outcome back to the plan.  It also remembers the local
ends of our outgoing connections, so that one of them coming back to a listener of
ours (a remote's DNS pointing at us) is recognised and never trusted by address.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from twisted.internet import defer, error as neterror
from twisted.internet.protocol import ClientFactory
from twisted.protocols.tls import TLSMemoryBIOFactory

from s2sproxy.config import own_listeners
from s2sproxy.core import actions as A
from s2sproxy.core import connect as C
from s2sproxy.core import events as E
from s2sproxy.core import routing as R
from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundStream
from s2sproxy.core.srv import Target
from s2sproxy.logs import get_logger
from s2sproxy.tx.protocol import StreamProtocol
from s2sproxy.tx.tls import ClientCreator

log = get_logger(__name__)

Address = tuple[Any, int]      # (core.connect.IP, port)


class OutgoingProtocol(StreamProtocol):
    """A stream we opened: its local (address, port) is known to the connector for as
    long as it is connected."""

    local: Address | None = None

    def connectionMade(self) -> None:  # noqa: N802
        connector = getattr(self.owner, "connector", None)
        host = self.transport.getHost()
        ip = C.parse_ip(str(getattr(host, "host", "")))
        if connector is not None and ip is not None:
            self.local = (ip, getattr(host, "port", 0))
            connector.outgoing.setdefault(self.local, Counter())[
                getattr(self.factory, "pair", None)] += 1
            connector.local.add(ip)
        super().connectionMade()

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        connector = getattr(self.owner, "connector", None)
        if connector is not None and self.local is not None:
            pairs = connector.outgoing.get(self.local)
            if pairs is not None:
                pairs[getattr(self.factory, "pair", None)] -= 1
                if pairs[getattr(self.factory, "pair", None)] <= 0:
                    del pairs[getattr(self.factory, "pair", None)]
                if not pairs:
                    del connector.outgoing[self.local]
        super().connectionLost(reason)


class OutboundFactory(ClientFactory):
    """One outgoing connection attempt.  With ``planned``, its outcome (ready, failed,
    or a dialback verdict) fires ``outcome`` with (protocol or None, action) once;
    otherwise (the backend leg) the proxy handles the stream's actions itself."""

    noisy = False       # no "Starting factory <...>" lines: the stream logs its own

    def __init__(self, proxy: Any, stream: OutboundStream | None, label: str,
                 router: R.Router | None = None, pair: R.Pair | None = None,
                 planned: bool = False, tls: ClientCreator | None = None) -> None:
        self.proxy = proxy
        self.stream = stream
        self.label = label
        self.router = router
        self.pair = pair
        self.planned = planned
        self.tls = tls               # made before connecting: a local error fails early
        self.outcome: defer.Deferred = defer.Deferred()
        self.reason = None

    def buildProtocol(self, addr):  # noqa: N802
        proto = OutgoingProtocol(self.stream, self.proxy, self.proxy.reactor, self.label)
        proto.factory = self
        self.proxy.streams.add(proto)
        return proto

    def clientConnectionFailed(self, connector, reason) -> None:  # noqa: N802
        self.reason = reason
        self.report(None, None)

    def report(self, proto: StreamProtocol | None, action: Any) -> None:
        if not self.outcome.called:
            self.outcome.callback((proto, action))


class Connector:
    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        s = proxy.settings
        # (local end, domain pair) of each connection of ours; two may share a local
        # end (Linux reuses an ephemeral port toward another destination)
        self.outgoing: dict[Address, Counter] = {}
        listeners = own_listeners(s)
        # core.connect rule 3a: our listeners; toward remotes, ejabberd's internal
        # listener too.  ``local`` is shared and grows with our connections' local ends.
        self.verify_rules = C.rules_from(listeners, allow_private=True)
        self.local = self.verify_rules.local
        for address, _port in listeners:
            ip = C.parse_ip(address)
            if ip is not None and not ip.is_unspecified:
                self.local.add(ip)
        self.remote_rules = C.rules_from([*listeners, (s.backend.host, s.backend.port)],
                                         s.allow_private_targets)
        self.remote_rules.local = self.local

    def listening(self, host: str, port: int) -> None:
        """A listener of ours is bound at ``host``:``port`` (e.g. a port 0 made real)."""
        for rules in (self.verify_rules, self.remote_rules):
            rules.add_own(host, port)

    def is_own_connection(self, peer: str, pair: R.Pair) -> bool:
        """Is the accepted connection from ``peer`` ("host:port"), asking to be
        verified for ``pair`` (originating, receiving), one of ours come back?  Its
        source is the local end of a connection of ours *and* it asks for that
        connection's domain pair, as our own stream would.  The address alone is not
        enough: Linux gives the same ephemeral port to connections toward different
        destinations, so ejabberd's connection to our backend listener may share the
        local end of one of ours (seen in the test world on Linux 6.18), and the
        destination cannot tell either (a NAT or a load balancer in between changes
        it)."""
        host, _, port = peer.rpartition(":")
        ip = C.parse_ip(host)
        if ip is None or not port.isdigit():
            return False
        return self.outgoing.get((ip, int(port)), {}).get(pair, 0) > 0

    def client_tls(self, factory: OutboundFactory, server_name: str,
                   alpn: bool) -> ClientCreator:
        """Our client context; toward a remote it presents our domain's certificate
        (for SASL EXTERNAL)."""
        if factory.tls is not None:
            return factory.tls
        identity = None
        if factory.label == "remote":
            d = self.proxy.settings.domains.get(factory.stream.config.originating)
            identity = (d.certificate, d.key) if d else None
        return self.proxy.client_ctx.creator(server_name, alpn=alpn, identity=identity)

    # -- the backend leg: one operator-given address, reported to the router -----------

    def open_backend(self, pair: R.Pair) -> None:
        p = self.proxy
        s = p.settings
        b = s.backend
        remote, local = pair
        cfg = OutboundConfig(Mode.ORIGINATE, remote, local, p.keys, s.max_stanza_size,
                             s.max_depth, tls=b.tls, timeout=s.auth_timeout,
                             actions=p.stream_actions)
        factory = OutboundFactory(p, OutboundStream(cfg), "backend", p.to_backend, pair)
        log.info("backend stream opening for {remote} -> {local}", remote=remote,
                 local=local)
        p.reactor.connectTCP(b.host, b.port, factory, timeout=s.connect_timeout)

        def done(result) -> None:
            if result[0] is None:
                self._backend_unreachable(factory, f"backend {b.host}:{b.port}")
        factory.outcome.addCallback(done)

    def _backend_unreachable(self, factory: OutboundFactory, where: str) -> None:
        reason = factory.reason
        timeout = reason is not None and reason.check(neterror.TimeoutError)
        condition = "remote-server-timeout" if timeout else "remote-server-not-found"
        text = f"{where} unreachable: {reason.getErrorMessage() if reason else '?'}"
        self.proxy.link_failed(factory, condition, text)

    # -- remote servers -----------------------------------------------------------------

    def plan(self, domain: str) -> C.ConnectPlan:
        r = self.proxy.resolver
        return C.ConnectPlan(domain, self.remote_rules, r.rng.uniform, r.override(domain),
                             connect_timeout=self.proxy.settings.connect_timeout)

    async def open_remote(self, pair: R.Pair) -> None:
        """Open our stream for (local, remote); report ready or failed to the router.
        Whatever goes wrong here fails the attempt (never a link stuck connecting)."""
        p = self.proxy
        local, remote = pair
        s = p.settings

        def make(attempt: C.Attempt) -> OutboundStream:
            return OutboundStream(OutboundConfig(
                Mode.ORIGINATE, local, remote, p.keys, s.max_stanza_size, s.max_depth,
                tls="required", timeout=s.auth_timeout, direct_tls=attempt.direct_tls,
                request_bidi=True, sasl_external=True, trust=p.trust_policy,
                actions=p.stream_actions, max_pairs=p.to_remote.max_pairs))
        try:
            result = await self.run(self.plan(remote), make, "remote", p.to_remote, pair)
        except Exception as e:  # noqa: BLE001 (the tx boundary)
            log.failure("remote stream {pair}: internal error", pair=" -> ".join(pair))
            result = C.Exhausted("internal-server-error", f"internal error: {e!r}")
        if isinstance(result, C.Exhausted):
            factory = OutboundFactory(p, None, "remote", p.to_remote, pair)
            p.link_failed(factory, result.condition, result.text)
        else:
            p.link_ready(result[0])

    async def verify(self, req: A.VerifyDialback, backend: bool,
                     wanted: Callable[[], bool] | None = None) -> E.DialbackVerdict:
        """Ask ``req.originating``'s authoritative server (ejabberd itself for the
        backend listener) about ``req.key``: the first verdict wins."""
        p = self.proxy
        s = p.settings
        if backend:
            plan = C.ConnectPlan(req.originating, self.verify_rules, p.resolver.rng.uniform,
                                 [Target(s.backend.host, s.backend.port, False)],
                                 connect_timeout=s.connect_timeout)
        else:
            plan = self.plan(req.originating)

        def make(attempt: C.Attempt) -> OutboundStream:
            return OutboundStream(OutboundConfig(
                Mode.VERIFY, req.receiving, req.originating, None, s.max_stanza_size,
                s.max_depth, tls=s.backend.tls if backend else "auto",
                verify_stream_id=req.stream_id, verify_key=req.key, timeout=s.auth_timeout,
                direct_tls=attempt.direct_tls, trust=None if backend else p.trust_policy))
        try:
            result = await self.run(plan, make, "verify", wanted=wanted)
        except Exception:  # noqa: BLE001 (the tx boundary)
            log.failure("dialback verification {originating}: internal error",
                        originating=req.originating)
            result = C.Exhausted("remote-server-not-found", "internal error")
        if isinstance(result, C.Exhausted):
            condition = result.condition if result.condition == "remote-server-timeout" \
                else "remote-server-not-found"
            log.info("dialback verification {originating} -> {receiving} not possible: "
                     "{text}", originating=req.originating, receiving=req.receiving,
                     text=result.text)
            return E.DialbackVerdict(req.originating, req.receiving, None, condition)
        return result[1]

    # -- running a plan -----------------------------------------------------------------

    async def run(self, plan: C.ConnectPlan, make: Callable[[C.Attempt], OutboundStream],
                  label: str, router: R.Router | None = None, pair: R.Pair | None = None,
                  wanted: Callable[[], bool] | None = None
                  ) -> tuple[StreamProtocol, Any] | C.Exhausted:
        """Execute ``plan`` until a stream is ready (or a verdict is in): return its
        protocol and that action (``StreamReady``, ``DialbackVerdict``), or the plan's
        ``Exhausted``."""
        resolver = self.proxy.resolver
        while True:
            if wanted is not None and not wanted():
                return C.Exhausted("remote-server-timeout", "no longer wanted")
            step = plan.next()
            if isinstance(step, C.Exhausted):
                return step
            if isinstance(step, C.LookupSrv):
                plan.srv_answered(*await resolver.srv(step.domain))
            elif isinstance(step, C.LookupAddresses):
                plan.addresses_answered(step.host, *await resolver.addresses(step.host))
            else:
                proto, action, failure = await self._attempt(step, plan.domain, make,
                                                             label, router, pair)
                if failure is None:
                    return proto, action
                plan.attempt_failed(step, failure)

    async def _attempt(self, attempt: C.Attempt, domain: str, make, label: str,
                       router, pair) -> tuple[Any, Any, C.AttemptFailed | None]:
        reactor = self.proxy.reactor
        factory = OutboundFactory(self.proxy, make(attempt), label, router, pair,
                                  planned=True)
        log.info("{label} connection to {host} [{address}]:{port} ({kind}) for {domain}",
                 label=label, host=attempt.host, address=attempt.address, port=attempt.port,
                 kind="direct TLS" if attempt.direct_tls else "STARTTLS", domain=domain)
        try:
            # Made before connecting, for STARTTLS too: a context that cannot be made
            # (say, a certificate file that became unreadable) is our error, the same for
            # every address (core.connect rule 4b).
            factory.tls = self.client_tls(factory, domain, alpn=attempt.direct_tls)
            wrapped = TLSMemoryBIOFactory(factory.tls, True, factory) \
                if attempt.direct_tls else factory
            reactor.connectTCP(attempt.address, attempt.port, wrapped,
                               timeout=attempt.connect_timeout)
        except Exception as e:  # noqa: BLE001 (the tx boundary)
            log.failure("{label} connection for {domain}: cannot connect", label=label,
                        domain=domain)
            return None, None, C.AttemptFailed(C.FailureKind.FINAL, "internal-server-error",
                                               f"internal error: {e!r}")
        proto, action = await factory.outcome
        return proto, action, _failure(factory, action)

    # -- sender multiplexing (core.routing rule 7, core.outbound invariant 6) -----------

    def multiplex(self, op: R.Multiplex) -> None:
        """Ask for ``op.pair`` on ``op.handle``, a ready stream of ours to the remote."""
        proto = op.handle
        local, remote = op.pair
        if proto.closing:       # (the router forgets a stream as it closes: not expected)
            self.multiplexed(proto, A.PairFailed(local, remote, "not tried", "",
                                                 "the stream is closing", tried=False))
            return
        asked, actions = proto.stream.multiplex(local)
        if asked:
            log.info("remote stream {sid} multiplexing {local} -> {remote} (dialback) "
                     "peer={peer}", sid=proto.stream.stream_id, local=local, remote=remote,
                     peer=proto.peer)
        proto.run(actions)

    def multiplexed(self, proto: StreamProtocol, a: Any) -> None:
        """What the stream says about a pair asked for on it, or about itself."""
        p = self.proxy
        router, now, sid = p.to_remote, p.reactor.seconds(), proto.stream.stream_id
        if type(a) is A.RetireStream:
            log.info("remote stream {sid} retired: {text}", sid=sid, text=a.text)
            p._run_ops(router, router.retire(proto, now))
            return
        pair = (a.originating, a.receiving)
        if type(a) is A.PairReady:
            log.info("remote stream {sid} multiplexing {local} -> {remote}: valid",
                     sid=sid, local=a.originating, remote=a.receiving)
            p._run_ops(router, router.pair_ready(pair, proto, now))
            return
        (log.warn if a.tried else log.info)(
            "remote stream {sid} multiplexing {local} -> {remote}: {outcome} ({text})",
            sid=sid, local=a.originating, remote=a.receiving, outcome=a.outcome,
            text=a.text)
        p._run_ops(router, router.pair_failed(pair, proto, a.condition, a.text, now,
                                              tried=a.tried))


def _failure(factory: OutboundFactory, action: Any) -> C.AttemptFailed | None:
    """The attempt's outcome for the plan: Twisted's connect failure translated, the
    rest decided by ``core.connect.attempt_outcome`` (rule 4)."""
    if action is None:                          # the TCP connection was not made
        reason = factory.reason
        timed_out = reason is not None and reason.check(neterror.TimeoutError) is not None
        return C.connect_failed(timed_out, reason.getErrorMessage() if reason else "?")
    return C.attempt_outcome(action, factory.stream.refused_by_peer)
