"""Every peer version the harness can run (versions.py) really runs, as itself.

For ejabberd 24.12 (installed), ejabberd 23.01 and Prosody 13.0.1 (unpacked by
scripts/unpack-peers) and Prosody 0.12 (installed): start it alone in its own run
directory, ask the running server which version it is (ejabberdctl status and its
log; the Prosody admin shell, prosodyctl about and its log), check that its native
code comes from the intended tree, register a user and log in as that user, stop it,
and check that no process of the run is left.

The servers use the fixed loopback addresses of harness.py: one test at a time.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

import harness
import versions
from harness import EJABBERD_IP, LOCAL_DOMAIN, PROSODY_IP, REMOTE_DOMAIN, Account

pytestmark = pytest.mark.integration

EJABBERDS = [versions.EJABBERD_2412, versions.EJABBERD_2301]
PROSODIES = [versions.PROSODY_012, versions.PROSODY_13]


def _require(version: versions.PeerVersion) -> None:
    missing = version.missing()
    if missing:
        pytest.fail(missing, pytrace=False)


def _assert_is(version: versions.PeerVersion, reported: str, where: str) -> None:
    """``reported`` (e.g. "23.01-1", "0.12.3") is ``version``: exactly its Debian
    version when that is fixed, else its version with any suffix."""
    if version.debian_version is not None and version.kind == "ejabberd":
        assert reported == version.debian_version, f"{where}: {reported!r}, want {version}"
    elif version.debian_version is not None:  # Prosody reports the upstream version
        assert reported == version.version, f"{where}: {reported!r}, want {version}"
    else:
        assert re.fullmatch(re.escape(version.version) + r"([-.~+].*)?", reported), \
            f"{where}: {reported!r}, want {version}"


def _mapped_libraries(pid: int) -> set[str]:
    """Shared objects mapped into ``pid`` (NIFs, Lua C modules)."""
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f
                if len(line.split()) >= 6 and line.split()[-1].endswith(".so")}


def _assert_native_code_from(version: versions.PeerVersion, libs: set[str],
                             ours: str, system_dir: str) -> None:
    """The libraries matching ``ours`` (the server's own native code) come from the
    unpacked tree for an unpacked version, from ``system_dir`` for an installed one."""
    own = sorted(p for p in libs if ours in p)
    assert own, f"no {ours} library mapped: {sorted(libs)}"
    root = str(version.tree) if version.tree is not None else system_dir
    wrong = [p for p in own if not p.startswith(root + "/")]
    assert not wrong, f"{version} runs libraries from outside {root}: {wrong}"


def _log_in(account: Account, ca_file) -> None:
    async def session() -> None:
        c = await harness.Client.connected(account, ca_file)
        await c.close()
    harness.run_async(session, 30)


def _epmds() -> set[int]:
    return {p for p, comm, _ in harness.peer_processes() if comm == "epmd"}


def _assert_all_stopped(run: harness.RunDir, epmd_before: set[int]) -> None:
    left = [p for p in harness.peer_processes(run.path) if p[1] != "epmd"]
    new_epmd = _epmds() - epmd_before
    assert not left and not new_epmd, f"left running: {left}, new epmd: {new_epmd}"


@pytest.mark.parametrize("version", EJABBERDS, ids=str)
def test_ejabberd_version_runs(peers, run_dir, version):
    _require(version)
    harness.check_fixed_ports_free()
    epmd_before = _epmds()
    ej = harness.Ejabberd(run_dir, dns_port=harness.free_port(udp_too=True),
                          s2s_port=harness.S2S_PORT, version=version)
    try:
        ej.start()
        status = ej.ctl("status").stdout
        running = re.search(r"ejabberd (\S+) is running in that node", status)
        assert running, f"ejabberdctl status: {status!r}"
        _assert_is(version, running.group(1), "ejabberdctl status")
        started = re.search(r"ejabberd (\S+) is started in the node", ej.log_text())
        assert started, harness.tail(ej.log_path)
        _assert_is(version, started.group(1), "ejabberd.log")
        _assert_native_code_from(version, _mapped_libraries(ej.beam_pid), "/lib/erlang/lib/p1_",
                                 "/usr/lib/erlang/lib")

        ej.register("carol", "carol-pw-1")
        users = ej.ctl("registered_users", LOCAL_DOMAIN).stdout.split()
        assert users == ["carol"], users
        _log_in(Account(f"carol@{LOCAL_DOMAIN}", "carol-pw-1", EJABBERD_IP), run_dir.ca_file)
    finally:
        ej.stop()
    _assert_all_stopped(run_dir, epmd_before)


@pytest.mark.parametrize("version", PROSODIES, ids=str)
def test_prosody_version_runs(peers, run_dir, version):
    _require(version)
    harness.check_fixed_ports_free()
    epmd_before = _epmds()
    pr = harness.Prosody(run_dir, version=version)
    try:
        about = pr.prosodyctl("about").stdout
        first = re.match(r"Prosody (\S+)\n", about)
        assert first, f"prosodyctl about: {about[:300]!r}"
        _assert_is(version, first.group(1), "prosodyctl about")
        source = str(version.tree / "usr/lib/prosody") if version.tree else "/usr/lib/prosody"
        assert f"Source directory:   {source}\n" in about, about

        pr.start()
        running = pr.shell("server", "version")
        got = re.search(r"OK: (\S+)", running)
        assert got, f"shell server version: {running!r}"
        _assert_is(version, got.group(1), "admin shell")
        hello = re.search(r"Hello and welcome to Prosody version (\S+)", pr.log_text())
        assert hello, harness.tail(pr.log_path)
        _assert_is(version, hello.group(1), "prosody.log")
        _assert_native_code_from(version, _mapped_libraries(pr.proc.pid), "/lib/prosody/util/",
                                 "/usr/lib/prosody")

        pr.register("carol", "carol-pw-1")
        listed = pr.shell("user", "list", REMOTE_DOMAIN)
        assert f"carol@{REMOTE_DOMAIN}" in listed.split(), listed
        _log_in(Account(f"carol@{REMOTE_DOMAIN}", "carol-pw-1", PROSODY_IP), run_dir.ca_file)
    finally:
        pr.stop()
    _assert_all_stopped(run_dir, epmd_before)


def test_ejabberd_2301_refuses_bidi(run_dir):
    """ejabberd 23.01 has no mod_s2s_bidi (it would not start with one configured)."""
    assert not versions.EJABBERD_2301.has_mod_s2s_bidi
    with pytest.raises(ValueError, match="no mod_s2s_bidi"):
        harness.Ejabberd(run_dir, dns_port=1, bidi=True, version=versions.EJABBERD_2301)


def test_missing_tree_names_install_peers(tmp_path):
    absent = dataclasses.replace(versions.PROSODY_13, tree=tmp_path / "prosody-13.0.1",
                                 prosody=str(tmp_path / "prosody-13.0.1/bin/prosody"),
                                 prosodyctl=str(tmp_path / "prosody-13.0.1/bin/prosodyctl"))
    assert not absent.available()
    assert "scripts/install-peers" in absent.missing()
    assert str(tmp_path / "prosody-13.0.1") in absent.missing()
