"""Fixtures for the real-peer integration tests (see harness.py).

    run_dir         a fresh RunDir (/tmp/s2sproxy-it-*), removed after a passing test,
                    kept (path printed) after a failing one or with S2SPROXY_IT_KEEP=1
    peers           fails the test with the apt commands if ejabberd/Prosody are missing
    federation      factory: federation(**start_federation kwargs) -> Federation;
                    stopped at teardown, which then checks that no beam.smp, epmd or
                    Prosody process of this run is left
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request) -> bool:
    return any(getattr(request.node, f"rep_{w}", None) is not None
               and getattr(request.node, f"rep_{w}").failed for w in ("setup", "call"))


@pytest.fixture
def peers():
    try:
        harness.require_tools()
    except harness.HarnessError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def run_dir(request):
    run = harness.RunDir.create()
    yield run
    if _failed(request) or os.environ.get("S2SPROXY_IT_KEEP"):
        run.keep = True
        sys.stderr.write(f"\nintegration run directory kept: {run.path}\n")
    run.cleanup()


@pytest.fixture
def federation(peers, run_dir):
    started: list[harness.Federation] = []
    epmd_before = {p for p, c, _ in harness.peer_processes() if c == "epmd"}

    def make(**kw) -> harness.Federation:
        fed = harness.start_federation(run_dir, **kw)
        started.append(fed)
        return fed

    yield make
    for fed in reversed(started):
        fed.stop()
    left = harness.peer_processes(run_dir.path)
    new_epmd = [p for p in harness.peer_processes() if p[1] == "epmd" and p[0] not in epmd_before]
    assert not left and not new_epmd, f"processes left running: {left + new_epmd}"
