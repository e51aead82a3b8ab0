"""The test world's DNS server: Knot DNS (``knotd``, Debian's ``knot`` package) serving
zone files on loopback, by default on 127.0.0.53:53.

s2sproxy (``dns.nameservers``), ejabberd (inet_res, through its inetrc) and Prosody
(libunbound, forwarding to the ``nameserver`` of a resolv.conf, hence port 53) all
ask it.  Knot is authoritative only: it never recurses, so nothing a test asks ever
leaves the machine; a name outside its zones is answered REFUSED.

Typical use (synchronous, no reactor)::

    knot = KnotServer(run.path, {"example": '''
        _xmpp-server._tcp.multi  SRV 10 60 5269 xmpp1.multi
        xmpp1.multi              A   127.0.0.21
    '''})
    knot.start()                 # knotd -c run/knot/knot.conf, ready when every zone's
                                 # SOA is served over UDP
    knot.query("_xmpp-server._tcp.multi.example", "SRV")   # ['10 60 5269 xmpp1.multi.example.']
    knot.set_zone("example", "...")   # higher serial, knotc zone-reload, served
    knot.stop()                  # SIGTERM by pid, bounded wait, SIGKILL; idempotent

Files, all under ``run_dir/knot/``: ``knot.conf``, ``zones/ORIGIN.zone``, ``run/``
(pid file, knotc's control socket ``knot.sock``), ``db/`` (timer database) and
``knotd.log`` (the server logs to stderr, which goes there, so even a configuration
error before logging is set up is in the log).  knotd runs as the user running the
tests (the configuration has no ``user:``): root, for port 53.

What Knot wants (3.2, bookworm), found out while writing this:

* A zone without a SOA at its apex is not loaded (logged "missing SOA at the zone
  apex"); queries for its names are then answered SERVFAIL.  A missing NS is only a
  warning.  The class writes ``$ORIGIN``, ``$TTL 60``, the SOA (with the serial it
  manages: 1, then one more per ``set_zone``) and an NS ``knot-ns.ORIGIN.`` with an
  A (or AAAA) record of the listening address in front of the body.  So a body must
  not use ``knot-ns`` as an owner name, and every body line should start with an
  owner name (a line starting with blanks belongs to the previous owner; the body is
  dedented first, so an indented triple-quoted string is fine).
* A CNAME must be the only record at its name (RFC 1034): a zone with a CNAME next to
  any other record at the same owner is not loaded (a mandatory semantic check).
* An SRV record saying "no service" (RFC 2782) is written ``0 0 0 .``; on the wire
  its target is the root name, which twisted.names gives as an empty name and
  s2sproxy's resolver as the host ``"."``.
* Knot follows a CNAME chain within one zone in its answer; a chain leaving the zone
  ends in the answer at the last CNAME (the client must ask again).
* ``listen`` is ``ADDRESS@PORT``; without it knotd listens nowhere.  UDP sockets use
  SO_REUSEPORT (one per UDP worker), the TCP one does not: a second knotd on the same
  address fails to bind TCP and exits ("failed to configure server").  start() checks
  /proc/net for any UDP or TCP socket on address:port first and names its owner.
* ``server: rundir`` (pid file, control socket), ``database: storage`` (the timer
  database) and ``control: listen`` (the knotc socket) must point into the run
  directory, or knotd uses /run/knot and /var/lib/knot, shared with the system's.
* ``server: automatic-acl`` only concerns configured remotes (zone transfers,
  NOTIFY): not needed, there are none.  ``answer-rotation`` is off by default and
  left off: an RRset is always answered in the same (canonical) order, so a test's
  record order is deterministic; s2sproxy's weighting does its own randomisation.
* ``zonefile-sync: -1`` and ``journal-content: none``: knotd never writes to the zone
  files and keeps no journal, so each file is the whole truth; ``knotc zone-reload``
  reloads a zone without looking at the file's modification time (two writes in one
  second are not missed).
* knotd stops on SIGTERM (or SIGINT) within milliseconds; ``knotc stop`` is not used.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from harness import HarnessError, _which, kill_and_wait, tail, wait_for

DEFAULT_ADDRESS = "127.0.0.53"
DNS_PORT = 53
NS_LABEL = "knot-ns"
TTL = 60

KNOT_INSTALL_HINT = """\
Install Knot DNS (as root, Debian 12):
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y knot
(or run scripts/install-peers, which also stops and disables the system knot service)"""


class DnsQueryError(HarnessError):
    """A query got no answer, or an answer other than NOERROR and NXDOMAIN."""


def require_knot() -> tuple[str, str]:
    """Paths of knotd and knotc; HarnessError with the apt command if one is missing."""
    knotd, knotc = _which("knotd"), _which("knotc")
    missing = [n for n, p in (("knotd", knotd), ("knotc", knotc)) if p is None]
    if missing:
        raise HarnessError(f"missing {', '.join(missing)} (Debian package knot).\n"
                           f"{KNOT_INSTALL_HINT}")
    return knotd, knotc


def _origin(name: str) -> str:
    return name.strip().rstrip(".").lower()


# -- who holds a port ------------------------------------------------------------------

def _proc_hex(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """``ip`` as /proc/net/{tcp,udp}[6] print it: 32-bit words in host byte order."""
    b = ip.packed
    words = [b[i:i + 4] for i in range(0, len(b), 4)]
    if sys.byteorder == "little":
        words = [w[::-1] for w in words]
    return b"".join(words).hex().upper()


def _from_proc_hex(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw)


def socket_holders(address: str, port: int) -> list[str]:
    """Sockets that would keep knotd from binding ``address:port``: any UDP socket and
    any listening TCP socket on that address or a wildcard (0.0.0.0, ::), each as
    ``"UDP 127.0.0.53:53 (pid 123 knotd -c ...)"`` when its owner is visible."""
    ip = ipaddress.ip_address(address)
    wanted: dict[str, set[str]] = {}
    if ip.version == 4:
        v4 = {_proc_hex(ip), _proc_hex(ipaddress.IPv4Address("0.0.0.0"))}
        wanted["tcp"] = wanted["udp"] = v4
        mapped = ipaddress.IPv6Address(f"::ffff:{ip}")
        wanted["tcp6"] = wanted["udp6"] = {_proc_hex(mapped),
                                           _proc_hex(ipaddress.IPv6Address("::"))}
    else:
        wanted["tcp6"] = wanted["udp6"] = {_proc_hex(ip),
                                           _proc_hex(ipaddress.IPv6Address("::"))}
    found: list[tuple[str, str, str]] = []     # (protocol, local address, inode)
    for table, addrs in wanted.items():
        try:
            with open(f"/proc/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10:
                continue
            host, _, hexport = cols[1].partition(":")
            if host not in addrs or int(hexport, 16) != port:
                continue
            if table.startswith("tcp") and cols[3] != "0A":   # only LISTEN blocks a bind
                continue
            found.append((table[:3].upper(), host, cols[9]))
    if not found:
        return []
    owners = _socket_owners({inode for _, _, inode in found})
    out = []
    for proto, host, inode in found:
        ip = _from_proc_hex(host)
        where = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        owner = f" ({owners[inode]})" if inode in owners else ""
        out.append(f"{proto} {where}{owner}")
    return list(dict.fromkeys(out))    # one line per UDP worker socket is enough


def _socket_owners(inodes: set[str]) -> dict[str, str]:
    """inode -> "pid N COMMAND" for the sockets among ``inodes`` we can see."""
    owners: dict[str, str] = {}
    links = {f"socket:[{i}]": i for i in inodes}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{d}/fd/{fd}")
            except OSError:
                continue
            if target in links and links[target] not in owners:
                try:
                    with open(f"/proc/{d}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                owners[links[target]] = f"pid {d} {cmd.strip()[:120]}"
    return owners


# -- a stub client ---------------------------------------------------------------------

def _fqdn(name) -> str:
    text = name.name.decode("ascii", "replace")
    return f"{text}." if text else "."


def _present(rr) -> str:
    """A record's data in zone-file (presentation) form."""
    from twisted.names import dns
    p = rr.payload
    if rr.type in (dns.A, dns.AAAA):
        return socket.inet_ntop(socket.AF_INET if rr.type == dns.A else socket.AF_INET6,
                                p.address)
    if rr.type == dns.SRV:
        return f"{p.priority} {p.weight} {p.port} {_fqdn(p.target)}"
    if rr.type in (dns.CNAME, dns.NS, dns.PTR, dns.DNAME):
        return _fqdn(p.name)
    if rr.type == dns.MX:
        return f"{p.preference} {_fqdn(p.name)}"
    if rr.type == dns.SOA:
        return (f"{_fqdn(p.mname)} {_fqdn(p.rname)} {p.serial} {p.refresh} {p.retry} "
                f"{p.expire} {p.minimum}")
    if rr.type == dns.TXT:
        return " ".join('"' + d.decode("utf-8", "replace") + '"' for d in p.data)
    return repr(p)


def _rdtype(rdtype: str | int) -> int:
    from twisted.names import dns
    if isinstance(rdtype, int):
        return rdtype
    value = dns.REV_TYPES.get(rdtype.upper())
    if value is None:
        raise ValueError(f"unknown record type {rdtype!r}")
    return value


def ask(address: str, port: int, name: str, rdtype: str | int, timeout: float = 2.0):
    """One query over UDP (re-sent every 0.5 s until ``timeout``): the reply as a
    twisted.names ``dns.Message``; DnsQueryError when nothing came back."""
    from twisted.names import dns
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    qid = int.from_bytes(os.urandom(2), "big")
    msg = dns.Message(id=qid, recDes=0)
    msg.queries = [dns.Query(name.rstrip(".").encode("ascii") or b"", _rdtype(rdtype),
                             dns.IN)]
    data = msg.toStr()
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, port))
        while time.monotonic() < deadline:
            try:
                s.send(data)
            except OSError:          # ECONNREFUSED from an earlier ICMP: nobody there yet
                time.sleep(0.05)
                continue
            resend = min(deadline, time.monotonic() + 0.5)
            while time.monotonic() < resend:
                s.settimeout(max(0.01, resend - time.monotonic()))
                try:
                    reply = s.recv(65535)
                except (TimeoutError, socket.timeout):
                    break
                except OSError:       # ICMP port unreachable
                    time.sleep(0.05)
                    break
                answer = dns.Message()
                try:
                    answer.fromStr(reply)
                except Exception:  # noqa: BLE001 (not a DNS message: keep waiting)
                    continue
                if answer.id == qid and answer.answer:
                    return answer
    raise DnsQueryError(f"no answer from {address}:{port} to {name} {rdtype} "
                        f"within {timeout:g} s")


RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
          5: "REFUSED"}


# -- the server ------------------------------------------------------------------------

class KnotServer:
    """knotd serving ``zones`` (origin -> zone-file body) on ``address@port``.

    The body holds records only, with names relative to the origin or absolute; the
    class puts $ORIGIN, $TTL 60, SOA and NS in front (see the module docstring).  The
    files are written by the constructor; ``start()`` launches knotd."""

    def __init__(self, run_dir: Path, zones: dict[str, str], address: str = DEFAULT_ADDRESS,
                 port: int = DNS_PORT) -> None:
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback:
            raise ValueError(f"KnotServer listens on loopback only, not {address}")
        if not zones:
            raise ValueError("KnotServer needs at least one zone")
        self.address, self.port = str(ip), port
        self.dir = Path(run_dir) / "knot"
        self.conf_path = self.dir / "knot.conf"
        self.zones_dir = self.dir / "zones"
        self.rundir = self.dir / "run"
        self.storage = self.dir / "db"
        self.control_socket = self.rundir / "knot.sock"
        self._log_path = self.dir / "knotd.log"
        for d in (self.dir, self.zones_dir, self.rundir, self.storage):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.zones: dict[str, str] = {}
        self.serials: dict[str, int] = {}
        for origin, body in zones.items():
            origin = _origin(origin)
            self.zones[origin] = body
            self.serials[origin] = 1
            self._write_zone(origin)
        self._write_conf()
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._log_mark = 0
        self.startup_seconds: float | None = None   # launch until every SOA answered

    # -- properties --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def nameserver(self) -> str:
        """``"127.0.0.53:53"`` (``"[::1]:53"`` for IPv6), as s2sproxy's config wants."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- files -------------------------------------------------------------------------

    def zone_path(self, origin: str) -> Path:
        return self.zones_dir / f"{_origin(origin) or 'root'}.zone"

    def zone_text(self, origin: str) -> str:
        origin = _origin(origin)
        apex = f"{origin}." if origin else "."
        ns = f"{NS_LABEL}.{apex}" if origin else f"{NS_LABEL}."
        glue = "AAAA" if ":" in self.address else "A"
        body = textwrap.dedent(self.zones[origin]).strip("\n")
        return (f"; written by KnotServer (tests/integration/dns_server.py)\n"
                f"$ORIGIN {apex}\n"
                f"$TTL {TTL}\n"
                f"@ IN SOA {ns} hostmaster.{apex} {self.serials[origin]} 3600 600 86400 "
                f"{TTL}\n"
                f"@ IN NS {ns}\n"
                f"{ns} IN {glue} {self.address}\n"
                f"{body}\n")

    def _write_zone(self, origin: str) -> None:
        path = self.zone_path(origin)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.zone_text(origin))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)      # knotd never reads half a file

    def _write_conf(self) -> None:
        zones = "".join(f"  - domain: \"{o}.\"\n    file: \"{self.zone_path(o)}\"\n"
                        for o in self.zones)
        text = f"""\
# written by KnotServer (tests/integration/dns_server.py)
server:
    rundir: "{self.rundir}"
    pidfile: "{self.rundir}/knot.pid"
    listen: {self.address}@{self.port}
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
    answer-rotation: off

log:
  - target: stderr
    any: info

database:
    storage: "{self.storage}"

control:
    listen: "{self.control_socket}"

template:
  - id: default
    storage: "{self.zones_dir}"
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: none

zone:
{zones}"""
        tmp = self.conf_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.conf_path)

    # -- life --------------------------------------------------------------------------

    def __enter__(self) -> "KnotServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        """Launch knotd and wait (at most ``timeout`` s) until it serves every zone's
        SOA with the current serial over UDP; HarnessError (with the log tail) if not."""
        knotd, _knotc = require_knot()
        if self.running():
            raise HarnessError(f"knotd already running (pid {self.pid})")
        self._check_privileges()
        busy = socket_holders(self.address, self.port)
        if busy:
            raise HarnessError(f"cannot start knotd on {self.nameserver}: already in use: "
                               f"{'; '.join(busy)}")
        self._log_file = open(self._log_path, "ab")
        self._log_mark = self._log_size()
        t0 = time.monotonic()
        self.proc = subprocess.Popen([knotd, "-c", str(self.conf_path)],
                                     stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._serves_all, timeout, f"knotd (pid {self.pid}) to serve "
                     f"{', '.join(self.zones)} on {self.nameserver}",
                     interval=0.02, on_timeout=self._diagnostics)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0

    def _check_privileges(self) -> None:
        if os.geteuid() == 0:
            return
        try:
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
                first = int(f.read())
        except (OSError, ValueError):
            first = 1024
        if self.port < first:
            raise HarnessError(f"knotd on port {self.port} needs root (ports below {first} "
                               f"are privileged); run the tests as root")

    def _serves_all(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(f"knotd (pid {self.pid}) exited with status "
                               f"{self.proc.returncode}\n{self._diagnostics()}")
        self._raise_load_failures(self.zones)
        return all(self.served_serial(o, timeout=0.3) == s for o, s in self.serials.items())

    def served_serial(self, origin: str, timeout: float = 1.0) -> int | None:
        """The SOA serial knotd answers for ``origin`` now (None: no SOA answer)."""
        from twisted.names import dns
        try:
            reply = ask(self.address, self.port, _origin(origin), dns.SOA, timeout)
        except DnsQueryError:
            return None
        return next((rr.payload.serial for rr in reply.answers if rr.type == dns.SOA
                     and rr.payload is not None), None)

    def _log_size(self) -> int:
        try:
            return self._log_path.stat().st_size
        except OSError:
            return 0

    def _raise_load_failures(self, origins) -> None:
        """HarnessError at once when knotd logged, since ``_log_mark``, that it could
        not load one of ``origins`` (it then answers SERVFAIL, or keeps the old zone)."""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(self._log_mark)
                text = f.read().decode(errors="replace")
        except OSError:
            return
        for origin in origins:
            marker = f"[{origin}.] zone event 'load' failed"
            if marker in text:
                raise HarnessError(f"knotd could not load zone {origin} "
                                   f"({self.zone_path(origin)}):\n{self._diagnostics()}")

    def _diagnostics(self) -> str:
        return tail(self._log_path)

    def knotc(self, *args: str, timeout: float = 15.0) -> subprocess.CompletedProcess:
        """``knotc -c CONF ARGS``; HarnessError unless it succeeds."""
        _knotd, knotc = require_knot()
        cmd = [knotc, "-c", str(self.conf_path), "-t", str(int(timeout)), *args]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"timed out after {timeout + 5:g} s: {' '.join(cmd)}\n"
                               f"{self._diagnostics()}") from None
        if res.returncode != 0:
            raise HarnessError(f"exit {res.returncode}: {' '.join(cmd)}\nstdout: "
                               f"{res.stdout}\nstderr: {res.stderr}\n{self._diagnostics()}")
        return res

    def set_zone(self, origin: str, body: str, timeout: float = 10.0) -> int:
        """Replace the records of ``origin`` (a new origin adds a zone) with a higher
        serial; when running, reload it and wait until the new serial is served.
        Returns the new serial."""
        origin = _origin(origin)
        new = origin not in self.zones
        self.zones[origin] = body
        self.serials[origin] = self.serials.get(origin, 0) + 1
        self._write_zone(origin)
        if new:
            self._write_conf()
        if self.running():
            self._log_mark = self._log_size()
            if new:
                self.knotc("reload")          # re-reads knot.conf: the new zone
            else:
                self.knotc("-b", "zone-reload", f"{origin}.")
            serial = self.serials[origin]

            def served() -> bool:
                self._raise_load_failures([origin])
                return self.served_serial(origin, timeout=0.3) == serial
            wait_for(served, timeout,
                     f"knotd to serve {origin} serial {serial}", interval=0.02,
                     on_timeout=self._diagnostics)
        return self.serials[origin]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM by pid, at most ``timeout`` s, then SIGKILL; reaps it.  Idempotent."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                kill_and_wait(proc.pid, timeout, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- queries -----------------------------------------------------------------------

    def query(self, name: str, rdtype: str | int, timeout: float = 2.0) -> list[str]:
        """The ``rdtype`` records of ``name`` in the answer section, in zone-file form
        (``"10 60 5269 xmpp1.multi.example."``, ``"127.0.0.20"``, ``"::1"``); [] for
        NXDOMAIN or no such record.  A CNAME chain knotd follows is skipped over (ask
        for CNAME to see it).  DnsQueryError for no answer, SERVFAIL, REFUSED, ..."""
        want = _rdtype(rdtype)
        reply = ask(self.address, self.port, name, want, timeout)
        if reply.rCode not in (0, 3):
            raise DnsQueryError(f"{name} {rdtype}: {RCODES.get(reply.rCode, reply.rCode)} "
                                f"from {self.nameserver}")
        return [_present(rr) for rr in reply.answers if rr.type == want]
