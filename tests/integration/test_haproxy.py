"""Scale-out behind HAProxy (issue 10) with real parts: HAProxy (the Debian package,
deploy/haproxy/haproxy.cfg as it is) in front of two s2sproxy instances sharing the
dialback secret, PROXY protocol v2 on their public listeners, ejabberd's outgoing
streams through HAProxy to either instance, Prosody connecting through HAProxy.

1. A dialback key one instance issued is verified by the other (the shared secret).
2. The real peer address (Prosody's, not HAProxy's) is what s2sproxy logs and
   ``s2sproxy status`` shows.
3. One instance is stopped mid-conversation: every message is delivered or bounced to
   its sender, none lost, and federation goes on through the other instance within
   the health-check interval (plus the peers' reconnection)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

A_IP, B_IP = "127.0.0.31", "127.0.0.32"
EACH_WAY = 30


def _id(xml: str) -> str | None:
    m = re.search(r"""\bid=["']([^"']+)""", xml)
    return m.group(1) if m else None


def _send(client: harness.Client, to: str, body: str) -> None:
    msg = client.xmpp.make_message(mto=to, mbody=body, mtype="chat")
    msg["id"] = body
    msg.send()


@pytest.fixture
def scaled_out(federation, run_dir):
    dns_port = harness.free_port(udp_too=True)
    backend_port = harness.free_port()
    outgoing_port = harness.free_port()
    # Prosody does not trust our CA: its callback to local.test (through HAProxy) is
    # how it authenticates our outgoing streams, so keys get verified by an instance.
    fed = federation(via_proxy=True, bidi=False, prosody_trusts_ca=False,
                     ejabberd_nameservers=[(A_IP, dns_port), (B_IP, dns_port)])
    secret = run_dir.path / "shared-dialback.secret"
    proxy_dns = harness.DnsResponder()
    proxy_dns.start()
    haproxy = harness.HAProxy(run_dir, {
        "PUBLIC_STARTTLS": f"{harness.PROXY_IP}:{harness.PROXY_STARTTLS_PORT}",
        "PUBLIC_DIRECT_TLS": f"{harness.PROXY_IP}:{harness.PROXY_DIRECT_TLS_PORT}",
        "EJABBERD_OUTGOING": f"127.0.0.1:{outgoing_port}",
        "S2SPROXY_A": A_IP, "S2SPROXY_B": B_IP,
        "STARTTLS_PORT": str(harness.PROXY_STARTTLS_PORT),
        "DIRECT_TLS_PORT": str(harness.PROXY_DIRECT_TLS_PORT),
        "BACKEND_PORT": str(backend_port), "CHECK_INTERVAL": "500ms"})
    proxies = {}
    try:
        for name, ip in (("a", A_IP), ("b", B_IP)):
            proxies[name] = harness.start_s2sproxy(
                run_dir, name=f"s2sproxy-{name}", listen_host=ip, proxy_protocol=True,
                backend_host=ip, backend_port=backend_port, dns_host=ip,
                dns_port=dns_port, srv_port=outgoing_port, secret_file=secret,
                nameservers=[f"127.0.0.1:{proxy_dns.port}"])
        haproxy.start((harness.PROXY_IP, harness.PROXY_STARTTLS_PORT))
        yield fed, proxies, haproxy
    finally:
        for p in proxies.values():
            p.stop()
        haproxy.stop()
        proxy_dns.stop()


def sources(dst: str) -> set[str]:
    """"host:port" sources of the established TCP connections to ``dst``."""
    r = subprocess.run(["ss", "-Htn", "state", "established", "dst", dst],
                       capture_output=True, text=True, timeout=10, check=True)
    return {line.split()[2] for line in r.stdout.splitlines() if line.strip()}


def status(proxy) -> dict:
    r = harness.s2sproxy_cli("status", proxy.config_path, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


async def conversation_with_one_stopped(fed, stopped) -> dict:
    alice, bob = await asyncio.gather(harness.Client.connected(ALICE, fed.run.ca_file),
                                      harness.Client.connected(BOB, fed.run.ca_file))
    got = {"a": set(), "b": set()}
    bounced = {"a": set(), "b": set()}

    def collect() -> None:
        for client in (alice, bob):
            while not client.messages.empty():
                m = client.messages.get_nowait()
                mid = _id(m.xml) or ""
                if re.fullmatch(r"[ab]\d+", mid):
                    (bounced if m.type == "error" else got)[mid[0]].add(mid)
    try:
        stopped_at = None
        for i in range(EACH_WAY):
            _send(alice, BOB.bare, f"a{i}")
            _send(bob, ALICE.bare, f"b{i}")
            await asyncio.sleep(0.1)
            collect()
            if i == EACH_WAY // 3:
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, stopped.stop)
                stopped_at = time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                len(got[k] | bounced[k]) < EACH_WAY for k in "ab"):
            collect()
            await asyncio.sleep(0.2)
        # after the stop, both ways through the other instance
        after = {}
        for sender, recipient, to in ((alice, bob, BOB), (bob, alice, ALICE)):
            t0 = time.monotonic()
            sender.send_message(to.bare, "after the stop")
            await recipient.wait_message(30, match=lambda m: m.body == "after the stop")
            after[to.bare] = time.monotonic() - t0
    finally:
        await asyncio.gather(alice.close(), bob.close())
    return {"got": got, "bounced": bounced, "after": after,
            "since_stop": time.monotonic() - stopped_at}


def test_two_instances_behind_haproxy(scaled_out):
    fed, proxies, haproxy = scaled_out
    # bob first: Prosody's stream lands on one instance; then alice: ejabberd's
    # outgoing stream (through HAProxy) and our dialback to Prosody, whose callback to
    # local.test goes through HAProxy again (leastconn: the other instance).
    assert fed.send(BOB, ALICE, "hello alice").body == "hello alice"
    assert fed.send(ALICE, BOB, "hello bob").body == "hello bob"
    logs = {n: p.log_text() for n, p in proxies.items()}
    issued = {n for n, t in logs.items()
              if re.search(r"remote stream ready: local\.test -> remote\.test "
                           r"method=dialback", t)}
    answered = {n for n, t in logs.items()
                if re.search(r"db:verify local\.test -> remote\.test answered valid", t)}
    assert issued and answered, (issued, answered)
    assert answered - issued, ("the key was verified by the instance that issued it",
                               issued, answered)

    # PROXY protocol: the peer of each public stream is the source of Prosody's
    # connection to HAProxy, never that of HAProxy's connection to the instance (both
    # come from 127.0.0.1 here: the ports tell them apart).
    to_haproxy = sources(f"{harness.PROXY_IP}:{harness.PROXY_STARTTLS_PORT}")
    haproxy_to_us = sources(f"{A_IP}:{harness.PROXY_STARTTLS_PORT}") | \
        sources(f"{B_IP}:{harness.PROXY_STARTTLS_PORT}")
    peers = {s["peer"] for n in proxies for s in status(proxies[n])["streams"]
             if s["role"] == "public"}
    assert peers and peers <= to_haproxy, (peers, to_haproxy)
    assert not peers & haproxy_to_us, (peers, haproxy_to_us)

    # s2sproxy check knows the load balancer in front of the backend listeners
    r = harness.s2sproxy_cli("check", proxies["a"].config_path, "--verbose")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "answers: a load balancer in front of the backend listeners" in r.stdout

    # Stop the instance that carries Prosody's stream, mid-conversation.
    carrying = next(n for n in proxies if any(
        s["role"] == "public" and s["authenticated"] for s in status(proxies[n])["streams"]))
    out = harness.run_async(lambda: conversation_with_one_stopped(fed, proxies[carrying]),
                            180)
    for k, who in (("a", "alice -> bob"), ("b", "bob -> alice")):
        accounted = out["got"][k] | out["bounced"][k]
        missing = sorted(set(f"{k}{i}" for i in range(EACH_WAY)) - accounted,
                         key=lambda x: int(x[1:]))
        assert not missing, (who, missing, haproxy.log_text()[-2000:])
    print(f"\nstopped s2sproxy-{carrying}: alice->bob delivered {len(out['got']['a'])} "
          f"bounced {len(out['bounced']['a'])}; bob->alice delivered "
          f"{len(out['got']['b'])} bounced {len(out['bounced']['b'])}; after the stop: "
          f"{out['after']}")
    # the conversation went on through the other instance
    other = next(n for n in proxies if n != carrying)
    assert re.search(r"public stream \S+ accepted", proxies[other].log_text()[
        len(logs[other]):]) or out["got"]["b"], "nothing reached the other instance"
    assert all(t < 30 for t in out["after"].values())
    for p in proxies.values():
        assert "Traceback" not in p.log_text()
