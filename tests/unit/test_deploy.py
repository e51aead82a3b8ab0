"""deploy/s2sproxy.service passes ``systemd-analyze verify`` and has what issue 10
asks of it: its own user, the usual hardening, one capability, reload by SIGHUP."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy/s2sproxy.service"


def service_section() -> dict[str, str]:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read_string(UNIT.read_text())
    return dict(cp["Service"])


def test_unit_hardening_and_reload():
    s = service_section()
    assert s["User"] == "s2sproxy" and s["Group"] == "s2sproxy"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "true"
    assert s["CapabilityBoundingSet"] == s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert s["RuntimeDirectory"] == "s2sproxy"       # /run/s2sproxy: control.socket
    assert "--nodaemon" in s["ExecStart"] and "--logfile=-" in s["ExecStart"]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    # scripts/install-peers installs systemd where a container image lacks it
    assert shutil.which("systemd-analyze"), "systemd-analyze missing: scripts/install-peers"
    # The one path that only exists once installed as the unit's comment says.
    twistd = Path(sys.executable).with_name("twistd")
    unit = tmp_path / "s2sproxy.service"
    unit.write_text(UNIT.read_text().replace("/opt/s2sproxy/bin/twistd", str(twistd)))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
