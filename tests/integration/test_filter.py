"""[filter] with real Prosody and ejabberd (issue 11): remote.test listed in a
blocklist file cannot reach alice (Prosody's stream is refused at authentication) and
alice's messages to it bounce not-allowed from s2sproxy, with denied-domain flags;
taken off the list (the file changes on disk, no reload), it federates again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration


async def attempt(fed, sender, recipient, body: str, timeout: float = 20.0) -> str:
    """'delivered' or the bounce's error condition."""
    a, b = await asyncio.gather(harness.Client.connected(sender, fed.run.ca_file),
                                harness.Client.connected(recipient, fed.run.ca_file))
    try:
        out, xml = await harness.delivered_or_bounced(a, b, recipient, body, timeout)
        if out != "bounced":
            return out
        for cond in ("not-allowed", "remote-server-not-found", "remote-server-timeout",
                     "policy-violation", "forbidden", "not-authorized"):
            if cond in xml:
                return cond
        return xml
    finally:
        await asyncio.gather(a.close(), b.close())


def test_blocklist_file_denies_then_allows_again(federation):
    fed = federation(via_proxy=True, bidi=True)
    d = fed.run.path / "s2sproxy"
    d.mkdir(exist_ok=True)
    lst = d / "blocklist.txt"
    lst.write_text("# test list\nspam.invalid\nremote.test\n")
    proxy = fed.start_proxy(extra_toml='[filter]\ndeny_files = ["blocklist.txt"]\n')

    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "to a denied domain"), 60)
    assert out == "not-allowed", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "from a denied domain"), 60)
    assert out != "delivered", out
    log = proxy.log_text()
    assert "flag denied-domain action=bounce" in log
    assert "flag denied-domain action=refuse" in log
    assert "filter.deny_files: " + str(lst) + ": 2 domains" in log
    r = harness.s2sproxy_cli("status", proxy.config_path, "--json")
    reasons = {f["reason"] for f in json.loads(r.stdout)["last_flags"]}
    assert reasons == {"denied-domain"}, reasons
    got = harness.run_async(lambda: _raw_to_alice(fed), 60)
    assert got == "delivered", got        # raw.test, not listed, on the same run

    # off the list: no reload, the file's change is noticed within a tick
    lst.write_text("spam.invalid\n")
    os.utime(lst, None)
    deadline = time.monotonic() + 10
    while "filter.deny_files: " + str(lst) + ": 1 domains" not in proxy.log_text():
        assert time.monotonic() < deadline, proxy.log_text()[-2000:]
        time.sleep(0.1)
    # Prosody remembers the refusal for a while (its s2s retry): alice speaks first
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "allowed again", 30), 60)
    assert out == "delivered", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "hello again", 30), 60)
    assert out == "delivered", out
    assert "Traceback" not in proxy.log_text()


@pytest.mark.parametrize("deny", ["remote.test", "*.remote.test"])
def test_filter_deny_list_exact_and_wildcard(federation, deny):
    """filter.deny names remote.test (exactly, or as *.remote.test: the domain and its
    subdomains): Prosody cannot reach alice nor alice bob, with denied-domain flags;
    raw.test, not denied, reaches alice on the same run."""
    fed = federation(via_proxy=True, bidi=True)
    proxy = fed.start_proxy(extra_toml=f'[filter]\ndeny = ["{deny}"]\n')
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "to a denied domain"), 60)
    assert out == "not-allowed", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "from a denied domain", 10),
                            60)
    assert out != "delivered", out
    log = proxy.log_text()
    assert "flag denied-domain action=bounce" in log
    assert "flag denied-domain action=refuse" in log
    assert f"detail=filter.deny: {deny}" in log
    got = harness.run_async(lambda: _raw_to_alice(fed), 60)
    assert got == "delivered", got
    assert "Traceback" not in proxy.log_text()


def test_prosody_13_honours_our_xep0478_max_bytes(federation):
    """With limits.max_stanza_size = 10000, Prosody 13 reads our advertised max-bytes
    and does not send bob's larger message (its log says so; it bounces nothing to
    bob, as 13.0.1 does): it never reaches us, so s2sproxy closes nothing with
    policy-violation, and the next message is delivered."""
    import versions
    if versions.PROSODY_13.missing():
        pytest.fail(versions.PROSODY_13.missing())
    fed = federation(via_proxy=True, bidi=True, prosody_version=versions.PROSODY_13)
    proxy = fed.start_proxy(extra_toml="[limits]\nmax_stanza_size = 10000\n")
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "small first"), 60)
    assert out == "delivered", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "x" * 12000, 5), 60)
    assert out in ("policy-violation", "nothing"), out
    harness.wait_for(lambda: "exceeding session limit of 10000B" in
                     fed.prosody.log_text(), 10, "Prosody 13 to apply our max-bytes")
    log = proxy.log_text()
    assert "stanza larger than" not in log and "policy-violation" not in log, log[-2000:]
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "small after"), 60)
    assert out == "delivered", out
    assert "Traceback" not in proxy.log_text()


async def burst_and_other(fed, n: int) -> dict:
    """bob sends ``n`` messages at once; meanwhile raw.test (another remote) sends one:
    when each arrived at alice."""
    alice, bob = await asyncio.gather(harness.Client.connected(ALICE, fed.run.ca_file),
                                      harness.Client.connected(BOB, fed.run.ca_file))
    try:
        await _warm(bob, alice)
        raw = harness.RawPeer(fed.run).open(bidi=True)
        try:
            t0 = time.monotonic()
            for i in range(n):      # 2 KB each at 25/s: 50 KB/s against 20 KB/s
                bob.send_message(ALICE.bare, f"burst {i} " + "x" * 2000)
                await asyncio.sleep(0.04)
            t_raw = time.monotonic()
            raw.send("<message from='eve@raw.test/r' to='alice@local.test' type='chat' "
                     "id='r1'><body>from another remote</body></message>")
            arrived: dict[str, float] = {}
            deadline = time.monotonic() + 60
            while len(arrived) < n + 1 and time.monotonic() < deadline:
                try:
                    m = await alice.wait_message(1)
                except harness.HarnessError:
                    continue
                arrived[m.body.split(" x", 1)[0].rstrip("x ")] = time.monotonic()
        finally:
            raw.close()
    finally:
        await asyncio.gather(alice.close(), bob.close())
    return {"t0": t0, "t_raw": t_raw, "arrived": arrived}


async def _warm(bob, alice) -> None:
    bob.send_message(ALICE.bare, "warm-up")
    await alice.wait_message(20, match=lambda m: m.body == "warm-up")


def test_rate_limited_remote_is_slowed_not_dropped_and_others_are_not(federation):
    """ratelimit.bytes_per_second = 20000 (burst 1 s): bob's 50 messages of 2 KB, sent
    at 25/s, all arrive, the last of them seconds after they were sent; raw.test's
    message, sent while bob is throttled, arrives at once."""
    fed = federation(via_proxy=True, bidi=True)
    proxy = fed.start_proxy(extra_toml="[ratelimit]\nbytes_per_second = 20000\n"
                                       "burst_seconds = 1\nflag_after = 1\n")
    n = 50
    out = harness.run_async(lambda: burst_and_other(fed, n), 120)
    arrived = out["arrived"]
    missing = [i for i in range(n) if f"burst {i}" not in arrived]
    assert not missing, missing
    last = max(arrived[f"burst {i}"] for i in range(n)) - out["t0"]
    other = arrived["from another remote"] - out["t_raw"]
    print(f"\nrate-limited remote: last of {n} after {last:.1f} s; the other remote's "
          f"message after {other * 1000:.0f} ms")
    assert last >= 3.5, last        # about 110 KB at 20 KB/s after a 20 KB burst: ~4.5 s
    assert other < 1.0, other
    assert "flag rate-limited action=throttle" in proxy.log_text()
    assert "Traceback" not in proxy.log_text()


# -- real-time block list: Prosody's mod_pubsub as the RTBL service ---------------------

RTBL = "rtbl.test"
NODE = "spam_source_domains"


class Publisher:
    """bob, admin of Prosody's pubsub component, publishing and retracting on NODE as
    an RTBL operator does (an item per domain, its id the domain, a report payload)."""

    def __init__(self, fed) -> None:
        self.fed = fed

    async def _do(self, what):
        c = await harness.Client.connected(BOB, self.fed.run.ca_file)
        try:
            c.xmpp.register_plugin("xep_0060")
            return await what(c.xmpp.plugin["xep_0060"])
        finally:
            await c.close()

    def run(self, what):
        return harness.run_async(lambda: self._do(what), 60)

    def create(self):
        self.run(lambda ps: ps.create_node(RTBL, NODE, timeout=10))

    def publish(self, domain: str):
        from xml.etree import ElementTree as ET
        report = ET.Element("{urn:xmpp:reporting:1}report",
                            reason="urn:xmpp:reporting:spam")
        self.run(lambda ps: ps.publish(RTBL, NODE, id=domain, payload=report, timeout=10))

    def retract(self, domain: str):
        self.run(lambda ps: ps.retract(RTBL, NODE, domain, notify=True, timeout=10))

    def unsubscribe(self, jid: str):
        """As the node's owner: the service forgets our subscription."""
        self.run(lambda ps: ps.modify_subscriptions(RTBL, NODE, [(jid, "none")],
                                                    timeout=10))

    def subscribers(self) -> list[str]:
        async def get(ps):
            iq = await ps.get_node_subscriptions(RTBL, NODE, timeout=10)
            return [str(s["jid"]) for s in iq["pubsub_owner"]["subscriptions"]
                    if s["subscription"] == "subscribed"]
        return self.run(get)


def _wait_log(proxy, text: str, timeout: float, since: int = 0) -> float:
    t0 = time.monotonic()
    harness.wait_for(lambda: text in proxy.log_text()[since:], timeout,
                     f"s2sproxy to log {text!r}",
                     on_timeout=lambda: proxy.log_text()[-3000:])
    return time.monotonic() - t0


def test_rtbl_on_real_prosody_pubsub_denies_and_allows_again(federation):
    """s2sproxy subscribes, as local.test/s2sproxy-rtbl, to spam_source_domains on
    Prosody's pubsub service rtbl.test and fetches its items.  remote.test published
    there is refused within seconds (both ways, denied-domain flags naming the list),
    while raw.test still reaches alice; retracted, remote.test federates again.  A
    subscription the service forgot is mended by the periodic sync
    (filter.rtbl_refresh), and a restarted s2sproxy fetches the list again.  None of
    the service's stanzas reaches ejabberd."""
    fed = federation(via_proxy=True, bidi=True, prosody_pubsub=RTBL)
    pub = Publisher(fed)
    pub.create()
    pub.publish("spam.invalid")
    remotes = {harness.REMOTE_DOMAIN: [f"{harness.PROSODY_IP}:{harness.S2S_PORT}"],
               RTBL: [f"{harness.PROSODY_IP}:{harness.S2S_PORT}"]}
    port = harness.free_port()
    toml = (f'[metrics]\nlisten = "tcp:{port}:interface=127.0.0.1"\n\n'
            f'[filter]\nrtbl_refresh = 10\n\n[[filter.rtbl]]\nservice = "{RTBL}"\n'
            f'node = "{NODE}"\n')
    proxy = fed.start_proxy(remotes=remotes, extra_toml=toml)
    name = f"rtbl {RTBL}/{NODE}"
    _wait_log(proxy, f"{name}: subscription subscribed", 20)
    _wait_log(proxy, f"{name}: 1 domains (1 added, 0 removed)", 20)
    assert pub.subscribers() == ["local.test/s2sproxy-rtbl"]
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "before the listing"), 60)
    assert out == "delivered", out

    # the service's stanzas are s2sproxy's: a notification reaches no one in ejabberd
    inbound = 's2sproxy_stanzas_total{direction="inbound"}'
    before = harness.metrics(port)
    mark = len(proxy.log_text())
    pub.publish("other.invalid")
    _wait_log(proxy, f"{name}: added other.invalid", 10, mark)
    entries = f's2sproxy_rtbl_entries{{source="{name}"}}'
    harness.wait_for(lambda: harness.metrics(port)[entries] == 2, 5,
                     "the gauge (updated once a second)")
    after = harness.metrics(port)
    assert after[inbound] == before[inbound], (before[inbound], after[inbound])
    assert after[f's2sproxy_rtbl_subscribed{{source="{name}"}}'] == 1

    # listed: refused within seconds
    mark = len(proxy.log_text())
    t0 = time.monotonic()
    pub.publish(harness.REMOTE_DOMAIN)
    _wait_log(proxy, f"{name}: added {harness.REMOTE_DOMAIN}", 10, mark)
    took = time.monotonic() - t0
    print(f"\nRTBL: remote.test published -> denied by s2sproxy in {took * 1000:.0f} ms")
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "to a listed domain"), 60)
    assert out == "not-allowed", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "from a listed domain", 10),
                            60)
    assert out != "delivered", out
    log = proxy.log_text()[mark:]
    assert f"detail={name}: {harness.REMOTE_DOMAIN}" in log, log[-3000:]
    assert "flag denied-domain action=bounce" in log
    assert "flag denied-domain action=refuse" in log or "now denied by [filter]" in log
    got = harness.run_async(lambda: _raw_to_alice(fed), 60)
    assert got == "delivered", got        # another remote is not affected

    # retracted: federates again
    mark = len(proxy.log_text())
    pub.retract(harness.REMOTE_DOMAIN)
    _wait_log(proxy, f"{name}: removed {harness.REMOTE_DOMAIN}", 10, mark)
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "allowed again", 30), 60)
    assert out == "delivered", out
    out = harness.run_async(lambda: attempt(fed, BOB, ALICE, "hello again", 30), 60)
    assert out == "delivered", out

    # the service forgets our subscription: the next sync (<= 10 s) mends it and
    # fetches what was published meanwhile
    pub.unsubscribe("local.test/s2sproxy-rtbl")
    assert pub.subscribers() == []
    mark = len(proxy.log_text())
    pub.publish("missed.invalid")
    _wait_log(proxy, f"{name}: 3 domains (1 added, 0 removed)", 25, mark)
    assert pub.subscribers() == ["local.test/s2sproxy-rtbl"]

    # a restart fetches the list again
    pub.publish(harness.REMOTE_DOMAIN)
    _wait_log(proxy, f"{name}: added {harness.REMOTE_DOMAIN}", 10, mark)
    proxy.stop()
    proxy = fed.start_proxy(remotes=remotes, extra_toml=toml)
    _wait_log(proxy, f"{name}: 4 domains (4 added, 0 removed)", 20)
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "after the restart"), 60)
    assert out == "not-allowed", out

    assert "s2sproxy-rtbl" not in fed.ejabberd.log_text()
    assert "Traceback" not in proxy.log_text()
    st = json.loads(harness.s2sproxy_cli("status", proxy.config_path, "--json").stdout)
    assert [(r["source"], r["state"], r["entries"]) for r in st["rtbl"]] == \
        [(name, "subscribed", 4)]

    # the list taken out of the configuration (SIGHUP): unsubscribed, nothing denied
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text[:text.index("[[filter.rtbl]]")])
    mark = len(proxy.log_text())
    os.kill(proxy.pid, signal.SIGHUP)
    _wait_log(proxy, f"{name}: unsubscribed (result): no longer configured", 10, mark)
    assert pub.subscribers() == []
    out = harness.run_async(lambda: attempt(fed, ALICE, BOB, "list removed", 30), 60)
    assert out == "delivered", out
    assert "Traceback" not in proxy.log_text()


async def _raw_to_alice(fed) -> str:
    alice = await harness.Client.connected(ALICE, fed.run.ca_file)
    try:
        raw = harness.RawPeer(fed.run).open(bidi=True)
        try:
            raw.send("<message from='eve@raw.test/r' to='alice@local.test' type='chat' "
                     "id='r2'><body>raw.test is not listed</body></message>")
            await alice.wait_message(10, match=lambda m: m.body == "raw.test is not listed")
            return "delivered"
        finally:
            raw.close()
    finally:
        await alice.close()
