"""SIGTERM with traffic in flight (issue 7, defect 15): every message is delivered or
bounced to its sender, none is lost silently, and s2sproxy exits cleanly in time."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

EACH_WAY = 75


def _send(client: harness.Client, to: str, body: str, id_: str) -> None:
    msg = client.xmpp.make_message(mto=to, mbody=body, mtype="chat")
    msg["id"] = id_
    msg.send()


def _id(xml: str) -> str | None:
    m = re.search(r"""\bid=["']([^"']+)""", xml)
    return m.group(1) if m else None


async def burst_then_sigterm(fed) -> dict:
    alice, bob = await asyncio.gather(harness.Client.connected(ALICE, fed.run.ca_file),
                                      harness.Client.connected(BOB, fed.run.ca_file))
    try:
        # both directions up first
        for s, r, to in ((bob, alice, ALICE), (alice, bob, BOB)):
            s.send_message(to.bare, "warm-up")
            await r.wait_message(20, match=lambda m: m.body == "warm-up")
        for i in range(EACH_WAY):
            _send(alice, BOB.bare, f"a{i}", f"a{i}")
            _send(bob, ALICE.bare, f"b{i}", f"b{i}")
        got = {"a": set(), "b": set()}          # delivered, by sender
        bounced = {"a": set(), "b": set()}      # errors back to the sender

        def collect() -> None:
            for client in (alice, bob):
                while not client.messages.empty():
                    m = client.messages.get_nowait()
                    mid = _id(m.xml) or ""
                    if re.fullmatch(r"[ab]\d+", mid):
                        (bounced if m.type == "error" else got)[mid[0]].add(mid)
        # SIGTERM once some of each direction got through: the rest is in flight
        deadline = time.monotonic() + 20
        while (len(got["a"]) < 3 or len(got["b"]) < 3) and time.monotonic() < deadline:
            collect()
            await asyncio.sleep(0.005)
        stopping = asyncio.get_running_loop().run_in_executor(None, fed.proxy.stop)
        t0 = time.monotonic()
        code = await stopping
        stop_took = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
                len(got[k] | bounced[k]) < EACH_WAY for k in "ab"):
            collect()
            await asyncio.sleep(0.2)
    finally:
        await asyncio.gather(alice.close(), bob.close())
    return {"got": got, "bounced": bounced, "code": code, "stop_took": stop_took}


def test_sigterm_in_flight_loses_nothing_silently(federation):
    fed = federation(via_proxy=True, bidi=True)
    fed.start_proxy()
    out = harness.run_async(lambda: burst_then_sigterm(fed), 150)
    log = fed.proxy.log_text()
    for k, who in (("a", "alice -> bob"), ("b", "bob -> alice")):
        accounted = out["got"][k] | out["bounced"][k]
        missing = sorted(set(f"{k}{i}" for i in range(EACH_WAY)) - accounted,
                         key=lambda x: int(x[1:]))
        assert not missing, (who, missing, log[-4000:])
    # twistd re-raises the signal that stopped it, so the exit status is SIGTERM's
    assert out["code"] in (0, -15), (out["code"], log[-3000:])
    assert out["stop_took"] < 15, out["stop_took"]
    assert "Traceback" not in log
    print(f"\nSIGTERM mid-burst: alice->bob delivered {len(out['got']['a'])} bounced "
          f"{len(out['bounced']['a'])}; bob->alice delivered {len(out['got']['b'])} "
          f"bounced {len(out['bounced']['b'])}; stop took {out['stop_took']:.2f} s")
