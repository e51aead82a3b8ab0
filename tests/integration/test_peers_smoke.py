"""Proves the harness without s2sproxy: ejabberd and Prosody federate directly.

ejabberd (local.test) keeps its s2s listener on 127.0.0.10:5269; its inetrc names
only a DnsResponder run by this test, which answers
_xmpp-server._tcp.remote.test with SRV 0 5 5269 127.0.0.20 (an IP-literal target:
ejabberd resolves targets with inet:getaddrs, which parses it without any lookup).
Prosody (remote.test) finds local.test at 127.0.0.10 through its hoststxt.
"""

from __future__ import annotations

import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("prosody_trusts_ca", [False, True], ids=["dialback", "external"])
def test_direct_federation(federation, run_dir, prosody_trusts_ca):
    t0 = time.monotonic()
    dns = harness.DnsResponder(srv={
        "_xmpp-server._tcp.remote.test": [(0, 5, harness.S2S_PORT, harness.PROSODY_IP)],
    })
    fed = federation(via_proxy=False, dns=dns, bidi=True,
                     prosody_trusts_ca=prosody_trusts_ca, ejabberd_starttls="required")
    started = time.monotonic() - t0

    # remote -> local first: Prosody opens the connection (lab README)
    got = fed.send(BOB, ALICE, "hello alice from bob")
    assert got.body == "hello alice from bob"
    assert got.from_.startswith("bob@remote.test/")
    assert got.to.split("/")[0] == "alice@local.test"

    got = fed.send(ALICE, BOB, "hello bob from alice")
    assert got.body == "hello bob from alice"
    assert got.from_.startswith("alice@local.test/")

    # ejabberd asked our responder (and, with {resolv_conf, ""}, nothing else)
    assert dns.asked("_xmpp-server._tcp.remote.test"), dns.queries

    show = fed.prosody.s2s_show()
    assert "local.test" in show, show

    ej_log = fed.ejabberd.log_text()
    if prosody_trusts_ca:
        # Prosody verifies ejabberd's certificate and ejabberd trusts Prosody's:
        # Prosody -> ejabberd authenticates with SASL EXTERNAL.
        assert "Accepted inbound s2s EXTERNAL authentication remote.test -> local.test" \
            in ej_log, ej_log[-3000:]
    else:
        assert "Accepted inbound s2s" in ej_log, ej_log[-3000:]

    fed.stop()
    assert not harness.peer_processes(run_dir.path)
    total = time.monotonic() - t0
    print(f"\nstart {started:.1f} s, total {total:.1f} s\n{show}")
    assert total < 40
