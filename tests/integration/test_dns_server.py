"""The test world's DNS server (dns_server.KnotServer, Knot DNS; here on 127.0.0.54:53,
apart from tests/world's 127.0.0.53, so the two never meet) as s2sproxy sees it:
s2sproxy's own resolver (tx.resolver.RemoteResolver, configured by a real s2sproxy.toml
with ``dns.nameservers = ["127.0.0.54:53"]``) on a real reactor,
and its outgoing-connection plan (core.connect.ConnectPlan) fed with the answers.

Needs root (port 53) and knotd only, no XMPP server.  127.0.0.54:53 is a fixed
resource: a test fails (naming the holder) if something else listens there."""

from __future__ import annotations

import os

import pytest
import pytest_twisted

import dns_server
import harness
from dns_server import KnotServer
from s2sproxy import config
from s2sproxy.core.connect import Attempt, ConnectPlan, Exhausted, LookupAddresses, \
    LookupSrv, rules_from
from s2sproxy.core.srv import Target, order
from s2sproxy.tx.resolver import RemoteResolver

pytestmark = pytest.mark.integration

ADDRESS = "127.0.0.54"   # tests/world runs its Knot on 127.0.0.53

EXAMPLE = """
    ; two priorities and weights per service; relative and absolute targets
    _xmpp-server._tcp.multi   SRV 10 60 5269 xmpp1.multi
    _xmpp-server._tcp.multi   SRV 10 40 5279 xmpp2.multi.example.
    _xmpp-server._tcp.multi   SRV 20 0  5289 backup.multi
    _xmpps-server._tcp.multi  SRV 5  100 5270 xmpp1.multi
    _xmpps-server._tcp.multi  SRV 30 0  5280 backup.multi
    xmpp1.multi               A    127.0.0.21
    xmpp2.multi               A    127.0.0.22
    backup.multi              AAAA ::1
    ; "no service" (RFC 2782)
    _xmpp-server._tcp.none    SRV 0 0 0 .
    ; dual stack
    dual                      A    127.0.0.20
    dual                      AAAA ::1
    ; a CNAME chain of two links inside the zone, and one into another zone
    alias1                    CNAME alias2
    alias2                    CNAME host.example.
    host                      A    127.0.0.23
    far                       CNAME alias.other.
"""
OTHER = """
    alias   CNAME end
    end     A     127.0.0.24
"""


@pytest.fixture
def knot(run_dir):
    try:
        dns_server.require_knot()
    except harness.HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    server = KnotServer(run_dir.path, {"example": EXAMPLE, "other": OTHER}, address=ADDRESS)
    try:
        server.start()
    except harness.HarnessError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()
    assert not harness.pid_alive(server.pid)


@pytest.fixture
def settings(run_dir, knot):
    """s2sproxy's settings from a real config file naming the Knot server."""
    path = harness.write_s2sproxy_config(
        run_dir, backend_port=harness.free_port(), dns_port=harness.free_port(),
        remotes={}, nameservers=[knot.nameserver])
    return config.load(path)


def resolver(settings) -> RemoteResolver:
    from twisted.internet import reactor
    return RemoteResolver(settings.remotes, settings.nameservers, reactor)


def test_config_names_the_knot_server(settings, knot):
    assert knot.nameserver == f"{ADDRESS}:53"
    assert settings.nameservers == ((ADDRESS, 53),)


@pytest_twisted.ensureDeferred
async def test_srv_records_come_with_priorities_weights_ports_and_targets(settings):
    direct, starttls = await resolver(settings).srv("multi.example")
    assert direct.error == "" and starttls.error == ""
    assert sorted(direct.records, key=lambda t: t.priority) == [
        Target("xmpp1.multi.example", 5270, True, 5, 100),
        Target("backup.multi.example", 5280, True, 30, 0)]
    assert sorted(starttls.records, key=lambda t: (t.priority, -t.weight)) == [
        Target("xmpp1.multi.example", 5269, False, 10, 60),
        Target("xmpp2.multi.example", 5279, False, 10, 40),
        Target("backup.multi.example", 5289, False, 20, 0)]
    merged = order(list(direct.records + starttls.records), lambda lo, hi: lo)
    assert [t.priority for t in merged] == [5, 10, 10, 20, 30]


@pytest_twisted.ensureDeferred
async def test_connect_plan_reaches_the_first_target_address(settings):
    """The plan, fed with Knot's answers, first tries xmpp1.multi.example (priority 5,
    Direct TLS) at its A record; then the priority 10 targets."""
    res = resolver(settings)
    plan = ConnectPlan("multi.example", rules_from([], settings.allow_private_targets),
                       lambda lo, hi: lo)
    assert plan.next() == LookupSrv("multi.example")
    plan.srv_answered(*await res.srv("multi.example"))
    step = plan.next()
    assert step == LookupAddresses("xmpp1.multi.example")
    plan.addresses_answered(step.host, *await res.addresses(step.host))
    step = plan.next()
    assert isinstance(step, Attempt)
    assert (step.address, step.port, step.direct_tls) == ("127.0.0.21", 5270, True)


@pytest_twisted.ensureDeferred
async def test_srv_target_dot_is_no_service(settings):
    direct, starttls = await resolver(settings).srv("none.example")
    assert direct.records == () and direct.error == "NXDOMAIN"
    assert starttls.records == (Target(".", 0, False, 0, 0),)
    assert order(list(starttls.records), lambda lo, hi: lo) == []
    plan = ConnectPlan("none.example", rules_from([], True), lambda lo, hi: lo)
    plan.next()
    plan.srv_answered(direct, starttls)
    step = plan.next()            # no fallback to none.example:5269
    assert isinstance(step, Exhausted)
    assert step.condition == "remote-server-not-found"
    assert "_xmpp-server: no service (SRV target '.')" in step.text


@pytest_twisted.ensureDeferred
async def test_dual_stack_host_has_both_addresses(settings):
    assert await resolver(settings).addresses("dual.example") == (
        ["::1"], ["127.0.0.20"], "")


@pytest_twisted.ensureDeferred
async def test_cname_chains_resolve(settings, knot):
    assert knot.query("alias1.example", "CNAME") == ["alias2.example."]
    assert knot.query("alias2.example", "CNAME") == ["host.example."]
    res = resolver(settings)
    assert await res.addresses("alias1.example") == ([], ["127.0.0.23"], "")
    # Knot ends its answer at the zone's edge; the resolver asks again for alias.other.
    assert knot.query("far.example", "A") == []
    assert knot.query("far.example", "CNAME") == ["alias.other."]
    assert await res.addresses("far.example") == ([], ["127.0.0.24"], "")


@pytest_twisted.ensureDeferred
async def test_unknown_names(settings, knot):
    assert knot.query("missing.example", "A") == []            # NXDOMAIN
    assert await resolver(settings).addresses("missing.example") == (
        [], [], "AAAA NXDOMAIN; A NXDOMAIN")
    with pytest.raises(dns_server.DnsQueryError, match="REFUSED"):
        knot.query("elsewhere.test", "A")                      # not our zone: no recursion


@pytest_twisted.ensureDeferred
async def test_set_zone_serves_the_changed_record(settings, knot):
    assert knot.query("dual.example", "A") == ["127.0.0.20"]
    assert knot.served_serial("example") == 1
    body = EXAMPLE.replace("A    127.0.0.20", "A    127.0.0.29")
    assert knot.set_zone("example", body) == 2
    assert knot.served_serial("example") == 2
    assert knot.query("dual.example", "A") == ["127.0.0.29"]
    assert await resolver(settings).addresses("dual.example") == (
        ["::1"], ["127.0.0.29"], "")
    # a zone knotd cannot load (CNAME beside another record) keeps the old one served
    with pytest.raises(harness.HarnessError):
        knot.set_zone("other", "alias CNAME end\nalias A 127.0.0.1\nend A 127.0.0.24")
    assert knot.served_serial("other") == 1
    assert knot.query("alias.other", "A") == ["127.0.0.24"]


def test_stop_leaves_no_knotd(knot):
    pid = knot.pid
    assert harness.pid_alive(pid)
    assert any(f"pid {pid} " in h for h in dns_server.socket_holders(ADDRESS, 53))
    knot.stop()
    assert not harness.pid_alive(pid)
    assert [p for p, _pp, _c, cmd in harness._proc_entries()
            if str(knot.conf_path) in cmd and harness.pid_alive(p)] == []
    assert dns_server.socket_holders(ADDRESS, 53) == []
    knot.stop()                   # idempotent


def test_second_server_on_the_same_address_is_refused(knot, tmp_path):
    other = KnotServer(tmp_path, {"example": "x A 127.0.0.1"}, address=ADDRESS)
    with pytest.raises(harness.HarnessError, match=f"already in use: .*pid {knot.pid} "):
        other.start()
    assert other.pid is None
    assert knot.query("dual.example", "A") == ["127.0.0.20"]


def test_missing_knotd_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(dns_server, "_which", lambda name: None)
    server = KnotServer(tmp_path, {"example": "x A 127.0.0.1"})
    with pytest.raises(harness.HarnessError, match="apt-get install -y knot"):
        server.start()
    assert server.pid is None


def test_zone_file_has_soa_ns_and_the_body(tmp_path):
    server = KnotServer(tmp_path, {"Example.": "  x  A 127.0.0.1\n  y  CNAME x\n"})
    text = server.zone_path("example").read_text()
    assert "$ORIGIN example.\n$TTL 60\n" in text
    assert "@ IN SOA knot-ns.example. hostmaster.example. 1 " in text
    assert "@ IN NS knot-ns.example.\nknot-ns.example. IN A 127.0.0.53\n" in text
    assert text.endswith("x  A 127.0.0.1\ny  CNAME x\n")
    conf = server.conf_path.read_text()
    assert "listen: 127.0.0.53@53" in conf
    assert f'listen: "{tmp_path}/knot/run/knot.sock"' in conf
    with pytest.raises(ValueError):
        KnotServer(tmp_path, {"example": ""}, address="192.0.2.1")
    assert os.stat(server.dir).st_mode & 0o755 == 0o755
