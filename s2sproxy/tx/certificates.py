"""Expiry of the certificates s2sproxy presents: the metric
``s2sproxy_certificate_expiry_seconds{domain}`` (seconds left, read at each scrape)
and a warning from ``CERT_EXPIRY_WARNING`` before the end, at start, at each reload
and then once a day.  The labels are the served domains (and ``backend`` for the
backend listener's own certificate): bounded by the configuration."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from s2sproxy.config import Settings
from s2sproxy.core.limits import CERT_EXPIRY_WARNING
from s2sproxy.logs import get_logger

log = get_logger(__name__)

_DAY = 86400.0


def not_after(path: Path) -> float:
    """The first (leaf) certificate's notAfter, as a POSIX time."""
    leaf = x509.load_pem_x509_certificate(path.read_bytes())
    return leaf.not_valid_after_utc.timestamp()


def expiry_warnings(ends: dict[str, tuple[Path, float]], now: float) -> list[str]:
    """One text per certificate within CERT_EXPIRY_WARNING of its end (or past it)."""
    out = []
    for label, (path, end) in ends.items():
        left = end - now
        if left <= 0:
            out.append(f"certificate for {label} ({path}) expired {-left / _DAY:.1f} "
                       "days ago")
        elif left <= CERT_EXPIRY_WARNING:
            out.append(f"certificate for {label} ({path}) expires in {left / _DAY:.1f} "
                       "days")
    return out


class Certificates(Collector):
    def __init__(self, metrics, reactor) -> None:
        self.reactor = reactor
        self.ends: dict[str, tuple[Path, float]] = {}
        self._next_check = 0.0
        metrics.registry.register(self)

    @staticmethod
    def read(settings: Settings) -> dict[str, tuple[Path, float]]:
        """Each presented certificate's end (set ``ends`` to it: ``Proxy._configure``)."""
        ends = {name: (d.certificate, not_after(d.certificate))
                for name, d in settings.domains.items()}
        if settings.backend.certificate is not None:
            ends["backend"] = (settings.backend.certificate,
                               not_after(settings.backend.certificate))
        return ends

    def check(self, now: float) -> None:
        """Warn now (start, reload), then at most once a day from ``tick``."""
        for text in expiry_warnings(self.ends, now):
            log.warn("{text}: renew it, then reload s2sproxy (SIGHUP)", text=text)
        self._next_check = now + _DAY

    def tick(self, now: float) -> None:
        if now >= self._next_check:
            self.check(now)

    def collect(self):
        g = GaugeMetricFamily("s2sproxy_certificate_expiry_seconds",
                              "Seconds until the certificate s2sproxy presents for a "
                              "served domain expires (negative: expired)",
                              labels=["domain"])
        now = self.reactor.seconds()
        for label, (_path, end) in self.ends.items():
            g.add_metric([label], end - now)
        yield g
