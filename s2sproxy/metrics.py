"""Counters with stable names (Prometheus text format at ``metrics.listen``).

prometheus-client is used rather than hand-written exposition: it gets the format,
escaping and label handling right.  Each ``Metrics`` has its own registry, so that
tests (and several proxies in one process) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from s2sproxy.core.limits import PEER_LABELS_MAX

UNAUTHENTICATED = "-"     # the peer label of anything not from an authenticated domain
OTHER = "other"           # the peer label beyond PEER_LABELS_MAX distinct domains


class StanzaCounts(Collector):
    """``s2sproxy_stanzas_total{direction}``, counted in plain integers on the per-read
    path (``inbound += n``) and read at scrape time: a prometheus-client ``Counter``
    takes a lock per ``inc()``, about 0.75 µs, which is paid once per read."""

    def __init__(self) -> None:
        self.inbound = 0
        self.outbound = 0

    def collect(self):
        c = CounterMetricFamily("s2sproxy_stanzas", "Stanzas routed, by direction",
                                labels=["direction"])
        c.add_metric(["inbound"], self.inbound)
        c.add_metric(["outbound"], self.outbound)
        yield c


class Metrics:
    def __init__(self, max_peers: int = PEER_LABELS_MAX) -> None:
        self.max_peers = max_peers
        self._peers: set[str] = set()
        r = self.registry = CollectorRegistry()
        self.flags = Counter("s2sproxy_flags", "Unexpected stanzas by reason code, "
                             "peer domain and action taken",
                             ["reason", "peer", "action"], registry=r)
        self.pings_answered = Counter("s2sproxy_pings_answered",
                                      "XEP-0199 pings to a served domain answered by "
                                      "s2sproxy itself", ["peer"], registry=r)
        self.stanzas = StanzaCounts()
        r.register(self.stanzas)
        self.bounces = Counter("s2sproxy_bounces", "Error stanzas generated for "
                               "undeliverable stanzas, by condition", ["condition"],
                               registry=r)
        self.iq_timeouts = Counter("s2sproxy_iq_timeouts", "iq requests answered with "
                                   "remote-server-timeout by s2sproxy", registry=r)
        self.dead_peers = Counter("s2sproxy_dead_peers", "Streams closed because the peer "
                                  "did not answer a keepalive ping", ["peer"], registry=r)
        self.authentications = Counter(
            "s2sproxy_authentications", "Authentications of a domain pair on a stream, by "
            "the stream's role, method (external, dialback) and outcome (success, or the "
            "SASL failure or dialback error condition)", ["role", "method", "outcome"],
            registry=r)
        self.outgoing_failures = Counter(
            "s2sproxy_outgoing_failures", "Streams of ours (to ejabberd, to remotes) that "
            "could not be set up, by role and the condition bounced with",
            ["role", "condition"], registry=r)
        self.dialback_verifications = Counter(
            "s2sproxy_dialback_verifications", "Dialback keys s2sproxy had verified "
            "(XEP-0220 db:verify), by outcome (valid, invalid, or the error condition)",
            ["outcome"], registry=r)
        self.tls_failures = Counter(
            "s2sproxy_tls_handshake_failures", "Connections lost before their TLS "
            "handshake completed, by role", ["role"], registry=r)
        self.connections_refused = Counter(
            "s2sproxy_connections_refused", "Public connections refused at accept, by "
            "the bound they hit (total, per-source)", ["bound"], registry=r)
        self.unauthenticated = Gauge("s2sproxy_unauthenticated_connections",
                                     "Public connections not authenticated yet", registry=r)
        self.pending_iqs = Gauge("s2sproxy_pending_iqs", "iq requests awaiting an answer",
                                 registry=r)
        self.iq_evicted = Gauge("s2sproxy_iq_evicted", "iq requests forgotten because "
                                "policy.iq_max_pending was reached (since start)",
                                registry=r)

    def peer(self, domain: str | None) -> str:
        """The ``peer`` label value for an *authenticated* remote domain (None or "":
        nothing authenticated).  At most ``max_peers`` distinct values, so that neither
        a flood of connections nor a wildcard domain with endless subdomains can grow
        the registry without bound."""
        if not domain:
            return UNAUTHENTICATED
        if domain in self._peers:
            return domain
        if len(self._peers) >= self.max_peers:
            return OTHER
        self._peers.add(domain)
        return domain

    def value(self, name: str, **labels: str) -> float:
        v = self.registry.get_sample_value(name, labels or None)
        return v or 0.0


class ProxyState(Collector):
    """What is open and what waits: ``s2sproxy_streams{role,state}`` (state
    ``authenticated`` or ``negotiating``) and ``s2sproxy_queued_stanzas{toward}`` /
    ``s2sproxy_queued_bytes{toward}`` (``toward`` ``ejabberd`` or ``remote``), and
    ``s2sproxy_rtbl_entries{source}`` / ``s2sproxy_rtbl_subscribed{source}`` (one
    ``source`` per ``[[filter.rtbl]]``, named "rtbl SERVICE/NODE").  Counted
    by ``update`` on the reactor (the proxy's tick, once a second), never on the
    per-stanza path, and read by ``collect`` in the thread that serves /metrics."""

    ROLES = ("public", "backend-in", "backend", "remote", "verify")

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self._streams: dict[tuple[str, str], int] = {}
        self._queued: dict[str, tuple[int, int]] = {}
        self._rtbl: list[tuple[str, int, int]] = []
        self.update()

    def update(self, now: float = 0.0) -> None:
        counts = {(r, st): 0 for r in self.ROLES for st in ("authenticated",
                                                             "negotiating")}
        for proto in self.proxy.streams:
            st = proto.stream
            done = bool(getattr(st, "authenticated", None)) or \
                getattr(getattr(st, "state", None), "value", "") == "ready"
            key = (proto.label, "authenticated" if done else "negotiating")
            counts[key] = counts.get(key, 0) + 1
        queued = {}
        for toward, router in (("ejabberd", self.proxy.to_backend),
                               ("remote", self.proxy.to_remote)):
            links = router.links.values()
            queued[toward] = (sum(len(x.queue) for x in links),
                              sum(x.queued_bytes for x in links))
        filtering = getattr(self.proxy, "filtering", None)
        rtbl = [(r["source"], r["entries"], int(r["state"] == "subscribed"))
                for r in filtering.rtbl.rows(now)] if filtering is not None else []
        # swapped whole: no torn read
        self._streams, self._queued, self._rtbl = counts, queued, rtbl

    def collect(self):
        g = GaugeMetricFamily("s2sproxy_streams", "Open streams, by role and state",
                              labels=["role", "state"])
        for (role, state), n in self._streams.items():
            g.add_metric([role, state], n)
        yield g
        stanzas = GaugeMetricFamily("s2sproxy_queued_stanzas", "Stanzas waiting for a "
                                    "stream, by where they go", labels=["toward"])
        size = GaugeMetricFamily("s2sproxy_queued_bytes", "Bytes of the stanzas waiting "
                                 "for a stream, by where they go", labels=["toward"])
        for toward, (n, b) in self._queued.items():
            stanzas.add_metric([toward], n)
            size.add_metric([toward], b)
        yield stanzas
        yield size
        entries = GaugeMetricFamily("s2sproxy_rtbl_entries", "Domains a real-time block "
                                    "list ([[filter.rtbl]]) denies", labels=["source"])
        up = GaugeMetricFamily("s2sproxy_rtbl_subscribed", "1 while the block list's "
                               "service confirmed our subscription", labels=["source"])
        for source, n, ok in self._rtbl:
            entries.add_metric([source], n)
            up.add_metric([source], ok)
        yield entries
        yield up
