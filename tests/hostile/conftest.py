"""Fixtures of the hostile-input suite; see hostile_world.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hostile_world import (CONFIG, Pinger, World, harness, print_table,  # noqa: E402
                           rss_kib)


@pytest.fixture(scope="module")
def world(request):
    harness.require_tools()
    harness.check_fixed_ports_free()
    run = harness.RunDir.create(prefix="s2sproxy-hostile-")
    dns = harness.DnsResponder()
    dns.start()
    proxy = pinger = None
    failed = False
    metrics_port = harness.free_port()
    try:
        proxy = harness.start_s2sproxy(
            run, backend_port=harness.free_port(), dns_port=harness.free_port(udp_too=True),
            remotes={}, nameservers=[f"127.0.0.1:{dns.port}"], log_level="info",
            extra_toml=CONFIG + f'\n[metrics]\nlisten = "tcp:{metrics_port}:'
                                f'interface=127.0.0.1"\n')
        pinger = Pinger(run)
        time.sleep(1.5)
        w = World(run, proxy, pinger, rss_kib(proxy.proc.pid), metrics_port)
        w.new_log()
        yield w
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():    # shown in a normal run
            print_table(w, print)
    except BaseException:
        failed = True
        raise
    finally:
        if pinger is not None:
            pinger.stop()
        if proxy is not None:
            proxy.stop()
        dns.stop()
        if failed or os.environ.get("S2SPROXY_IT_KEEP"):
            run.keep = True
            sys.stderr.write(f"\nhostile run directory kept: {run.path}\n")
        run.cleanup()


