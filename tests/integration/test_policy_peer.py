"""The stanza policy against a raw s2s peer (issue #4).

A test peer authenticates like a real server (STARTTLS, SASL EXTERNAL with a
certificate from the run's CA, bidi) and then sends each kind of unexpected stanza.
Each must be flagged with the right reason and handled with the configured action,
while a normal message sent after each still reaches alice@local.test (ejabberd).
Then a peer that stops answering is detected, its stream closed, and the iq pending
toward it answered with remote-server-timeout.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest

import harness
from harness import ALICE

pytestmark = pytest.mark.integration

POLICY = """
[policy.actions]
"invalid-from" = "drop"
"host-unknown" = "drop"
"not-a-stanza" = "drop"
"improper-addressing" = "drop"

[flags]
json_log = "{run}/flags.jsonl"
quarantine = "{run}/quarantine.jsonl"

[keepalive]
whitespace = 1
ping = 2
timeout = 2
"""

EVE = "eve@raw.test/r"
CAPS_NODE = "https://s2sproxy.test/raw"
WRONG_VER = "AAAAAAAAAAAAAAAAAAAAAAAAAAA="


def flags(run) -> list[dict]:
    path = run.path / "flags.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_flags(run, n: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(flags(run)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return flags(run)


@pytest.fixture
def proxied(federation):
    fed = federation(via_proxy=True, bidi=True)
    fed.start_proxy(extra_toml=POLICY.format(run=fed.run.path))
    return fed


def test_each_unexpected_stanza_is_flagged_and_handled_as_configured(proxied):
    """Unsolicited result (forward), iq without child (bounce bad-request), unknown type
    (forward), spoofed from / unserved to / not a stanza / no from (drop, as configured
    here), caps hash mismatch (forward): each flagged, the stream undisturbed."""
    fed = proxied
    raw = harness.RawPeer(fed.run).open(bidi=True)
    cases = [
        (f"<iq type='result' id='u1' from='{EVE}' to='alice@local.test/it'/>",
         "unsolicited-iq-response", "forward"),
        (f"<iq type='get' id='c1' from='{EVE}' to='alice@local.test/it'/>",
         "iq-child-count", "bounce"),
        (f"<message type='shout' from='{EVE}' to='alice@local.test'><body>shout</body>"
         f"</message>", "unknown-type", "forward"),
        ("<message from='eve@spoofed.test' to='alice@local.test'><body>spoof</body>"
         "</message>", "invalid-from", "drop"),
        (f"<message from='{EVE}' to='bob@elsewhere.test'><body>x</body></message>",
         "host-unknown", "drop"),
        ("<foo xmlns='urn:example:foo'/>", "not-a-stanza", "drop"),
        ("<message to='alice@local.test'><body>anonymous</body></message>",
         "improper-addressing", "drop"),
    ]

    async def scenario():
        alice = await harness.Client.connected(ALICE, fed.run.ca_file,
                                               feature="urn:s2sproxy:test:alice")
        try:
            for i, (data, _reason, _action) in enumerate(cases):
                raw.send(data)
                probe = f"still here {i}"
                raw.send(f"<message from='{EVE}' to='alice@local.test' type='chat'>"
                         f"<body>{probe}</body></message>")
                await alice.wait_message(10, match=lambda m, p=probe: m.body == p)
            # caps: eve announces caps to alice; alice's client asks disco#info for
            # node#ver over s2s; eve answers with a result whose hash does not match.
            raw.send(f"<presence from='{EVE}' to='alice@local.test'><c xmlns='http://"
                     f"jabber.org/protocol/caps' hash='sha-1' node='{CAPS_NODE}' "
                     f"ver='{WRONG_VER}'/></presence>")
            got = await asyncio.get_running_loop().run_in_executor(
                None, lambda: raw.wait_for(b"disco#info", 15))
            m = re.search(rb"<iq[^>]*\bid=['\"]([^'\"]+)['\"][^>]*>\s*<query[^>]*"
                          rb"http://jabber.org/protocol/disco#info", got)
            assert m, got[-800:]
            raw.send(f"<iq type='result' id='{m.group(1).decode()}' from='{EVE}' "
                     f"to='alice@local.test/it'><query xmlns='http://jabber.org/protocol/"
                     f"disco#info' node='{CAPS_NODE}#{WRONG_VER}'><identity "
                     f"category='client' type='pc' name='raw'/><feature var='http://"
                     f"jabber.org/protocol/disco#info'/></query></iq>")
            raw.send(f"<message from='{EVE}' to='alice@local.test' type='chat'>"
                     f"<body>last</body></message>")
            await alice.wait_message(10, match=lambda m: m.body == "last")
        finally:
            await alice.close()

    harness.run_async(scenario, 90)
    records = wait_flags(fed.run, len(cases) + 1)
    assert [(r["reason"], r["action"]) for r in records] == \
        [(reason, action) for _d, reason, action in cases] + \
        [("caps-hash-mismatch", "forward")], records
    assert all(r["peer"] in ("raw.test", "spoofed.test", "") for r in records), records
    # the bounce for the childless iq went back to eve on her bidi stream
    assert re.search(rb"<iq [^>]*type='error'[^>]*id='c1'[^>]*>.*bad-request", raw.received)
    assert not raw.closed
    quarantine = (fed.run.path / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == len(cases) + 1
    assert "spoof" in json.loads(quarantine[3])["content"]
    raw.close()


VIOLATIONS = {
    "before-auth": (lambda: b"<message from='eve@raw.test' to='alice@local.test'/>",
                    b"not-authorized"),
    # limits.max_stanza_size is 512 KiB by default
    "oversize": (lambda: b"<message from='eve@raw.test/r' to='alice@local.test'><body>"
                 + b"x" * (600 * 1024) + b"</body></message>", b"policy-violation"),
    "restricted-xml": (lambda: b"<!-- a comment -->", b"restricted-xml"),
}


@pytest.mark.parametrize("case", list(VIOLATIONS))
def test_stream_level_violations_close_with_stream_error(proxied, case):
    """What cannot be skipped safely ends the stream with the RFC 6120 condition, flagged."""
    fed = proxied
    make, condition = VIOLATIONS[case]
    data, reason = make(), case
    raw = harness.RawPeer(fed.run)
    if case == "before-auth":
        raw.open(tls=False)
        raw.send(data)
        got = raw._read_until(b"</stream:stream>")
    else:
        raw.open(bidi=True)
        raw.send(data)
        got = raw.wait_for(b"</stream:stream>")
    assert b"<" + condition + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in got
    assert [(r["reason"], r["action"]) for r in wait_flags(fed.run, 1)] == [(reason, "close")]
    raw.close()


def test_dead_remote_is_detected_and_pending_iq_answered(proxied):
    """A peer that stops answering is pinged after keepalive.ping, declared dead after
    keepalive.timeout, its stream closed, and alice's iq to it answered with
    remote-server-timeout."""
    fed = proxied
    raw = harness.RawPeer(fed.run).open(bidi=True)

    async def scenario():
        import slixmpp
        from slixmpp.xmlstream import ET
        alice = await harness.Client.connected(ALICE, fed.run.ca_file)
        try:
            iq = alice.xmpp.Iq()
            iq["type"] = "get"
            iq["to"] = EVE
            iq.append(ET.Element("{jabber:iq:version}query"))
            fut = asyncio.ensure_future(iq.send(timeout=30))
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: raw.wait_for(b"jabber:iq:version", 10))
            raw.stop_reading()
            t0 = time.monotonic()
            with pytest.raises(slixmpp.exceptions.IqError) as e:
                await fut
            return e.value.iq["error"]["condition"], time.monotonic() - t0
        finally:
            await alice.close()

    condition, elapsed = harness.run_async(scenario, 60)
    assert condition == "remote-server-timeout"
    # silence of keepalive.ping (2 s), then keepalive.timeout (2 s), on a 1 s tick
    assert 3 <= elapsed <= 8, elapsed
    log = fed.proxy.log_text()
    assert re.search(r"public stream .* to raw\.test dead: no answer to a keepalive ping",
                     log), log[-3000:]
    print(f"\ndead peer detected and iq answered {elapsed:.1f}s after it went silent")
    raw.close()
