"""scripts/demo's program (demo/demo.py) runs, prints its transcript and the status
table, stops what it started, and exits 0 (issue 10)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

import harness

pytestmark = pytest.mark.integration


def test_demo_runs_and_tells_what_happened():
    r = subprocess.run([sys.executable, str(harness.REPO_ROOT / "demo" / "demo.py")],
                       capture_output=True, text=True, timeout=180,
                       cwd=str(harness.REPO_ROOT))
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    for line in ("bob@remote.test -> alice@local.test  \"Hi Alice",
                 "alice@local.test -> bob@remote.test  \"Hello Bob",
                 "by s2sproxy itself",
                 "flag: iq type=result id=never-asked: unsolicited-iq-response",
                 "$ s2sproxy status", "Streams (3):", "Stopping s2sproxy"):
        assert line in out, (line, out)
    logs = re.search(r"logs in (/\S+s2sproxy-demo-\S+)", out)
    if logs:
        shutil.rmtree(logs.group(1), ignore_errors=True)
    left = [(pid, cmd) for pid, _pp, _comm, cmd in harness._proc_entries()
            if "s2sproxy-demo-" in cmd and harness.pid_alive(pid)]
    assert not left, left
