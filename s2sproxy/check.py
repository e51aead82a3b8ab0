"""``s2sproxy check``: what ``prosodyctl check`` does, for s2sproxy.

Each check yields findings, one line each: ``error`` (federation breaks), ``warn``
(it works, but not as it should) or ``ok`` (printed with ``--verbose``).  The exit
status is 1 when any error or warning was found, else 0.

1. config: the same checks as start-up (``config.load``); nothing else runs without it.
2. certificates: each served domain's (and the backend listener's) names, chain
   (verified against ``[trust]``, as remote servers verify it against theirs) and
   days to expiry.
3. secret: the dialback secret file's mode (0600 or stricter).
4. ejabberd side (``deploy/EJABBERD.md``): its internal listener answers a stream
   header with features that agree with ``backend.tls``; the backend DNS responder
   (served by the running proxy) answers an SRV query as ejabberd's resolver asks it
   (RD copied) with ``backend.srv_target``/``srv_port``, and the target resolves to
   the backend listener's address.
5. ``--dns``: each served domain's public ``_xmpp-server``/``_xmpps-server`` SRV
   records point at a port of this proxy's listeners.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cryptography import x509
from OpenSSL import crypto

from s2sproxy.config import ConfigError, Settings, endpoint_address, load
from s2sproxy.core.identity import certificate_names
from s2sproxy.core.jid import dns_name
from s2sproxy.core.limits import CERT_EXPIRY_WARNING

ERROR, WARN, OK = "error", "warn", "ok"
_TIMEOUT = 3.0


@dataclass(frozen=True)
class Finding:
    level: str
    what: str          # the check's subject: "config", "certificate local.test", ...
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.what}: {self.text}"


# -- certificates -------------------------------------------------------------------------

def _store(s: Settings) -> crypto.X509Store:
    store = crypto.X509Store()
    if s.trust.system_cas:
        paths = ssl.get_default_verify_paths()
        store.load_locations(paths.cafile, paths.capath)
    if s.trust.ca_file:
        store.load_locations(str(s.trust.ca_file))
    return store


def certificate_findings(label: str, path: Path, store: crypto.X509Store,
                         now: float) -> Iterator[Finding]:
    what = f"certificate {label}"
    chain = x509.load_pem_x509_certificates(path.read_bytes())
    leaf = chain[0]
    names = ", ".join(certificate_names(leaf)) or "none"
    yield Finding(OK, what, f"{path} names {names}")
    left = leaf.not_valid_after_utc.timestamp() - now
    if left <= 0:
        yield Finding(ERROR, what, f"expired {-left / 86400:.0f} days ago")
    elif left <= CERT_EXPIRY_WARNING:
        yield Finding(WARN, what, f"expires in {left / 86400:.1f} days: renew it, then "
                                  "reload s2sproxy (SIGHUP)")
    else:
        yield Finding(OK, what, f"expires in {left / 86400:.0f} days")
    ctx = crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf),
                                  [crypto.X509.from_cryptography(c) for c in chain[1:]])
    try:
        ctx.verify_certificate()
        yield Finding(OK, what, "chain verifies against the configured trust")
    except crypto.X509StoreContextError as e:
        yield Finding(WARN, what, f"chain does not verify against the configured trust "
                                  f"({e}): remote servers will not accept it either "
                                  "(missing intermediate, or not from a public CA)")


# -- the secret ---------------------------------------------------------------------------

def secret_findings(s: Settings) -> Iterator[Finding]:
    mode = s.secret_file.stat().st_mode & 0o777
    if mode & 0o077:
        yield Finding(WARN, "secret_file", f"{s.secret_file} is mode {mode:04o}: make it "
                                           "0600 (anyone who reads it can forge dialback "
                                           "keys)")
    else:
        yield Finding(OK, "secret_file", f"{s.secret_file} mode {mode:04o}")


# -- the ejabberd side --------------------------------------------------------------------

_HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
           "xmlns:stream='http://etherx.jabber.org/streams' "
           "xmlns:db='jabber:server:dialback' from='{frm}' to='{to}' version='1.0'>")


def _read_features(sock: socket.socket) -> bytes:
    data = b""
    deadline = time.monotonic() + _TIMEOUT
    while b"</stream:features>" not in data and b"<stream:features/>" not in data \
            and b"</stream:stream>" not in data and len(data) < 65536:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def backend_findings(s: Settings) -> Iterator[Finding]:
    b = s.backend
    what = f"ejabberd {b.host}:{b.port}"
    domain = next(iter(s.domains))
    try:
        with socket.create_connection((b.host, b.port), timeout=_TIMEOUT) as sock:
            sock.sendall(_HEADER.format(frm="check.s2sproxy.invalid", to=domain).encode())
            data = _read_features(sock)
    except OSError as e:
        yield Finding(ERROR, what, f"does not answer ({e.strerror or e}): is ejabberd "
                                   "running with the listener of deploy/EJABBERD.md?")
        return
    if b"<stream:stream" not in data or b"features" not in data:
        yield Finding(ERROR, what, f"did not answer a stream header with features: "
                                   f"{data[:200]!r}")
        return
    starttls = b"urn:ietf:params:xml:ns:xmpp-tls" in data
    required = starttls and b"<required" in data.split(b"xmpp-tls", 1)[1][:80]
    if b.tls == "required" and not starttls:
        yield Finding(ERROR, what, "offers no STARTTLS, and backend.tls is \"required\"")
    elif b.tls == "never" and required:
        yield Finding(ERROR, what, "requires STARTTLS, and backend.tls is \"never\" (set "
                                   "s2s_use_starttls: optional in ejabberd, or backend.tls"
                                   " = \"auto\")")
    else:
        yield Finding(OK, what, f"answers with {'STARTTLS' if starttls else 'no STARTTLS'}"
                                f" (backend.tls = {b.tls})")


def _dns_query(server: tuple[str, int], name: str, rtype: int,
               timeout: float = _TIMEOUT):
    """One query over UDP with RD set, as ejabberd's inet_res (and libc) ask: the
    answer Message, or raise OSError."""
    from twisted.names import dns
    qid = random.randrange(1, 65535)
    m = dns.Message(id=qid, recDes=1)
    m.queries = [dns.Query(name, rtype, dns.IN)]
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(m.toStr(), server)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            data, _ = sock.recvfrom(65535)
            answer = dns.Message()
            answer.fromStr(data)
            if answer.id == qid:
                return answer


def _srv_records(answer) -> list[tuple[int, int, int, str]]:
    from twisted.names import dns
    return [(rr.payload.priority, rr.payload.weight, rr.payload.port,
             rr.payload.target.name.decode("ascii", "replace"))
            for rr in answer.answers if rr.type == dns.SRV]


def backend_dns_findings(s: Settings) -> Iterator[Finding]:
    from twisted.names import dns
    b = s.backend
    what = f"backend DNS {b.dns_address}:{b.dns_port}"
    name = "_xmpp-server._tcp.check.s2sproxy.invalid"
    try:
        answer = _dns_query((b.dns_address, b.dns_port), name, dns.SRV)
    except OSError as e:
        yield Finding(ERROR, what, f"no answer to SRV {name} ({e.strerror or e}): is "
                                   "s2sproxy running with this configuration?")
        return
    records = _srv_records(answer)
    if not answer.recDes:
        yield Finding(ERROR, what, "the answer does not copy RD: ejabberd's resolver "
                                   "rejects it")
    if records != [(0, 0, b.srv_port, b.srv_target)]:
        yield Finding(ERROR, what, f"SRV answer {records or 'empty'}, expected "
                                   f"{b.srv_target}:{b.srv_port}")
        return
    yield Finding(OK, what, f"answers SRV with {b.srv_target}:{b.srv_port}, as ejabberd "
                            "asks it")
    listen = endpoint_address(b.listen)
    what = f"backend.srv_target {b.srv_target}"
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(b.srv_target, b.srv_port,
                                                        type=socket.SOCK_STREAM)}
    except socket.gaierror as e:
        yield Finding(ERROR, what, f"does not resolve ({e.strerror}): ejabberd cannot "
                                   "reach the backend listener")
        return
    shown = ", ".join(sorted(addrs))
    if listen is not None and listen[1] == b.srv_port and (
            listen[0] in ("0.0.0.0", "::") or listen[0] in addrs):
        yield Finding(OK, what, f"resolves to {shown}: the backend listener")
        return
    # Not this instance's backend listener: a load balancer in front of several
    # (deploy/haproxy/), which must answer.
    try:
        socket.create_connection((b.srv_target, b.srv_port), timeout=_TIMEOUT).close()
    except OSError as e:
        yield Finding(ERROR, what, f"{b.srv_target}:{b.srv_port} ({shown}) is not the "
                                   f"backend listener ({b.listen}) and does not answer "
                                   f"({e.strerror or e}): ejabberd's outgoing streams "
                                   "would fail")
        return
    yield Finding(OK, what, f"{b.srv_target}:{b.srv_port} ({shown}) answers: a load "
                            f"balancer in front of the backend listeners")


# -- public DNS ---------------------------------------------------------------------------

def public_dns_findings(s: Settings, servers: list[tuple[str, int]]) -> Iterator[Finding]:
    from twisted.names import dns
    ports = {"_xmpp-server": {a[1] for a in map(endpoint_address, s.starttls_listeners)
                              if a},
             "_xmpps-server": {a[1] for a in map(endpoint_address, s.direct_tls_listeners)
                               if a}}
    for domain in s.domains:
        for service, ours in ports.items():
            name = f"{service}._tcp.{dns_name(domain)}"
            what = f"DNS {name}"
            answer = None
            for server in servers:
                try:
                    answer = _dns_query(server, name, dns.SRV)
                    break
                except OSError:
                    continue
            if answer is None:
                yield Finding(ERROR, what, "no nameserver answered "
                              f"({', '.join(f'{h}:{p}' for h, p in servers)})")
                continue
            records = _srv_records(answer)
            if not records:
                hint = ("remote servers connect to the domain's own address on 5269"
                        if service == "_xmpp-server" else "no Direct TLS (XEP-0368)")
                yield Finding(WARN if service == "_xmpp-server" else OK, what,
                              f"no SRV record: {hint}")
                continue
            if records == [(0, 0, 0, "")] or any(t in ("", ".") for *_, t in records):
                yield Finding(ERROR if ours else OK, what, "\".\": the service is "
                              "declared unavailable")
                continue
            wrong = [r for r in records if r[2] not in ours]
            shown = ", ".join(f"{t}:{p}" for _p, _w, p, t in records)
            if wrong and ours:
                yield Finding(ERROR, what, f"{shown}: port(s) "
                              f"{', '.join(str(r[2]) for r in wrong)} are not this proxy's "
                              f"({', '.join(map(str, sorted(ours)))})")
            elif not ours:
                yield Finding(WARN, what, f"{shown}, but this proxy has no such listener")
            else:
                yield Finding(OK, what, shown)


# -- all of it ----------------------------------------------------------------------------

def run(config: str, dns: bool = False,
        nameservers: list[tuple[str, int]] | None = None) -> list[Finding]:
    try:
        s = load(config, generate_secret=False)
    except ConfigError as e:
        return [Finding(ERROR, "config", str(e))]
    out = [Finding(OK, "config", f"{config}: valid ({len(s.domains)} domain(s))")]
    store = _store(s)
    now = time.time()
    for name, d in s.domains.items():
        out += certificate_findings(name, d.certificate, store, now)
    if s.backend.certificate is not None:
        out += certificate_findings("backend", s.backend.certificate, store, now)
    out += secret_findings(s)
    out += backend_findings(s)
    out += backend_dns_findings(s)
    if dns:
        from s2sproxy.tx.resolver import system_nameservers
        servers = nameservers or list(s.nameservers) or system_nameservers()
        out += public_dns_findings(s, servers)
    return out


def exit_status(findings: list[Finding]) -> int:
    return 1 if any(f.level in (ERROR, WARN) for f in findings) else 0

