"""Fixtures of the federation test world (world.py).

    world      session: Knot and the remote servers, started once; after the last test,
               everything stopped and checked gone (no beam, lua, knotd of this run)
    backend    session, parametrized by backend version (ejabberd 24.12, 23.01): that
               ejabberd behind a fresh s2sproxy; pytest runs every test of one version,
               then stops it and starts the next
    matrix     the interop matrix the tests fill in; printed as a table at the end of
               the run (pytest_terminal_summary)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

import harness  # noqa: E402
import versions  # noqa: E402
import world as W  # noqa: E402
from matrix import MATRIX, render  # noqa: E402

BACKENDS = [versions.EJABBERD_2412, versions.EJABBERD_2301]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item.session.world_failed = True


@pytest.fixture(scope="session")
def world(request):
    try:
        harness.require_tools()
        for v in (versions.PROSODY_012, versions.PROSODY_13, *BACKENDS):
            if not v.available():
                raise harness.HarnessError(v.missing())
    except harness.HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    W.check_ports_free()
    w = W.World(versions)
    try:
        w.start()
        yield w
    finally:
        try:
            w.stop()
        finally:
            left = harness.peer_processes(w.run.path)
            if getattr(request.session, "world_failed", False) or \
                    os.environ.get("S2SPROXY_IT_KEEP"):
                w.run.keep = True
                sys.stderr.write(f"\nworld run directory kept: {w.run.path}\n")
            w.run.cleanup()
        assert not left, f"processes left running: {left}"


@pytest.fixture(scope="session", params=BACKENDS, ids=lambda v: f"ejabberd-{v.version}")
def backend(request, world):
    b = world.start_backend(request.param)
    try:
        yield b
    finally:
        world.stop_backend()


def pytest_terminal_summary(terminalreporter):
    if MATRIX.cells:
        terminalreporter.write_sep("=", "interop matrix (tests/world)")
        terminalreporter.write_line(render())
