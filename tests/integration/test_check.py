"""``s2sproxy check`` against a real running proxy and ejabberd (issue 10): everything
in order gives exit 0; a wrong backend address, a public SRV record on another port
and an expiring certificate each give one line naming it and exit 1."""

from __future__ import annotations

import subprocess

import pytest

import harness

pytestmark = pytest.mark.integration


def check(config, *args: str) -> subprocess.CompletedProcess:
    return harness.s2sproxy_cli("check", config, *args)


def test_check_against_running_proxy_and_ejabberd(federation):
    fed = federation(via_proxy=True, bidi=True)
    public = harness.DnsResponder(srv={
        "_xmpp-server._tcp.local.test": [(0, 0, harness.PROXY_STARTTLS_PORT,
                                          "xmpp.local.test")],
        "_xmpps-server._tcp.local.test": [(0, 0, harness.PROXY_DIRECT_TLS_PORT,
                                           "xmpp.local.test")]})
    public.start()
    try:
        proxy = fed.start_proxy(nameservers=[f"127.0.0.1:{public.port}"])
        r = check(proxy.config_path, "--dns", "--verbose")
        print("\n" + r.stdout)
        assert r.returncode == 0, r.stdout + r.stderr
        out = r.stdout
        for line in ("ok: certificate local.test: chain verifies",
                     f"ok: ejabberd {harness.EJABBERD_INTERNAL_IP}:"
                     f"{harness.EJABBERD_INTERNAL_S2S_PORT}: answers with STARTTLS",
                     "ok: backend DNS 127.0.0.1:", "ok: backend.srv_target localhost",
                     f"ok: DNS _xmpp-server._tcp.local.test: xmpp.local.test:"
                     f"{harness.PROXY_STARTTLS_PORT}",
                     "s2sproxy check: all "):
            assert line in out, (line, out)
        # Who asked what: the public SRV records at the configured nameserver.
        assert public.asked("_xmpp-server._tcp.local.test")

        # A wrong backend port, a public SRV record on another port, a certificate
        # about to expire: each one line, exit 1.
        public.srv["_xmpps-server._tcp.local.test"] = [(0, 0, 5999, "xmpp.local.test")]
        d = proxy.config_path.parent
        fed.run.ca.issue("local.test", days=3).write(d / "local.test.crt",
                                                      d / "local.test.key")
        good = proxy.config_path.read_text()
        proxy.config_path.write_text(good.replace(
            f"port = {harness.EJABBERD_INTERNAL_S2S_PORT}", f"port = {harness.free_port()}"))
        r = check(proxy.config_path, "--dns")
        print(r.stdout)
        assert r.returncode == 1
        lines = r.stdout.splitlines()
        assert any(x.startswith("warn: certificate local.test: expires in 2.9") or
                   x.startswith("warn: certificate local.test: expires in 3.0")
                   for x in lines), lines
        assert any(x.startswith("error: ejabberd ") and "does not answer" in x
                   for x in lines), lines
        assert any(x.startswith("error: DNS _xmpps-server._tcp.local.test: "
                                "xmpp.local.test:5999: port(s) 5999 are not this proxy's")
                   for x in lines), lines
        assert lines[-1] == "s2sproxy check: 3 problem(s) in " + lines[-1].split(" in ")[1]

        # A configuration error: the one line start-up would print.
        proxy.config_path.write_text(good + "\n[limits]\nmax_depth = 1\n")
        r = check(proxy.config_path)
        assert r.returncode == 1
        assert r.stdout.splitlines()[0] == \
            "error: config: limits.max_depth: must be an integer >= 4, not 1", r.stdout
    finally:
        public.stop()
