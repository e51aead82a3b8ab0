"""``s2sproxy status`` against a real running proxy with Prosody and ejabberd
federating through it (issue 10): every stream with its role, domains, method, TLS,
bidi and counts; ``--json`` for scripts; a clear line when nothing answers."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration


def status(config, *args: str) -> subprocess.CompletedProcess:
    return harness.s2sproxy_cli("status", config, *args)


def test_status_shows_each_stream_of_a_real_federation(federation):
    fed = federation(via_proxy=True, bidi=True)
    proxy = fed.start_proxy()
    for i in range(3):
        assert fed.send(BOB, ALICE, f"in {i}").body == f"in {i}"
    assert fed.send(ALICE, BOB, "out").body == "out"

    r = status(proxy.config_path, "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["domains"] == ["local.test"]
    by_role = {}
    for s in st["streams"]:
        by_role.setdefault(s["role"], []).append(s)
    # Prosody's bidi stream: EXTERNAL, TLS 1.3, carrying alice's message back to bob
    (public,) = [s for s in by_role["public"] if s["authenticated"]]
    assert public["authenticated"] == ["remote.test -> local.test"]
    assert (public["direction"], public["method"], public["tls"], public["bidi"]) == \
        ("in", "external", "TLSv1.3", True)
    assert public["in_stanzas"] >= 3 and public["out_stanzas"] >= 1
    assert public["carries"] == ["local.test -> remote.test"]
    # ejabberd's side: our stream to it (dialback) and its stream to us
    (backend,) = by_role["backend"]
    assert backend["direction"] == "out" and backend["method"] == "dialback"
    assert backend["authenticated"] == ["remote.test -> local.test"]
    assert backend["out_stanzas"] >= 3
    assert any(s["authenticated"] == ["local.test -> remote.test"] and
               s["in_stanzas"] >= 1 for s in by_role["backend-in"])
    assert st["links"] == [] and st["pending_iqs"] == 0

    text = status(proxy.config_path)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    print("\n" + out)
    assert re.match(r"s2sproxy 0\.1\.0 \(pid \d+\) serving local\.test\n", out), out
    assert "Streams (" in out and "Links not ready (0):" in out and "Pending iqs: 0" in out
    row = next(ln for ln in out.splitlines() if "remote.test -> local.test" in ln
               and " public " in ln)
    assert "external" in row and "TLSv1.3" in row and "bidi" in row

    proxy.stop()
    r = status(proxy.config_path)
    assert r.returncode == 2
    assert r.stderr.startswith("s2sproxy status: no control socket at "), r.stderr
