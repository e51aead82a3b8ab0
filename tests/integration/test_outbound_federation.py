"""Federation both ways through s2sproxy with real peers (issue #3).

ejabberd 24.12 (local.test) sends through s2sproxy's backend listener; Prosody 0.12
(remote.test) talks to s2sproxy's public listener.  A whole conversation (messages,
subscriptions both ways with XEP-0115 caps so that disco#info crosses s2s, XEP-0199
pings to the domain and to full JIDs, a server-to-server ping) must work over exactly
one TCP connection between Prosody and s2sproxy with bidi, whichever side speaks first,
and ejabberd must never log "Unexpected info" (ejabberd issue #4344).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

MESSAGES = 3          # each way


metrics = harness.metrics


def proxy_with_metrics(fed, **kw):
    port = harness.free_port()
    extra = kw.pop("extra_toml", "")
    proxy = fed.start_proxy(extra_toml=f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"'
                                       f"\n{extra}", **kw)
    return proxy, port


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise harness.HarnessError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def conversation(run, first: str) -> dict:
    """Both clients online with distinct caps; ``first`` ('remote' or 'local') speaks
    first.  Returns what was seen."""
    alice, bob = await asyncio.gather(
        harness.Client.connected(ALICE, run.ca_file, feature="urn:s2sproxy:test:alice"),
        harness.Client.connected(BOB, run.ca_file, feature="urn:s2sproxy:test:bob"))
    seen: dict = {"alice": [], "bob": [], "pings": {}}
    try:
        for c in (alice, bob):
            await c.xmpp.plugin["xep_0115"].update_caps()
        order = [(bob, alice, ALICE), (alice, bob, BOB)]
        if first == "local":
            order.reverse()
        for i in range(MESSAGES):
            for sender, receiver, to in order:
                body = f"{sender.account.jid} #{i}"
                sender.send_message(to.bare, body)
                got = await receiver.wait_message(20, match=lambda m, b=body: m.body == b)
                seen["alice" if receiver is alice else "bob"].append(got.body)
        # Subscriptions both ways (slixmpp authorises and subscribes back by default);
        # presence then carries caps, and each server's PEP/caps code asks the other
        # side's client for disco#info over s2s.
        subscriber = bob if first == "remote" else alice
        other = alice if subscriber is bob else bob
        subscriber.xmpp.send_presence_subscription(pto=other.account.bare)
        for c, peer in ((alice, BOB), (bob, ALICE)):
            await wait_until(lambda c=c, p=peer: c.xmpp.client_roster[p.bare]["subscription"]
                             == "both", 20, f"{c.account.jid} <-> {peer.jid} subscription")
        for c in (alice, bob):
            c.xmpp.send_presence()
        # disco#info both ways: an explicit query, and the one XEP-0115 makes by itself
        # when a presence announces caps it does not know yet.
        for asker, other, feature in ((alice, bob, "urn:s2sproxy:test:bob"),
                                      (bob, alice, "urn:s2sproxy:test:alice")):
            info = await asker.xmpp.plugin["xep_0030"].get_info(
                jid=other.xmpp.boundjid, timeout=10)
            seen.setdefault("disco", []).append(
                feature in info["disco_info"]["features"])
            deadline = time.monotonic() + 20
            while await asker.xmpp.plugin["xep_0115"].get_caps(jid=other.xmpp.boundjid) \
                    is None:
                if time.monotonic() > deadline:
                    raise harness.HarnessError(f"caps of {other.account.jid} never learnt")
                await asyncio.sleep(0.1)
        # XEP-0199 pings: remote user -> local domain and local user's full JID, and
        # the local user -> remote user's full JID.
        for pinger, target in ((bob, "local.test"), (bob, str(alice.xmpp.boundjid)),
                               (alice, str(bob.xmpp.boundjid)), (alice, "remote.test")):
            rtt = await pinger.xmpp.plugin["xep_0199"].ping(jid=target, timeout=10)
            seen["pings"][f"{pinger.account.bare} -> {target}"] = rtt
    finally:
        await asyncio.gather(alice.close(), bob.close())
    return seen


def connections_between(proxy_log: str) -> dict:
    return {
        "inbound": len(re.findall(r"public stream authenticated: remote\.test -> local\.test",
                                  proxy_log)),
        "outbound": len(re.findall(r"remote stream ready: local\.test -> remote\.test",
                                   proxy_log)),
        "bidi": len(re.findall(r"(?:public stream authenticated: remote\.test -> local\.test"
                               r"|remote stream ready: local\.test -> remote\.test)"
                               r".* bidi=True", proxy_log)),
    }


@pytest.mark.parametrize("first", ["remote", "local"])
def test_conversation_both_ways_over_one_bidi_connection(federation, first):
    """Messages, subscriptions with caps, pings and a server ping all work over one
    bidi connection between Prosody and s2sproxy, started from either side."""
    t0 = time.monotonic()
    fed = federation(via_proxy=True, bidi=True)
    proxy, port = proxy_with_metrics(fed)
    seen = harness.run_async(lambda: conversation(fed.run, first), 120)
    s2s_ping = fed.prosody.shell("xmpp:ping('remote.test', 'local.test')")
    elapsed = time.monotonic() - t0
    m = metrics(port)

    assert len(seen["alice"]) == MESSAGES and len(seen["bob"]) == MESSAGES, seen
    assert len(seen["pings"]) == 4 and all(r is not None for r in seen["pings"].values())
    assert "pong from local.test" in s2s_ping, s2s_ping
    log = proxy.log_text()
    # Exactly one connection, bidirectional: s2sproxy's view ...
    assert connections_between(log) == (
        {"inbound": 1, "outbound": 0, "bidi": 1} if first == "remote"
        else {"inbound": 0, "outbound": 1, "bidi": 1}), log[-5000:]
    # ... and Prosody's.
    sessions = [s for s in fed.prosody.s2s_sessions() if s["remote"] == "local.test"]
    assert [s["dir"] for s in sessions] == ["<->"], fed.prosody.s2s_show()
    assert seen["disco"] == [True, True], seen
    # ejabberd's own outgoing stream was checked with ejabberd (db:verify to its
    # internal listener) before anything it sent was relayed.
    assert re.search(r"backend-in stream authenticated: local\.test -> remote\.test "
                     r"method=dialback", log), log[-5000:]
    assert "dialback verification local.test -> remote.test: valid" in log
    ej = fed.ejabberd.log_text()
    assert "Unexpected info" not in ej
    routed = {k: v for k, v in m.items() if k.startswith("s2sproxy_stanzas_total")}
    print(f"\n[{first} first] {MESSAGES} messages each way, pings {seen['pings']}, "
          f"s2s ping: {s2s_ping.strip()}; stanzas routed {routed}, flags 0; {elapsed:.1f}s")


def test_conversation_without_bidi_uses_two_connections(federation):
    """With bidi off in Prosody the same traffic flows over two one-way connections."""
    fed = federation(via_proxy=True, bidi=False)
    proxy, port = proxy_with_metrics(fed)
    seen = harness.run_async(lambda: conversation(fed.run, "remote"), 120)
    m = metrics(port)
    assert len(seen["alice"]) == MESSAGES and len(seen["bob"]) == MESSAGES
    assert all(r is not None for r in seen["pings"].values())
    assert seen["disco"] == [True, True], seen
    # No flag, and bob's ping to the served domain was answered by s2sproxy.
    assert not [k for k in m if k.startswith("s2sproxy_flags_total")], m
    assert m['s2sproxy_pings_answered_total{peer="remote.test"}'] == 1, m
    log = proxy.log_text()
    assert " flag " not in log
    assert connections_between(log) == {"inbound": 1, "outbound": 1, "bidi": 0}, log[-5000:]
    dirs = sorted(s["dir"] for s in fed.prosody.s2s_sessions() if s["remote"] == "local.test")
    assert dirs == ["-->", "<--"], fed.prosody.s2s_show()
    assert "Unexpected info" not in fed.ejabberd.log_text()


class SilentServer:
    """Accepts TCP connections on loopback and never says a word."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.conns: list[socket.socket] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


def test_unreachable_remotes_bounce_with_the_right_condition(federation):
    """A message to a domain that does not exist comes back remote-server-not-found;
    one to a server that accepts TCP but never answers comes back
    remote-server-timeout, after timeouts.auth."""
    silent = SilentServer("127.0.0.40", 5269)
    try:
        fed = federation(via_proxy=True, bidi=True)
        fed.start_proxy(remotes={"remote.test": ["127.0.0.20:5269"],
                                 "silent.test": ["127.0.0.40:5269"]},
                        extra_toml="[timeouts]\nauth = 3\nconnect = 3\n")

        async def scenario():
            alice = await harness.Client.connected(ALICE, fed.run.ca_file)
            out = {}
            try:
                for to in ("someone@nowhere.test", "someone@silent.test"):
                    t0 = time.monotonic()
                    alice.send_message(to, "hello?")
                    err = await alice.wait_message(
                        20, match=lambda m, to=to: m.type == "error" and m.from_ == to)
                    out[to] = (err.xml, time.monotonic() - t0)
            finally:
                await alice.close()
            return out

        out = harness.run_async(scenario, 60)
    finally:
        silent.stop()
    xml, took = out["someone@nowhere.test"]
    assert "remote-server-not-found" in xml, xml
    xml, took_silent = out["someone@silent.test"]
    assert "remote-server-timeout" in xml, xml
    assert 2.5 <= took_silent <= 10, took_silent
    print(f"\nbounces: not-found after {took:.2f}s, timeout after {took_silent:.2f}s")
