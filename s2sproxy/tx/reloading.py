"""A configuration applied to a running proxy: at start, and on SIGHUP (``reload``).

``configure`` makes everything that can fail first (TLS contexts, certificates, the
trust store, the resolver) and changes nothing until all of it was made; then new
connections and new stanzas use the new configuration, and established streams keep
what they negotiated.  What only a restart can change is ``config.RESTART_ONLY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from s2sproxy.config import ConfigError, Settings, load, reload_refusals
from s2sproxy.core.inbound import TrustPolicy
from s2sproxy.core.limits import MAX_MULTIPLEXED_PAIRS
from s2sproxy.logs import get_logger, set_level
from s2sproxy.policy import keepalive as K
from s2sproxy.policy.classify import PolicyConfig
from s2sproxy.policy.domains import parse_entry
from s2sproxy.policy.ratelimit import RateConfig
from s2sproxy.tx.resolver import RemoteResolver
from s2sproxy.tx.tls import ClientContexts, ServerContexts, TrustStore

if TYPE_CHECKING:
    from s2sproxy.tx.service import Proxy

log = get_logger(__name__)


def policy_config(s: Settings) -> PolicyConfig:
    p = s.policy
    return PolicyConfig(dict(p.actions), p.answer_pings, p.iq_timeout, p.iq_max_pending,
                        p.caps_cache)


def rate_configs(s: Settings) -> tuple[RateConfig, RateConfig]:
    r = s.ratelimit
    common = dict(burst_seconds=r.burst_seconds, flag_after=r.flag_after,
                  close_after=r.close_after)
    return (RateConfig(r.bytes_per_second, r.stanzas_per_second, **common),
            RateConfig(r.connection_bytes_per_second, r.connection_stanzas_per_second,
                       **common))


def keepalive_config(s: Settings) -> K.KeepaliveConfig:
    ka = s.keepalive
    return K.KeepaliveConfig(ka.whitespace, ka.ping, ka.timeout)


def configure(self: "Proxy", settings: Settings) -> None:
    """Everything a configuration decides that a reload may change: new
    connections and new stanzas see it, established streams keep running.  What
    can fail (TLS contexts, certificates, the resolver) is made first; nothing is
    changed until all of it was made, so a failure leaves the running one whole."""
    b = settings.backend
    backend_identity = (b.certificate, b.key) if b.certificate else None
    made = dict(
        trust=TrustStore(settings.trust),
        public_ctx=ServerContexts(settings.domains, alpn=False),
        direct_ctx=ServerContexts(settings.domains, alpn=True),
        backend_ctx=ServerContexts(settings.domains, alpn=False, extra=backend_identity),
        client_ctx=ClientContexts(),
        resolver=RemoteResolver(settings.remotes, settings.nameservers, self.reactor))
    ends = self.certificates.read(settings)
    fs = settings.filter
    lists = (fs.mode, [parse_entry(x) for x in fs.allow],
             [parse_entry(x) for x in fs.deny])
    # -- from here on nothing raises ---------------------------------------------
    self.settings = settings
    self._inbound_configs = {}      # new streams get configs of the new settings
    for name, value in made.items():
        setattr(self, name, value)
    self.certificates.ends = ends
    self.trust_policy = TrustPolicy(settings.trust.require_valid_certificates,
                                    settings.trust.secure_domains,
                                    settings.trust.insecure_domains)
    q = settings.queue
    routers = dict(queue_limit=q.limit, max_age=q.max_age,
                   idle_timeout=settings.idle_timeout, backoff_after=q.backoff_after,
                   backoff_base=q.backoff_base, backoff_max=q.backoff_max,
                   max_bytes=q.max_bytes)
    self.to_backend.budget.limit = q.max_total_bytes
    self.to_backend.configure(**routers)    # never multiplexed toward ejabberd
    self.to_remote.configure(**routers, max_pairs=MAX_MULTIPLEXED_PAIRS
                             if settings.multiplex else 1)
    self.admission.max_total = settings.max_unauthenticated
    self.admission.max_per_source = settings.max_unauthenticated_per_source
    self.policy.reconfigure(policy_config(settings), self.reactor.seconds())
    self.stream_actions = dict(settings.policy.actions)
    f = settings.flags
    self.flags.json_log, self.flags.quarantine = f.json_log, f.quarantine
    self.flags.quarantine_max_bytes = f.quarantine_max_bytes
    self.keepalive.config = keepalive_config(settings)
    set_level(settings.log_level)
    self.filtering.configure(lists, fs.deny_files, fs.rtbl, fs.rtbl_refresh)
    renew = self.limiter.configure(*rate_configs(settings))
    for proto in list(self.streams):    # streams authenticated before limits were on
        if not proto.closing:
            self.track_rate(proto, renew=renew)

def reload(self: "Proxy") -> bool:
    """SIGHUP: re-read the configuration file.  A file with an error, or one that
    changes what only a restart can (``config.RESTART_ONLY``), is refused with one
    line per problem, and the running configuration stays in force."""
    if self.config_path is None:
        log.warn("reload: no configuration file to re-read")
        return False
    try:
        new = load(self.config_path, generate_secret=False)
    except ConfigError as e:
        log.error("reload refused: {error}; the running configuration stays in force",
                  error=str(e))
        return False
    refusals = reload_refusals(self.settings, new)
    for why in refusals:
        log.error("reload refused: {error}; the running configuration stays in force",
                  error=why)
    if refusals:
        return False
    try:
        configure(self, new)
    except Exception as e:  # noqa: BLE001 (OpenSSL refusing a certificate config
        # accepted, a file gone since load): nothing was changed
        log.error("reload refused: {error}; the running configuration stays in force",
                  error=f"{type(e).__name__}: {e}")
        return False
    log.info("reloaded {path}: new connections and new stanzas use it; {n} open "
             "stream(s) keep running", path=str(self.config_path), n=len(self.streams))
    self.certificates.check(self.reactor.seconds())
    return True

# -- lifecycle -----------------------------------------------------------------------
