"""End-to-end benchmark: a real ``twistd s2sproxy`` beside reference relays, same run.

    python bench/bench_e2e.py [--count N] [--rounds R] [--relays byte,lxml,s2sproxy]
    python bench/bench_e2e.py --latency [--rate 10000] [--seconds 10]
    python bench/bench_e2e.py --idle 1000 [--burst 16384]

Every relay is a process of its own, pinned to core 0 (where ``os.sched_setaffinity``
exists and there are two cores or more); the sender and the sink are two more
processes on the other core.  All on loopback, 127.0.3.1, free ports.

Relays (TLS 1.3 on both legs unless named otherwise):

* ``byte``: Twisted TCP relay, TCP_NODELAY on both sockets, bytes forwarded untouched;
* ``lxml``: the naive relay: ``etree.XMLPullParser`` on the stream, every top-level
  element re-serialised with ``etree.tostring`` (one write per read);
* ``s2sproxy``: ``twistd -n s2sproxy``, plain backend leg (``backend.tls = "never"``);
* ``s2sproxy-tls``: the same with STARTTLS on the backend leg (``backend.tls = "auto"``);
* ``s2sproxy-pure``: ``s2sproxy`` with the Python framer (``S2SPROXY_PURE_PYTHON=1``),
  the fallback where the compiled framer is not built;
* ``s2sproxy-out`` (throughput only): the other direction, ejabberd to the remote.  The
  sink opens ejabberd's outgoing stream to s2sproxy's backend listener (plain, dialback:
  it answers s2sproxy's ``db:verify`` on its own listener) and writes the stanzas; the
  sender negotiated bidi (XEP-0288) on its stream and counts them as they come back;
* ``direct`` (latency mode only): no relay, the sender writes to the sink.

The sender opens a real s2s stream to s2sproxy (STARTTLS, SASL EXTERNAL with a
certificate for remote.bench from a throwaway CA, restart); to the reference relays
it speaks TLS then a stream header.  It sends one warm-up stanza (s2sproxy opens its
backend stream on demand), waits until the sink saw it, then writes N ~253-byte
stanzas (chat messages; 1 in 4 a presence with caps) in 64 KiB writes.  The sink
plays ejabberd's internal listener for s2sproxy (header, features, ``db:result``
answered 'valid') and counts stanza ends.

Figures: stanzas/s = N / (last stanza received - first byte sent), both
CLOCK_MONOTONIC on this machine; relay CPU = utime + stime (+ children) of the relay
process from /proc/PID/stat over the same span.  It prints figures; it asserts
nothing about them.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import queue
import re
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from s2sproxy.core.limits import MEMORY_TRIM_INTERVAL, PARSER_RELEASE_IDLE  # noqa: E402

HOST = "127.0.3.1"
LOCAL, REMOTE = "local.bench", "remote.bench"
NS_HEAD = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
           "xmlns:stream='http://etherx.jabber.org/streams' "
           "xmlns:db='jabber:server:dialback' from='{frm}' to='{to}' version='1.0'{extra}>")
MSG = (b"<message from='juliet@remote.bench/balcony' to='romeo@local.bench/orchard' "
       b"type='chat' id='%s'><body>Wherefore art thou, Romeo? Deny thy father and "
       b"refuse thy name, Juliet!!</body>"
       b"<active xmlns='http://jabber.org/protocol/chatstates'/>"
       b"</message>")
PRES = (b"<presence from='juliet@remote.bench/balcony' to='romeo@local.bench' id='%s'>"
        b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
        b"node='https://bench.example/client/desktop1' ver='q07IKJEyjvHSyhy//CH0CxmKi8w='/>"
        b"<priority>5</priority></presence>")
ENDS = (b"</message>", b"</presence>")


def _swap(template: bytes) -> bytes:
    return (template.replace(b"from='juliet@remote.bench/balcony'", b"from='@@'")
            .replace(b"to='romeo@local.bench/orchard'", b"to='juliet@remote.bench/balcony'")
            .replace(b"to='romeo@local.bench'", b"to='juliet@remote.bench'")
            .replace(b"from='@@'", b"from='romeo@local.bench/orchard'"))


MSG_OUT, PRES_OUT = _swap(MSG), _swap(PRES)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def stanza(i: int, ident: bytes | None = None, out: bool = False) -> bytes:
    ident = ident if ident is not None else b"%08d" % i
    if out:     # local.bench -> remote.bench (the s2sproxy-out direction)
        return (PRES_OUT if i % 4 == 3 else MSG_OUT) % ident
    return (PRES if i % 4 == 3 else MSG) % ident


# -- process plumbing ----------------------------------------------------------------

def _child_setup(core: int | None) -> None:
    """preexec_fn: pin to ``core``, die with the parent (PR_SET_PDEATHSIG), own group."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG
    except OSError:
        pass
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Child:
    """A process we started: JSON lines on stdout, commands on stdin."""
    live: list["Child"] = []

    def __init__(self, name: str, cmd: list[str], core: int | None, cwd: str | None = None,
                 env: dict | None = None, stdout_json: bool = True,
                 log: Path | None = None) -> None:
        self.name = name
        self.lines: queue.Queue = queue.Queue()
        err = open(log, "ab") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE if stdout_json else err,
                                     stderr=err, cwd=cwd, env=env,
                                     preexec_fn=lambda: _child_setup(core),
                                     start_new_session=True)
        if log:
            err.close()
        Child.live.append(self)
        if stdout_json:
            threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line.decode(errors='replace')}")
        self.lines.put(None)

    def expect(self, key: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no {key!r} within {timeout:g} s")
            try:
                msg = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if msg is None:
                raise RuntimeError(f"{self.name}: exited ({self.proc.poll()}) "
                                   f"before {key!r}")
            if key in msg:
                return msg
            if "error" in msg:
                raise RuntimeError(f"{self.name}: {msg['error']}")

    def send(self, obj: dict) -> None:
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        self.proc.stdin.flush()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        if self in Child.live:
            Child.live.remove(self)

    @classmethod
    def stop_all(cls) -> None:
        for c in list(reversed(cls.live)):
            c.stop()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state): utime 14, stime 15, cutime 16, cstime 17
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def wake_ups(pid: int) -> int:
    """Voluntary context switches of the process's main thread: how often its reactor
    found nothing to do and slept in epoll_wait."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE // 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: Child, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{proc.name}: not listening on {HOST}:{port} after {timeout:g} s")


# -- TLS material ------------------------------------------------------------------

class Material:
    """Throwaway CA, leaves for local.bench (relays, s2sproxy, sink) and remote.bench."""

    def __init__(self, d: Path) -> None:
        from harness import TestCA
        self.dir = d
        ca = TestCA("s2sproxy bench CA")
        self.ca = d / "ca.crt"
        self.ca.write_bytes(ca.cert_pem)
        for name, dom in (("local", LOCAL), ("remote", REMOTE)):
            ca.issue(dom).write(d / f"{name}.crt", d / f"{name}.key")

    def args(self) -> list[str]:
        return ["--dir", str(self.dir)]


def server_ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "local.crt", d / "local.key")
    return ctx


def client_ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(d / "remote.crt", d / "remote.key")
    return ctx


def emit(**kw) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def read_until(sock, buf: bytes, marker: bytes | tuple[bytes, ...],
               timeout: float = 30.0) -> tuple[bytes, bytes]:
    """Read until ``marker`` (or the first of several); returns (data up to and
    including it, the rest)."""
    markers = marker if isinstance(marker, tuple) else (marker,)
    deadline = time.monotonic() + timeout
    while not any(m in buf for m in markers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {marker!r} in {buf[-300:]!r}")
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed while waiting for {marker!r}: {buf[-300:]!r}")
        buf += chunk
    i = min(buf.index(m) + len(m) for m in markers if m in buf)
    return buf[:i], buf[i:]


def read_header(sock, buf: bytes) -> bytes:
    """Read a stream header (``<stream:stream ...>``); return what follows it."""
    deadline = time.monotonic() + 30
    while True:
        m = re.search(rb"<stream:stream[^>]*>", buf)
        if m:
            return buf[m.end():]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no stream header in {buf[-300:]!r}")
        sock.settimeout(5)
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"closed before a stream header: {buf!r}")
        buf += chunk


# -- sink ---------------------------------------------------------------------------

def run_sink(a) -> None:
    """Accept connections; ``--mode raw`` (TLS, then count), ``xmpp`` or ``xmpp-tls``
    (ejabberd's internal listener, then count).  Emits ready, warm, done."""
    d = Path(a.dir)
    sctx = server_ctx(d)
    threading.stack_size(512 * 1024)
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(4096)
    expect = a.count + 1
    state = {"count": 0, "last": 0.0, "warm": False, "done": False}
    lat: list[int] = []
    lock = threading.Lock()
    idre = re.compile(rb"id=['\"]L(\d+)")

    def conn(sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rest = b""
            if a.mode == "raw":
                sock = sctx.wrap_socket(sock, server_side=True)
            else:
                rest = read_header(sock, b"")
                hdr = NS_HEAD.format(frm=LOCAL, to=REMOTE,
                                     extra=" id='sink%d'" % id(sock)).encode()
                if a.mode == "xmpp-tls":
                    sock.sendall(hdr + b"<stream:features><starttls xmlns='urn:ietf:"
                                 b"params:xml:ns:xmpp-tls'><required/></starttls>"
                                 b"</stream:features>")
                    _, rest = read_until(sock, rest, b"<starttls")
                    sock.sendall(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    sock = sctx.wrap_socket(sock, server_side=True)
                    rest = read_header(sock, b"")
                sock.sendall(hdr + b"<stream:features><dialback xmlns='urn:xmpp:features:"
                             b"dialback'><errors/></dialback></stream:features>")
                head, rest = read_until(sock, rest, (b"</db:result>", b"</db:verify>"))
                if b"</db:verify>" in head:
                    # s2sproxy checks the key the sink's outgoing stream gave it
                    # (s2sproxy-out): the sink is ejabberd's authoritative server.
                    v = head.rsplit(b"<db:verify", 1)[1]
                    sock.sendall(b"<db:verify from='%s' to='%s' id='%s' type='valid'/>" % (
                        re.search(rb"to=['\"]([^'\"]+)", v).group(1),
                        re.search(rb"from=['\"]([^'\"]+)", v).group(1),
                        re.search(rb"id=['\"]([^'\"]+)", v).group(1)))
                    while sock.recv(65536):
                        pass
                    return
                frm = re.search(rb"from=['\"]([^'\"]+)", head.rsplit(b"<db:result", 1)[1])
                to = re.search(rb"to=['\"]([^'\"]+)", head.rsplit(b"<db:result", 1)[1])
                sock.sendall(b"<db:result from='%s' to='%s' type='valid'/>"
                             % (to.group(1), frm.group(1)))
            sock.settimeout(None)
            tails = [b"", b""]
            pending = b""
            chunk = rest
            while True:
                if chunk:
                    now = time.monotonic()
                    n = 0
                    if a.latency:
                        buf = pending + chunk
                        cut = max(buf.rfind(e) for e in ENDS)
                        if cut >= 0:
                            cut += 11
                            done_part, pending = buf[:cut], buf[cut:]
                            ns = time.monotonic_ns()
                            stamps = idre.findall(done_part)
                            n = done_part.count(ENDS[0]) + done_part.count(ENDS[1])
                            lat.extend(ns - int(s) for s in stamps)
                        else:
                            pending = buf
                    else:
                        for k, e in enumerate(ENDS):
                            L = len(e) - 1
                            n += chunk.count(e) + (tails[k] + chunk[:L]).count(e)
                            tails[k] = ((tails[k] + chunk)[-L:] if len(chunk) < L
                                        else chunk[-L:])
                    if n:
                        with lock:
                            state["count"] += n
                            state["last"] = now
                            if not state["warm"]:
                                state["warm"] = True
                                emit(warm=now)
                            if state["count"] >= expect and not state["done"]:
                                state["done"] = True
                                emit(done=now, count=state["count"], **latency_summary(lat))
                chunk = sock.recv(262144)
                if not chunk:
                    break
        except Exception as e:  # noqa: BLE001
            if not state["done"]:
                emit(note=f"sink connection: {e!r}")
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def acceptor() -> None:
        while True:
            s, _ = lsock.accept()
            threading.Thread(target=conn, args=(s,), daemon=True).start()

    threading.Thread(target=acceptor, daemon=True).start()
    emit(ready=lsock.getsockname()[1])
    go = threading.Event()
    for line in sys.stdin:  # until the parent closes stdin or stops us
        cmd = json.loads(line)
        if "quit" in cmd:
            break
        if "connect" in cmd:
            threading.Thread(target=write_out, args=(a, cmd["connect"], go),
                             daemon=True).start()
        if "go" in cmd:
            go.set()
    os._exit(0)


def write_out(a, port: int, go: threading.Event) -> None:
    """s2sproxy-out: ejabberd's outgoing stream to s2sproxy's backend listener (plain,
    dialback), one warm-up stanza, then on ``go`` the COUNT stanzas."""
    try:
        sock = socket.create_connection((HOST, port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(NS_HEAD.format(frm=LOCAL, to=REMOTE, extra="").encode())
        _, rest = read_until(sock, b"", b"</stream:features>")
        sock.sendall(b"<db:result from='%s' to='%s'>bench-key</db:result>"
                     % (LOCAL.encode(), REMOTE.encode()))
        head, rest = read_until(sock, rest, b"<db:result", 60)
        _, rest = read_until(sock, rest, b"/>", 30)
        emit(authed=1)
        sock.settimeout(None)
        payload = b"".join(stanza(i, out=True) for i in range(1, a.count + 1))
        sock.sendall(stanza(0, b"warmup", out=True))
        go.wait()
        t0 = time.monotonic()
        view = memoryview(payload)
        for i in range(0, len(payload), 65536):
            sock.sendall(view[i:i + 65536])
        emit(sent=t0, end=time.monotonic(), n=a.count)
        while sock.recv(65536):
            pass
    except Exception as e:  # noqa: BLE001
        emit(note=f"outgoing stream: {e!r}")


def latency_summary(lat: list[int]) -> dict:
    if len(lat) < 2:
        return {}
    lat = sorted(x / 1e6 for x in lat)  # ms

    def p(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"n": len(lat), "p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": lat[-1]}


# -- sender -------------------------------------------------------------------------

def open_stream(a, cctx: ssl.SSLContext, port: int) -> ssl.SSLSocket:
    """Connect to the relay; s2s mode: STARTTLS + SASL EXTERNAL + restart."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = NS_HEAD.format(frm=REMOTE, to=LOCAL, extra="").encode()
    if a.mode in ("s2s", "s2s-bidi"):
        sock.sendall(head)
        _, rest = read_until(sock, b"", b"</stream:features>")
        sock.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        read_until(sock, rest, b"<proceed")
        sock = cctx.wrap_socket(sock, server_hostname=LOCAL)
        sock.sendall(head)
        feats, rest = read_until(sock, b"", b"</stream:features>")
        if b"EXTERNAL" not in feats:
            raise RuntimeError(f"EXTERNAL not offered: {feats!r}")
        if a.mode == "s2s-bidi":
            if b"urn:xmpp:features:bidi" not in feats:
                raise RuntimeError(f"bidi not offered: {feats!r}")
            sock.sendall(b"<bidi xmlns='urn:xmpp:bidi'/>")
        sock.sendall(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                     b"mechanism='EXTERNAL'>=</auth>")
        _, rest = read_until(sock, rest, b"<success")
        sock.sendall(head)
        read_until(sock, rest, b"</stream:features>")
    else:
        sock = cctx.wrap_socket(sock, server_hostname=LOCAL)
        sock.sendall(head)
    return sock


def run_sender(a) -> None:
    d = Path(a.dir)
    cctx = client_ctx(d)
    if a.idle:
        socks = [open_stream(a, cctx, a.port) for _ in range(10)]
        emit(warm=len(socks))
        wait_cmd("go")
        for i in range(a.idle):
            sock = open_stream(a, cctx, a.port)
            if a.burst:
                # a busy moment before the silence: whitespace keepalives (RFC 6120
                # section 4.6.1), read by the relay but forwarded nowhere
                sock.sendall(b" " * a.burst)
            socks.append(sock)
        emit(opened=len(socks))
        wait_cmd("quit")
        os._exit(0)
    sock = open_stream(a, cctx, a.port)
    if a.mode == "s2s-bidi":
        return count_in(a, sock)
    sock.sendall(stanza(0, b"warmup"))
    emit(authed=sock.version())
    if a.latency:
        n = int(a.rate * a.seconds)
    else:
        n = a.count
        payload = b"".join(stanza(i) for i in range(1, n + 1))
    wait_cmd("go")
    t0 = time.monotonic()
    if a.latency:
        sent = 0
        step = 1.0 / a.rate
        while sent < n:
            now = time.monotonic()
            due = min(n, int((now - t0) * a.rate) + 1) - sent
            if due > 0:
                ns = b"L%d" % time.monotonic_ns()
                sock.sendall(b"".join(stanza(sent + k, ns) for k in range(1, due + 1)))
                sent += due
            else:
                time.sleep(max(0.0, t0 + (sent) * step - time.monotonic()))
    else:
        view = memoryview(payload)
        for i in range(0, len(payload), 65536):
            sock.sendall(view[i:i + 65536])
    emit(sent=t0, end=time.monotonic(), n=n)
    wait_cmd("quit")
    os._exit(0)


def count_in(a, sock) -> None:
    """s2sproxy-out: count the stanzas coming back over our bidi stream."""
    emit(authed=sock.version())
    sock.settimeout(None)
    tails = [b"", b""]
    count = 0
    warm = False
    while count < a.count + 1:
        chunk = sock.recv(262144)
        if not chunk:
            raise RuntimeError(f"closed after {count} stanzas")
        now = time.monotonic()
        for k, e in enumerate(ENDS):
            L = len(e) - 1
            count += chunk.count(e) + (tails[k] + chunk[:L]).count(e)
            tails[k] = (tails[k] + chunk)[-L:] if len(chunk) < L else chunk[-L:]
        if count and not warm:
            warm = True
            emit(warm=now)
    emit(done=now, count=count)
    wait_cmd("quit")
    os._exit(0)


def wait_cmd(word: str) -> None:
    for line in sys.stdin:
        if word in json.loads(line):
            return
    os._exit(0)  # parent gone


# -- reference relays (Twisted) ---------------------------------------------------------

def run_relay(a) -> None:
    from OpenSSL import SSL  # noqa: F401
    from twisted.internet import reactor, ssl as tssl, task
    from twisted.internet.protocol import ClientFactory, Factory, Protocol

    d = Path(a.dir)
    pem = (d / "local.key").read_bytes() + (d / "local.crt").read_bytes()
    server_opts = tssl.PrivateCertificate.loadPEM(pem).options()
    client_opts = tssl.CertificateOptions()  # no verification: the sink is ours
    kind = a.kind

    class Out(Protocol):
        def connectionMade(self):  # noqa: N802
            self.transport.setTcpNoDelay(True)
            self.factory.inbound.attach(self)

        def dataReceived(self, data):  # noqa: N802
            pass

        def connectionLost(self, reason):  # noqa: N802
            self.factory.inbound.transport.loseConnection()

    class In(Protocol):
        out = None

        def connectionMade(self):  # noqa: N802
            self.transport.setTcpNoDelay(True)
            self.pending = []
            if kind == "lxml":
                from lxml import etree
                self.etree = etree
                self.parser = etree.XMLPullParser(events=("start", "end"))
                self.depth = 0
                self.root = None
            f = ClientFactory()
            f.protocol = Out
            f.inbound = self
            reactor.connectSSL(HOST, a.port, f, client_opts)

        def attach(self, out):
            self.out = out
            out.transport.registerProducer(self.transport, True)
            if self.pending:
                out.transport.write(b"".join(self.pending))
                self.pending = []

        def dataReceived(self, data):  # noqa: N802
            if kind == "lxml":
                data = self.reserialise(data)
                if not data:
                    return
            if self.out is None:
                self.pending.append(data)
            else:
                self.out.transport.write(data)

        def reserialise(self, data: bytes) -> bytes:
            out = []
            self.parser.feed(data)
            tostring = self.etree.tostring
            for ev, el in self.parser.read_events():
                if ev == "start":
                    self.depth += 1
                    if self.depth == 1:
                        self.root = el
                        out.append(NS_HEAD.format(frm=REMOTE, to=LOCAL, extra="").encode())
                else:
                    self.depth -= 1
                    if self.depth == 1:
                        out.append(tostring(el))
                        self.root.remove(el)
            return b"".join(out)

        def connectionLost(self, reason):  # noqa: N802
            if self.out is not None:
                self.out.transport.loseConnection()

    f = Factory()
    f.protocol = In
    reactor.listenSSL(a.listen, f, server_opts, interface=HOST, backlog=4096)
    ppid = os.getppid()
    task.LoopingCall(lambda: os.getppid() != ppid and reactor.stop()).start(1.0)
    reactor.run()


# -- s2sproxy -------------------------------------------------------------------------

def s2sproxy_config(mat: Material, sink_port: int, backend_tls: str) -> tuple[Path, int, int]:
    """The config, the public STARTTLS port and the backend listener's port."""
    from harness import _toml_str as q
    d = mat.dir
    port = free_port()
    backend_listen = free_port()
    lines = [
        f"secret_file = {q(d / 'dialback.secret')}",
        "[[domain]]", f"name = {q(LOCAL)}",
        f"certificate = {q(d / 'local.crt')}", f"key = {q(d / 'local.key')}",
        "[public]", f"starttls = [{q(f'tcp:{port}:interface={HOST}')}]",
        f"direct_tls = [{q(f'tcp:{free_port()}:interface={HOST}')}]",
        "[backend]", f"host = {q(HOST)}", f"port = {sink_port}", f"tls = {q(backend_tls)}",
        f"listen = {q(f'tcp:{backend_listen}:interface={HOST}')}",
        f"dns_address = {q(HOST)}", f"dns_port = {free_port()}",
        "[queue]", "limit = 1000000", "max_bytes = 1073741824",
        "max_total_bytes = 1073741824", "max_age = 600",
        "[trust]", "system_cas = false", f"ca_file = {q(mat.ca)}",
        "[limits]", "max_unauthenticated = 100000",
        "max_unauthenticated_per_source = 100000",
        "[timeouts]", "auth = 120", "idle = 86400",
        "[dns]", f"nameservers = [{q(f'{HOST}:9')}]",
        "[keepalive]", "whitespace = 86400", "ping = 86400", "timeout = 86400",
        "[log]", 'level = "warn"', "",
        "[control]", 'socket = ""', "",
    ]
    path = d / f"s2sproxy-{backend_tls}.toml"
    path.write_text("\n".join(lines))
    return path, port, backend_listen


# -- orchestration -------------------------------------------------------------------------

def cores() -> tuple[int | None, int | None]:
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def child(name: str, role: str, mat: Material, core, *extra) -> Child:
    """This script in another process, in ``role``; its stderr goes to DIR/NAME.err."""
    return Child(name, me(role, mat, *extra), core, log=mat.dir / f"{name}.err")


def me(role: str, mat: Material, *extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--role", role, *mat.args(),
            *map(str, extra)]


def start_relay(relay: str, mat: Material, sink_port: int, core) -> tuple[Child, int]:
    if relay.startswith("s2sproxy"):
        from harness import s2sproxy_command
        cfg, port, backend_listen = s2sproxy_config(
            mat, sink_port, "auto" if relay == "s2sproxy-tls" else "never")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if relay == "s2sproxy-pure":
            env["S2SPROXY_PURE_PYTHON"] = "1"
        log = mat.dir / f"{relay}.log"
        c = Child(relay, s2sproxy_command(cfg, log, sys.executable), core, cwd=str(mat.dir),
                  env=env, stdout_json=False, log=mat.dir / f"{relay}.console.log")
        c.backend_port = backend_listen
    else:
        port = free_port()
        c = child(relay, "relay", mat, core, "--kind", relay, "--listen", port,
                  "--port", sink_port)
    wait_listening(port, c)
    return c, port


def sink_mode(relay: str) -> str:
    return {"s2sproxy": "xmpp", "s2sproxy-pure": "xmpp", "s2sproxy-out": "xmpp",
            "s2sproxy-tls": "xmpp-tls"}.get(relay, "raw")


def one_run(relay: str, mat: Material, a, cores_) -> dict:
    rc, oc = cores_
    if relay == "s2sproxy-out":
        return one_run_out(relay, mat, a, cores_)
    started: list[Child] = []
    try:
        lat = ["--latency"] if a.latency else []
        n = int(a.rate * a.seconds) if a.latency else a.count
        sink = child("sink", "sink", mat, oc, "--mode", sink_mode(relay), "--count", n,
                     *lat)
        started.append(sink)
        sink_port = sink.expect("ready", 30)["ready"]
        if relay == "direct":
            relay_proc, port = None, sink_port
        else:
            relay_proc, port = start_relay(relay, mat, sink_port, rc)
            started.append(relay_proc)
        mode = "s2s" if relay.startswith("s2sproxy") else "tls"
        sender = child("sender", "sender", mat, oc, "--mode", mode, "--port", port,
                                    "--count", n, "--rate", a.rate, "--seconds", a.seconds,
                       *lat)
        started.append(sender)
        tls = sender.expect("authed", 60)["authed"]
        sink.expect("warm", 30)
        time.sleep(0.3)
        cpu0 = cpu_seconds(relay_proc.pid) if relay_proc else 0.0
        wake0 = wake_ups(relay_proc.pid) if relay_proc else 0
        load0 = cpu_seconds(sender.pid) + cpu_seconds(sink.pid)
        sender.send({"go": 1})
        limit = (a.seconds + 60) if a.latency else n / 5000 + 60
        done = sink.expect("done", limit)
        cpu1 = cpu_seconds(relay_proc.pid) if relay_proc else 0.0
        wakes = (wake_ups(relay_proc.pid) - wake0) if relay_proc else 0
        load1 = cpu_seconds(sender.pid) + cpu_seconds(sink.pid)
        sent = sender.expect("sent", 30)
        span = done["done"] - sent["sent"]
        out = {"relay": relay, "tls": tls, "rate": n / span,
               "cpu_us": (cpu1 - cpu0) / n * 1e6, "span": span,
               "ends_us": (load1 - load0) / n * 1e6,  # sender + sink
               "behind": (done["done"] - sent["end"]) * 1e3,  # ms after the last write
               "per_wake": n / wakes if wakes else float("nan")}
        out.update({k: done[k] for k in ("p50", "p90", "p99", "max") if k in done})
        return out
    finally:
        for c in reversed(started):
            c.stop()


def one_run_out(relay: str, mat: Material, a, cores_) -> dict:
    """The other direction: the sink (ejabberd) writes, the sender (the remote) counts
    what comes back over its bidi stream."""
    rc, oc = cores_
    started: list[Child] = []
    n = a.count
    try:
        sink = child("sink", "sink", mat, oc, "--mode", "xmpp", "--count", n)
        started.append(sink)
        sink_port = sink.expect("ready", 30)["ready"]
        relay_proc, port = start_relay(relay, mat, sink_port, rc)
        started.append(relay_proc)
        sender = child("sender", "sender", mat, oc, "--mode", "s2s-bidi", "--port", port,
                       "--count", n)
        started.append(sender)
        tls = sender.expect("authed", 60)["authed"]
        sink.send({"connect": relay_proc.backend_port})
        sink.expect("authed", 60)
        sender.expect("warm", 30)
        time.sleep(0.3)
        cpu0 = cpu_seconds(relay_proc.pid)
        load0 = cpu_seconds(sender.pid) + cpu_seconds(sink.pid)
        sink.send({"go": 1})
        done = sender.expect("done", n / 5000 + 60)
        cpu1 = cpu_seconds(relay_proc.pid)
        load1 = cpu_seconds(sender.pid) + cpu_seconds(sink.pid)
        sent = sink.expect("sent", 30)
        span = done["done"] - sent["sent"]
        return {"relay": relay, "tls": tls, "rate": n / span,
                "cpu_us": (cpu1 - cpu0) / n * 1e6, "span": span,
                "ends_us": (load1 - load0) / n * 1e6,
                "behind": (done["done"] - sent["end"]) * 1e3}
    finally:
        for c in reversed(started):
            c.stop()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def throughput(a, mat: Material, cores_) -> None:
    relays = a.relays.split(",")
    rows: dict[str, list[dict]] = {r: [] for r in relays}
    print(f"throughput: {a.count} stanzas of ~{len(stanza(0))} B per run, {a.rounds} "
          f"rounds, relay on core {cores_[0]}, sender+sink on core {cores_[1]}")
    print(f"{'round':>5}  {'relay':<13} {'stanzas/s':>10}  {'CPU µs/stanza':>13}  "
          f"{'time s':>6}  {'sender+sink µs/stanza':>21}")
    for r in range(a.rounds):
        k = r % len(relays)
        for relay in relays[k:] + relays[:k]:
            row = one_run(relay, mat, a, cores_)
            rows[relay].append(row)
            print(f"{r + 1:>5}  {relay:<13} {row['rate']:>10,.0f}  {row['cpu_us']:>13.2f}  "
                  f"{row['span']:>6.2f}  {row['ends_us']:>21.2f}  {row['tls']}", flush=True)
    print(f"\nrelay          stanzas/s  CPU µs/stanza  (median of {a.rounds} rounds)")
    med = {}
    for relay in relays:
        med[relay] = (median([x["rate"] for x in rows[relay]]),
                      median([x["cpu_us"] for x in rows[relay]]))
        print(f"{relay:<13} {med[relay][0]:>10,.0f}  {med[relay][1]:>13.2f}")
    for s in [x for x in relays if x.startswith("s2sproxy")]:
        for ref in [x for x in relays if not x.startswith("s2sproxy")]:
            ratios_rate = [x["rate"] / y["rate"] for x, y in zip(rows[s], rows[ref])]
            ratios_cpu = [x["cpu_us"] / y["cpu_us"] for x, y in zip(rows[s], rows[ref])
                          if y["cpu_us"] > 0]
            print(f"{s} vs {ref}: rate x{median(ratios_rate):.2f}, CPU x"
                  f"{median(ratios_cpu):.2f} (medians of per-round ratios)")


def latency(a, mat: Material, cores_) -> None:
    relays = ["direct"] + [r for r in a.relays.split(",") if r != "direct"]
    print(f"latency: {a.rate:g} stanzas/s for {a.seconds:g} s per run, {a.rounds} rounds; "
          "ms from the sender's write to the sink's read")
    print(f"{'round':>5}  {'relay':<13} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  "
          f"{'CPU µs/stanza':>13}  {'tail ms':>7}  {'stanzas/sleep':>13}")
    rows: dict[str, list[dict]] = {r: [] for r in relays}
    for r in range(a.rounds):
        k = r % len(relays)
        for relay in relays[k:] + relays[:k]:
            row = one_run(relay, mat, a, cores_)
            rows[relay].append(row)
            print(f"{r + 1:>5}  {relay:<13} {row['p50']:>7.3f} {row['p90']:>7.3f} "
                  f"{row['p99']:>7.3f} {row['max']:>7.3f}  {row['cpu_us']:>13.1f}  "
                  f"{row['behind']:>7.1f}  {row['per_wake']:>13.2f}", flush=True)
    print(f"\nmedians of {a.rounds} rounds (ms); +direct, +byte: the median of per-round "
          "differences from that relay's figure in the same round")
    print(f"{'relay':<13} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}  {'p50+direct':>10} "
          f"{'p99+direct':>10} {'p50+byte':>8} {'p99+byte':>8}  {'CPU µs/stanza':>13}  "
          f"{'CPU xbyte':>9}")

    def added(relay: str, base: str, q: str) -> float:
        if base not in rows:
            return float("nan")
        return median([x[q] - y[q] for x, y in zip(rows[relay], rows[base])])
    def cpu_ratio(relay: str) -> float:
        if "byte" not in rows or relay == "direct":
            return float("nan")
        return median([x["cpu_us"] / y["cpu_us"] for x, y in zip(rows[relay], rows["byte"])
                       if y["cpu_us"] > 0])
    for relay in relays:
        m = {q: median([x[q] for x in rows[relay]]) for q in ("p50", "p90", "p99", "max",
                                                             "cpu_us")}
        print(f"{relay:<13} {m['p50']:>7.3f} {m['p90']:>7.3f} {m['p99']:>7.3f} "
              f"{m['max']:>7.3f}  {added(relay, 'direct', 'p50'):>10.3f} "
              f"{added(relay, 'direct', 'p99'):>10.3f} {added(relay, 'byte', 'p50'):>8.3f} "
              f"{added(relay, 'byte', 'p99'):>8.3f}  {m['cpu_us']:>13.1f}  "
              f"{cpu_ratio(relay):>9.2f}")
    print("CPU xbyte: the median of per-round ratios to the byte relay's CPU per stanza. "
          "stanzas/sleep: stanzas relayed per time the relay's reactor slept (its "
          "voluntary context switches); a round where a relay fell behind (a "
          "scheduling hiccup) has more, and less CPU per stanza")


def idle(a, mat: Material, cores_) -> None:
    rc, oc = cores_
    burst = f", each after a {a.burst}-byte burst" if a.burst else ""
    print(f"memory: {a.idle} idle streams{burst} (after 10 warm-up streams); RSS of the "
          f"relay")
    relays = ["s2sproxy", "byte"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if 2 * a.idle + 64 > hard:
        # The byte relay holds two descriptors per connection (in and out).
        print(f"byte      skipped: {a.idle} connections need {2 * a.idle} descriptors in "
              f"one process, RLIMIT_NOFILE is {hard}")
        relays.remove("byte")
    for relay in relays:
        started: list[Child] = []
        try:
            sink = child("sink", "sink", mat, oc, "--mode", sink_mode(relay), "--count", 0)
            started.append(sink)
            sink_port = sink.expect("ready", 30)["ready"]
            relay_proc, port = start_relay(relay, mat, sink_port, rc)
            started.append(relay_proc)
            mode = "s2s" if relay == "s2sproxy" else "tls"
            sender = child("sender", "sender", mat, oc, "--mode", mode, "--port", port,
                           "--idle", a.idle, "--burst", a.burst)
            started.append(sender)
            sender.expect("warm", 120)
            time.sleep(1.0)
            r0 = rss_kib(relay_proc.pid)
            sender.send({"go": 1})
            sender.expect("opened", 60 + a.idle * 0.2)
            time.sleep(2.0)
            r1 = rss_kib(relay_proc.pid)
            what = ("authenticated s2s stream (TLS, EXTERNAL)" if relay == "s2sproxy"
                    else "connection (TLS in + TLS out to the sink)")
            print(f"{relay:<9} RSS {r0 / 1024:7.1f} -> {r1 / 1024:7.1f} MiB: "
                  f"{(r1 - r0) / a.idle:6.1f} KiB per idle {what}", flush=True)
            if relay == "s2sproxy":
                # Idle streams drop their expat parser and renew their TLS buffers
                # after PARSER_RELEASE_IDLE seconds of silence, and the freed memory
                # is handed back at most every MEMORY_TRIM_INTERVAL seconds
                # (policy.keepalive rule 7), at keepalive ticks.
                wait = PARSER_RELEASE_IDLE + MEMORY_TRIM_INTERVAL + 4.0
                time.sleep(wait)
                r2 = rss_kib(relay_proc.pid)
                print(f"{'':<9} after {wait + 2:.0f} s idle: RSS "
                      f"{r2 / 1024:7.1f} MiB: {(r2 - r0) / a.idle:6.1f} KiB per stream",
                      flush=True)
        finally:
            for c in reversed(started):
                c.stop()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=300_000, help="stanzas per run")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--relays", default="byte,lxml,s2sproxy,s2sproxy-tls",
                   help="comma-separated: byte, lxml, s2sproxy, s2sproxy-tls, "
                        "s2sproxy-pure")
    p.add_argument("--latency", action="store_true", help="paced latency mode")
    p.add_argument("--rate", type=float, default=10000.0, help="stanzas/s (latency mode)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per latency run")
    p.add_argument("--idle", type=int, default=0, help="memory mode: N idle streams")
    p.add_argument("--burst", type=int, default=0,
                   help="memory mode: each stream first sends this many bytes")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    # internal: the roles of the child processes
    p.add_argument("--role", choices=("sink", "sender", "relay"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--listen", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        {"sink": run_sink, "sender": run_sender, "relay": run_relay}[a.role](a)
        return
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored
    d = Path(tempfile.mkdtemp(prefix="s2sproxy-bench-"))
    try:
        mat = Material(d)
        c = cores()
        print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"{os.cpu_count()} CPUs,",
              f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, load average "
              f"{os.getloadavg()[0]:.2f} (other processes share these cores)")
        if a.idle:
            idle(a, mat, c)
        elif a.latency:
            latency(a, mat, c)
        else:
            throughput(a, mat, c)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        Child.stop_all()
        print(f"load average at the end {os.getloadavg()[0]:.2f}")
        if a.keep:
            print(f"kept {d}")
        else:
            import shutil
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
