"""The federation test world (issue 8): real DNS, many domains on both sides, dual stack,
Direct TLS, every peer version.

Everything resolves through real DNS (Knot, ``dns_server.KnotServer``) on
127.0.0.53:53, serving the zone ``example`` written by ``zone()``: s2sproxy's
``dns.nameservers`` names it, Prosody's libunbound forwards to it (resolv.conf).  The
remote ejabberd asks a second Knot on 127.0.0.54:53, with the same zone less one record
(``zone(ejabberd_view=True)`` says why): its ``inetrc`` names it and its libc resolver
asks it too (it runs in a private mount namespace whose /etc/resolv.conf says so).  No
static address override anywhere: the only path is SRV / A / AAAA / CNAME, as on the
internet.  Domains are under ``.example``: Prosody's libunbound answers every ``*.test``
name with NXDOMAIN.

Addresses (loopback only; 127.0.1.0/24, apart from tests/integration's 127.0.0.x, so the
two suites never hold the same port)::

    127.0.0.53:53        Knot, authoritative for "example"
    127.0.0.54:53        Knot, the remote ejabberd's view of "example" (``zone()``)
    127.0.1.30           s2sproxy public listeners, 5269 STARTTLS and 5270 Direct TLS
    127.0.1.10           backend ejabberd: c2s 5222, internal s2s 15269 (the listener
                         deploy/EJABBERD.md moves to 127.0.0.1, here on its own address)
    127.0.1.20 and ::1   Prosody 0.12 (dual stack): 5222, 5269, 5270 Direct TLS
    127.0.1.21           Prosody 13: 5222, 5269, 5270 Direct TLS
    127.0.1.40           ejabberd 24.12 as a remote server: 5222, s2s 5279
    127.0.1.99           nothing (connections refused)

Domains: two served behind s2sproxy (alpha, beta) and two per remote server, one
whose certificate the others trust (SASL EXTERNAL both ways) and one whose certificate
comes from a CA nobody trusts (dialback both ways)::

    alpha.example   served   world CA    _xmpps-server 5270 + _xmpp-server 5269
    beta.example    served   stranger    _xmpp-server 5269
    p12.example     Prosody 0.12  world      _xmpps-server + _xmpp-server, A + AAAA
    p12db.example   Prosody 0.12  stranger   _xmpp-server
    p13.example     Prosody 13    world      _xmpps-server + _xmpp-server
    p13db.example   Prosody 13    stranger   _xmpp-server -> CNAME -> CNAME -> A
    ej.example      ejabberd      world      _xmpp-server 5279
    ejdb.example    ejabberd      stranger   _xmpp-server 5279

and the fallback domains of item 4 (each: how the first way fails, what works)::

    fb-refused.example  SRV 0 -> 127.0.1.99 (refused), SRV 10 -> Prosody 0.12
    fb-v6.example       target has AAAA ::1 (nothing on 5279) and A 127.0.1.40 (ejabberd)
    fb-nosrv.example    no SRV: the domain's own A, port 5269 (Prosody 0.12)
    fb-cert.example     SRV 0 -> Prosody 13 with a certificate for another name,
                        SRV 10 -> Prosody 0.12 with the right one (trust.secure_domains)
    fb-none.example     SRV target "." (no service): bounced, never tried
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

import harness  # noqa: E402
from harness import Account, HarnessError, TestCA  # noqa: E402

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"

DNS_IP = "127.0.0.53"
# The remote ejabberd's own view of the zone: the same records without alpha.example's
# _xmpps-server (``zone(ejabberd_view=True)``, see there why).
EJR_DNS_IP = "127.0.0.54"
PROXY_IP = "127.0.1.30"
BACKEND_C2S_IP = "127.0.1.10"
BACKEND_S2S = ("127.0.1.10", 15269)
P12_IP = "127.0.1.20"
P13_IP = "127.0.1.21"
EJR_IP = "127.0.1.40"
EJR_S2S_PORT = 5279
DEAD_IP = "127.0.1.99"
FIXED_LISTENERS = [(DNS_IP, 53), (EJR_DNS_IP, 53), (PROXY_IP, 5269), (PROXY_IP, 5270),
                   (BACKEND_C2S_IP, 5222), BACKEND_S2S, (P12_IP, 5222), (P12_IP, 5269),
                   (P13_IP, 5269), (EJR_IP, 5222), (EJR_IP, EJR_S2S_PORT)]


def check_ports_free() -> None:
    busy = [f"{h}:{p}" for h, p in FIXED_LISTENERS if harness.tcp_listening(h, p)]
    if busy:
        raise HarnessError(f"world addresses already in use: {', '.join(busy)} (another "
                           f"world run?); peer processes: {harness.peer_processes()}")
PASSWORD = "world-pw-1"


@dataclass(frozen=True)
class Domain:
    name: str
    server: str          # "proxy", "p12", "p13", "ejr"
    trusted: bool        # certificate from the world CA (else the stranger CA)
    user: str

    def account(self, tag: str = "") -> Account:
        """The domain's user (``tag`` appended: one fresh user per backend run, so that
        no roster state of an earlier run leaks into the next)."""
        host = {"proxy": BACKEND_C2S_IP, "p12": P12_IP, "p13": P13_IP, "ejr": EJR_IP}
        return Account(f"{self.user}{tag}@{self.name}", PASSWORD, host[self.server])


ALPHA = Domain("alpha.example", "proxy", True, "alice")
BETA = Domain("beta.example", "proxy", False, "bianca")
SERVED = (ALPHA, BETA)
REMOTE_DOMAINS = (
    Domain("p12.example", "p12", True, "pat"),
    Domain("p12db.example", "p12", False, "pia"),
    Domain("p13.example", "p13", True, "tom"),
    Domain("p13db.example", "p13", False, "tia"),
    Domain("ej.example", "ejr", True, "eve"),
    Domain("ejdb.example", "ejr", False, "ed"),
)
FALLBACK = (
    Domain("fb-refused.example", "p12", True, "frank"),
    Domain("fb-v6.example", "ejr", True, "vic"),
    Domain("fb-nosrv.example", "p12", True, "nora"),
    Domain("fb-cert.example", "p12", True, "cera"),
)
NO_SERVICE = "fb-none.example"
# fb-cert.example on Prosody 13 presents a certificate for this name instead.
WRONG_CERT_NAME = "wrong.example"

BY_NAME = {d.name: d for d in SERVED + REMOTE_DOMAINS + FALLBACK}


def domains_of(server: str) -> list[Domain]:
    out = [d for d in REMOTE_DOMAINS + FALLBACK if d.server == server]
    if server == "p13":
        out.append(Domain("fb-cert.example", "p13", True, "cera"))
    return out


def zone(ejabberd_view: bool = False) -> str:
    """The body of zone ``example`` (KnotServer adds SOA and NS).

    ``ejabberd_view``: the zone as the remote ejabberd 24.12 sees it (its own Knot,
    ``EJR_DNS_IP``), without alpha.example's ``_xmpps-server`` record.  Its Direct TLS
    connect has a race (xmpp 1.9.4, fast_tls 1.1.22): ``xmpp_socket:starttls`` sends the
    ClientHello and sets the socket ``{active, once}`` before
    ``xmpp_socket:finish_tls_handshake`` sets it passive and reads the server's answer,
    so an answer that comes back in between lands in the process's mailbox and the
    handshake fails (on loopback: in about one run of the world tests in 25 here, and 17
    handshakes in 100 with fast_tls alone against ``openssl s_server``).
    ``xmpp_stream_out:connect`` then dials the next SRV target (our STARTTLS port)
    without closing the first socket, and the TLS bytes still in the mailbox are parsed
    as the new stream: ejabberd closes it with not-well-formed, and s2sproxy flags the
    stream header it sends after its error (restricted-xml).  README "Tested server
    versions" tells operators; here ejabberd reaches alpha.example by STARTTLS only, as
    it reaches beta.example."""
    xmpps_alpha = ("" if ejabberd_view else
                   "_xmpps-server._tcp.alpha    SRV   0 5 5270 xmpp.alpha.example.\n")
    return f"""\
; served by s2sproxy
xmpp.alpha                  A     {PROXY_IP}
{xmpps_alpha}_xmpp-server._tcp.alpha     SRV   10 5 5269 xmpp.alpha.example.
proxy.beta                  A     {PROXY_IP}
_xmpp-server._tcp.beta      SRV   0 5 5269 proxy.beta.example.

; Prosody 0.12, dual stack
xmpp.p12                    A     {P12_IP}
xmpp.p12                    AAAA  ::1
_xmpps-server._tcp.p12      SRV   0 5 5270 xmpp.p12.example.
_xmpp-server._tcp.p12       SRV   10 5 5269 xmpp.p12.example.
_xmpp-server._tcp.p12db     SRV   0 5 5269 xmpp.p12.example.

; Prosody 13, IPv4 only
xmpp.p13                    A     {P13_IP}
_xmpps-server._tcp.p13      SRV   0 5 5270 xmpp.p13.example.
_xmpp-server._tcp.p13       SRV   10 5 5269 xmpp.p13.example.
_xmpp-server._tcp.p13db     SRV   0 5 5269 s2s.p13db.example.
s2s.p13db                   CNAME alias.p13.example.
alias.p13                   CNAME xmpp.p13.example.

; ejabberd as a remote server
xmpp.ej                     A     {EJR_IP}
_xmpp-server._tcp.ej        SRV   0 5 {EJR_S2S_PORT} xmpp.ej.example.
_xmpp-server._tcp.ejdb      SRV   0 5 {EJR_S2S_PORT} xmpp.ej.example.

; fallback cases
dead                        A     {DEAD_IP}
_xmpp-server._tcp.fb-refused SRV  0 5 5269 dead.example.
_xmpp-server._tcp.fb-refused SRV  10 5 5269 xmpp.p12.example.
dual.fb-v6                  A     {EJR_IP}
dual.fb-v6                  AAAA  ::1
_xmpp-server._tcp.fb-v6     SRV   0 5 {EJR_S2S_PORT} dual.fb-v6.example.
fb-nosrv                    A     {P12_IP}
_xmpp-server._tcp.fb-cert   SRV   0 5 5269 xmpp.p13.example.
_xmpp-server._tcp.fb-cert   SRV   10 5 5269 xmpp.p12.example.
_xmpp-server._tcp.fb-none   SRV   0 0 0 .
"""


def _fill(template: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    left = sorted(set(re.findall(r"@[A-Z_0-9]+@", text)))
    if left:
        raise HarnessError(f"{template}: unfilled placeholders {left}")
    return text


# -- certificates -------------------------------------------------------------------

@dataclass
class Trust:
    """The world's two CAs: ``world`` (every server trusts it) and ``stranger`` (nobody
    does, so its domains authenticate by dialback).  ``bundle`` has both, for clients."""
    run: harness.RunDir
    world: TestCA
    stranger: TestCA = field(default_factory=lambda: TestCA("stranger CA"))

    def __post_init__(self) -> None:
        self.world_file = self.run.ca_file
        self.bundle = self.run.path / "ca-bundle.crt"
        self.bundle.write_bytes(self.world.cert_pem + self.stranger.cert_pem)
        os.chmod(self.bundle, 0o644)

    def leaf(self, domain: Domain, name: str | None = None) -> harness.Leaf:
        ca = self.world if domain.trusted else self.stranger
        return ca.issue(name or domain.name)


# -- Prosody ------------------------------------------------------------------------

class WorldProsody(harness.Prosody):
    """A Prosody (0.12 or 13) serving several virtual hosts, resolving through Knot."""

    def __init__(self, run: harness.RunDir, trust: Trust, name: str, ips: Sequence[str],
                 domains: Sequence[Domain], version=None) -> None:
        self.run = run
        self.name = name
        self.dir = run.path / name
        self.ip = ips[0]
        self.config = self.dir / "prosody.cfg.lua"
        self.admin_socket = self.dir / "data" / "prosody.sock"
        self.proc: subprocess.Popen | None = None
        self.domains = list(domains)
        self.version = version or harness.PROSODY_012
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        (self.dir / "certs").mkdir(exist_ok=True)
        (self.dir / "hosts").write_text("127.0.0.1 localhost\n")
        (self.dir / "resolv.conf").write_text(f"nameserver {DNS_IP}\n")
        vhosts = []
        for d in self.domains:
            wrong = name == "p13" and d.name == "fb-cert.example"
            leaf = trust.leaf(d, WRONG_CERT_NAME if wrong else None)
            leaf.write(self.dir / "certs" / f"{d.name}.crt", self.dir / "certs" / f"{d.name}.key")
            vhosts.append(f'VirtualHost "{d.name}"\n\tssl = {{\n'
                          f'\t\tcertificate = "{self.dir}/certs/{d.name}.crt";\n'
                          f'\t\tkey = "{self.dir}/certs/{d.name}.key";\n\t}}\n')
        self.config.write_text(_fill("prosody.cfg.lua.in", {
            "DIR": self.dir, "CA_FILE": trust.world_file,
            "INTERFACES": "; ".join(f'"{ip}"' for ip in ips),
            "VHOSTS": "\n".join(vhosts),
        }))
        harness._chown_tree(self.dir, "prosody")

    def register_all(self, tag: str = "") -> None:
        for d in self.domains:
            self.prosodyctl("register", d.user + tag, d.name, PASSWORD)


# -- ejabberd -----------------------------------------------------------------------

class WorldEjabberd(harness.Ejabberd):
    """An ejabberd serving several hosts: the backend behind s2sproxy
    (``backend_dns_port``: s2sproxy's backend DNS responder; deploy/EJABBERD.md applied)
    or a remote server (``backend_dns_port=None``: it resolves through Knot, its libc
    resolver too, inside a private mount namespace)."""

    def __init__(self, run: harness.RunDir, trust: Trust, name: str, c2s_ip: str,
                 domains: Sequence[Domain], *, backend_dns_port: int | None,
                 s2s_port: int = EJR_S2S_PORT, starttls: str = "optional",
                 dns_ip: str = DNS_IP, version=None) -> None:
        self.run = run
        self.name = name
        self.dir = run.path / name
        self.config_dir = self.dir / "config"
        self.logs_dir = self.dir / "logs"
        self.spool_dir = self.dir / "spool"
        self.pidfile = self.dir / "ejabberd.pid"
        self.console_log = self.dir / "console.log"
        self.c2s_ip = c2s_ip
        self.domains = list(domains)
        self.remote = backend_dns_port is None
        self.dns_port = 53 if self.remote else backend_dns_port
        self.s2s_ip, self.s2s_port = (c2s_ip, s2s_port) if self.remote else BACKEND_S2S
        self.dist_port = harness.free_port()
        self.node = f"ejabberd-{name}-{secrets.token_hex(3)}@localhost"
        self.proc = None
        self.beam_pid = None
        self._started_pids = {}
        self.version = version or harness.EJABBERD_2412
        for d in (self.config_dir, self.logs_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        certfiles = []
        for d in self.domains:
            path = self.config_dir / f"{d.name}.pem"
            trust.leaf(d).write(path, combined=True)
            certfiles.append(f'  - "{path}"')
        self.leaf = None
        values = {
            "RUN": run.path, "HOSTS": "\n".join(f"  - {d.name}" for d in self.domains),
            "CERTFILES": "\n".join(certfiles), "C2S_IP": c2s_ip,
            "S2S_IP": self.s2s_ip, "S2S_PORT": self.s2s_port, "S2S_USE_STARTTLS": starttls,
            # ca_file validates our own certfiles (both CAs); s2s_cafile is what peers'
            # certificates are checked against: the world CA only.
            "CA_FILE": trust.bundle, "S2S_CAFILE": trust.world_file,
            # A remote ejabberd runs mod_s2s_bidi, as a 24.12 operator would; the backend
            # never does (deploy/EJABBERD.md).
            "MOD_S2S_BIDI_LINE": "  mod_s2s_bidi: {}" if self.remote
            and self.version.has_mod_s2s_bidi else "",
            "LOGLEVEL": "info", "NODE": self.node,
            "DIST_PORT": self.dist_port,
            # Each node its own cookie: ejabberd derives its rr- iq ids and dialback
            # secret from it (lab README).
            "COOKIE": secrets.token_hex(16), "DNS_PORT": self.dns_port,
        }
        config = _fill("ejabberd.yml.in", values)
        if self.remote:
            inetrc = ('{resolv_conf, ""}.\n'
                      f'{{nameserver, {{{dns_ip.replace(".", ",")}}}, 53}}.\n'
                      '{timeout, 1000}.\n{retry, 2}.\n')
            (self.dir / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
            (self.dir / "resolv.conf").write_text(f"nameserver {dns_ip}\n")
        else:
            config = harness.apply_deploy_snippet(config, starttls)
            # the snippet's internal listener, on this world's own address
            config = config.replace("  ip: 127.0.0.1\n  module: ejabberd_s2s_in",
                                    f"  ip: {BACKEND_S2S[0]}\n  module: ejabberd_s2s_in")
            if f"  ip: {BACKEND_S2S[0]}\n  module: ejabberd_s2s_in" not in config:
                raise HarnessError("deploy snippet: internal s2s listener not found")
            inetrc = (harness.DEPLOY_DIR / "ejabberd" / "inetrc").read_text().replace(
                "{nameserver, {127,0,0,1}, 15353}",
                f"{{nameserver, {{127,0,0,1}}, {backend_dns_port}}}")
        (self.config_dir / "ejabberd.yml").write_text(config)
        ctl_cfg = harness._fill("ejabberdctl.cfg.in", values).replace(
            f"{run.path}/ejabberd/", f"{self.dir}/")
        (self.config_dir / "ejabberdctl.cfg").write_text(ctl_cfg)
        (self.config_dir / "inetrc").write_text(inetrc)
        harness._chown_tree(self.dir, "ejabberd")

    def _foreground_command(self) -> list[str]:
        cmd = self._ctl_base() + ["foreground"]
        if not self.remote:
            return cmd
        # libc (getaddrinfo, which ejabberd uses for SRV targets) reads /etc/hosts and
        # /etc/resolv.conf: give this ejabberd its own, naming Knot only.
        script = (f'mount --bind {self.dir}/hosts /etc/hosts && '
                  f'mount --bind {self.dir}/resolv.conf /etc/resolv.conf && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                "sh"] + cmd

    def register_all(self, tag: str = "") -> None:
        for d in self.domains:
            self.ctl("register", d.user + tag, d.name, PASSWORD)


# -- s2sproxy -----------------------------------------------------------------------

def write_proxy_config(run: harness.RunDir, trust: Trust, *, backend_port: int,
                       backend_dns_port: int, metrics_port: int) -> Path:
    d = run.path / "s2sproxy"
    d.mkdir(exist_ok=True)
    q = harness._toml_str
    lines = [f"secret_file = {q(d / 'dialback.secret')}", ""]
    for dom in SERVED:
        trust.leaf(dom).write(d / f"{dom.name}.crt", d / f"{dom.name}.key")
        lines += ["[[domain]]", f"name = {q(dom.name)}",
                  f"certificate = {q(d / (dom.name + '.crt'))}",
                  f"key = {q(d / (dom.name + '.key'))}", ""]
    lines += [
        "[public]",
        f"starttls = [{q(f'tcp:5269:interface={PROXY_IP}')}]",
        f"direct_tls = [{q(f'tcp:5270:interface={PROXY_IP}')}]",
        "",
        "[backend]",
        f"host = {q(BACKEND_S2S[0])}",
        f"port = {BACKEND_S2S[1]}",
        f"listen = {q(f'tcp:{backend_port}:interface=127.0.0.1')}",
        f"dns_port = {backend_dns_port}",
        "",
        "[trust]",
        "system_cas = false",
        f"ca_file = {q(trust.world_file)}",
        # fb-cert.example's first SRV target has a certificate for another name: with
        # the domain required to prove itself, s2sproxy must move on to the second.
        "secure_domains = [\"fb-cert.example\"]",
        "",
        "[dns]",
        f"nameservers = [{q(DNS_IP + ':53')}]",
        # every server of this world is on loopback
        "allow_private_targets = true",
        "",
        "[metrics]",
        f"listen = {q(f'tcp:{metrics_port}:interface=127.0.0.1')}",
        "",
        "[log]",
        'level = "debug"',
        "",
        "[control]",
        f"socket = {q(d / 'control.sock')}",
        "",
    ]
    path = d / "s2sproxy.toml"
    path.write_text("\n".join(lines))
    return path


metrics = harness.metrics


# -- the whole world ----------------------------------------------------------------

@dataclass
class Backend:
    """ejabberd (one version) behind a fresh s2sproxy, serving alpha and beta."""
    tag: str
    version: object
    ejabberd: WorldEjabberd
    proxy: harness.S2SProxy
    metrics_port: int
    run: harness.RunDir

    def stop(self) -> None:
        errors = []
        for part in (self.proxy, self.ejabberd):
            try:
                part.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]


class World:
    """Knot and the three remote servers (Prosody 0.12, Prosody 13, ejabberd 24.12),
    started once; backends (ejabberd 24.12 or 23.01 behind s2sproxy) come and go."""

    def __init__(self, versions) -> None:
        self.versions = versions
        self.run = harness.RunDir.create(prefix="s2sproxy-world-")
        self.trust = Trust(self.run, self.run.ca)
        from dns_server import KnotServer
        self.dns = KnotServer(self.run.path, {"example": zone()}, address=DNS_IP, port=53)
        self.ejr_dns = KnotServer(self.run.path / "ejr-dns",
                                  {"example": zone(ejabberd_view=True)},
                                  address=EJR_DNS_IP, port=53)
        self.p12 = WorldProsody(self.run, self.trust, "p12", [P12_IP, "::1"],
                                domains_of("p12"), version=versions.PROSODY_012)
        self.p13 = WorldProsody(self.run, self.trust, "p13", [P13_IP], domains_of("p13"),
                                version=versions.PROSODY_13)
        self.ejr = WorldEjabberd(self.run, self.trust, "ejr", EJR_IP, domains_of("ejr"),
                                 backend_dns_port=None, dns_ip=EJR_DNS_IP,
                                 version=versions.EJABBERD_2412)
        self.remotes = {"p12": self.p12, "p13": self.p13, "ejr": self.ejr}
        self.backend: Backend | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> None:
        t0 = time.monotonic()
        self.dns.start()
        self.ejr_dns.start()
        harness.start_servers(self.p12, self.p13, self.ejr, timeout=60)
        self.timings["remotes started"] = time.monotonic() - t0

    def start_backend(self, version) -> Backend:
        if self.backend is not None:
            raise HarnessError("a backend is running already")
        t0 = time.monotonic()
        tag = "-" + version.version.replace(".", "")
        run = harness.RunDir(path=self.run.path / f"backend{tag}", ca=self.run.ca)
        (run.path / "s2sproxy").mkdir(parents=True)
        os.chmod(run.path, 0o755)
        dns_port = harness.free_port(udp_too=True)
        backend_port = harness.free_port()
        metrics_port = harness.free_port()
        ej = WorldEjabberd(run, self.trust, "ejabberd", BACKEND_C2S_IP, SERVED,
                           backend_dns_port=dns_port, version=version)
        config = write_proxy_config(run, self.trust, backend_port=backend_port,
                                    backend_dns_port=dns_port, metrics_port=metrics_port)
        ej.start(60)
        try:
            proxy = harness.start_s2sproxy(run, config_path=config, backend_port=backend_port,
                                           dns_port=dns_port, listen_host=PROXY_IP)
        except BaseException:
            ej.stop()
            raise
        self.backend = Backend(tag, version, ej, proxy, metrics_port, run)
        try:
            ej.register_all(tag)
            for server in self.remotes.values():
                server.register_all(tag)
        except BaseException:
            self.stop_backend()
            raise
        self.timings[f"backend {version.version} started"] = time.monotonic() - t0
        return self.backend

    def stop_backend(self) -> None:
        if self.backend is not None:
            b, self.backend = self.backend, None
            b.stop()

    def stop(self) -> None:
        errors = []
        for part in (self.stop_backend, self.ejr.stop, self.p13.stop, self.p12.stop,
                     self.ejr_dns.stop, self.dns.stop):
            try:
                part()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]
