"""Real-peer benchmark: Prosody -> ejabberd, directly and through s2sproxy, interleaved.

    python bench/bench_peers.py [--count 20000] [--rounds 4] [--backend-tls never]
                                [--direction in|out]

Each run starts a fresh federation with the integration harness (as root, like the
tests): Prosody 0.12 for remote.test, ejabberd 24.12 for local.test, and for the
``proxy`` runs ``twistd s2sproxy`` in front of ejabberd exactly as deploy/EJABBERD.md
says (``direct``: ejabberd's own s2s listener, the two servers federate alone).  Both
servers trust the test CA, so both ways authenticate by SASL EXTERNAL.  Nothing logs
per stanza (ejabberd at warning, no Prosody debug log, s2sproxy at warn).
``--backend-tls never``: the leg between s2sproxy and ejabberd is plain TCP (ejabberd
with ``s2s_use_starttls: optional``, s2sproxy ``backend.tls = "never"``), as an
operator may run it when both are on one host; ``auto`` (the default, and the shipped
configuration) has STARTTLS there too.

Two raw c2s clients (STARTTLS, SASL PLAIN, bind, presence), one process each side:
with ``--direction in`` (the default) bob@remote.test on Prosody writes COUNT chat
messages to alice@local.test/bench in 64 KiB writes and alice counts them on ejabberd;
``--direction out`` is the other way (ejabberd -> s2sproxy -> Prosody, over Prosody's
bidi stream through s2sproxy).  One warm-up message first sets up the
s2s stream.  rate = COUNT / (last message received - first byte written).  The CPU
of s2sproxy, Prosody and ejabberd over the same span comes from /proc/PID/stat.

It prints one row per run, the medians per mode and the median of per-round ratios
(proxy rate / direct rate, rounds alternating which mode goes first).  It asserts
nothing about the figures.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import harness  # noqa: E402
from harness import ALICE, BOB  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


class C2S:
    """A blocking raw c2s client: just enough XMPP to log in and pass messages."""

    def __init__(self, account: harness.Account, resource: str, ca_file: Path) -> None:
        self.domain = account.bare.split("@")[1]
        self.user = account.bare.split("@")[0]
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (account.host, account.port), timeout=30)
        self.buf = b""
        self._header()
        self._until(b"</stream:features>")
        self.send(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        self._until(b"<proceed")
        ctx = ssl.create_default_context(cafile=str(ca_file))
        self.sock = ctx.wrap_socket(self.sock, server_hostname=self.domain)
        self.buf = b""
        self._header()
        self._until(b"</stream:features>")
        plain = base64.b64encode(f"\0{self.user}\0{account.password}".encode()).decode()
        self.send(f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                  f"{plain}</auth>".encode())
        self._until(b"<success")
        self.buf = b""
        self._header()
        self._until(b"</stream:features>")
        self.send(f"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  f"<resource>{resource}</resource></bind></iq>".encode())
        self._until(b"</iq>")
        self.buf = b""
        self.send(b"<presence/>")

    def _header(self) -> None:
        self.send(f"<?xml version='1.0'?><stream:stream to='{self.domain}' "
                  f"xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
                  f"version='1.0'>".encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _until(self, marker: bytes) -> None:
        while marker not in self.buf:
            data = self.sock.recv(65536)
            if not data:
                raise harness.HarnessError(f"connection closed waiting for {marker!r}: "
                                           f"{self.buf[-500:]!r}")
            self.buf += data
        self.buf = self.buf[self.buf.index(marker) + len(marker):]

    def count_messages(self, n: int, timeout: float) -> float:
        """Read until ``n`` messages have arrived; the time the last one did."""
        seen, tail = 0, b""
        self.sock.settimeout(timeout)
        while seen < n:
            data = self.sock.recv(262144)
            if not data:
                raise harness.HarnessError(f"connection closed after {seen} messages")
            chunk = tail + data
            seen += chunk.count(b"</message>")
            tail = chunk[-9:]
        return time.monotonic()

    def close(self) -> None:
        try:
            self.send(b"</stream:stream>")
            self.sock.close()
        except OSError:
            pass


def message(i: int, to: harness.Account = ALICE) -> bytes:
    return (f"<message to='{to.bare}/bench' type='chat' id='m{i}'><body>Benchmark "
            f"message {i:06d}: wherefore art thou, Romeo?</body></message>").encode()


def one_run(mode: str, count: int, backend_tls: str = "auto", direction: str = "in") -> dict:
    run = harness.RunDir.create(prefix="s2sproxy-bench-peers-")
    fed = None
    try:
        if mode == "direct":
            dns = harness.DnsResponder(srv={"_xmpp-server._tcp.remote.test": [
                (0, 5, harness.S2S_PORT, harness.PROSODY_IP)]})
            fed = harness.start_federation(run, via_proxy=False, dns=dns, quiet=True)
        else:
            fed = harness.start_federation(
                run, via_proxy=True, start_proxy=True, quiet=True, log_level="warn",
                backend_tls=backend_tls,
                ejabberd_starttls="optional" if backend_tls == "never" else "required")
        alice = C2S(ALICE, "bench", run.ca_file)
        bob = C2S(BOB, "bench", run.ca_file)
        # warm-up, both ways: the s2s streams (through s2sproxy: bidi, and the backend
        # streams) are open before the measured run
        bob.send(message(0, ALICE))
        alice.count_messages(1, 60)
        alice.send(message(0, BOB))
        bob.count_messages(1, 60)
        sender, receiver, to = (bob, alice, ALICE) if direction == "in" else (alice, bob, BOB)
        pids = {"ejabberd": [fed.ejabberd.beam_pid or fed.ejabberd.proc.pid],
                "prosody": [fed.prosody.proc.pid]}
        if fed.proxy is not None:
            pids["s2sproxy"] = [fed.proxy.proc.pid]
        cpu0 = {k: cpu_seconds(v) for k, v in pids.items()}
        payload = b"".join(message(i, to) for i in range(1, count + 1))
        done: dict[str, float] = {}

        def receive() -> None:
            done["t"] = receiver.count_messages(count, 120)

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        t0 = time.monotonic()
        for i in range(0, len(payload), 65536):
            sender.send(payload[i:i + 65536])
        reader.join(150)
        if "t" not in done:
            raise harness.HarnessError(f"{mode}: not all {count} messages arrived")
        elapsed = done["t"] - t0
        cpu = {k: (cpu_seconds(v) - cpu0[k]) / count * 1e6 for k, v in pids.items()}
        alice.close()
        bob.close()
        return {"rate": count / elapsed, "seconds": elapsed, "cpu": cpu}
    finally:
        if fed is not None:
            fed.stop()
        run.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="messages per run")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--backend-tls", choices=("auto", "never"), default="auto",
                   help="the s2sproxy-ejabberd leg (proxy runs)")
    p.add_argument("--direction", choices=("in", "out"), default="in",
                   help="in: Prosody -> ejabberd; out: ejabberd -> Prosody")
    a = p.parse_args()
    harness.require_tools()
    way = "Prosody 0.12 -> ejabberd 24.12" if a.direction == "in" else \
        "ejabberd 24.12 -> Prosody 0.12"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {way}, "
          f"{a.count} messages per run, {a.rounds} rounds, "
          f"backend leg TLS {a.backend_tls}, {os.cpu_count()} CPUs")
    print(f"{'round':>5}  {'mode':<7} {'msg/s':>9} {'s':>6}  CPU µs/message: "
          f"s2sproxy prosody ejabberd")
    results: dict[str, list[dict]] = {"direct": [], "proxy": []}
    for r in range(a.rounds):
        order = ("direct", "proxy") if r % 2 == 0 else ("proxy", "direct")
        for mode in order:
            m = one_run(mode, a.count, a.backend_tls, a.direction)
            results[mode].append(m)
            c = m["cpu"]
            print(f"{r + 1:>5}  {mode:<7} {m['rate']:>9,.0f} {m['seconds']:>6.2f}  "
                  f"{c.get('s2sproxy', 0.0):>23.1f} {c['prosody']:>7.1f} "
                  f"{c['ejabberd']:>8.1f}", flush=True)
    print()
    for mode, ms in results.items():
        print(f"{mode:<7} median {statistics.median(m['rate'] for m in ms):>9,.0f} msg/s")
    ratios = [p["rate"] / d["rate"] for p, d in zip(results["proxy"], results["direct"])]
    share = statistics.median(m["cpu"]["s2sproxy"] * m["rate"] / 1e6
                              for m in results["proxy"])
    print(f"proxy vs direct: rate x{statistics.median(ratios):.2f} (median of per-round "
          f"ratios; {', '.join(f'{x:.2f}' for x in ratios)}); s2sproxy used "
          f"{share * 100:.0f}% of a core")


if __name__ == "__main__":
    main()
