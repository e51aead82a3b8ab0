"""Proves the harness without s2sproxy: ejabberd and Prosody federate directly.

ejabberd (local.test) keeps its s2s listener on 127.0.0.10:5269; its inetrc names
only a DnsResponder run by this test, which answers
_xmpp-server._tcp.remote.test with SRV 0 5 5269 127.0.0.20 (an IP-literal target
works: ejabberd resolves targets with inet:getaddrs, which parses the literal).
Prosody (remote.test) finds local.test at 127.0.0.10 through its hoststxt.
"""

from __future__ import annotations

import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

CASES = {
    # neither server trusts the test CA: dialback both ways (ejabberd verifies
    # Prosody's key by calling remote.test back, through the DnsResponder)
    "dialback-required": dict(trust=False, starttls="required"),
    # both trust it: SASL EXTERNAL both ways
    "external-required": dict(trust=True, starttls="required"),
    "dialback-optional": dict(trust=False, starttls="optional"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_federation(federation, run_dir, case):
    trust, starttls = CASES[case]["trust"], CASES[case]["starttls"]
    t0 = time.monotonic()
    dns = harness.DnsResponder(srv={
        "_xmpp-server._tcp.remote.test": [(0, 5, harness.S2S_PORT, harness.PROSODY_IP)],
    })
    fed = federation(via_proxy=False, dns=dns, bidi=True, prosody_trusts_ca=trust,
                     ejabberd_trusts_ca=trust, ejabberd_starttls=starttls)
    started = time.monotonic() - t0

    # remote -> local first: Prosody opens the connection (lab README)
    got = fed.send(BOB, ALICE, "hello alice from bob")
    assert got.body == "hello alice from bob"
    assert got.from_.startswith("bob@remote.test/")
    assert got.to.split("/")[0] == "alice@local.test"

    got = fed.send(ALICE, BOB, "hello bob from alice")
    assert got.body == "hello bob from alice"
    assert got.from_.startswith("alice@local.test/")

    # ejabberd asked our responder (its inetrc names nothing else)
    assert dns.asked("_xmpp-server._tcp.remote.test"), dns.queries
    print(f"\nDNS queries: {dns.queries}")

    sessions = fed.prosody.s2s_sessions()
    dirs = sorted(s["dir"] for s in sessions if s["remote"] == "local.test")
    assert dirs == ["-->", "<--"], sessions          # ejabberd 24.12 never does bidi
    assert all(s["security"].startswith("TLS") for s in sessions), sessions

    ej_log = fed.ejabberd.log_text()
    pr_log = fed.prosody.log_text(debug=True)
    if trust:
        assert "Accepted inbound s2s EXTERNAL authentication remote.test -> local.test" \
            in ej_log, ej_log[-3000:]
        assert all(s["sasl"] == "Succeeded" for s in sessions), sessions
    else:
        assert "Accepted inbound s2s dialback authentication remote.test -> local.test" \
            in ej_log, ej_log[-3000:]
        assert "asking local.test if key" in pr_log

    fed.stop()
    assert not harness.peer_processes(run_dir.path)
    total = time.monotonic() - t0
    print(f"\n{case}: start {started:.1f} s, total {total:.1f} s")
    assert total < 40
