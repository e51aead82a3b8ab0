"""TOML configuration file -> frozen, validated settings.

Every error raised here is a ``ConfigError`` whose message names the offending key
(``domain[0].certificate: file not found: /x.pem``), so that ``twistd`` can print one
line and exit non-zero.  Certificates are loaded and checked against their domain here,
at start, rather than at the first connection.
"""

from __future__ import annotations

import ipaddress
import math
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from s2sproxy.core.identity import certificate_names, names_cover, subject_common_names
from s2sproxy.core.jid import InvalidJid, nameprep_domain

DEFAULT_CONFIG_PATH = "/etc/s2sproxy/s2sproxy.toml"
# systemd's RuntimeDirectory=s2sproxy (deploy/s2sproxy.service) makes /run/s2sproxy
DEFAULT_CONTROL_SOCKET = "/run/s2sproxy/control.sock"

# RFC 6120 section 13.12 requires servers to accept stanzas of at least 10000 bytes;
# Prosody's s2s default is 512 KiB, ejabberd's is 512 KiB as well: a remote that works
# with either must work with us.
DEFAULT_MAX_STANZA_SIZE = 512 * 1024
# XMPP payloads nest shallowly (a MAM result with a forwarded message is about 8 deep).
# The parser is not recursive, so the limit only bounds the open-element stack.
DEFAULT_MAX_DEPTH = 64


class ConfigError(Exception):
    """A configuration value is missing or wrong; ``str()`` names the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Domain:
    name: str
    certificate: Path
    key: Path


@dataclass(frozen=True)
class Backend:
    host: str
    port: int
    tls: str                 # "auto" | "required" | "never"
    listen: str              # Twisted server endpoint description
    srv_target: str          # name ejabberd resolves (libc) to reach `listen`
    srv_port: int
    dns_address: str
    dns_port: int
    certificate: Path | None  # offered by the backend listener's STARTTLS
    key: Path | None
    trusted_addresses: frozenset[str]   # ejabberd's db:result trusted by source address


@dataclass(frozen=True)
class Queue:
    limit: int
    max_age: float
    backoff_after: int
    backoff_base: float
    backoff_max: float
    max_bytes: int           # bytes waiting per domain pair
    max_total_bytes: int     # bytes waiting in all queues together


@dataclass(frozen=True)
class Trust:
    system_cas: bool
    ca_file: Path | None
    require_valid_certificates: bool
    secure_domains: frozenset[str]
    insecure_domains: frozenset[str]


@dataclass(frozen=True)
class RemoteOverride:
    starttls: tuple[tuple[str, int], ...]
    direct_tls: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class PolicySettings:
    actions: dict[str, str]
    answer_pings: bool
    iq_timeout: float
    iq_max_pending: int
    caps_cache: bool


@dataclass(frozen=True)
class Keepalive:
    whitespace: float       # send a space after this long without sending anything
    ping: float             # send an XEP-0199 ping after this long without receiving
    timeout: float          # ... and declare the peer dead if nothing comes back


@dataclass(frozen=True)
class Flags:
    json_log: Path | None
    quarantine: Path | None
    quarantine_max_bytes: int


@dataclass(frozen=True)
class FilterSettings:
    mode: str                       # "deny" | "allow"
    allow: tuple[str, ...]          # policy.domains patterns: "x.org", "*.x.org"
    deny: tuple[str, ...]
    deny_files: tuple[Path, ...]    # blocklist files (one domain per line)
    rtbl: tuple = ()                # policy.rtbl.RtblSource: [[filter.rtbl]]
    rtbl_refresh: float = 3600.0    # seconds between two full syncs of each RTBL


@dataclass(frozen=True)
class RateLimits:
    bytes_per_second: float             # per remote domain (0: none)
    stanzas_per_second: float
    connection_bytes_per_second: float  # per connection
    connection_stanzas_per_second: float
    burst_seconds: float
    flag_after: float
    close_after: float                  # 0: never


@dataclass(frozen=True)
class Settings:
    domains: dict[str, Domain]
    starttls_listeners: tuple[str, ...]
    direct_tls_listeners: tuple[str, ...]
    backend: Backend
    queue: Queue
    trust: Trust
    remotes: dict[str, RemoteOverride]
    secret: bytes
    secret_file: Path
    max_stanza_size: int
    max_depth: int
    pre_auth_max_stanza_size: int
    pre_auth_max_elements: int
    max_unauthenticated: int
    max_unauthenticated_per_source: int
    connect_timeout: float
    auth_timeout: float
    idle_timeout: float
    nameservers: tuple[tuple[str, int], ...]
    policy: PolicySettings
    keepalive: Keepalive
    flags: Flags
    metrics_listen: str | None
    log_level: str
    log_format: str = "text"     # log.format: "text" (twistd's) | "json" (JSON lines)
    filter: FilterSettings = FilterSettings("deny", (), (), ())
    ratelimit: RateLimits = RateLimits(0, 0, 0, 0, 2, 30, 0)
    control_socket: Path | None = None   # control.socket ("s2sproxy status"); None: off
    # public.proxy_sources: who may send a PROXY header to a haproxy: listener
    proxy_sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    source: Path = field(default=Path("."))
    allow_private_targets: bool = False  # dns.allow_private_targets (core.connect rule 3b)
    multiplex: bool = True   # outgoing.multiplex: XEP-0220 sender multiplexing to remotes


_TOP_KEYS = {"secret_file", "domain", "public", "backend", "queue", "trust", "remote",
             "outgoing", "limits", "timeouts", "dns", "policy", "keepalive", "flags",
             "metrics", "log", "control", "filter", "ratelimit"}


def load(path: str | os.PathLike, generate_secret: bool = True) -> Settings:
    """Read and validate the file at ``path``; raise ``ConfigError`` on any mistake.
    ``generate_secret=False`` (reload, ``s2sproxy check``): a missing secret file is an
    error, not made (a new secret would no longer match the other instances')."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    return parse(data, base=path.parent.resolve(), source=path,
                 generate_secret=generate_secret)


def parse(data: dict[str, Any], base: Path, source: Path = Path("."),
          generate_secret: bool = True) -> Settings:
    _no_unknown("", data, _TOP_KEYS)
    domains = _domains(data.get("domain"), base)
    public = _table(data, "public", {"starttls", "direct_tls", "proxy_sources"})
    proxy_sources = tuple(_network(v, f"public.proxy_sources[{i}]") for i, v in
                          enumerate(_list(public, "public.proxy_sources",
                                          ["127.0.0.0/8", "::1"])))
    starttls = _endpoints(public, "public.starttls", ["tcp:5269"])
    direct = _endpoints(public, "public.direct_tls", ["tcp:5270"])
    if not starttls and not direct:
        raise ConfigError("public", "at least one listener is needed")

    backend = _backend(_table(data, "backend", {
        "host", "port", "tls", "listen", "srv_target", "srv_port", "dns_address",
        "dns_port", "certificate", "key", "trusted_addresses"}), base, domains)
    queue = _queue(_table(data, "queue", {"limit", "max_age", "backoff_after",
                                          "backoff_base", "backoff_max", "max_bytes",
                                          "max_total_bytes"}))
    trust = _trust(_table(data, "trust", {
        "system_cas", "ca_file", "require_valid_certificates", "secure_domains",
        "insecure_domains"}), base)
    remotes = _remotes(data.get("remote", {}))
    # Not under [remote], whose keys are remote domains ([remote."DOMAIN"]).
    outgoing = _table(data, "outgoing", {"multiplex"})
    limits = _table(data, "limits", {"max_stanza_size", "max_depth",
                                     "pre_auth_max_stanza_size", "pre_auth_max_elements",
                                     "max_unauthenticated",
                                     "max_unauthenticated_per_source"})
    timeouts = _table(data, "timeouts", {"connect", "auth", "idle"})
    dns = _table(data, "dns", {"nameservers", "allow_private_targets"})
    policy = _policy(_table(data, "policy", {"actions", "answer_pings", "iq_timeout",
                                             "iq_max_pending", "caps_cache"}))
    ka = _table(data, "keepalive", {"whitespace", "ping", "timeout"})
    flags = _table(data, "flags", {"json_log", "quarantine", "quarantine_max_bytes"})
    metrics = _table(data, "metrics", {"listen"})
    log = _table(data, "log", {"level", "format"})
    control = _table(data, "control", {"socket"})
    filter_ = _filter(_table(data, "filter", {"mode", "allow", "deny", "deny_files",
                                              "rtbl", "rtbl_refresh"}), base, domains)
    rl = _table(data, "ratelimit", {"bytes_per_second", "stanzas_per_second",
                                    "connection_bytes_per_second",
                                    "connection_stanzas_per_second", "burst_seconds",
                                    "flag_after", "close_after"})
    ratelimit = RateLimits(*(_nonneg(rl, f"ratelimit.{k}", d) for k, d in (
        ("bytes_per_second", 0), ("stanzas_per_second", 0),
        ("connection_bytes_per_second", 0), ("connection_stanzas_per_second", 0),
        ("burst_seconds", 2.0), ("flag_after", 30.0), ("close_after", 0))))
    if ratelimit.burst_seconds <= 0:
        raise ConfigError("ratelimit.burst_seconds", "must be more than 0")
    control_socket = control.get("socket", DEFAULT_CONTROL_SOCKET)
    if not isinstance(control_socket, str):
        raise ConfigError("control.socket", f"must be a path, or \"\" for none, not "
                                            f"{control_socket!r}")
    metrics_listen = None
    if "listen" in metrics:
        metrics_listen = _str(metrics, "metrics.listen", "")
        _check_server_endpoint(metrics_listen, "metrics.listen")

    secret_file = _path(data, "secret_file", base, "/var/lib/s2sproxy/dialback.secret")
    secret = _secret(secret_file, generate_secret)

    level = _str(log, "log.level", "info")
    if level not in ("debug", "info", "warn", "error"):
        raise ConfigError("log.level", f"must be one of debug, info, warn, error, not {level!r}")
    log_format = _str(log, "log.format", "text")
    if log_format not in ("text", "json"):
        raise ConfigError("log.format", f"must be text or json, not {log_format!r}")

    return Settings(
        domains=domains,
        starttls_listeners=tuple(starttls),
        direct_tls_listeners=tuple(direct),
        backend=backend,
        queue=queue,
        trust=trust,
        remotes=remotes,
        secret=secret,
        secret_file=secret_file,
        max_stanza_size=_int(limits, "limits.max_stanza_size", DEFAULT_MAX_STANZA_SIZE, 10000),
        max_depth=_int(limits, "limits.max_depth", DEFAULT_MAX_DEPTH, 4),
        pre_auth_max_stanza_size=_int(limits, "limits.pre_auth_max_stanza_size", 8192, 1024),
        pre_auth_max_elements=_int(limits, "limits.pre_auth_max_elements", 32, 4),
        max_unauthenticated=_int(limits, "limits.max_unauthenticated", 1024, 1),
        max_unauthenticated_per_source=_int(limits, "limits.max_unauthenticated_per_source",
                                            32, 1),
        connect_timeout=_number(timeouts, "timeouts.connect", 10.0),
        auth_timeout=_number(timeouts, "timeouts.auth", 30.0),
        idle_timeout=_number(timeouts, "timeouts.idle", 600.0),
        nameservers=tuple(_hostport(v, f"dns.nameservers[{i}]", 53)
                          for i, v in enumerate(_list(dns, "dns.nameservers", []))),
        policy=policy,
        keepalive=Keepalive(whitespace=_number(ka, "keepalive.whitespace", 60.0),
                            ping=_number(ka, "keepalive.ping", 300.0),
                            timeout=_number(ka, "keepalive.timeout", 60.0)),
        flags=Flags(
            json_log=_path(flags, "flags.json_log", base, "x") if "json_log" in flags
            else None,
            quarantine=_path(flags, "flags.quarantine", base, "x") if "quarantine" in flags
            else None,
            quarantine_max_bytes=_int(flags, "flags.quarantine_max_bytes", 10 * 1024 * 1024,
                                      4096)),
        metrics_listen=metrics_listen,
        log_level=level,
        log_format=log_format,
        filter=filter_,
        ratelimit=ratelimit,
        proxy_sources=proxy_sources,
        control_socket=(base / control_socket) if control_socket else None,
        source=source,
        allow_private_targets=_bool(dns, "dns.allow_private_targets", False),
        multiplex=_bool(outgoing, "outgoing.multiplex", True),
    )


# -- sections ---------------------------------------------------------------------------

def _domains(value: Any, base: Path) -> dict[str, Domain]:
    if value is None:
        raise ConfigError("domain", "missing: add at least one [[domain]] with name, "
                                    "certificate and key")
    if not isinstance(value, list) or not value:
        raise ConfigError("domain", "must be an array of tables ([[domain]])")
    out: dict[str, Domain] = {}
    for i, entry in enumerate(value):
        key = f"domain[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a table")
        _no_unknown(key, entry, {"name", "certificate", "key"})
        name = _domain_name(_required_str(entry, f"{key}.name"), f"{key}.name")
        if name in out:
            raise ConfigError(f"{key}.name", f"domain {name!r} is listed twice")
        cert = _existing(entry, f"{key}.certificate", base)
        priv = _existing(entry, f"{key}.key", base)
        check_certificate(cert, priv, name, f"{key}.certificate")
        out[name] = Domain(name, cert, priv)
    return out


def _backend(t: dict[str, Any], base: Path, domains: dict[str, Domain]) -> Backend:
    tls = _str(t, "backend.tls", "auto")
    if tls not in ("auto", "required", "never"):
        raise ConfigError("backend.tls", f"must be auto, required or never, not {tls!r}")
    cert = key = None
    if "certificate" in t or "key" in t:
        cert = _existing(t, "backend.certificate", base)
        key = _existing(t, "backend.key", base)
        check_certificate(cert, key, None, "backend.certificate")
    listen = _str(t, "backend.listen", "tcp:15270:interface=127.0.0.1")
    _check_server_endpoint(listen, "backend.listen")
    return Backend(
        host=_str(t, "backend.host", "127.0.0.1"),
        port=_port(t, "backend.port", 15269),
        tls=tls,
        listen=listen,
        srv_target=_str(t, "backend.srv_target", "localhost"),
        srv_port=_port(t, "backend.srv_port", _endpoint_port(listen) or 15270),
        dns_address=_address(t, "backend.dns_address", "127.0.0.1"),
        dns_port=_port(t, "backend.dns_port", 15353),
        certificate=cert,
        key=key,
        trusted_addresses=frozenset(
            _ip(v, f"backend.trusted_addresses[{i}]")
            for i, v in enumerate(_list(t, "backend.trusted_addresses", []))),
    )


def _queue(t: dict[str, Any]) -> Queue:
    return Queue(
        limit=_int(t, "queue.limit", 1000, 1),
        max_age=_number(t, "queue.max_age", 60.0),
        backoff_after=_int(t, "queue.backoff_after", 2, 1),
        backoff_base=_number(t, "queue.backoff_base", 5.0),
        backoff_max=_number(t, "queue.backoff_max", 300.0),
        max_bytes=_int(t, "queue.max_bytes", 2 * 1024 * 1024, 10000),
        max_total_bytes=_int(t, "queue.max_total_bytes", 128 * 1024 * 1024, 10000),
    )


def _trust(t: dict[str, Any], base: Path) -> Trust:
    ca_file = None
    if "ca_file" in t:
        ca_file = _existing(t, "trust.ca_file", base)
        try:
            certs = x509.load_pem_x509_certificates(ca_file.read_bytes())
        except ValueError:
            certs = []
        if not certs:
            raise ConfigError("trust.ca_file", f"no PEM certificate in {ca_file}")
    secure = frozenset(_domain_name(v, f"trust.secure_domains[{i}]")
                       for i, v in enumerate(_list(t, "trust.secure_domains", [])))
    insecure = frozenset(_domain_name(v, f"trust.insecure_domains[{i}]")
                         for i, v in enumerate(_list(t, "trust.insecure_domains", [])))
    both = secure & insecure
    if both:
        raise ConfigError("trust.insecure_domains",
                          f"{sorted(both)[0]} is also in trust.secure_domains")
    return Trust(
        system_cas=_bool(t, "trust.system_cas", True),
        ca_file=ca_file,
        require_valid_certificates=_bool(t, "trust.require_valid_certificates", False),
        secure_domains=secure,
        insecure_domains=insecure,
    )


def _remotes(value: Any) -> dict[str, RemoteOverride]:
    if not isinstance(value, dict):
        raise ConfigError("remote", 'must be a table of domains ([remote."example.org"])')
    out = {}
    for name, entry in value.items():
        key = f'remote."{name}"'
        domain = _domain_name(name, key)
        if not isinstance(entry, dict):
            raise ConfigError(key, "must be a table")
        _no_unknown(key, entry, {"starttls", "direct_tls"})
        starttls = tuple(_hostport(v, f"{key}.starttls[{i}]", 5269)
                         for i, v in enumerate(_list(entry, f"{key}.starttls", [])))
        direct = tuple(_hostport(v, f"{key}.direct_tls[{i}]", 5270)
                       for i, v in enumerate(_list(entry, f"{key}.direct_tls", [])))
        if not starttls and not direct:
            raise ConfigError(key, "needs starttls or direct_tls addresses")
        out[domain] = RemoteOverride(starttls, direct)
    return out


def _policy(t: dict[str, Any]) -> PolicySettings:
    from s2sproxy.policy.classify import REASONS  # noqa: PLC0415 (config -> policy only)
    actions = {name: r.default for name, r in REASONS.items()}
    given = t.get("actions", {})
    if not isinstance(given, dict):
        raise ConfigError("policy.actions", "must be a table of reason = action")
    for reason, action in given.items():
        key = f'policy.actions."{reason}"'
        if reason not in REASONS:
            raise ConfigError(key, f"unknown reason code (known: {', '.join(REASONS)})")
        allowed = REASONS[reason].allowed
        if action not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(sorted(allowed))}, "
                                   f"not {action!r}")
        actions[reason] = action
    return PolicySettings(
        actions=actions,
        answer_pings=_bool(t, "policy.answer_pings", True),
        iq_timeout=_number(t, "policy.iq_timeout", 120.0),
        iq_max_pending=_int(t, "policy.iq_max_pending", 10000, 1),
        caps_cache=_bool(t, "policy.caps_cache", False),
    )


def _filter(t: dict[str, Any], base: Path, domains: dict[str, Domain]) -> FilterSettings:
    from s2sproxy.policy.domains import parse_entry
    mode = _str(t, "filter.mode", "deny")
    if mode not in ("deny", "allow"):
        raise ConfigError("filter.mode", f"must be deny or allow, not {mode!r}")
    lists = {}
    for key in ("allow", "deny"):
        out = []
        for i, v in enumerate(_list(t, f"filter.{key}", [])):
            try:
                out.append(str(parse_entry(str(v))))
            except ValueError as e:
                raise ConfigError(f"filter.{key}[{i}]", str(e)) from None
        lists[key] = tuple(out)
    if mode == "allow" and not lists["allow"]:
        raise ConfigError("filter.allow", "empty with filter.mode = \"allow\": no remote "
                                          "could federate")
    files = tuple(base / str(v) for v in _list(t, "filter.deny_files", []))
    refresh = _number(t, "filter.rtbl_refresh", 3600.0)
    if refresh < 10:
        raise ConfigError("filter.rtbl_refresh", f"must be at least 10 seconds, not "
                                                 f"{refresh:g}")
    rtbl = _rtbl(t.get("rtbl", []), domains)
    if rtbl and mode == "allow":
        raise ConfigError("filter.rtbl", "denies nothing with filter.mode = \"allow\" "
                                         "(only filter.allow may federate): remove it")
    return FilterSettings(mode, lists["allow"], lists["deny"], files, rtbl, refresh)


def _rtbl(entries: Any, domains: dict[str, Domain]) -> tuple:
    """``[[filter.rtbl]]``: service (required), node, ids, domain (the served domain
    that subscribes; the first one by default)."""
    from s2sproxy.policy.rtbl import DEFAULT_NODE, parse_source
    if not isinstance(entries, list):
        raise ConfigError("filter.rtbl", "must be an array of tables ([[filter.rtbl]])")
    out = []
    for i, t in enumerate(entries):
        key = f"filter.rtbl[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(key, "must be a table ([[filter.rtbl]])")
        _no_unknown(key, t, {"service", "node", "ids", "domain"})
        if "service" not in t:
            raise ConfigError(f"{key}.service", "missing: the pubsub service's domain, "
                                                "e.g. \"xmppbl.org\"")
        domain = t.get("domain", next(iter(domains)))
        if not isinstance(domain, str) or _canonical_or_none(domain) not in domains:
            raise ConfigError(f"{key}.domain", f"must be a served domain ([[domain]]), "
                                               f"not {domain!r}")
        try:
            src = parse_source(str(t["service"]), str(t.get("node", DEFAULT_NODE)),
                               str(t.get("ids", "domain")), _canonical_or_none(domain))
        except ValueError as e:
            field, _, why = str(e).partition(": ")
            raise ConfigError(f"{key}.{field}", why) from None
        if src.service in domains:
            raise ConfigError(f"{key}.service", f"{src.service} is a served domain")
        if any((o.service, o.node) == (src.service, src.node) for o in out):
            raise ConfigError(key, f"{src.name} is listed twice")
        out.append(src)
    return tuple(out)


def _canonical_or_none(domain: str) -> str | None:
    try:
        return nameprep_domain(domain)
    except InvalidJid:
        return None


def _nonneg(t: dict[str, Any], key: str, default: float) -> float:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 \
            or not math.isfinite(v):
        raise ConfigError(key, f"must be a number >= 0, not {v!r}")
    return float(v)


def _secret(path: Path, generate: bool = True) -> bytes:
    """Read the dialback secret, or generate one and keep it (mode 0600).

    All instances behind one load balancer must share this file: XEP-0185 keys are
    derived from it, so any instance can verify a key another one issued.
    """
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        if not generate:
            raise ConfigError("secret_file", f"{path} does not exist (it is made at "
                                             "start, never by a reload or a check)") from None
        secret = secrets.token_hex(32).encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secret + b"\n")
        except OSError as e:
            raise ConfigError("secret_file", f"cannot create {path}: {e.strerror}") from None
    except OSError as e:
        raise ConfigError("secret_file", f"cannot read {path}: {e.strerror}") from None
    if len(secret) < 16:
        raise ConfigError("secret_file", f"{path} holds fewer than 16 bytes; "
                                         "delete it to have a new secret generated")
    return secret


def check_certificate(cert_path: Path, key_path: Path, domain: str | None, key: str) -> None:
    """Refuse a certificate that does not load, does not match its key, or does not
    cover ``domain`` (DNS-ID, SRV-ID or XmppAddr, as ``core.identity.names_cover``
    decides for peers; never the CN)."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except ValueError:
        chain = []
    if not chain:
        raise ConfigError(key, f"no PEM certificate in {cert_path}")
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        keyname = key.rsplit(".", 1)[0] + ".key"
        raise ConfigError(keyname, f"cannot load private key {key_path}: {e}") from None
    pub = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    leaf = chain[0]
    if leaf.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo) != pub:
        raise ConfigError(key, f"{cert_path} does not match its private key {key_path}")
    if domain is not None and not names_cover(leaf, domain):
        # The rule a peer's certificate is held to (core.identity), so that what we
        # present is what we would accept.
        names = ", ".join(certificate_names(leaf))
        if not names:
            names = "none"
            cns = subject_common_names(leaf)
            if cns:
                names += f"; the subject CN {', '.join(cns)} is not used, RFC 9525"
        raise ConfigError(key, f"{cert_path} does not cover {domain} (names: {names})")


# -- scalar helpers ---------------------------------------------------------------------

def _no_unknown(prefix: str, table: dict[str, Any], known: set[str]) -> None:
    for k in table:
        if k not in known:
            name = f"{prefix}.{k}" if prefix else k
            raise ConfigError(name, f"unknown key (known here: {', '.join(sorted(known))})")


def _table(data: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    t = data.get(name, {})
    if not isinstance(t, dict):
        raise ConfigError(name, "must be a table")
    _no_unknown(name, t, known)
    return t


def _required_str(t: dict[str, Any], key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf not in t:
        raise ConfigError(key, "missing")
    return _str(t, key, "")


def _str(t: dict[str, Any], key: str, default: str) -> str:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"must be a non-empty string, not {v!r}")
    return v


def _bool(t: dict[str, Any], key: str, default: bool) -> bool:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, bool):
        raise ConfigError(key, f"must be true or false, not {v!r}")
    return v


def _int(t: dict[str, Any], key: str, default: int, minimum: int) -> int:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}, not {v!r}")
    return v


def _number(t: dict[str, Any], key: str, default: float) -> float:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 \
            or not math.isfinite(v):
        raise ConfigError(key, f"must be a number of seconds > 0, not {v!r}")
    return float(v)


def _port(t: dict[str, Any], key: str, default: int) -> int:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 65536:
        raise ConfigError(key, f"must be a port number 1-65535, not {v!r}")
    return v


def _list(t: dict[str, Any], key: str, default: list) -> list:
    v = t.get(key.rsplit(".", 1)[-1], default)
    if not isinstance(v, list):
        raise ConfigError(key, f"must be an array, not {v!r}")
    return v


def _path(t: dict[str, Any], key: str, base: Path, default: str) -> Path:
    return base / _str(t, key, default)


def _existing(t: dict[str, Any], key: str, base: Path) -> Path:
    p = base / _required_str(t, key)
    if not p.is_file():
        raise ConfigError(key, f"file not found: {p}")
    if not os.access(p, os.R_OK):
        raise ConfigError(key, f"file not readable: {p}")
    return p


def _domain_name(v: Any, key: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(key, f"must be a domain name string, not {v!r}")
    try:
        return nameprep_domain(v)
    except InvalidJid as e:
        raise ConfigError(key, f"not a valid domain name: {v!r} ({e})") from None


def _address(t: dict[str, Any], key: str, default: str) -> str:
    return _ip(_str(t, key, default), key)


def _network(v: Any, key: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(v), strict=False)
    except ValueError:
        raise ConfigError(key, f"not an IP address or network: {v!r}") from None


def _ip(v: Any, key: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ConfigError(key, f"must be an IP address, not {v!r}") from None


def _hostport(v: Any, key: str, default_port: int) -> tuple[str, int]:
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f'must be "host:port" or "host", not {v!r}')
    host, port = v, default_port
    if v.startswith("["):
        host, _, rest = v[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ConfigError(key, f"bad port in {v!r}")
            port = int(rest[1:])
    elif v.count(":") == 1:
        host, p = v.split(":")
        if not p.isdigit():
            raise ConfigError(key, f"bad port in {v!r}")
        port = int(p)
    if not 0 < port < 65536 or not host:
        raise ConfigError(key, f"bad address {v!r}")
    return host, port


def _endpoints(t: dict[str, Any], key: str, default: list[str]) -> list[str]:
    v = _list(t, key, default)
    for i, desc in enumerate(v):
        if not isinstance(desc, str):
            raise ConfigError(f"{key}[{i}]", f"must be a Twisted endpoint string, not {desc!r}")
        _check_server_endpoint(desc, f"{key}[{i}]")
    return v


def _check_server_endpoint(desc: str, key: str) -> None:
    # Parsing only (no reactor): a typo such as "tpc:5269" is caught at start.
    from twisted.internet.endpoints import _parseServer  # noqa: PLC0415
    inner = desc[len("haproxy:"):] if desc.lower().startswith("haproxy:") else desc
    if inner != desc and key.startswith(("backend.", "metrics.")):
        raise ConfigError(key, f"the PROXY protocol (haproxy:) is for public listeners, "
                               f"not {desc!r}")
    if inner.split(":", 1)[0].lower() in ("ssl", "tls"):
        raise ConfigError(key, f"use a plain tcp: endpoint; s2sproxy does TLS itself "
                               f"(for SNI and STARTTLS), not {desc!r}")
    try:
        _parseServer(desc, None)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(key, f"not a Twisted server endpoint string: {desc!r} ({e})") \
            from None


def _endpoint_port(desc: str) -> int | None:
    for part in desc.split(":")[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port=") and part[5:].isdigit():
            return int(part[5:])
    return None


def endpoint_address(desc: str) -> tuple[str, int] | None:
    """(interface, port) a ``tcp:``/``tcp6:`` server endpoint string (optionally behind
    ``haproxy:``) listens on; the interface is ``0.0.0.0`` or ``::`` when unspecified.
    None for other endpoint kinds (``unix:``), whose address no remote can name."""
    from twisted.internet.endpoints import _parse  # noqa: PLC0415
    try:
        args, kwargs = _parse(desc)
    except (ValueError, KeyError, TypeError):
        return None
    if args and args[0].lower() == "haproxy":
        args = args[1:]
    if not args or args[0].lower() not in ("tcp", "tcp6"):
        return None
    port = kwargs.get("port") or (args[1] if len(args) > 1 else "")
    if not str(port).isdigit():
        return None
    default = "::" if args[0].lower() == "tcp6" else "0.0.0.0"
    interface = kwargs.get("interface") or (args[2] if len(args) > 2 else "") or default
    return interface, int(port)


def own_listeners(s: Settings) -> list[tuple[str, int]]:
    """Every TCP address s2sproxy listens on, as far as the configuration says."""
    descs = [*s.starttls_listeners, *s.direct_tls_listeners, s.backend.listen]
    if s.metrics_listen:
        descs.append(s.metrics_listen)
    out = [a for a in map(endpoint_address, descs) if a is not None]
    out.append((s.backend.dns_address, s.backend.dns_port))
    return out


# -- reload (SIGHUP) ----------------------------------------------------------------------

#: What a reload cannot change in a running process, with why: a change to any of these
#: refuses the whole reload (one line per key), and the running configuration stays.
RESTART_ONLY = {
    "public.starttls": "listeners are bound at start",
    "public.direct_tls": "listeners are bound at start",
    "backend.listen": "listeners are bound at start",
    "backend.host": "the rules for what s2sproxy may connect to are made at start",
    "backend.port": "the rules for what s2sproxy may connect to are made at start",
    "dns.allow_private_targets": "the rules for what s2sproxy may connect to are made "
                                 "at start",
    "backend.srv_target": "the backend DNS responder is made at start",
    "backend.srv_port": "the backend DNS responder is made at start",
    "backend.dns_address": "the backend DNS responder is bound at start",
    "backend.dns_port": "the backend DNS responder is bound at start",
    "metrics.listen": "listeners are bound at start",
    "domain": "the served domains are routed on by every stream",
    "secret_file": "dialback keys in flight were made with the running secret",
    "log.format": "the log observer is chosen at start",
    "control.socket": "the control socket is bound at start",
}


def _restart_only_values(s: Settings) -> dict[str, Any]:
    b = s.backend
    return {
        "public.starttls": s.starttls_listeners, "public.direct_tls": s.direct_tls_listeners,
        "backend.listen": b.listen, "backend.host": b.host, "backend.port": b.port,
        "dns.allow_private_targets": s.allow_private_targets,
        "backend.srv_target": b.srv_target, "backend.srv_port": b.srv_port,
        "backend.dns_address": b.dns_address,
        "backend.dns_port": b.dns_port, "metrics.listen": s.metrics_listen,
        "domain": tuple(s.domains), "secret_file": (s.secret_file, s.secret),
        "log.format": s.log_format, "control.socket": s.control_socket,
    }


def reload_refusals(running: Settings, new: Settings) -> list[str]:
    """Why ``new`` cannot replace ``running`` in place: one text per key in
    ``RESTART_ONLY`` that differs (empty: the reload may go ahead)."""
    old, now = _restart_only_values(running), _restart_only_values(new)
    return [f"{key} changed ({why}): restart s2sproxy to apply it"
            for key, why in RESTART_ONLY.items() if old[key] != now[key]]

