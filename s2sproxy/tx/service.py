"""The proxy: listeners, the backend pool and the routing between streams.

Flow of a stanza from a remote server (DESIGN.md): public stream -> core inbound
machine (checks) -> ``DeliverStanzas`` -> the backend link for (remote, local) -> one
plain dialback-authenticated stream to ejabberd's internal listener.
"""

from __future__ import annotations

import secrets
from collections import deque
from typing import Any

from twisted.application import internet, service, strports
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory, Factory
from s2sproxy.logs import get_logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from s2sproxy.config import Settings
from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.inbound import InboundConfig, InboundStream, Role, TrustPolicy
from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundStream
from s2sproxy.core.stanza import Stanza, bounce
from s2sproxy.tx.backend_dns import make_factories
from s2sproxy.tx.protocol import StreamProtocol
from s2sproxy.tx.resolver import RemoteResolver
from s2sproxy.tx.tls import ClientCreator, ContextFactory, ServerContexts, TrustStore

log = get_logger(__name__)


def new_stream_id() -> str:
    return secrets.token_urlsafe(12)


class _OutboundFactory(ClientFactory):
    """Builds the protocol for one outgoing connection; reports connect failures."""

    def __init__(self, proxy: "Proxy", stream: OutboundStream, label: str,
                 on_connect_failed) -> None:
        self.proxy = proxy
        self.stream = stream
        self.label = label
        self.on_connect_failed = on_connect_failed
        self.proto: StreamProtocol | None = None

    def buildProtocol(self, addr):  # noqa: N802
        self.proto = StreamProtocol(self.stream, self.proxy, self.proxy.reactor, self.label)
        self.proto.factory = self
        return self.proto

    def clientConnectionFailed(self, connector, reason) -> None:  # noqa: N802
        self.on_connect_failed(reason.getErrorMessage())


class BackendLink:
    """The stream to ejabberd for one (remote, local) pair and the stanzas waiting
    for it while it authenticates."""

    def __init__(self, pair: tuple[str, str]) -> None:
        self.pair = pair
        self.ready = False
        self.proto: StreamProtocol | None = None
        self.queue: deque[tuple[Stanza, float]] = deque()
        self.timer = None


class Proxy(service.MultiService):
    def __init__(self, settings: Settings, reactor) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.keys = DialbackKeys(settings.secret)
        self.trust = TrustStore(settings.trust)
        self.policy = TrustPolicy(settings.trust.require_valid_certificates,
                                  settings.trust.secure_domains,
                                  settings.trust.insecure_domains)
        self.served = frozenset(settings.domains)
        self.public_ctx = ServerContexts(settings.domains, alpn=False)
        self.direct_ctx = ServerContexts(settings.domains, alpn=True)
        b = settings.backend
        backend_identity = (b.certificate, b.key) if b.certificate else None
        self.backend_ctx = ServerContexts(settings.domains, alpn=False,
                                          extra=backend_identity)
        self.resolver = RemoteResolver(settings.remotes, settings.nameservers, reactor)
        self.links: dict[tuple[str, str], BackendLink] = {}
        self.bidi_streams: dict[str, set[StreamProtocol]] = {}
        self.inbound: set[StreamProtocol] = set()
        self._build_listeners()

    # -- listeners -----------------------------------------------------------------------

    def _inbound_factory(self, role: Role, direct_tls: bool) -> Factory:
        s = self.settings
        cfg = InboundConfig(role=role, served=self.served, keys=self.keys,
                            new_stream_id=new_stream_id, max_size=s.max_stanza_size,
                            max_depth=s.max_depth, trust=self.policy,
                            starttls_available=True, direct_tls=direct_tls)
        label = {Role.PUBLIC: "public", Role.BACKEND: "backend"}[role]
        proxy = self

        class F(Factory):
            def buildProtocol(self, addr):  # noqa: N802
                p = StreamProtocol(InboundStream(cfg), proxy, proxy.reactor, label)
                proxy.inbound.add(p)
                return p
        return F()

    def _build_listeners(self) -> None:
        s = self.settings
        for desc in s.starttls_listeners:
            strports.service(desc, self._inbound_factory(Role.PUBLIC, False),
                             reactor=self.reactor).setServiceParent(self)
        for desc in s.direct_tls_listeners:
            f = TLSMemoryBIOFactory(ContextFactory(self.direct_ctx.for_domain(None)), False,
                                    self._inbound_factory(Role.PUBLIC, True))
            strports.service(desc, f, reactor=self.reactor).setServiceParent(self)
        strports.service(s.backend.listen, self._inbound_factory(Role.BACKEND, False),
                         reactor=self.reactor).setServiceParent(self)
        tcp_f, udp_p = make_factories(s.backend.srv_target, s.backend.srv_port)
        dns_addr = s.backend.dns_address
        port = s.backend.dns_port
        # There is no "udp:" endpoint string in Twisted; the DNS responder is
        # configured by address and port instead.
        internet.UDPServer(port, udp_p, interface=dns_addr,
                           reactor=self.reactor).setServiceParent(self)
        internet.TCPServer(port, tcp_f, interface=dns_addr,
                           reactor=self.reactor).setServiceParent(self)

    def stopService(self):  # noqa: N802
        for p in list(self.inbound) + [lk.proto for lk in self.links.values() if lk.proto]:
            p.close()
        return super().stopService()

    # -- what StreamProtocol asks of its owner ------------------------------------------

    def start_tls(self, proto: StreamProtocol, server_name: str | None) -> None:
        if isinstance(proto.stream, InboundStream):
            ctxs = self.public_ctx if proto.stream.role is Role.PUBLIC else self.backend_ctx
            proto.transport.startTLS(ContextFactory(ctxs.for_domain(server_name)))
        else:
            proto.transport.startTLS(ClientCreator(server_name or ""))

    def check_peer(self, proto: StreamProtocol) -> E.TlsEstablished:
        ok, cert = self.trust.check(proto.tls_connection())
        return E.TlsEstablished(ok, cert)

    def stream_lost(self, proto: StreamProtocol) -> None:
        self.inbound.discard(proto)
        for streams in self.bidi_streams.values():
            streams.discard(proto)
        self._backend_stream_lost(proto)

    def stream_action(self, proto: StreamProtocol, a: Any) -> None:
        t = type(a)
        if t is A.DeliverStanzas:
            self.deliver(a.stanzas)
        elif t is A.Authenticated:
            st = proto.stream
            log.info("{label} stream authenticated: {originating} -> {receiving} "
                     "method={method} tls={tls} bidi={bidi} stream={sid} peer={peer}",
                     label=proto.label, originating=a.originating, receiving=a.receiving,
                     method=a.method, tls=st.secure, bidi=st.bidi, sid=st.stream_id,
                     peer=proto.peer)
            if st.bidi:
                self.bidi_streams.setdefault(a.originating, set()).add(proto)
        elif t is A.BidiNegotiated:
            st = proto.stream
            log.info("{label} stream bidi negotiated: stream={sid} peer={peer}",
                     label=proto.label, sid=st.stream_id, peer=proto.peer)
            for origin in st.authenticated_from:
                self.bidi_streams.setdefault(origin, set()).add(proto)
        elif t is A.VerifyDialback:
            defer.ensureDeferred(self.verify_dialback(proto, a))
        elif t is A.StreamReady:
            self._link_ready(proto)
        elif t is A.StreamFailed:
            self._link_failed(proto, a.condition, a.text)
        elif t is E.DialbackVerdict:
            waiter = getattr(proto.factory, "verdict", None)
            if waiter is not None and not waiter.called:
                waiter.callback(a)
        else:
            log.error("unhandled action {action!r}", action=a)

    # -- dialback: asking the remote's authoritative server ------------------------------

    async def verify_dialback(self, requester: StreamProtocol, req: A.VerifyDialback) -> None:
        verdict = E.DialbackVerdict(req.originating, req.receiving, None,
                                    "remote-server-not-found")
        try:
            targets = await self.resolver.resolve(req.originating)
        except Exception as e:  # noqa: BLE001 (the tx boundary)
            log.warn("dialback: cannot resolve {domain}: {err}", domain=req.originating,
                     err=repr(e))
            targets = []
        for target in targets:
            cfg = OutboundConfig(Mode.VERIFY, req.receiving, req.originating, None,
                                 self.settings.max_stanza_size, self.settings.max_depth,
                                 verify_stream_id=req.stream_id, verify_key=req.key,
                                 timeout=self.settings.auth_timeout)
            stream = OutboundStream(cfg)
            d: defer.Deferred = defer.Deferred()
            factory = _OutboundFactory(self, stream, "verify",
                                       lambda reason, d=d: d.called or d.callback(None))
            factory.verdict = d
            self._connect(target.host, target.port, target.direct_tls, req.originating,
                          factory)
            result = await d
            if result is None or result.valid is None:
                log.info("dialback: {host}:{port} for {domain} did not answer",
                         host=target.host, port=target.port, domain=req.originating)
                verdict = result or verdict
                continue
            verdict = result
            break
        log.info("dialback verification {originating} -> {receiving}: {verdict}",
                 originating=req.originating, receiving=req.receiving,
                 verdict={True: "valid", False: "invalid"}.get(verdict.valid,
                                                               verdict.condition))
        requester.run(requester.stream.handle(verdict))

    def _connect(self, host: str, port: int, direct_tls: bool, server_name: str,
                 factory: ClientFactory) -> None:
        if direct_tls:
            factory.stream.secure = True
            wrapped = TLSMemoryBIOFactory(ClientCreator(server_name, alpn=True), True,
                                          factory)
            self.reactor.connectTCP(host, port, wrapped,
                                    timeout=self.settings.connect_timeout)
        else:
            self.reactor.connectTCP(host, port, factory,
                                    timeout=self.settings.connect_timeout)

    # -- the backend leg -------------------------------------------------------------------

    def deliver(self, stanzas: list[Stanza]) -> None:
        """Send stanzas accepted from remotes to ejabberd, one write per link."""
        batches: dict[tuple[str, str], list[Stanza]] = {}
        for s in stanzas:
            batches.setdefault((s.from_domain, s.to_domain), []).append(s)
        now = self.reactor.seconds()
        for pair, batch in batches.items():
            link = self.links.get(pair)
            if link is None:
                link = self._open_link(pair)
            if link.ready:
                link.proto.transport.write(b"".join(s.raw for s in batch))
                continue
            limit = self.settings.backend.queue_limit
            for s in batch:
                if len(link.queue) >= limit:
                    self.bounce(s, "resource-constraint", "too many stanzas waiting")
                else:
                    link.queue.append((s, now))

    def _open_link(self, pair: tuple[str, str]) -> BackendLink:
        remote, local = pair
        b = self.settings.backend
        link = self.links[pair] = BackendLink(pair)
        cfg = OutboundConfig(Mode.ORIGINATE, remote, local, self.keys,
                             self.settings.max_stanza_size, self.settings.max_depth,
                             tls=b.tls, timeout=self.settings.auth_timeout)
        factory = _OutboundFactory(self, OutboundStream(cfg), "backend",
                                   lambda reason: self._link_down(
                                       link, "remote-server-not-found",
                                       f"backend {b.host}:{b.port} unreachable: {reason}"))
        factory.link = link
        link.timer = self.reactor.callLater(b.queue_timeout, self._link_down, link,
                                            "remote-server-timeout",
                                            "backend did not accept the stream in time")
        self.reactor.connectTCP(b.host, b.port, factory, timeout=self.settings.connect_timeout)
        log.info("backend stream opening for {remote} -> {local}", remote=remote,
                 local=local)
        return link

    def _link_of(self, proto: StreamProtocol) -> BackendLink | None:
        return getattr(getattr(proto, "factory", None), "link", None)

    def _link_ready(self, proto: StreamProtocol) -> None:
        link = self._link_of(proto)
        if link is None:
            return
        link.proto = proto
        link.ready = True
        if link.timer is not None and link.timer.active():
            link.timer.cancel()
        waiting = [s for s, _ in link.queue]
        link.queue.clear()
        log.info("backend stream ready for {remote} -> {local} (dialback accepted by "
                 "ejabberd, tls={tls}); flushing {n} stanza(s)", remote=link.pair[0],
                 local=link.pair[1], tls=proto.stream.secure, n=len(waiting))
        if waiting:
            proto.transport.write(b"".join(s.raw for s in waiting))

    def _link_failed(self, proto: StreamProtocol, condition: str, text: str) -> None:
        link = self._link_of(proto)
        if link is not None:
            self._link_down(link, condition, text)

    def _link_down(self, link: BackendLink, condition: str, text: str) -> None:
        if self.links.get(link.pair) is link:
            del self.links[link.pair]
        if link.timer is not None and link.timer.active():
            link.timer.cancel()
        waiting = list(link.queue)
        link.queue.clear()
        if waiting or not link.ready:
            log.warn("backend stream for {remote} -> {local} failed: {condition} {text}; "
                     "bouncing {n} stanza(s)", remote=link.pair[0], local=link.pair[1],
                     condition=condition, text=text, n=len(waiting))
        for s, _ in waiting:
            self.bounce(s, condition, text)
        if link.proto is not None and not link.proto.closing:
            link.proto.close()

    def _backend_stream_lost(self, proto: StreamProtocol) -> None:
        link = self._link_of(proto)
        if link is not None and self.links.get(link.pair) is link:
            self._link_down(link, "remote-server-not-found", "backend stream closed")

    # -- bounces -------------------------------------------------------------------------

    def bounce(self, stanza: Stanza, condition: str, text: str = "") -> None:
        data = bounce(stanza, condition, text)
        if data is None:
            log.info("not bouncing {stanza} ({condition}): never an error for an error",
                     stanza=repr(stanza), condition=condition)
            return
        remote = stanza.from_domain
        for proto in self.bidi_streams.get(remote, ()):
            if not proto.closing:
                proto.transport.write(data)
                log.info("bounced {stanza} with {condition}", stanza=repr(stanza),
                         condition=condition)
                return
        # Without a bidi stream the bounce needs an outgoing stream to the remote,
        # which the outbound issue (#3) adds.
        log.warn("cannot bounce {stanza} with {condition}: no stream toward {remote}",
                 stanza=repr(stanza), condition=condition, remote=remote)

