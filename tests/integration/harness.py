"""Real-peer integration harness: ejabberd 24.12, Prosody 0.12 and s2sproxy on loopback.

Everything here is synchronous and callable from plain pytest tests; XMPP clients
(slixmpp) run in their own asyncio loop in a worker thread.

Addresses (fixed, loopback only)::

    127.0.0.10   ejabberd   local.test   c2s 5222, s2s 5269 (direct) or 15269 (internal)
    127.0.0.20   Prosody    remote.test  c2s 5222, s2s 5269
    127.0.0.30   s2sproxy   public       5269 STARTTLS, 5270 Direct TLS
    127.0.0.1    s2sproxy   backend listener and DNS responder (free ports per run)

Typical use (conftest.py wraps this in the ``federation`` fixture)::

    run = RunDir.create()                          # /tmp/s2sproxy-it-*, throwaway CA
    fed = start_federation(run, via_proxy=True, bidi=True, prosody_trusts_ca=True,
                           ejabberd_starttls="required")  # alice and bob registered
    fed.start_proxy()                              # s2sproxy on 127.0.0.30:5269/5270
    got = fed.send(BOB, ALICE, "hi")               # bob@remote.test -> alice@local.test
    fed.prosody.s2s_sessions(); fed.ejabberd.log_text(); fed.proxy.log_text()
    fed.stop(); run.cleanup()

Lower-level pieces: TestCA/Leaf, Ejabberd, Prosody, start_servers,
write_s2sproxy_config/start_s2sproxy, DnsResponder, erlang_srv_lookup, Client,
exchange/send_and_receive, peer_processes.

Every process started here is stopped here, by its pid, with bounded waits.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from versions import EJABBERD_2412, PROSODY_012, PeerVersion  # tests/integration/versions.py

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
REPO_ROOT = HERE.parent.parent

LOCAL_DOMAIN = "local.test"
REMOTE_DOMAIN = "remote.test"
EJABBERD_IP = "127.0.0.10"
PROSODY_IP = "127.0.0.20"
PROXY_IP = "127.0.0.30"
C2S_PORT = 5222
S2S_PORT = 5269
PROXY_STARTTLS_PORT = 5269
PROXY_DIRECT_TLS_PORT = 5270
PROSODY_DIRECT_TLS_PORT = 5270
EJABBERD_INTERNAL_S2S_PORT = 15269   # deploy/ejabberd/ejabberd-s2sproxy.yml
EJABBERD_INTERNAL_IP = "127.0.0.1"

INSTALL_HINT = """\
Install the real peers (as root, Debian 12):
  echo 'deb http://deb.debian.org/debian bookworm-backports main' > /etc/apt/sources.list.d/backports.list
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y prosody lua-unbound
  DEBIAN_FRONTEND=noninteractive apt-get install -y -t bookworm-backports ejabberd
  DEBIAN_FRONTEND=noninteractive apt-get install -y knot haproxy
(or run scripts/install-peers)"""


class HarnessError(Exception):
    """Something the harness started did not behave; the message says what and where."""


# -- tools and environment ----------------------------------------------------------

def missing_tools() -> list[str]:
    """Names of the external programs the harness needs but cannot find."""
    need = ["ejabberdctl", "prosody", "prosodyctl"]
    if os.geteuid() == 0:
        need.append("setpriv")
    return [t for t in need if _which(t) is None]


def require_tools() -> None:
    """Raise HarnessError (with the apt commands) if ejabberd or Prosody is missing,
    or if we are not root (ejabberdctl only runs as root or as user ejabberd)."""
    missing = missing_tools()
    if missing:
        raise HarnessError(f"missing {', '.join(missing)}.\n{INSTALL_HINT}")
    if os.geteuid() != 0:
        raise HarnessError("the real-peer tests must run as root: ejabberdctl switches to "
                           "user ejabberd and Prosody is started as user prosody")
    for user in ("ejabberd", "prosody"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise HarnessError(f"system user {user!r} is missing.\n{INSTALL_HINT}") from None


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def free_port(host: str = "127.0.0.1", udp_too: bool = False) -> int:
    """A port that is free on ``host`` for TCP (and UDP when ``udp_too``) right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if udp_too:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((host, port))
            except OSError:
                continue
        return port
    raise HarnessError(f"no free port found on {host}")


def tcp_ready(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_listening(host: str, port: int) -> bool:
    """True if a TCP socket listens on host:port (or the IPv4 wildcard).

    Reads /proc/net/tcp, so it opens no connection (nothing appears in the
    server's log); falls back to a connect where /proc/net/tcp is unreadable."""
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return tcp_ready(host, port)
    want = {f"{socket.htonl(int(ipaddress.IPv4Address(host))):08X}:{port:04X}",
            f"00000000:{port:04X}"}
    return any(r.split()[1] in want and r.split()[3] == "0A" for r in rows if r.strip())


FIXED_LISTENERS = {
    (EJABBERD_IP, C2S_PORT): "ejabberd c2s", (EJABBERD_IP, S2S_PORT): "ejabberd s2s",
    (EJABBERD_INTERNAL_IP, EJABBERD_INTERNAL_S2S_PORT): "ejabberd internal s2s",
    (PROSODY_IP, C2S_PORT): "Prosody c2s", (PROSODY_IP, S2S_PORT): "Prosody s2s",
    (PROXY_IP, PROXY_STARTTLS_PORT): "s2sproxy STARTTLS",
    (PROXY_IP, PROXY_DIRECT_TLS_PORT): "s2sproxy Direct TLS",
}


def check_fixed_ports_free() -> None:
    """Raise HarnessError if something already listens where a run puts its servers
    (a leftover of an earlier run, or another run at the same time)."""
    busy = [f"{name} {h}:{p}" for (h, p), name in FIXED_LISTENERS.items()
            if tcp_listening(h, p)]
    if busy:
        raise HarnessError(f"already in use: {', '.join(busy)}; peer processes running: "
                           f"{peer_processes()}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1, on_timeout: Callable[[], str] | None = None) -> None:
    """Poll ``predicate`` until it is true; raise HarnessError naming ``what`` after
    ``timeout`` seconds (with ``on_timeout()`` appended, e.g. a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            extra = on_timeout() if on_timeout else ""
            raise HarnessError(f"timed out after {timeout:g} s waiting for {what}"
                               + (f"\n{extra}" if extra else ""))
        time.sleep(interval)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"({path}: not there)"
    return f"--- last {lines} lines of {path}:\n" + "\n".join(text.splitlines()[-lines:])


# -- processes ----------------------------------------------------------------------

def _proc_entries() -> Iterable[tuple[int, int, str, str]]:
    """(pid, ppid, comm, cmdline) for every process we can see."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        yield int(d), ppid, comm, cmd


def descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (children first)."""
    children: dict[int, list[int]] = {}
    for p, pp, _c, _cmd in _proc_entries():
        children.setdefault(pp, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(0), []):
            out.append(c)
            todo.append(c)
    return out


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def peer_processes(run_dir: str | Path | None = None) -> list[tuple[int, str, str]]:
    """Live beam.smp / epmd / Prosody (lua) processes as (pid, comm, cmdline).

    With ``run_dir``, beam and lua processes only count when their command line
    names that directory (so concurrent runs elsewhere are not blamed); epmd always
    counts, since the harness never needs one (ERL_DIST_PORT)."""
    out = []
    for pid, _pp, comm, cmd in _proc_entries():
        if pid == os.getpid() or not pid_alive(pid):
            continue
        is_beam = comm.startswith("beam")
        is_epmd = comm == "epmd"
        is_prosody = comm.startswith("lua") and "prosody" in cmd or comm == "prosody"
        if not (is_beam or is_epmd or is_prosody):
            continue
        if run_dir is not None and not is_epmd and str(run_dir) not in cmd:
            continue
        out.append((pid, comm, cmd))
    return out


def kill_and_wait(pid: int, timeout: float = 10.0, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to ``pid``; after ``timeout`` send SIGKILL.  True if it exited
    within ``timeout`` after the first signal."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    try:
        wait_for(lambda: not pid_alive(pid), timeout, f"pid {pid} to exit")
        return True
    except HarnessError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_for(lambda: not pid_alive(pid), 5, f"pid {pid} to die after SIGKILL")
        return False


def _finish_popen(proc: subprocess.Popen, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _run(cmd: Sequence[str], timeout: float, what: str, env: dict | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise HarnessError(f"{what}: timed out after {timeout:g} s: {' '.join(cmd)}\n"
                           f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
    if check and res.returncode != 0:
        raise HarnessError(f"{what}: exit {res.returncode}: {' '.join(cmd)}\n"
                           f"stdout: {res.stdout}\nstderr: {res.stderr}")
    return res


def _chown_tree(path: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, pw.pw_uid, pw.pw_gid)
        for n in dirs + files:
            os.chown(os.path.join(root, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _fill(template: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    if "@" in text:
        import re
        left = sorted(set(re.findall(r"@[A-Z_0-9]+@", text)))
        if left:
            raise HarnessError(f"{template}: unfilled placeholders {left}")
    return text


# -- certificates -------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """A leaf certificate issued by the test CA."""
    domain: str
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def chain_pem(self) -> bytes:
        """Leaf first, then the CA (what s2sproxy and Prosody want)."""
        return self.cert_pem + self.ca_pem

    def write(self, cert_path: Path, key_path: Path | None = None, *, owner: str | None = None,
              chain: bool = True, combined: bool = False) -> None:
        """Write the certificate (with the CA after it when ``chain``) and key (0600).

        ``combined``: key, leaf and CA in the one file ``cert_path`` (ejabberd certfiles)."""
        cert_path = Path(cert_path)
        if combined:
            _write_private(cert_path, self.key_pem + self.chain_pem, owner)
            return
        cert_path.write_bytes(self.chain_pem if chain else self.cert_pem)
        os.chmod(cert_path, 0o644)
        if owner:
            pw = pwd.getpwnam(owner)
            os.chown(cert_path, pw.pw_uid, pw.pw_gid)
        if key_path is not None:
            _write_private(Path(key_path), self.key_pem, owner)


def _write_private(path: Path, data: bytes, owner: str | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)
    if owner:
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)


class TestCA:
    """Per-run throwaway CA (EC P-256 by default, ``key_type="rsa"`` for RSA 2048)."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "s2sproxy integration test CA", key_type: str = "ec") -> None:
        self.key_type = key_type
        self.key = self._new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "s2sproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {secrets.token_hex(4)}"),
        ])
        pub = self.key.public_key()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _new_key(self):
        if self.key_type == "rsa":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(ec.SECP256R1())

    def issue(self, domain: str, *, client_auth: bool = True, server_auth: bool = True,
              extra_names: Sequence[str] = (), days: int = 30) -> Leaf:
        """A leaf for ``domain`` (SAN DNS), EKU serverAuth (+ clientAuth unless
        ``client_auth=False``)."""
        key = self._new_key()
        pub = key.public_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        ekus = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_auth else []) + \
               ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
            .issuer_name(self.cert.subject)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=self.key_type == "rsa", data_encipherment=False,
                key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(n) for n in (domain, *extra_names)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Leaf(
            domain=domain,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            ca_pem=self.cert_pem,
        )


# -- run directory ------------------------------------------------------------------

@dataclass
class RunDir:
    """Per-run directory under /tmp holding every config, cert, spool and log.

    Layout: ca.crt, ca.key, ejabberd/ (owned by ejabberd), prosody/ (owned by
    prosody), s2sproxy/, s2sproxy.log, dns-queries.log."""
    path: Path
    ca: TestCA
    keep: bool = False

    @classmethod
    def create(cls, prefix: str = "s2sproxy-it-", key_type: str = "ec") -> "RunDir":
        path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        os.chmod(path, 0o755)  # ejabberd and prosody must traverse it
        ca = TestCA(key_type=key_type)
        (path / "ca.crt").write_bytes(ca.cert_pem)
        os.chmod(path / "ca.crt", 0o644)
        _write_private(path / "ca.key", ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), None)
        for sub in ("ejabberd", "prosody", "s2sproxy"):
            (path / sub).mkdir(mode=0o755)
        return cls(path=path, ca=ca)

    @property
    def ca_file(self) -> Path:
        return self.path / "ca.crt"

    def cleanup(self) -> None:
        """Remove the directory unless ``keep`` (set it to look at logs afterwards)."""
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


# -- ejabberd -----------------------------------------------------------------------

class Ejabberd:
    """ejabberd 24.12 serving local.test, own config dir / spool / logs in the run dir.

    ``s2s_port``: 5269 when federating directly, 15269 behind s2sproxy (the
    "listen change").  ``dns_port``: the one DNS responder its inetrc names
    (127.0.0.1).  ``starttls``: s2s_use_starttls, "required" or "optional".
    ``trusts_ca``: s2s_cafile is the test CA (SASL EXTERNAL possible).
    ``version``: which ejabberd runs it (versions.py; EJABBERD_2301 has no bidi)."""

    c2s_ip = EJABBERD_IP    # where wait_ready looks for the c2s listener

    def __init__(self, run: RunDir, *, dns_port: int, s2s_port: int = EJABBERD_INTERNAL_S2S_PORT,
                 s2s_ip: str = EJABBERD_IP, starttls: str = "required", trusts_ca: bool = True,
                 bidi: bool = False, loglevel: str = "info", leaf: Leaf | None = None,
                 behind_proxy: bool = False, version: PeerVersion = EJABBERD_2412,
                 nameservers: Sequence[tuple[str, int]] = ()) -> None:
        """``nameservers``: the DNS responders its inetrc names, in order (default: the
        one at 127.0.0.1:``dns_port``)."""
        if starttls not in ("required", "optional", "true", "false"):
            raise ValueError(f"starttls={starttls!r}")
        if version.kind != "ejabberd":
            raise ValueError(f"version={version}: not an ejabberd")
        if bidi and not version.has_mod_s2s_bidi:
            raise ValueError(f"bidi=True: {version} has no mod_s2s_bidi")
        self.version = version  # versions.py: which ejabberdctl runs this node
        self.run = run
        self.dir = run.path / "ejabberd"
        self.config_dir = self.dir / "config"
        self.logs_dir = self.dir / "logs"
        self.spool_dir = self.dir / "spool"
        self.pidfile = self.dir / "ejabberd.pid"
        self.console_log = self.dir / "console.log"
        self.dns_port = dns_port
        self.s2s_ip, self.s2s_port = s2s_ip, s2s_port
        self.dist_port = free_port()
        self.node = f"ejabberd-it-{secrets.token_hex(3)}@localhost"
        self.proc: subprocess.Popen | None = None
        self.beam_pid: int | None = None
        self._started_pids: dict[int, str] = {}

        for d in (self.config_dir, self.logs_dir, self.spool_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.leaf = leaf or run.ca.issue(LOCAL_DOMAIN)
        certfile = self.config_dir / "local.test.pem"
        # ca_file (validates our own certfiles) is the test CA; s2s_cafile would
        # default to it, so "not trusted" means an unrelated CA there.
        other_ca = self.config_dir / "unrelated-ca.crt"
        if not trusts_ca:
            other_ca.write_bytes(TestCA("unrelated CA").cert_pem)
        self.leaf.write(certfile, combined=True)
        values = {
            "RUN": run.path, "CERTFILE": certfile, "C2S_IP": EJABBERD_IP,
            "S2S_IP": s2s_ip, "S2S_PORT": s2s_port, "S2S_USE_STARTTLS": starttls,
            "CA_FILE": run.ca_file, "S2S_CAFILE": run.ca_file if trusts_ca else other_ca,
            "MOD_S2S_BIDI_LINE": "  mod_s2s_bidi: {}" if bidi else "",
            "LOGLEVEL": loglevel, "NODE": self.node, "DIST_PORT": self.dist_port,
            "COOKIE": secrets.token_hex(16), "DNS_PORT": dns_port,
        }
        config = _fill("ejabberd.yml.in", values)
        inetrc = _fill("inetrc.in", values)
        if behind_proxy:
            # Exactly what deploy/EJABBERD.md tells operators to do, applied to a
            # stock configuration: merge the snippet, replace inetrc.
            config = apply_deploy_snippet(config, starttls)
            inetrc = (DEPLOY_DIR / "ejabberd" / "inetrc").read_text().replace(
                "{nameserver, {127,0,0,1}, 15353}", f"{{nameserver, {{127,0,0,1}}, {dns_port}}}")
        if nameservers:
            lines = [f"{{nameserver, {{{host.replace('.', ',')}}}, {port}}}."
                     for host, port in nameservers]
            inetrc = re.sub(r"\{nameserver, \{127,0,0,1\}, \d+\}\.", "\n".join(lines),
                            inetrc, count=1)
        (self.config_dir / "ejabberd.yml").write_text(config)
        (self.config_dir / "ejabberdctl.cfg").write_text(_fill("ejabberdctl.cfg.in", values))
        (self.config_dir / "inetrc").write_text(inetrc)
        _chown_tree(self.dir, "ejabberd")

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "ejabberd.log"

    def _ctl_base(self) -> list[str]:
        return [self.version.ejabberdctl, "--config-dir", str(self.config_dir),
                "--logs", str(self.logs_dir), "--spool", str(self.spool_dir)]

    def ctl(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``ejabberdctl --config-dir ... ARGS`` against this node."""
        return _run(self._ctl_base() + list(args), timeout, f"ejabberdctl {args[0] if args else ''}",
                    check=check, env=self.version.environ())

    def launch(self) -> None:
        """Start ``ejabberdctl ... foreground`` (returns at once; see wait_ready)."""
        if self.proc is not None:
            raise HarnessError("ejabberd already started")
        out = open(self.console_log, "ab")
        self.proc = subprocess.Popen(self._foreground_command(), stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=subprocess.STDOUT, cwd="/",
                                     start_new_session=True, env=self.version.environ())
        out.close()

    def _foreground_command(self) -> list[str]:
        return self._ctl_base() + ["foreground"]

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``ejabberdctl status`` until the node reports started (bounded)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout

        def started() -> bool:
            if self.proc.poll() is not None:
                raise HarnessError(f"ejabberd exited with {self.proc.returncode} while starting\n"
                                   + self._diagnostics())
            if not tcp_listening(self.c2s_ip, C2S_PORT):
                return False
            res = self.ctl("status", timeout=max(1.0, deadline - time.monotonic()), check=False)
            return res.returncode == 0

        wait_for(started, timeout, "ejabberd to start (ejabberdctl status)", interval=0.2,
                 on_timeout=self._diagnostics)
        self._remember_pids()

    def _remember_pids(self) -> None:
        assert self.proc is not None
        self._started_pids = {p: _comm(p) for p in descendants(self.proc.pid)}
        try:
            self.beam_pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            beams = [p for p in self._started_pids if _comm(p).startswith("beam")]
            self.beam_pid = beams[0] if beams else None

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def register(self, user: str, password: str) -> None:
        self.ctl("register", user, LOCAL_DOMAIN, password)

    def stop(self, timeout: float = 20.0) -> None:
        """``ejabberdctl stop``, then wait for the beam pid; SIGKILL what is left."""
        if self.proc is None:
            return
        if self.beam_pid is None or not self._started_pids:
            self._remember_pids()
        if self.proc.poll() is None:
            try:
                self.ctl("stop", timeout=15, check=False)
            except HarnessError:
                pass
            deadline = time.monotonic() + timeout
            for pid in ([self.beam_pid] if self.beam_pid else []) + [self.proc.pid]:
                try:
                    wait_for(lambda: not pid_alive(pid), max(0.1, deadline - time.monotonic()),
                             f"ejabberd pid {pid} to exit")
                except HarnessError:
                    kill_and_wait(pid, 5, signal.SIGKILL)
        _finish_popen(self.proc, 10)
        for pid, comm in self._started_pids.items():  # erl_child_setup, inet_gethost, su
            if pid_alive(pid) and _comm(pid) == comm:
                kill_and_wait(pid, 5)
        self.proc = None

    def log_text(self) -> str:
        """ejabberd.log of this run ('' if it does not exist yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        return "\n".join([tail(self.console_log, 30), tail(self.log_path, 30),
                          tail(self.logs_dir / "error.log", 20)])


DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"


def apply_deploy_snippet(config_text: str, starttls: str) -> str:
    """Merge deploy/ejabberd/ejabberd-s2sproxy.yml into an ejabberd.yml as an operator
    would: its ejabberd_s2s_in listener replaces ours, its top-level keys replace ours,
    its modules are added and mod_s2s_bidi is removed.  ``starttls`` picks one of the two
    s2s_use_starttls values the snippet allows."""
    import yaml  # test-only dependency (the snippet is YAML)

    config = yaml.safe_load(config_text)
    snippet = yaml.safe_load((DEPLOY_DIR / "ejabberd" / "ejabberd-s2sproxy.yml").read_text())
    config["listen"] = [entry for entry in config["listen"]
                        if entry.get("module") != "ejabberd_s2s_in"] + snippet.pop("listen")
    modules = snippet.pop("modules")
    config["modules"].pop("mod_s2s_bidi", None)
    config["modules"].update(modules)
    config.update(snippet)
    assert config["s2s_use_starttls"] in ("optional", "required")
    config["s2s_use_starttls"] = starttls
    return ("### stock test configuration + deploy/ejabberd/ejabberd-s2sproxy.yml\n"
            + yaml.safe_dump(config, sort_keys=False))


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# -- Prosody ------------------------------------------------------------------------

class Prosody:
    """Prosody 0.12 serving remote.test on 127.0.0.20, run as user prosody.

    ``local_test_address``: where local.test resolves for Prosody (its hoststxt):
    127.0.0.30 (s2sproxy) or 127.0.0.10 (ejabberd, direct federation).
    ``bidi``: load mod_s2s_bidi.  ``trusts_ca``: ssl.cafile is the test CA, so
    peers' certificates verify and SASL EXTERNAL is possible; otherwise dialback.
    ``version``: which Prosody runs it (versions.py, e.g. PROSODY_13).  ``pubsub``: also
    serve a XEP-0060 service (a mod_pubsub component) of that domain, bob its admin."""

    def __init__(self, run: RunDir, *, local_test_address: str = PROXY_IP, bidi: bool = True,
                 trusts_ca: bool = True, ip: str = PROSODY_IP, leaf: Leaf | None = None,
                 extra_hosts: dict[str, str] | None = None,
                 version: PeerVersion = PROSODY_012, debug_log: bool = True,
                 pubsub: str | None = None) -> None:
        if version.kind != "prosody":
            raise ValueError(f"version={version}: not a Prosody")
        self.version = version  # versions.py: which prosody/prosodyctl run it
        self.run = run
        self.dir = run.path / "prosody"
        self.ip = ip
        self.config = self.dir / "prosody.cfg.lua"
        self.admin_socket = self.dir / "data" / "prosody.sock"
        self.proc: subprocess.Popen | None = None
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        hosts = {LOCAL_DOMAIN: local_test_address, REMOTE_DOMAIN: ip, "localhost": "127.0.0.1"}
        hosts.update(extra_hosts or {})
        (self.dir / "hosts").write_text("".join(f"{a} {n}\n" for n, a in hosts.items()))
        # Nothing listens on 127.0.0.1:53; libunbound never leaves loopback.
        (self.dir / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        self.leaf = leaf or run.ca.issue(REMOTE_DOMAIN)
        self.leaf.write(self.dir / "remote.test.crt", self.dir / "remote.test.key")
        ssl_global = (f'ssl = {{\n\tcafile = "{run.ca_file}";\n}}' if trusts_ca else
                      "-- ssl.cafile not set: the test CA is not trusted (dialback)")
        config = _fill("prosody.cfg.lua.in", {
            "RUN": run.path, "IP": ip,
            "BIDI_LINE": '\t"s2s_bidi";' if bidi else "\t-- s2s_bidi off",
            "SSL_GLOBAL": ssl_global,
        })
        if pubsub:
            # A XEP-0060 service (mod_pubsub) as its own domain, bob its admin (who may
            # create nodes and publish), with a certificate of its own for s2s.
            run.ca.issue(pubsub).write(self.dir / f"{pubsub}.crt", self.dir / f"{pubsub}.key")
            config += (f'\nComponent "{pubsub}" "pubsub"\n'
                       f'\tadmins = {{ "{BOB.jid}" }}\n'
                       f'\tssl = {{\n\t\tcertificate = "{self.dir}/{pubsub}.crt";\n'
                       f'\t\tkey = "{self.dir}/{pubsub}.key";\n\t}}\n')
        if not debug_log:   # benchmarks: a debug line per stanza would be what they measure
            config = "\n".join(line for line in config.split("\n")
                                if not line.lstrip().startswith("debug = "))
        self.config.write_text(config)
        _chown_tree(self.dir, "prosody")

    @property
    def log_path(self) -> Path:
        return self.dir / "prosody.log"

    @property
    def debug_log_path(self) -> Path:
        return self.dir / "prosody.debug.log"

    def launch(self) -> None:
        if self.proc is not None:
            raise HarnessError("prosody already started")
        cmd = [self.version.prosody, "-F", "--config", str(self.config)]
        if os.geteuid() == 0:
            cmd = [_which("setpriv") or "setpriv", "--reuid=prosody", "--regid=prosody",
                   "--init-groups"] + cmd
        out = open(self.dir / "console.log", "ab")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, cwd=str(self.dir),
                                     start_new_session=True, env=self.version.environ())
        out.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll until the admin socket accepts a connection (bounded)."""
        assert self.proc is not None

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise HarnessError(f"prosody exited with {self.proc.returncode} while starting\n"
                                   + self._diagnostics())
            if not self.admin_socket.exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.admin_socket))
                except OSError:
                    return False
            return tcp_listening(self.ip, C2S_PORT) and tcp_listening(self.ip, S2S_PORT)

        wait_for(ready, timeout, "prosody to start (admin socket)", on_timeout=self._diagnostics)

    def start(self, timeout: float = 15.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def prosodyctl(self, *args: str, timeout: float = 20.0,
                   check: bool = True) -> subprocess.CompletedProcess:
        return _run([self.version.prosodyctl, "--config", str(self.config), *args], timeout,
                    f"prosodyctl {args[0] if args else ''}", check=check,
                    env=self.version.environ())

    def register(self, user: str, password: str) -> None:
        self.prosodyctl("register", user, REMOTE_DOMAIN, password)

    def shell(self, *command: str, timeout: float = 15.0) -> str:
        """``prosodyctl --config F shell CMD...`` output, e.g. shell("s2s", "show")
        runs ``s2s:show()``."""
        return self.prosodyctl("shell", *command, timeout=timeout).stdout

    def s2s_show(self) -> str:
        """Output of ``prosodyctl --config F shell s2s show`` (--> out, <-- in)."""
        return self.shell("s2s", "show")

    def s2s_sessions(self) -> list[dict[str, str]]:
        """``s2s show`` parsed: one dict per row, keys from the header (lowercased):
        session id, host, dir ("-->" out, "<--" in, "<->" bidi), remote, ipv,
        security, sasl, dialback.  (The Dialback column reads "Not used" even on
        a stream dialback authenticated: check the log for that.)"""
        return parse_s2s_show(self.s2s_show())

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the Prosody pid and wait (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            kill_and_wait(self.proc.pid, timeout)
        _finish_popen(self.proc, 5)
        self.proc = None

    def log_text(self, debug: bool = False) -> str:
        try:
            return (self.debug_log_path if debug else self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def _diagnostics(self) -> str:
        return "\n".join([tail(self.dir / "console.log", 20), tail(self.log_path, 30)])


def parse_s2s_show(text: str) -> list[dict[str, str]]:
    """Rows of Prosody 0.12 ``s2s show`` output as dicts keyed by the header."""
    rows = [line for line in text.splitlines() if "|" in line]
    if not rows:
        return []
    head = [h.strip().lower() for h in rows[0].split("|")]
    return [dict(zip(head, (c.strip() for c in r.split("|")))) for r in rows[1:]]


def start_servers(*servers, timeout: float = 30.0) -> None:
    """Launch all servers at once, then wait for each to be ready (stops the ones
    that started if any fails)."""
    launched = []
    try:
        for s in servers:
            s.launch()
            launched.append(s)
        with ThreadPoolExecutor(len(servers)) as ex:
            futs = [ex.submit(s.wait_ready, timeout) for s in servers]
            errors = [f.exception() for f in futs]
        errors = [e for e in errors if e is not None]
        if errors:
            raise errors[0]
    except BaseException:
        for s in launched:
            try:
                s.stop()
            except Exception:
                pass
        raise


# -- s2sproxy -----------------------------------------------------------------------

def metrics(port: int) -> dict[str, float]:
    """s2sproxy's /metrics as {'name{labels}': value}."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@dataclass
class S2SProxy:
    """A running s2sproxy (twistd -n) started by start_s2sproxy()."""
    proc: subprocess.Popen
    config_path: Path
    log_path: Path
    backend_port: int
    dns_port: int
    console_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by pid, wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc.poll() is None:
            kill_and_wait(self.proc.pid, timeout)
        _finish_popen(self.proc, 5)
        return self.proc.returncode


def write_s2sproxy_config(run: RunDir, *, backend_port: int, dns_port: int,
                          backend_tls: str = "auto", log_level: str = "debug",
                          remotes: dict[str, Sequence[str]] | None = None,
                          nameservers: Sequence[str] | None = None,
                          leaf: Leaf | None = None, extra_toml: str = "",
                          trusts_ca: bool = True, name: str = "s2sproxy",
                          listen_host: str = PROXY_IP, proxy_protocol: bool = False,
                          backend_host: str = "127.0.0.1", srv_port: int | None = None,
                          secret_file: Path | None = None, dns_host: str = "127.0.0.1") -> Path:
    """Write RUN/s2sproxy/s2sproxy.toml (and local.test cert/key) and return its path.

    ``remotes``: ``{"remote.test": ["127.0.0.20:5269"]}`` by default (STARTTLS
    addresses that bypass DNS).  ``nameservers``: s2sproxy's own resolvers
    (``["127.0.0.1:PORT"]``, e.g. a DnsResponder) so it never asks the machine's
    resolver; None leaves ``dns.nameservers`` out.  ``dns.allow_private_targets`` is
    always set: every peer here is on loopback.  ``extra_toml`` is appended verbatim (new
    tables only, e.g. ``[limits]``)."""
    d = run.path / name
    d.mkdir(exist_ok=True)
    leaf = leaf or run.ca.issue(LOCAL_DOMAIN)
    leaf.write(d / "local.test.crt", d / "local.test.key")
    if remotes is None:
        remotes = {REMOTE_DOMAIN: [f"{PROSODY_IP}:{S2S_PORT}"]}
    q = _toml_str
    pp = "haproxy:" if proxy_protocol else ""
    lines = [
        f"secret_file = {q(secret_file or d / 'dialback.secret')}",
        "",
        "[[domain]]",
        f"name = {q(LOCAL_DOMAIN)}",
        f"certificate = {q(d / 'local.test.crt')}",
        f"key = {q(d / 'local.test.key')}",
        "",
        "[public]",
        f"starttls = [{q(f'{pp}tcp:{PROXY_STARTTLS_PORT}:interface={listen_host}')}]",
        f"direct_tls = [{q(f'{pp}tcp:{PROXY_DIRECT_TLS_PORT}:interface={listen_host}')}]",
        "",
        "[backend]",
        f"host = {q(EJABBERD_INTERNAL_IP)}",
        f"port = {EJABBERD_INTERNAL_S2S_PORT}",
        f"tls = {q(backend_tls)}",
        f"listen = {q(f'tcp:{backend_port}:interface={backend_host}')}",
        f"srv_target = {q('localhost')}",
    ] + ([f"srv_port = {srv_port}"] if srv_port else []) + [
        f"dns_address = {q(dns_host)}",
        f"dns_port = {dns_port}",
        "",
        "[trust]",
        "system_cas = false",
    ] + ([f"ca_file = {q(run.ca_file)}"] if trusts_ca else []) + [
        "",
    ]
    for name, addrs in remotes.items():
        lines += [f"[remote.{q(name)}]",
                  f"starttls = [{', '.join(q(a) for a in addrs)}]", ""]
    # Everything here runs on loopback: remotes found through DNS are private addresses.
    lines += ["[dns]", "allow_private_targets = true"]
    if nameservers is not None:
        lines += [f"nameservers = [{', '.join(q(n) for n in nameservers)}]"]
    lines.append("")
    lines += ["[log]", f"level = {q(log_level)}", ""]
    lines += ["[control]", f"socket = {q(d / 'control.sock')}", ""]
    if extra_toml:
        lines.append(extra_toml)
    path = d / "s2sproxy.toml"
    path.write_text("\n".join(lines))
    return path


def _toml_str(v: object) -> str:
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def s2sproxy_command(config_path: Path, log_path: Path, python: str = sys.executable) -> list[str]:
    """``twistd -n --logfile LOG --pidfile '' s2sproxy --config FILE`` run with ``python``.

    (``python -m twisted`` is ``twist``, not ``twistd``: it has no ``-n``/``--logfile``,
    so twistd is run through its entry point.)"""
    return [python, "-c", "import sys; from twisted.scripts.twistd import run; "
                          "sys.argv[0] = 'twistd'; run()",
            "-n", "--logfile", str(log_path), "--pidfile", "",
            "s2sproxy", "--config", str(config_path)]


def start_s2sproxy(run: RunDir, *, backend_port: int | None = None, dns_port: int | None = None,
                   config_path: Path | None = None, python: str = sys.executable,
                   timeout: float = 20.0, listen_host: str = PROXY_IP,
                   name: str = "s2sproxy", **config_kw) -> S2SProxy:
    """Write the config (unless ``config_path``), start s2sproxy, and wait until
    127.0.0.30:5269 accepts TCP connections (bounded by ``timeout``).

    Ports default to free ones; pass the same ``dns_port`` you gave Ejabberd."""
    backend_port = backend_port or free_port()
    dns_port = dns_port or free_port(udp_too=True)
    if config_path is None:
        config_path = write_s2sproxy_config(run, backend_port=backend_port, dns_port=dns_port,
                                            name=name, listen_host=listen_host, **config_kw)
    log_path = run.path / f"{name}.log"
    console = run.path / f"{name}.console.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in
                                        env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = open(console, "ab")
    proc = subprocess.Popen(s2sproxy_command(config_path, log_path, python), env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            cwd=str(run.path / name), start_new_session=True)
    out.close()
    proxy = S2SProxy(proc, config_path, log_path, backend_port, dns_port, console)

    def ready() -> bool:
        if proc.poll() is not None:
            raise HarnessError(f"s2sproxy exited with {proc.returncode} while starting\n"
                               + tail(console, 30) + "\n" + tail(log_path, 30))
        return tcp_listening(listen_host, PROXY_STARTTLS_PORT)

    try:
        wait_for(ready, timeout, f"s2sproxy to listen on {listen_host}:{PROXY_STARTTLS_PORT}",
                 on_timeout=lambda: tail(console, 30) + "\n" + tail(log_path, 30))
    except BaseException:
        proxy.stop()
        raise
    return proxy


# -- a tiny DNS responder (for direct-federation tests, no reactor) -----------------

class DnsResponder:
    """Authoritative-only DNS responder on 127.0.0.1 (UDP and TCP) in daemon threads.

    Uses twisted.names.dns for the wire format only (no reactor).  ``srv`` maps an
    SRV owner name to a list of (priority, weight, port, target); ``a`` maps names
    to IPv4 addresses.  Anything else gets NXDOMAIN.  ``queries`` records every
    (name, type name, transport) asked, so a test can prove who ejabberd asked."""

    def __init__(self, srv: dict[str, list[tuple[int, int, int, str]]] | None = None,
                 a: dict[str, str] | None = None, host: str = "127.0.0.1",
                 port: int = 0, ttl: int = 60) -> None:
        self.srv = {k.lower().rstrip("."): v for k, v in (srv or {}).items()}
        self.a = {k.lower().rstrip("."): v for k, v in (a or {}).items()}
        self.ttl = ttl
        self.queries: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        port = port or free_port(host, udp_too=True)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, port))
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, port))
        self.tcp.listen(16)
        self.host, self.port = host, port
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve_udp, daemon=True),
                         threading.Thread(target=self._serve_tcp, daemon=True)]

    def __enter__(self) -> "DnsResponder":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for s in (self.udp, self.tcp):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(2)

    def asked(self, name: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [q for q in self.queries if q[0] == name.lower()]

    def answer(self, data: bytes, transport: str) -> bytes | None:
        from twisted.names import dns
        msg = dns.Message()
        try:
            msg.fromStr(data)
        except Exception:
            return None
        resp = dns.Message(id=msg.id, answer=1, opCode=msg.opCode, recDes=msg.recDes,
                           recAv=0, auth=1)
        resp.queries = msg.queries
        for q in msg.queries:
            name = q.name.name.decode("ascii", "replace").lower().rstrip(".")
            with self._lock:
                self.queries.append((name, dns.QUERY_TYPES.get(q.type, str(q.type)), transport))
            if q.type == dns.SRV and name in self.srv:
                for prio, weight, port, target in self.srv[name]:
                    resp.answers.append(dns.RRHeader(
                        name=name, type=dns.SRV, ttl=self.ttl, auth=True,
                        payload=dns.Record_SRV(prio, weight, port, target, ttl=self.ttl)))
            elif q.type == dns.A and name in self.a:
                resp.answers.append(dns.RRHeader(name=name, type=dns.A, ttl=self.ttl, auth=True,
                                                 payload=dns.Record_A(self.a[name],
                                                                      ttl=self.ttl)))
            elif name not in self.srv and name not in self.a:
                resp.rCode = dns.ENAME
        return resp.toStr()

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.udp.recvfrom(4096)
            except OSError:
                return
            out = self.answer(data, "udp")
            if out:
                try:
                    self.udp.sendto(out, addr)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    hdr = _recv_exact(conn, 2)
                    data = _recv_exact(conn, struct.unpack("!H", hdr)[0])
                    out = self.answer(data, "tcp")
                    if out:
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    pass


def erlang_srv_lookup(name: str, dns_port: int, dns_host: str = "127.0.0.1",
                      timeout: float = 20.0) -> str:
    """What ejabberd's resolver makes of a DNS responder's answer: runs
    ``inet_res:getbyname(NAME, srv)`` in a throwaway ``erl`` whose inetrc names
    only ``dns_host:dns_port`` (the same lines as the ejabberd template), and
    returns the printed Erlang term, e.g.
    ``{ok,{hostent,"_xmpp-server._tcp.x",[],srv,1,[{0,0,15270,"localhost"}]}}``.

    inet_res is stricter than most clients: it rejects a reply that does not copy
    the query's RD bit (``{error,unknown}``)."""
    erl = _which("erl")
    if erl is None:
        raise HarnessError(f"erl not found (it comes with ejabberd).\n{INSTALL_HINT}")
    with tempfile.NamedTemporaryFile("w", suffix=".inetrc", delete=False) as f:
        a = ",".join(str(int(x)) for x in dns_host.split("."))
        f.write(f'{{resolv_conf, ""}}.\n{{nameserver, {{{a}}}, {dns_port}}}.\n')
        rc = f.name
    try:
        env = dict(os.environ, ERL_INETRC=rc)
        expr = f'io:format("~p~n", [inet_res:getbyname("{name}", srv, 5000)]), halt().'
        res = _run([erl, "-noshell", "-start_epmd", "false", "-eval", expr], timeout,
                   "erl inet_res", env=env)
        return " ".join(res.stdout.split())
    finally:
        os.unlink(rc)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("short read")
        buf += chunk
    return buf


# -- XMPP clients (slixmpp, asyncio in a worker thread) ------------------------------

@dataclass(frozen=True)
class Account:
    jid: str
    password: str
    host: str
    port: int = C2S_PORT

    @property
    def bare(self) -> str:
        return self.jid.split("/", 1)[0]


ALICE = Account("alice@local.test", "alice-pw-1", EJABBERD_IP)
BOB = Account("bob@remote.test", "bob-pw-1", PROSODY_IP)


@dataclass
class Received:
    """A message stanza a client received."""
    from_: str
    to: str
    body: str
    type: str
    elapsed: float = 0.0
    xml: str = ""


def run_async(coro_factory: Callable[[], "asyncio.Future"], timeout: float = 60.0):
    """Run ``coro_factory()`` with asyncio.run in a fresh worker thread (so pytest's
    main thread, and any Twisted reactor there, are untouched); return its result
    or raise its exception.  ``timeout`` bounds the whole thing."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(asyncio.wait_for(coro_factory(), timeout))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            result["error"] = e

    t = threading.Thread(target=target, name="xmpp-clients", daemon=True)
    t.start()
    t.join(timeout + 10)
    if t.is_alive():
        raise HarnessError(f"client scenario did not finish within {timeout + 10:g} s")
    if "error" in result:
        err = result["error"]
        if isinstance(err, asyncio.TimeoutError):
            raise HarnessError(f"client scenario timed out after {timeout:g} s") from err
        raise err  # type: ignore[misc]
    return result.get("value")


class Client:
    """A slixmpp ClientXMPP wrapper for use inside a coroutine run by run_async.

    ``await Client.connected(account, ca_file)`` returns a session-started client
    (STARTTLS, certificate verified against the test CA); ``messages`` is an
    asyncio.Queue of Received; ``errors`` collects stream/auth failures."""

    def __init__(self, account: Account, ca_file: Path | None, resource: str = "it",
                 feature: str | None = None) -> None:
        import slixmpp
        jid = account.jid if "/" in account.jid else f"{account.jid}/{resource}"
        self.account = account
        self.xmpp = slixmpp.ClientXMPP(jid, account.password)
        self.xmpp.enable_direct_tls = False   # port 5222 is STARTTLS
        self.xmpp.enable_starttls = True
        self.xmpp.enable_plaintext = False
        if ca_file is not None:
            self.xmpp.ca_certs = Path(ca_file)
        else:
            import ssl
            self.xmpp.ssl_context.check_hostname = False
            self.xmpp.ssl_context.verify_mode = ssl.CERT_NONE
        for plugin in ("xep_0030", "xep_0115", "xep_0199"):
            self.xmpp.register_plugin(plugin)
        if feature:  # distinct caps hash per client (see lab README)
            self.xmpp.plugin["xep_0030"].add_feature(feature)
        self.messages: asyncio.Queue[Received] = asyncio.Queue()
        self.errors: list[str] = []
        self._t0 = time.monotonic()
        self._started = asyncio.get_running_loop().create_future()
        self.xmpp.add_event_handler("session_start", self._on_session_start)
        self.xmpp.add_event_handler("message", self._on_message)
        # slixmpp reports type='error' messages (bounces) as message_error only.
        self.xmpp.add_event_handler("message_error", self._on_message)
        for ev in ("failed_auth", "connection_failed", "stream_error", "session_end"):
            self.xmpp.add_event_handler(ev, self._failure(ev))

    @classmethod
    async def connected(cls, account: Account, ca_file: Path | None, timeout: float = 15.0,
                        **kw) -> "Client":
        c = cls(account, ca_file, **kw)
        c.xmpp.connect(account.host, account.port)
        try:
            await asyncio.wait_for(asyncio.shield(c._started), timeout)
        except asyncio.TimeoutError:
            c.xmpp.abort()
            raise HarnessError(f"{account.jid}: no session within {timeout:g} s via "
                               f"{account.host}:{account.port}; errors: {c.errors}") from None
        except BaseException:
            c.xmpp.abort()
            raise
        return c

    async def _on_session_start(self, _event) -> None:
        self.xmpp.send_presence()
        try:
            await self.xmpp.get_roster(timeout=10)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"roster: {e!r}")
        if not self._started.done():
            self._started.set_result(True)

    def _on_message(self, msg) -> None:
        self.messages.put_nowait(Received(
            from_=str(msg["from"]), to=str(msg["to"]), body=str(msg["body"]),
            type=str(msg["type"]), elapsed=time.monotonic() - self._t0, xml=str(msg)))

    def _failure(self, name: str):
        def handler(event) -> None:
            self.errors.append(f"{name}: {event!r}"[:500])
            if name != "session_end" and not self._started.done():
                self._started.set_exception(HarnessError(
                    f"{self.account.jid}: {name}: {event!r}"[:500]))
        return handler

    def send_message(self, to: str, body: str, mtype: str = "chat") -> None:
        self.xmpp.send_message(mto=to, mbody=body, mtype=mtype)

    async def wait_message(self, timeout: float = 20.0,
                           match: Callable[[Received], bool] | None = None) -> Received:
        """Next received message (matching ``match``); HarnessError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HarnessError(f"{self.account.jid}: no message within {timeout:g} s")
            try:
                m = await asyncio.wait_for(self.messages.get(), left)
            except asyncio.TimeoutError:
                raise HarnessError(f"{self.account.jid}: no message within {timeout:g} s") \
                    from None
            if match is None or match(m):
                return m

    async def close(self, timeout: float = 5.0) -> None:
        try:
            await asyncio.wait_for(self.xmpp.disconnect(wait=1), timeout)
        except Exception:  # noqa: BLE001
            self.xmpp.abort()


async def delivered_or_bounced(a: "Client", b: "Client", recipient: Account, body: str,
                               timeout: float) -> tuple[str, str]:
    """``a`` sends ``body`` to ``recipient`` (``b``'s account): ("delivered", ""),
    ("bounced", the error stanza's XML) or ("nothing", ""), whichever comes first."""
    a.send_message(recipient.bare, body)
    got = asyncio.ensure_future(b.wait_message(timeout, match=lambda m: m.body == body))
    err = asyncio.ensure_future(a.wait_message(timeout, match=lambda m: m.type == "error"))
    done, pending = await asyncio.wait({got, err}, return_when=asyncio.FIRST_COMPLETED)
    for f in pending:
        f.cancel()
    for f in done:
        f.exception()
    if got in done and got.exception() is None:
        return "delivered", ""
    if err in done and err.exception() is None:
        return "bounced", err.result().xml
    return "nothing", ""


async def exchange(sender: Account, recipient: Account, body: str, *,
                   ca_file: Path | None, timeout: float = 20.0) -> Received:
    """Coroutine: connect both, send ``body`` sender -> recipient, wait until the
    recipient receives it.  Errors bounced to the sender are reported."""
    a = b = None
    try:
        a, b = await asyncio.gather(
            Client.connected(sender, ca_file, feature="urn:s2sproxy:test:sender"),
            Client.connected(recipient, ca_file, feature="urn:s2sproxy:test:recipient"))
        t0 = time.monotonic()
        a.send_message(recipient.bare, body)

        async def bounced() -> Received:
            return await a.wait_message(timeout, match=lambda m: m.type == "error")

        got = asyncio.ensure_future(b.wait_message(timeout, match=lambda m: m.body == body))
        err = asyncio.ensure_future(bounced())
        done, pending = await asyncio.wait({got, err}, return_when=asyncio.FIRST_COMPLETED)
        for f in pending:
            f.cancel()
        for f in done:
            f.exception()  # retrieved here, so asyncio never warns about it
        if got in done and got.exception() is None:
            r = got.result()
            r.elapsed = time.monotonic() - t0
            return r
        if err in done and err.exception() is None:
            raise HarnessError(f"message {sender.jid} -> {recipient.jid} bounced: "
                               f"{err.result().xml}")
        raise HarnessError(f"{recipient.jid} did not receive {body!r} within {timeout:g} s "
                           f"(and no error came back to {sender.jid})")
    finally:
        await asyncio.gather(*(c.close() for c in (a, b) if c is not None))


def send_and_receive(sender: Account, recipient: Account, body: str, *,
                     ca_file: Path | None, timeout: float = 20.0) -> Received:
    """Synchronous wrapper of exchange(): returns what the recipient received."""
    return run_async(lambda: exchange(sender, recipient, body, ca_file=ca_file,
                                      timeout=timeout), timeout + 40)


# -- whole topologies ---------------------------------------------------------------

@dataclass
class Federation:
    """Everything one scenario started; ``stop()`` stops it all (reverse order)."""
    run: RunDir
    ejabberd: Ejabberd
    prosody: Prosody
    dns_port: int
    backend_port: int
    proxy: S2SProxy | None = None
    dns: DnsResponder | None = None
    proxy_dns: DnsResponder | None = None
    alice: Account = ALICE
    bob: Account = BOB
    _stopped: bool = field(default=False, repr=False)

    def start_proxy(self, **kw) -> S2SProxy:
        """start_s2sproxy() with this federation's ports; s2sproxy's own resolver
        is ``proxy_dns`` (a DnsResponder that answers NXDOMAIN to everything unless
        given records), so it never leaves loopback."""
        if self.proxy is not None and self.proxy.proc.poll() is None:
            raise HarnessError("s2sproxy already running")
        if "nameservers" not in kw and "config_path" not in kw:
            if self.proxy_dns is None:
                self.proxy_dns = DnsResponder()
                self.proxy_dns.start()
            kw["nameservers"] = [f"127.0.0.1:{self.proxy_dns.port}"]
        self.proxy = start_s2sproxy(self.run, backend_port=self.backend_port,
                                    dns_port=self.dns_port, **kw)
        return self.proxy

    def send(self, sender: Account, recipient: Account, body: str,
             timeout: float = 20.0) -> Received:
        return send_and_receive(sender, recipient, body, ca_file=self.run.ca_file,
                                timeout=timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        errors = []
        for part in (self.proxy, self.ejabberd, self.prosody, self.dns, self.proxy_dns):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]


def start_federation(run: RunDir, *, via_proxy: bool = True, bidi: bool = True,
                     prosody_trusts_ca: bool = True, ejabberd_trusts_ca: bool = True,
                     ejabberd_starttls: str = "required", start_proxy: bool = False,
                     dns: DnsResponder | None = None, quiet: bool = False,
                     ejabberd_nameservers: Sequence[tuple[str, int]] = (),
                     prosody_version: PeerVersion = PROSODY_012,
                     prosody_pubsub: str | None = None,
                     **proxy_kw) -> Federation:
    """Start ejabberd and Prosody (in parallel) and register alice and bob.

    ``via_proxy=True``: ejabberd s2s on 127.0.0.10:15269, its inetrc names the
    s2sproxy DNS port, Prosody resolves local.test to 127.0.0.30; s2sproxy is
    started too when ``start_proxy`` (else call ``fed.start_proxy()``).
    ``via_proxy=False``: direct federation; ejabberd s2s on 127.0.0.10:5269,
    Prosody resolves local.test to 127.0.0.10, ``dns`` (a DnsResponder, started
    here) answers ejabberd's SRV queries.  ``quiet``: no per-stanza logging (ejabberd
    at warning, no Prosody debug log), for benchmarks.  ``prosody_pubsub``: Prosody
    also serves a pubsub component of that domain (``Prosody(pubsub=)``)."""
    require_tools()
    check_fixed_ports_free()
    dns_port = dns.port if dns is not None else free_port(udp_too=True)
    backend_port = free_port()
    ej = Ejabberd(run, dns_port=dns_port, s2s_port=S2S_PORT, starttls=ejabberd_starttls,
                  trusts_ca=ejabberd_trusts_ca, behind_proxy=via_proxy,
                  loglevel="warning" if quiet else "info", nameservers=ejabberd_nameservers)
    pr = Prosody(run, local_test_address=PROXY_IP if via_proxy else EJABBERD_IP,
                 bidi=bidi, trusts_ca=prosody_trusts_ca, debug_log=not quiet,
                 version=prosody_version, pubsub=prosody_pubsub)
    fed = Federation(run, ej, pr, dns_port, backend_port, dns=dns)
    try:
        if dns is not None:
            dns.start()
        pr.register(BOB.jid.split("@")[0], BOB.password)  # internal storage: works offline
        start_servers(ej, pr)
        ej.register(ALICE.jid.split("@")[0], ALICE.password)
        if via_proxy and start_proxy:
            fed.start_proxy(**proxy_kw)
    except BaseException:
        fed.stop()
        raise
    return fed


def s2sproxy_cli(command: str, config: Path, *args: str,
                 timeout: float = 60.0) -> subprocess.CompletedProcess:
    """``python -m s2sproxy COMMAND --config CONFIG ARGS`` (status, check), as an
    operator runs it."""
    return subprocess.run([sys.executable, "-m", "s2sproxy", command, "--config",
                           str(config), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))


# -- HAProxy ----------------------------------------------------------------------------

class HAProxy:
    """HAProxy (the Debian package) in the foreground with deploy/haproxy/haproxy.cfg
    as it is, addresses given through its environment variables (``presetenv``)."""

    def __init__(self, run: RunDir, env: dict[str, str]) -> None:
        self.run = run
        self.env = env
        self.config = DEPLOY_DIR / "haproxy" / "haproxy.cfg"
        self.log_path = run.path / "haproxy.log"
        self.proc: subprocess.Popen | None = None

    def start(self, listen: tuple[str, int], timeout: float = 10.0) -> None:
        exe = _which("haproxy")
        if exe is None:
            raise HarnessError(f"haproxy not found.\n{INSTALL_HINT}")
        _run([exe, "-c", "-q", "-f", str(self.config)], 10, "haproxy -c",
             env=dict(os.environ, **self.env))
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([exe, "-db", "-f", str(self.config)],
                                     env=dict(os.environ, **self.env),
                                     stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        out.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise HarnessError(f"haproxy exited with {self.proc.returncode}\n"
                                   + tail(self.log_path))
            return tcp_listening(*listen)
        wait_for(ready, timeout, f"haproxy to listen on {listen[0]}:{listen[1]}",
                 on_timeout=lambda: tail(self.log_path))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_and_wait(self.proc.pid, timeout)
        if self.proc is not None:
            _finish_popen(self.proc, 5)


# -- a raw s2s peer ---------------------------------------------------------------------

class RawPeer:
    """A minimal remote server speaking raw s2s to s2sproxy's public listener: STARTTLS,
    SASL EXTERNAL with a certificate from the run's CA, bidi; then it sends whatever
    bytes a test gives it and collects what comes back (a reader thread).  For policy
    tests, where a real server would never send the unexpected stanzas."""

    HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              "xmlns:stream='http://etherx.jabber.org/streams' "
              "xmlns:db='jabber:server:dialback' from='{frm}' to='{to}' version='1.0'>")

    def __init__(self, run: RunDir, domain: str = "raw.test", to: str = LOCAL_DOMAIN,
                 address: tuple[str, int] = (PROXY_IP, PROXY_STARTTLS_PORT)) -> None:
        import ssl
        self.domain, self.to = domain, to
        d = run.path / "rawpeer"
        d.mkdir(exist_ok=True)
        run.ca.issue(domain).write(d / "peer.crt", d / "peer.key")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.load_cert_chain(d / "peer.crt", d / "peer.key")
        self.address = address
        self.sock = None
        self.received = b""
        self.closed = False
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def _read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        data = b""
        while marker not in data:
            if time.monotonic() > deadline:
                raise HarnessError(f"raw peer: no {marker!r} in {data[-300:]!r}")
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise HarnessError(f"raw peer: closed while waiting for {marker!r}: {data!r}")
            data += chunk
        return data

    def open(self, bidi: bool = True, tls: bool = True) -> "RawPeer":
        """Connect and authenticate (unless ``tls`` is False: then only the header)."""
        self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.sendall(self.HEADER.format(frm=self.domain, to=self.to).encode())
        self._read_until(b"</stream:features>")
        if not tls:
            return self
        self.sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self._read_until(b"<proceed")
        self.sock = self.ctx.wrap_socket(self.sock, server_hostname=self.to)
        self.sock.sendall(self.HEADER.format(frm=self.domain, to=self.to).encode())
        features = self._read_until(b"</stream:features>")
        if b"EXTERNAL" not in features:
            raise HarnessError(f"raw peer: EXTERNAL not offered: {features!r}")
        if bidi:
            self.sock.sendall(b"<bidi xmlns='urn:xmpp:bidi'/>")
        self.sock.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                          b"mechanism='EXTERNAL'>=</auth>")
        self._read_until(b"<success")
        self.sock.sendall(self.HEADER.format(frm=self.domain, to=self.to).encode())
        self._read_until(b"</stream:features>")
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()
        return self

    def _read_loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            if not chunk:
                break
            with self._lock:
                self.received += chunk
            # Answer s2sproxy's keepalive pings, as a live server would.
            for pid in re.findall(rb"<iq type='get' id='(s2sproxy-ping-\d+)'", chunk):
                self.sock.sendall(b"<iq type='result' id='" + pid + b"' from='"
                                  + self.domain.encode() + b"' to='" + self.to.encode()
                                  + b"'/>")
        self.closed = True

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def wait_for(self, needle: bytes, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if needle in self.received:
                    return self.received
            if self.closed:
                break
            time.sleep(0.05)
        raise HarnessError(f"raw peer: {needle!r} not received; got {self.received[-500:]!r}")

    def stop_reading(self) -> None:
        """Play dead: stop reading and never answer again (the socket stays open)."""
        self.closed = True
        if self._reader is not None:
            self._reader.join(2)

    def close(self) -> None:
        self.closed = True
        if self._reader is not None:
            self._reader.join(2)
        try:
            self.sock.close()
        except OSError:
            pass
