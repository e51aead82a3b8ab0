"""scripts/demo: real Prosody 0.12 (remote.test), ejabberd 24.12 (local.test) behind
``twistd s2sproxy``, all on loopback, a short conversation both ways, and what
s2sproxy made of it: a transcript, the streams, ``s2sproxy status``.  Everything it
starts is stopped (by pid) before it exits.  Uses the integration tests' harness
(tests/integration/harness.py) for the servers and the clients."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import harness  # noqa: E402
from harness import ALICE, BOB  # noqa: E402

T0 = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def at() -> str:
    return f"[{time.monotonic() - T0:5.1f} s]"


async def conversation(fed, transcript: list[str]) -> None:
    alice, bob = await asyncio.gather(harness.Client.connected(ALICE, fed.run.ca_file),
                                      harness.Client.connected(BOB, fed.run.ca_file))
    try:
        async def send(frm, to_client, to, body) -> float:
            t = time.monotonic()
            frm.send_message(to.bare, body)
            await to_client.wait_message(20, match=lambda m: m.body == body)
            return (time.monotonic() - t) * 1000
        ms = await send(bob, alice, ALICE, "Hi Alice, Bob here, on Prosody.")
        transcript.append(f"{at()} bob@remote.test -> alice@local.test  \"Hi Alice, Bob "
                          f"here, on Prosody.\"  delivered in {ms:.0f} ms")
        transcript.append("           Prosody -> s2sproxy (Prosody's stream) -> ejabberd "
                          "(s2sproxy's stream to it)")
        ms = await send(alice, bob, BOB, "Hello Bob! ejabberd 24.12 here, via s2sproxy.")
        transcript.append(f"{at()} alice@local.test -> bob@remote.test  \"Hello Bob! "
                          f"ejabberd 24.12 here, via s2sproxy.\"  delivered in {ms:.0f} ms")
        transcript.append("           ejabberd -> s2sproxy (ejabberd's stream to its backend "
                          "listener) -> Prosody (back on Prosody's own bidi stream)")
        t = time.monotonic()
        await bob.xmpp.plugin["xep_0199"].ping(jid="local.test", timeout=10)
        transcript.append(f"{at()} bob@remote.test pings local.test (XEP-0199): answered "
                          f"in {(time.monotonic() - t) * 1000:.0f} ms, by s2sproxy itself")
        # an iq result that answers nothing: s2sproxy flags it (and forwards it)
        bob.xmpp.make_iq_result(id="never-asked", ito="alice@local.test/it").send()
        transcript.append(f"{at()} bob@remote.test sends an iq result nobody asked for "
                          "(id never-asked)")
        await asyncio.sleep(1.0)
    finally:
        await asyncio.gather(alice.close(), bob.close())


def explain(log: str) -> list[str]:
    """What s2sproxy did, from its own log lines."""
    out = []
    pats = [
        (r"public stream authenticated: (\S+) -> (\S+) method=(\w+) tls=True bidi=(\w+)",
         lambda m: f"Prosody ({m[1]}) opened a stream to s2sproxy: TLS, SASL {m[3]}"
                   f"{', bidi (our stanzas to it go back on the same connection)' if m[4] == 'True' else ''}"),
        (r"backend stream ready for (\S+) -> (\S+) \(dialback accepted by ejabberd, tls=(\w+)",
         lambda m: f"s2sproxy opened a one-way stream to ejabberd for {m[1]} -> {m[2]}"
                   f" (dialback, with s2sproxy as {m[1]}'s authoritative server"
                   f"{', STARTTLS' if m[3] == 'True' else ''}): no bidi for ejabberd"),
        (r"backend-in stream authenticated: (\S+) -> (\S+) method=(\w+)",
         lambda m: f"ejabberd's outgoing stream for {m[1]} -> {m[2]} came to s2sproxy's "
                   f"backend listener ({m[3]}, verified with ejabberd)"),
        (r"flag (\S+) action=(\w+) .*?kind=(\w+) type=(\w+) id=(\S+)",
         lambda m: f"flag: {m[3]} type={m[4]} id={m[5]}: {m[1]} (action: {m[2]})"),
    ]
    for line in log.splitlines():
        for pat, text in pats:
            m = re.search(pat, line)
            if m:
                out.append(text(m))
    return out


def main() -> int:
    harness.require_tools()
    run = harness.RunDir.create(prefix="s2sproxy-demo-")
    fed = None
    code = 1
    try:
        say("Starting ejabberd 24.12 (local.test) and Prosody 0.12 (remote.test) on "
            "loopback ...")
        fed = harness.start_federation(run, via_proxy=True, bidi=True, quiet=True)
        metrics_port = harness.free_port()
        proxy = fed.start_proxy(log_level="info", extra_toml=(
            f'[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'))
        say(f"{at()} s2sproxy is up (pid {proxy.pid}); ejabberd listens on 127.0.0.1:15269 "
            "only, the world talks to s2sproxy on 127.0.0.30:5269")
        say()
        transcript: list[str] = []
        harness.run_async(lambda: conversation(fed, transcript), 90)
        log = proxy.log_text()
        m = harness.metrics(metrics_port)
        pings = sum(v for k, v in m.items() if k.startswith("s2sproxy_pings_answered_total"))
        flagged = sum(v for k, v in m.items() if k.startswith("s2sproxy_flags_total"))
        say("Conversation (real clients: alice on ejabberd, bob on Prosody):")
        for line in transcript:
            say("  " + line)
        say()
        say("What s2sproxy did:")
        for line in explain(log):
            say("  - " + line)
        inbound = m.get('s2sproxy_stanzas_total{direction="inbound"}', 0)
        outbound = m.get('s2sproxy_stanzas_total{direction="outbound"}', 0)
        say(f"  - pings to local.test answered by s2sproxy itself (ejabberd never saw "
            f"them): {pings:.0f}; stanzas flagged: {flagged:.0f}; stanzas routed: "
            f"{inbound:.0f} to ejabberd, {outbound:.0f} to remotes")
        say()
        say("$ s2sproxy status")
        r = subprocess.run([sys.executable, "-m", "s2sproxy", "status", "--config",
                            str(proxy.config_path)], capture_output=True, text=True,
                           timeout=30, cwd=str(ROOT))
        say(r.stdout.rstrip() or r.stderr.rstrip())
        say()
        code = 0 if r.returncode == 0 and pings >= 1 and flagged >= 1 else 1
    except harness.HarnessError as e:
        say(f"demo failed: {e}")
    finally:
        if fed is not None:
            say("Stopping s2sproxy, Prosody and ejabberd ...")
            fed.stop()
        say(f"Done in {time.monotonic() - T0:.0f} s; logs in {run.path}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
