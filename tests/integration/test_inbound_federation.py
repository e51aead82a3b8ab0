"""Inbound federation through s2sproxy with real peers (issue #2).

Prosody 0.12 (remote.test, s2s_bidi on) connects to s2sproxy (local.test's public
listener on 127.0.0.30), which authenticates it, negotiates bidi, and relays bob's
message over a dialback-authenticated backend stream to ejabberd 24.12, configured only
as deploy/EJABBERD.md says.  Two runs cover both ways of authenticating the remote.
"""

from __future__ import annotations

import re
import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

CASES = {
    # s2sproxy does not trust the test CA: Prosody must use dialback, which s2sproxy
    # verifies by calling remote.test back; ejabberd requires STARTTLS.
    "dialback": dict(proxy_trusts_ca=False, starttls="required", method="dialback"),
    # s2sproxy trusts the test CA: SASL EXTERNAL; ejabberd's STARTTLS optional.
    "external": dict(proxy_trusts_ca=True, starttls="optional", method="external"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inbound_message_reaches_ejabberd_through_s2sproxy(federation, case):
    """bob@remote.test's message reaches alice@local.test through s2sproxy over one
    TLS + bidi stream from Prosody, and ejabberd accepts the backend stream by dialback."""
    c = CASES[case]
    t0 = time.monotonic()
    fed = federation(via_proxy=True, bidi=True, prosody_trusts_ca=True,
                     ejabberd_trusts_ca=True, ejabberd_starttls=c["starttls"])
    proxy = fed.start_proxy(trusts_ca=c["proxy_trusts_ca"])
    started = time.monotonic() - t0

    bodies = [f"hello alice ({case}) #{i}" for i in range(3)]
    for body in bodies:
        got = fed.send(BOB, ALICE, body)
        assert got.body == body
        assert got.from_.startswith("bob@remote.test/")
        assert got.to.split("/")[0] == "alice@local.test"

    log = proxy.log_text()
    # The remote's stream: TLS, the expected authentication, bidi.
    auth = re.findall(r"public stream authenticated: remote\.test -> local\.test "
                      r"method=(\w+) tls=(\w+) bidi=(\w+)", log)
    assert auth == [(c["method"], "True", "True")], log[-4000:]
    assert "public stream bidi negotiated" in log
    if c["method"] == "dialback":
        assert "dialback verification remote.test -> local.test: valid" in log, log[-4000:]
    # Exactly one connection from Prosody, bidirectional and encrypted.
    sessions = [s for s in fed.prosody.s2s_sessions() if s["remote"] == "local.test"]
    assert [s["dir"] for s in sessions] == ["<->"], fed.prosody.s2s_show()
    assert sessions[0]["security"].startswith("TLS"), sessions
    # ejabberd saw a plain one-way stream authenticated by dialback (s2sproxy as the
    # authoritative server for remote.test, reached through the backend DNS).
    assert re.search(r"backend stream ready for remote\.test -> local\.test \(dialback "
                     r"accepted by ejabberd, tls=(True|False)\)", log), log[-4000:]
    ej_log = fed.ejabberd.log_text()
    assert "Accepted inbound s2s dialback authentication remote.test -> local.test" \
        in ej_log, ej_log[-4000:]
    assert "Unexpected info" not in ej_log
    print(f"\n[{case}] peers+proxy up in {started:.1f}s, "
          f"{len(bodies)} messages delivered, total {time.monotonic() - t0:.1f}s")


def test_inbound_message_bounced_when_ejabberd_is_down(federation):
    """With ejabberd's internal listener down, bob's message comes back to him as an
    error message (remote-server-not-found) over the bidi stream, nothing silently lost."""
    fed = federation(via_proxy=True, bidi=True)
    proxy = fed.start_proxy()
    fed.ejabberd.stop()

    async def scenario():
        bob = await harness.Client.connected(BOB, fed.run.ca_file)
        try:
            t0 = time.monotonic()
            bob.send_message(ALICE.bare, "anyone there?")
            err = await bob.wait_message(20, match=lambda m: m.type == "error")
            return err, time.monotonic() - t0
        finally:
            await bob.close()

    err, elapsed = harness.run_async(scenario, 40)
    assert err.from_.startswith("alice@local.test"), err
    assert "remote-server-not-found" in err.xml, err.xml
    log = proxy.log_text()
    assert re.search(r"backend stream remote\.test -> local\.test failed: "
                     r"remote-server-not-found backend 127\.0\.0\.1:15269 unreachable", log), \
        log[-3000:]
    assert len(re.findall(r"bouncing <Stanza message type=chat .* with "
                          r"remote-server-not-found", log)) == 1, log[-3000:]
    print(f"\nbounce received by bob {elapsed:.2f}s after sending")
