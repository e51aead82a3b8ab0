"""The hostile-input suite (issue 7): a real ``twistd s2sproxy`` on loopback, attacked
by raw s2s clients, while one legitimate authenticated bidi stream (legit.test, SASL
EXTERNAL) sends an XEP-0199 ping to local.test every second and times the answer, which
s2sproxy itself gives: the delay it measures is s2sproxy's own.

    world       (conftest.py) module-scoped: the run directory, the proxy (and its pid), the legit
                stream's pinger, and the results table printed at the end
    Attacker    a raw client: plain, STARTTLS, SASL EXTERNAL with a certificate from
                the run's CA, or Direct TLS; sends bytes, reads until the server closes

No ejabberd is needed: s2sproxy's backend points at a closed port (nothing here is
meant to reach ejabberd).  The fixed addresses are the integration harness's
(s2sproxy on 127.0.0.30:5269/5270): one run at a time.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

import harness  # noqa: E402

AUTH_TIMEOUT = 4.0            # timeouts.auth in this suite's config
PER_SOURCE = 64               # limits.max_unauthenticated_per_source here
LEGIT = "legit.test"
HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          "xmlns:stream='http://etherx.jabber.org/streams' "
          "xmlns:db='jabber:server:dialback' from='{frm}' to='{to}' version='1.0'>")
CONFIG = f"""
[timeouts]
auth = {AUTH_TIMEOUT:g}

[limits]
max_unauthenticated_per_source = {PER_SOURCE}

[keepalive]
whitespace = 600
ping = 600
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise harness.HarnessError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pinger:
    """The legitimate stream: a ping to local.test every ``interval`` seconds; records
    (sent_at, rtt or None) per ping."""

    def __init__(self, run: harness.RunDir, interval: float = 1.0) -> None:
        self.peer = harness.RawPeer(run, domain=LEGIT).open(bidi=True)
        self.interval = interval
        self.samples: list[tuple[float, float | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            pid = f"legit-{n}"
            t0 = time.monotonic()
            self.peer.send(f"<iq type='get' id='{pid}' from='{LEGIT}' to='local.test'>"
                           f"<ping xmlns='urn:xmpp:ping'/></iq>")
            rtt = None
            needle = f"id='{pid}'".encode()
            while time.monotonic() - t0 < 10 and not self._stop.is_set():
                with self.peer._lock:
                    if needle in self.peer.received:
                        rtt = time.monotonic() - t0
                        break
                if self.peer.closed:
                    break
                time.sleep(0.002)
            self.samples.append((t0, rtt))
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - t0)))

    def worst_since(self, t: float) -> float:
        """The longest answer time of the pings sent since ``t`` (inf if one is
        unanswered, or if none was sent)."""
        got = [rtt for t0, rtt in self.samples if t0 >= t]
        if not got or any(r is None for r in got):
            return float("inf")
        return max(got)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.peer.close()


@dataclass
class Result:
    case: str
    answer: str
    close_s: float
    legit_worst_s: float
    rss_mib: float
    note: str = ""


@dataclass
class World:
    run: harness.RunDir
    proxy: harness.S2SProxy
    pinger: Pinger
    rss_start_kib: int
    metrics_port: int
    results: list[Result] = field(default_factory=list)
    _log_seen: int = 0

    def new_log(self) -> str:
        """The proxy's log since the last call."""
        text = self.proxy.log_text()
        new, self._log_seen = text[self._log_seen:], len(text)
        return new

    def metric(self, name: str) -> float:
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    @property
    def pid(self) -> int:
        return self.proxy.proc.pid

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024


class Attacker:
    """A raw s2s client.  ``stage``: "tcp" (nothing sent), "header" (stream header
    sent, features read), "tls" (STARTTLS done, header and features read again),
    "auth" (SASL EXTERNAL as ``domain`` with a certificate from the run's CA)."""

    def __init__(self, run: harness.RunDir, domain: str = "evil.test",
                 source: str = "127.0.0.1", direct_tls: bool = False) -> None:
        self.run, self.domain, self.source = run, domain, source
        self.direct_tls = direct_tls
        self.sock: socket.socket | None = None
        self.data = b""

    def _ctx(self, cert: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if cert:
            d = self.run.path / "attackers"
            d.mkdir(exist_ok=True)
            crt, key = d / f"{self.domain}.crt", d / f"{self.domain}.key"
            if not crt.exists():
                self.run.ca.issue(self.domain).write(crt, key)
            ctx.load_cert_chain(crt, key)
        return ctx

    def connect(self, stage: str = "header", to: str = "local.test") -> "Attacker":
        port = harness.PROXY_DIRECT_TLS_PORT if self.direct_tls else harness.PROXY_STARTTLS_PORT
        self.sock = socket.create_connection((harness.PROXY_IP, port), timeout=10,
                                             source_address=(self.source, 0))
        if self.direct_tls:
            self.sock = self._ctx(stage == "auth").wrap_socket(self.sock,
                                                               server_hostname=to)
        if stage == "tcp":
            return self
        header = HEADER.format(frm=self.domain, to=to).encode()
        self.send(header)
        self.read_until(b"</stream:features>")
        if stage == "header" or self.direct_tls and stage == "tls":
            return self
        if not self.direct_tls:
            self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
            self.read_until(b"<proceed")
            self.sock = self._ctx(stage == "auth").wrap_socket(self.sock,
                                                               server_hostname=to)
            self.send(header)
            self.read_until(b"</stream:features>")
        if stage == "tls":
            return self
        self.send(b"<bidi xmlns='urn:xmpp:bidi'/><auth xmlns='urn:ietf:params:xml:ns:"
                  b"xmpp-sasl' mechanism='EXTERNAL'>=</auth>")
        self.read_until(b"<success")
        self.send(header)
        self.read_until(b"</stream:features>")
        return self

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.data:
            if time.monotonic() > deadline:
                raise harness.HarnessError(f"attacker: no {marker!r} in {self.data[-300:]!r}")
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise harness.HarnessError(f"attacker: closed before {marker!r}: "
                                           f"{self.data[-300:]!r}")
            self.data += chunk
        return self.data

    def until_closed(self, timeout: float) -> float:
        """Read until the server closes the connection; seconds it took (inf if it
        did not within ``timeout``)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            self.sock.settimeout(max(0.05, timeout - (time.monotonic() - t0)))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except (ConnectionResetError, ssl.SSLError, OSError):
                return time.monotonic() - t0
            if not chunk:
                return time.monotonic() - t0
            self.data += chunk
        return float("inf")

    def condition(self) -> str:
        """The stream error condition the server sent, or "" if none."""
        m = re.search(rb"<stream:error><([a-z-]+) xmlns='urn:ietf:params:xml:ns:xmpp-streams'",
                      self.data)
        return m.group(1).decode() if m else ""

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def print_table(w: World, write) -> None:
    """The figures of every case, one line each (through pytest's terminal, so that
    they show in a normal run)."""
    write("")
    write(f"hostile suite: s2sproxy RSS at start {w.rss_start_kib / 1024:.1f} MiB")
    write("| case | answer | time to close (s) | legit stream worst answer (s) "
          "| RSS after (MiB) | note |")
    write("|---|---|---|---|---|---|")
    for r in w.results:
        write(f"| {r.case} | {r.answer} | {r.close_s:.2f} | {r.legit_worst_s:.3f} "
              f"| {r.rss_mib:.1f} | {r.note} |")
