"""The proxy: listeners, outgoing connections, and the routing between streams.

Two routers (``core.routing``), one per direction:

* ``to_backend``: (remote, local) pairs, each a dialback-authenticated plain stream to
  ejabberd's internal listener, opened on demand.
* ``to_remote``: (local, remote) pairs, each either the remote's own bidi stream to us
  (preferred) or an outgoing stream of ours (SRV/XEP-0368, TLS, certificate check,
  SASL EXTERNAL or dialback, bidi requested).  With ``outgoing.multiplex``, a further
  pair toward a remote is asked for on a ready stream of ours to it (XEP-0220 sender
  multiplexing; ``core.routing`` rule 7 decides where, ``core.outbound`` invariant 6
  whether the stream can).

A stanza goes to ``to_backend`` when its ``to`` domain is served, else to
``to_remote``.  A bounce is a stanza too: it is routed back the other way.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.task import LoopingCall

from s2sproxy import __version__
from s2sproxy.config import Settings
from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core import routing as R
from s2sproxy.core.admission import Admission
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.inbound import InboundConfig, InboundStream, Role
from s2sproxy.core.limits import RATE_LIMIT_MAX_PAUSE
from s2sproxy.core.stanza import Stanza, bounce_stanza
from s2sproxy.core.subject import flag_subject
from s2sproxy.core.xmlstream import FRAMER
from s2sproxy.logs import get_logger
from s2sproxy.metrics import Metrics, ProxyState
from s2sproxy.policy import keepalive as K
from s2sproxy.policy.classify import BOUNCE, CLOSE, FORWARD, NS_PING, Policy
from s2sproxy.policy.domains import REASON as REASON_DENIED
from s2sproxy.policy.ratelimit import REASON as REASON_RATE, Limiter
from s2sproxy.tx import control, listeners, memory, reloading, shutdown
from s2sproxy.tx.certificates import Certificates
from s2sproxy.tx.connector import Connector, OutboundFactory as _OutboundFactory
from s2sproxy.tx.filtering import Filtering
from s2sproxy.tx.flags import FlagRecorder
from s2sproxy.tx.protocol import StreamProtocol
from s2sproxy.tx.tls import ContextFactory, peer_hello_read, tls_connection_of
from s2sproxy.tx.verify import Verifier

log = get_logger(__name__)

TICK = 1.0   # seconds between router ticks (queue ages, idle streams)


def new_stream_id() -> str:
    return secrets.token_urlsafe(12)


def new_ping_id() -> str:
    # 80 random bits; digits keep the ids the integration harness's raw peer answers.
    return f"s2sproxy-ping-{secrets.randbelow(10 ** 24):024d}"


class Proxy(service.MultiService):
    def __init__(self, settings: Settings, reactor, config_path: str | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self.config_path = config_path      # re-read on SIGHUP (``reload``)
        # What a reload never changes (config.RESTART_ONLY): the secret, the served
        # domains, the listeners, and the state that outlives a configuration.
        self.keys = DialbackKeys(settings.secret)
        self.served = frozenset(settings.domains)
        self.settings = settings
        self.connector = Connector(self)
        self.streams: set[StreamProtocol] = set()
        budget = R.ByteBudget(settings.queue.max_total_bytes)   # both directions share it
        self.to_backend = R.Router(0, 0.0, 0.0, budget=budget)
        self.to_remote = R.Router(0, 0.0, 0.0, budget=budget)
        self.admission = Admission(1, 1)
        self.metrics = Metrics()
        self.state_metrics = ProxyState(self)
        self.metrics.registry.register(self.state_metrics)
        self.policy = Policy(reloading.policy_config(settings), self.served)
        self.keepalive = K.Keepalive(reloading.keepalive_config(settings),
                                     new_ping_id)   # the one registry of our pings
        self.verifier = Verifier(self)
        self.certificates = Certificates(self.metrics, reactor)
        self.flags = FlagRecorder(self.metrics, None, None, 0)
        self.limiter = Limiter(*reloading.rate_configs(settings))   # [ratelimit]
        self.filtering = Filtering(self)    # [filter] (tx.filtering)
        self.domains = self.filtering.domains
        self._inbound_configs: dict = {}    # inbound_config's, emptied by a reload
        self._configure(settings)
        self._ticker = LoopingCall(self._tick)
        self.idle_memory = memory.IdleMemory()     # policy.keepalive rule 7
        self._ticker.clock = reactor
        self._control_port = None
        self._build_listeners()

    def _configure(self, settings: Settings) -> None:
        reloading.configure(self, settings)

    def reload(self) -> bool:
        """SIGHUP (``tx.reloading``)."""
        return reloading.reload(self)

    def listener(self, role: Role, direct_tls: bool) -> listeners.Listener:
        return listeners.Listener(self, role, direct_tls)

    def _build_listeners(self) -> None:
        listeners.build(self)


    def inbound_config(self, role: Role, direct_tls: bool) -> InboundConfig:
        """One per listener kind, shared by its streams (an idle stream holds no copy);
        made anew after a reload (``tx.reloading``), open streams keeping theirs."""
        key = (role, direct_tls)
        made = self._inbound_configs.get(key)
        if made is None:
            made = self._inbound_configs[key] = self._new_inbound_config(role, direct_tls)
        return made

    def _new_inbound_config(self, role: Role, direct_tls: bool) -> InboundConfig:
        s = self.settings
        return InboundConfig(role=role, served=self.served, keys=self.keys,
                             new_stream_id=new_stream_id, max_size=s.max_stanza_size,
                             max_depth=s.max_depth, trust=self.trust_policy,
                             starttls_available=True, direct_tls=direct_tls,
                             actions=self.stream_actions, auth_timeout=s.auth_timeout,
                             pre_auth_max_size=s.pre_auth_max_stanza_size,
                             pre_auth_max_elements=s.pre_auth_max_elements,
                             domains=self.domains,
                             idle_seconds=int(s.keepalive.ping) or None)

    def startService(self):  # noqa: N802
        super().startService()
        s = self.settings
        b = s.backend
        log.info("s2sproxy {version} serving {domains}; public STARTTLS {starttls}, "
                 "Direct TLS {direct}; ejabberd at {host}:{port} (tls={tls}), its outgoing "
                 "streams on {backend_listen}, its SRV answers on {dns}; metrics {metrics}; "
                 "framer: {framer}", version=__version__, domains=", ".join(s.domains),
                 starttls=", ".join(s.starttls_listeners) or "none",
                 direct=", ".join(s.direct_tls_listeners) or "none", host=b.host,
                 port=b.port, tls=b.tls, backend_listen=b.listen,
                 dns=f"{b.dns_address}:{b.dns_port}", metrics=s.metrics_listen or "off",
                 framer=FRAMER)
        for svc in self:    # the real bound addresses (a port 0 made real): never a target
            waiting = getattr(svc, "_waitingForPort", None)
            if waiting is not None:
                waiting.addCallback(self._bound)
        self._ticker.start(TICK, now=False)
        self.certificates.check(self.reactor.seconds())
        if s.control_socket is not None:
            d = control.listen(self, s.control_socket)
            if d is not None:
                d.addCallback(lambda port: setattr(self, "_control_port", port))
        if self.config_path is not None:
            import signal
            signal.signal(signal.SIGHUP,
                          lambda *_: self.reactor.callFromThread(self.reload))

    def _bound(self, port):
        h = getattr(port, "getHost", lambda: None)()   # None: the listen failed (logged)
        if h is not None:
            self.connector.listening(getattr(h, "host", ""), getattr(h, "port", 0))
        return port

    def stopService(self):  # noqa: N802
        """Stop accepting, then close every stream so that nothing in flight is lost
        (``tx/shutdown.py``); twistd waits for the returned Deferred."""
        if self._ticker.running:
            self._ticker.stop()
        port, self._control_port = self._control_port, None
        if port is not None:
            port.stopListening()
        return shutdown.stop(self, lambda: super(Proxy, self).stopService())

    def _tick(self) -> None:
        """Each part runs even when another raised; a failing tick logs one traceback
        and the ticker keeps running (LoopingCall stops at the first exception)."""
        now = self.reactor.seconds()
        failed = False
        parts = (("to_backend", self._tick_backend), ("to_remote", self._tick_remote),
                 ("iqs", self._tick_iqs), ("keepalive", self._keepalive),
                 ("certificates", self.certificates.tick),
                 ("metrics", self.state_metrics.update), ("filter", self.filtering.tick))
        for name, part in parts:
            try:
                part(now)
            except Exception:  # noqa: BLE001 (the tx boundary)
                if not failed:
                    log.failure("periodic tick: {part} failed", part=name)
                failed = True

    def _tick_backend(self, now: float) -> None:
        self._run_ops(self.to_backend, self.to_backend.tick(now))

    def _tick_remote(self, now: float) -> None:
        self._run_ops(self.to_remote, self.to_remote.tick(now))

    def _tick_iqs(self, now: float) -> None:
        expired = self.policy.expired(now)
        if expired:
            self.metrics.iq_timeouts.inc(len(expired))
            self._answer_unanswered(expired, "no answer in time")
        self.metrics.pending_iqs.set(len(self.policy.iqs))
        self.metrics.iq_evicted.set(self.policy.iqs.evicted)

    def _answer_unanswered(self, requests: list[Stanza], why: str) -> None:
        for req in requests:
            log.info("iq {id} from {requester} to {responder} unanswered ({why}): "
                     "remote-server-timeout", id=req.id, requester=req.from_,
                     responder=req.to, why=why)
            self.bounce(req, "remote-server-timeout", why)

    def _keepalive(self, now: float) -> None:
        """Run policy.keepalive's decisions on every established stream."""
        poll = self.keepalive.poll
        for proto in list(self.streams):
            st = proto.stream
            if proto.closing or not K.established(st):
                continue
            self.idle_memory.release(proto, now)
            for d in poll(proto, now, proto.last_tx, proto.last_rx, K.ping_ends(st)):
                if type(d) is K.StreamDead:
                    log.warn("{label} stream {peer} to {remote} dead: no answer to a "
                             "keepalive ping in {timeout:g} s", label=proto.label,
                             peer=proto.peer, remote=d.remote, timeout=d.timeout)
                    self.metrics.dead_peers.labels(self.metrics.peer(d.remote)).inc()
                    proto.run(st.fail(d.condition, d.text))
                else:
                    proto.write(d.data)
        self.idle_memory.tick_done(now)

    # -- what StreamProtocol asks of its owner ------------------------------------------

    def admit(self, proto: StreamProtocol) -> bool:
        """May this newly accepted public connection be held (``core.admission``)?
        Admitted, it is one of ``streams``."""
        if proto.label != "public":
            self.streams.add(proto)
            return True
        host = proto.peer.rsplit(":", 1)[0]
        refused = self.admission.admit(proto, host)
        self.metrics.unauthenticated.set(len(self.admission))
        if refused is None:
            self.streams.add(proto)
            return True
        self.metrics.connections_refused.labels(refused).inc()
        n = self.admission.log_due(self.reactor.seconds())
        if n:
            log.warn("refused {n} connection(s) over the {bound} bound of unauthenticated "
                     "connections (limits.max_unauthenticated{suffix} = {limit}); last "
                     "from {peer}", n=n, bound=refused, peer=proto.peer,
                     suffix="" if refused == "total" else "_per_source",
                     limit=self.admission.max_total if refused == "total"
                     else self.admission.max_per_source)
        return False

    def _release(self, proto: StreamProtocol) -> None:
        self.admission.release(proto)
        self.metrics.unauthenticated.set(len(self.admission))

    def start_tls(self, proto: StreamProtocol, server_name: str | None) -> None:
        st = proto.stream
        if isinstance(st, InboundStream):
            ctxs = self.public_ctx if st.role is Role.PUBLIC else self.backend_ctx
            proto.transport.startTLS(ContextFactory(ctxs.for_domain(server_name)))
        else:
            proto.transport.startTLS(self.connector.client_tls(
                proto.factory, server_name or "", alpn=False))

    def account_read(self, proto: StreamProtocol, nbytes: int, nstanzas: int) -> float:
        """[ratelimit]: what an authenticated remote stream read (bytes, before they
        are handled) or handled (stanzas); the seconds it must stop reading
        (``policy.ratelimit``)."""
        if not self.limiter.active:
            return 0.0
        remote, conn = proto.rate
        d = self.limiter.account(remote, conn, nbytes, nstanzas, self.reactor.seconds())
        if d.flag:
            self._flag(A.Flag(REASON_RATE, "throttle", f"over its rate limit for "
                              f"{self.settings.ratelimit.flag_after:g} s"), proto)
        if d.close:
            proto.run(proto.stream.fail("policy-violation", "over its rate limit"))
            return 0.0
        return min(d.pause, RATE_LIMIT_MAX_PAUSE)

    def track_rate(self, proto: StreamProtocol, renew: bool = False) -> None:
        """[ratelimit]: an authenticated remote's stream (a public one, or our own
        bidi stream, for what the remote sends back on it; ejabberd's are never
        limited) gets its connection bucket, once, for its first domain (a further
        pair gets none); ``renew``: a reload changed the connection limits."""
        if not self.limiter.active or (proto.rate is not None and not renew):
            return
        st = proto.stream
        if proto.label == "public":
            remote = next(iter(st.authenticated_from), None) if proto.rate is None \
                else proto.rate[0]
        else:
            f = getattr(proto, "factory", None)
            remote = f.pair[1] if f is not None and f.label == "remote" and st.bidi \
                and getattr(st.state, "value", "") == "ready" else None
        if remote is not None:
            proto.rate = (remote, self.limiter.new_connection(self.reactor.seconds()))

    def tls_failed(self, proto: StreamProtocol) -> None:
        """The connection went before its TLS handshake completed."""
        self.metrics.tls_failures.labels(proto.label).inc()
        # debug: a scan of the Direct TLS port would log a line per connection
        heard = peer_hello_read(tls_connection_of(proto.transport),
                                accepted=proto.factory_label() is None)
        log.debug("{label} stream {peer}: TLS handshake not completed ({how})",
                  label=proto.label, peer=proto.peer,
                  how="the peer's hello came" if heard else "no hello from the peer")

    def check_peer(self, proto: StreamProtocol) -> E.TlsEstablished:
        ok, cert = self.trust.check(proto.tls_connection())
        return E.TlsEstablished(ok, cert)

    def stream_lost(self, proto: StreamProtocol) -> None:
        """The stream is closing or closed: no router may write to it any more."""
        self.streams.discard(proto)
        self._release(proto)
        self.keepalive.forget(proto)
        now = self.reactor.seconds()
        # Answers to requests sent over a bidi stream come back on it: they are lost
        # with it.  Over a one-way stream they come on the peer's own stream.
        carried = [pair for router in (self.to_backend, self.to_remote)
                   for pair in router.pairs_of(proto)] if proto.stream.bidi else []
        for router in (self.to_backend, self.to_remote):
            self._run_ops(router, router.stream_closed(proto, now))
        for pair in carried:
            self._answer_unanswered(self.policy.stream_died(pair), "stream closed")

    def stream_action(self, proto: StreamProtocol, a: Any) -> None:
        t = type(a)
        if t is A.DeliverStanzas:
            # Answers to our keepalive pings are consumed, whichever stream they come
            # on, and are no traffic that keeps an idle link open.
            stanzas = self.keepalive.without_answers(a.stanzas)
            if stanzas and self.filtering.rtbl.active:     # [[filter.rtbl]]'s own
                stanzas = self.filtering.take(stanzas)
            if not stanzas:
                return
            factory = getattr(proto, "factory", None)
            if factory is not None and factory.label == "remote":
                self.to_remote.activity_from(stanzas, self.reactor.seconds())
            self.route(stanzas, proto)
        elif t is A.Flag:
            self._flag(a, proto)
        elif t is A.DialbackAnswered:
            log.info("{label} stream {peer}: db:verify {originating} -> {receiving} "
                     "answered {verdict}", label=proto.label, peer=proto.peer,
                     originating=a.originating, receiving=a.receiving,
                     verdict="valid" if a.valid else "invalid")
        elif t is A.AuthFailed:
            self.metrics.authentications.labels(proto.label, a.method, a.condition).inc()
        elif t is A.Authenticated:
            self._release(proto)
            self.track_rate(proto)
            self.metrics.authentications.labels(proto.label, a.method, "success").inc()
            st = proto.stream
            log.info("{label} stream authenticated: {originating} -> {receiving} "
                     "method={method} tls={tls} bidi={bidi} direct_tls={direct} "
                     "stream={sid} peer={peer}",
                     label=proto.label, originating=a.originating, receiving=a.receiving,
                     method=a.method, tls=st.secure, bidi=st.bidi,
                     direct=st.config.direct_tls, sid=st.stream_id, peer=proto.peer)
            if st.bidi:
                self._attach_bidi(proto, a.originating, a.receiving)
        elif t is A.BidiNegotiated:
            st = proto.stream
            log.info("{label} stream bidi negotiated: stream={sid} peer={peer}",
                     label=proto.label, sid=st.stream_id, peer=proto.peer)
            if isinstance(st, InboundStream):
                for originating, receiving in st.authenticated:
                    self._attach_bidi(proto, originating, receiving)
        elif t is A.VerifyDialback:
            defer.ensureDeferred(self.verifier.verify(proto, a))
        elif t is A.PairReady or t is A.PairFailed or t is A.RetireStream:
            self.connector.multiplexed(proto, a)
        elif t is A.StreamReady or t is A.StreamFailed or t is E.DialbackVerdict:
            f = proto.factory
            if f.planned:
                f.report(proto, a)      # tx.connector decides what comes next
            elif t is A.StreamReady:
                self.link_ready(proto)
            elif t is A.StreamFailed:
                self.link_failed(f, a.condition, a.text)
        else:
            log.error("unhandled action {action!r}", action=a)

    def _attach_bidi(self, proto: StreamProtocol, originating: str, receiving: str) -> None:
        """A remote's authenticated bidi stream carries our stanzas for it too (not
        once it is closing: nothing may be written on it any more)."""
        if proto.closing or proto.stream.local_closed:
            return
        pair = (receiving, originating)
        self._run_ops(self.to_remote, self.to_remote.stream_ready(
            pair, proto, self.reactor.seconds(), borrowed=True,
            peer_max_bytes=proto.stream.peer_max_bytes))

    def link_ready(self, proto: StreamProtocol) -> None:
        if proto.closing:
            return
        f = proto.factory
        st = proto.stream
        if f.label == "remote" and self.domains.active:
            why = self.domains.verdict(f.pair[1])
            if why is not None:     # [filter] changed while the stream was set up
                log.info("remote stream {peer}: {remote} now denied by [filter]: closed",
                         peer=proto.peer, remote=f.pair[1])
                self.refuse_queued(f.pair)
                proto.run(st.fail("policy-violation",
                                  f"{f.pair[1]} may not federate with this server"))
                return
        self.metrics.authentications.labels(f.label, st.auth_method or "dialback",
                                            "success").inc()
        self.track_rate(proto)
        if f.label == "backend":
            log.info("backend stream ready for {remote} -> {local} (dialback accepted by "
                     "ejabberd, tls={tls})", remote=f.pair[0], local=f.pair[1],
                     tls=st.secure)
        else:
            log.info("remote stream ready: {local} -> {remote} method={method} tls={tls} "
                     "bidi={bidi} direct_tls={direct} peer_certificate_valid={valid} "
                     "peer={peer}",
                     local=f.pair[0], remote=f.pair[1], method=st.auth_method,
                     tls=st.secure, bidi=st.bidi, direct=st.config.direct_tls,
                     valid=st.peer_verified, peer=proto.peer)
            if st.peer_bidi_misnamed:
                log.info("remote {remote} offers bidi in the request's namespace "
                         "(<bidi xmlns='urn:xmpp:bidi'/>, ejabberd 24.10 to 25.02): not "
                         "negotiated; its stanzas to {local} come on its own connection",
                         remote=f.pair[1], local=f.pair[0])
        self._run_ops(f.router, f.router.stream_ready(
            f.pair, proto, self.reactor.seconds(), shareable=st.shareable,
            peer_max_bytes=st.peer_max_bytes if f.label == "remote" else None))

    def link_failed(self, factory: _OutboundFactory, condition: str, text: str) -> None:
        """Opening the stream of ``factory.pair`` failed: bounce what waits for it."""
        log.warn("{label} stream {pair} failed: {condition} {text}", label=factory.label,
                 pair=" -> ".join(factory.pair), condition=condition, text=text)
        self.metrics.outgoing_failures.labels(factory.label, condition).inc()
        self._run_ops(factory.router, factory.router.stream_failed(
            factory.pair, condition, text, self.reactor.seconds()))

    # -- routing -----------------------------------------------------------------------

    def route(self, stanzas: list[Stanza], source: StreamProtocol | None = None) -> None:
        """Classify stanzas (policy) and hand those to forward to the router of their
        direction, one batch per domain pair."""
        now = self.reactor.seconds()
        check = self.policy.check
        passed = []
        for s in stanzas:
            outcome = check(s, now)
            if outcome is None or self._apply(s, outcome, source):
                passed.append(s)
            elif source is not None and source.closing:
                break       # a policy close: the rest of the read is not processed
        self._send(passed, now)

    def send_generated(self, stanzas: list[Stanza]) -> None:
        """Stanzas s2sproxy wrote itself (answers, bounces): not classified, but an iq
        answer still settles the request it answers."""
        if self.filtering.rtbl.active:      # a bounce of an RTBL request is its own
            stanzas = self.filtering.take(stanzas)
        for s in stanzas:
            if s.kind == "iq" and s.type in ("result", "error"):
                self.policy.iqs.response(s)
        self._send(stanzas, self.reactor.seconds())

    def _send(self, stanzas: list[Stanza], now: float) -> None:
        """One router batch per domain pair; when several pairs of one read go on one
        stream (sender multiplexing, a bidi stream carrying several pairs), their
        writes are merged: one ``transport.write`` (one TLS record) per stream."""
        batches: dict[R.Pair, list[Stanza]]
        if len(stanzas) == 1:       # one stanza per read, as ejabberd writes them
            s = stanzas[0]
            batches = {(s.from_domain, s.to_domain): stanzas}
        else:
            batches = {}
            for s in stanzas:
                batches.setdefault((s.from_domain, s.to_domain), []).append(s)
        if self.domains.active:
            self._refuse_denied(batches)
        if len(batches) == 1:
            pair, batch = batches.popitem()
            router = self._count(pair, batch)
            if batch:
                self._run_ops(router, router.send(pair, batch, now))
            return
        writes: dict[Any, list[R.Write]] = {}   # per stream, in the order first written
        for pair, batch in batches.items():
            router = self._count(pair, batch)
            for op in (router.send(pair, batch, now) if batch else ()):
                if type(op) is R.Write:
                    writes.setdefault(op.handle, []).append(op)
                else:       # what was written so far goes first, as it would have
                    self._write_all(writes)
                    self._run_ops(router, [op])
        self._write_all(writes)

    def _refuse_denied(self, batches: dict) -> None:
        """Stanzas to a remote ``[filter]`` denies: bounced ``not-allowed`` and flagged,
        no stream opened (``policy.domains``)."""
        for pair in [p for p in batches if p[1] not in self.served]:
            why = self.domains.verdict(pair[1])
            if why is not None:
                self._deny(batches.pop(pair), why)

    def refuse_queued(self, pair: R.Pair) -> None:
        """Stanzas waiting for a remote ``[filter]`` denied meanwhile: bounced and
        flagged as a new one would be (``_refuse_denied``)."""
        why = self.domains.verdict(pair[1])
        if why is not None:
            self._deny(self.to_remote.take_queued(pair), why)

    def _deny(self, stanzas: list[Stanza], why: str) -> None:
        for s in stanzas:
            self._flag(A.Flag(REASON_DENIED, "bounce", why, s.kind, s.type, s.id,
                              s.from_, s.to), None, s)
            self.bounce(s, "not-allowed", f"{s.to_domain} may not federate with this "
                                          "server")

    def _count(self, pair: R.Pair, batch: list[Stanza]) -> R.Router:
        if pair[1] in self.served:
            self.metrics.stanzas.inbound += len(batch)
            return self.to_backend
        self.metrics.stanzas.outbound += len(batch)
        return self.to_remote

    @staticmethod
    def _write_all(writes: dict[Any, list[R.Write]]) -> None:
        for handle, ops in writes.items():
            if len(ops) == 1:
                handle.write_stanzas(ops[0].data, ops[0].stanzas)
            else:
                handle.write_stanzas(b"".join([op.data for op in ops]),
                                     sum(op.stanzas for op in ops))
        writes.clear()

    def _apply(self, s: Stanza, outcome, source: StreamProtocol | None) -> bool:
        """Run a policy outcome; True when the stanza is still to be forwarded."""
        if outcome.replies:
            if s.child_ns == NS_PING:
                self.metrics.pings_answered.labels(self.metrics.peer(s.from_domain)).inc()
            log.debug("answered {stanza} here", stanza=repr(s))
            self.send_generated(outcome.replies)
        u = outcome.unexpected
        if u is None:
            return outcome.forward
        self._flag(A.Flag(u.reason, u.action, u.detail, s.kind, s.type, s.id, s.from_, s.to,
                          s.raw), source, s)
        if u.action == BOUNCE:
            self.bounce(s, u.condition, u.detail)
        elif u.action == CLOSE and source is not None:
            source.run(source.stream.fail(u.stream_condition, u.detail))
        return u.action == FORWARD

    def _flag(self, flag: A.Flag, proto: StreamProtocol | None,
              stanza: Stanza | None = None) -> None:
        st = proto.stream if proto is not None else None
        direction, peer, authenticated = flag_subject(
            st, stanza, self.served, getattr(getattr(proto, "factory", None), "label", "")
            == "remote", lambda pair: self.to_remote.ready_handle(pair) is not None)
        self.flags.record(flag, getattr(st, "stream_id", ""), peer, direction,
                          authenticated)

    def _run_ops(self, router: R.Router, ops: list[R.Op]) -> None:
        for op in ops:
            t = type(op)
            if t is R.Write:
                op.handle.write_stanzas(op.data, op.stanzas)
            elif t is R.Open:
                if router is self.to_backend:
                    self.connector.open_backend(op.pair)
                else:
                    defer.ensureDeferred(self._open_remote(op.pair))
            elif t is R.Multiplex:
                self.connector.multiplex(op)
            elif t is R.Close:
                op.handle.close()
            elif t is R.Bounce:
                self.bounce(op.stanza, op.condition, op.text)

    def bounce(self, stanza: Stanza, condition: str, text: str = "") -> None:
        back = bounce_stanza(stanza, condition, text)
        if back is None:
            log.info("not bouncing {stanza} ({condition}): never an error for an error",
                     stanza=repr(stanza), condition=condition)
            return
        log.info("bouncing {stanza} with {condition}: {text}", stanza=repr(stanza),
                 condition=condition, text=text)
        self.metrics.bounces.labels(condition).inc()
        self.send_generated([back])

    # -- outgoing connections (tx.connector) -------------------------------------------

    async def _open_remote(self, pair: R.Pair) -> None:
        await self.connector.open_remote(pair)
