"""Dialback both ways with real Prosody, the local user speaking first (issue 7,
defect 16): s2sproxy's own stream to remote.test and Prosody's bidi stream to
local.test (opened to verify our dialback key) both come up for the same domain pair.
Whatever s2sproxy does about two streams for one pair, nothing may be lost or
reordered."""

from __future__ import annotations

import asyncio
import re

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

COUNT = 6


async def local_first(run) -> list[str]:
    alice, bob = await asyncio.gather(harness.Client.connected(ALICE, run.ca_file),
                                      harness.Client.connected(BOB, run.ca_file))
    got: list[str] = []
    try:
        for i in range(COUNT):
            alice.send_message(BOB.bare, f"local first #{i}")
        for _ in range(COUNT):
            m = await bob.wait_message(20, match=lambda m: m.body.startswith("local first"))
            got.append(m.body)
    except harness.HarnessError:
        pass
    finally:
        await asyncio.gather(alice.close(), bob.close())
    return got


@pytest.mark.parametrize("direct_tls", [False, True])
def test_dialback_both_ways_local_first_loses_nothing(federation, direct_tls):
    """Neither side trusts the other's CA (dialback both ways); alice speaks first with
    COUNT messages sent at once: bob gets all of them, in order."""
    fed = federation(via_proxy=True, bidi=True, prosody_trusts_ca=False)
    address = f"{harness.PROSODY_IP}:{harness.PROSODY_DIRECT_TLS_PORT if direct_tls else 5269}"
    proxy = fed.start_proxy(trusts_ca=False, remotes={},
                            extra_toml=f'[remote."remote.test"]\n'
                                       f'{"direct_tls" if direct_tls else "starttls"} = '
                                       f'["{address}"]\n')
    got = harness.run_async(lambda: local_first(fed.run), 90)
    log = proxy.log_text()
    assert got == [f"local first #{i}" for i in range(COUNT)], (got, log[-6000:])
    assert "Traceback" not in log
    streams = re.findall(r"(?:remote stream ready|public stream authenticated): .*?bidi=\w+",
                         log)
    print(f"\n[direct_tls={direct_tls}] delivered {len(got)}/{COUNT}; streams: {streams}")
