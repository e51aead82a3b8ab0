"""Counters with stable names (Prometheus text format at ``metrics.listen``).

prometheus-client is used rather than hand-written exposition: it gets the format,
escaping and label handling right.  Each ``Metrics`` has its own registry, so that
tests (and several proxies in one process) do not share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily
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
        self.streams = Gauge("s2sproxy_streams", "Open streams, by kind", ["kind"],
                             registry=r)
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
