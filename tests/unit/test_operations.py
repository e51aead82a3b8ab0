"""Issue 10's sans-IO pieces: what a reload may change, the JSON log record, the
certificate expiry warning, and reconfiguring routers and policy in place."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from twisted.logger import Logger
from twisted.python.failure import Failure

from s2sproxy.config import ConfigError, RESTART_ONLY, load, reload_refusals
from s2sproxy.core.limits import CERT_EXPIRY_WARNING
from s2sproxy.core.routing import ByteBudget, Router, Write
from s2sproxy.logs import JsonLinesObserver, event_record
from s2sproxy.policy.classify import Policy, PolicyConfig
from s2sproxy.tx.certificates import expiry_warnings
from tests.unit.test_config import conf  # noqa: F401 (fixture)


def test_reload_refusals_name_each_restart_only_key(conf):  # noqa: F811
    running = load(conf())
    assert reload_refusals(running, load(conf())) == []
    changed = load(conf("""
        [public]
        starttls = ["tcp:5369"]
        [backend]
        listen = "tcp:15271"
        [log]
        format = "json"
        """))
    refusals = reload_refusals(running, changed)
    # backend.srv_port follows backend.listen's port unless set
    assert [r.split(" ", 1)[0] for r in refusals] == ["public.starttls", "backend.listen",
                                                      "backend.srv_port", "log.format"]
    assert all("restart s2sproxy to apply it" in r for r in refusals)


def test_reload_refusals_let_limits_policy_and_certificates_change(conf):  # noqa: F811
    running = load(conf())
    new = load(conf("""
        [limits]
        max_stanza_size = 100000
        [policy]
        answer_pings = false
        [queue]
        limit = 7
        [log]
        level = "warn"
        """))
    assert reload_refusals(running, new) == []
    assert new.max_stanza_size == 100000 and new.queue.limit == 7


def test_every_restart_only_key_is_compared(conf):  # noqa: F811
    """A key in RESTART_ONLY that reload_refusals did not read would raise KeyError."""
    s = load(conf())
    assert reload_refusals(s, s) == [] and len(RESTART_ONLY) >= 14


def test_log_format_is_checked(conf):  # noqa: F811
    with pytest.raises(ConfigError) as e:
        load(conf('[log]\nformat = "xml"\n'))
    assert str(e.value) == "log.format: must be text or json, not 'xml'"
    assert load(conf('[log]\nformat = "json"\n')).log_format == "json"


def test_json_record_has_the_events_named_fields():
    events = []
    log = Logger(namespace="s2sproxy.test", observer=events.append)
    log.info("public stream {peer} closed: {reason}", peer="192.0.2.1:5", reason="x",
             n=3, obj=object())
    rec = event_record(events[0])
    assert rec["message"] == "public stream 192.0.2.1:5 closed: x"
    assert rec["level"] == "info" and rec["namespace"] == "s2sproxy.test"
    assert rec["peer"] == "192.0.2.1:5" and rec["reason"] == "x" and rec["n"] == 3
    assert rec["obj"].startswith("<object object")
    assert rec["time"].endswith("+00:00")
    assert not any(k.startswith("log_") for k in rec)


def test_json_observer_writes_one_object_per_line_with_traceback():
    out = io.StringIO()
    observer = JsonLinesObserver(out)
    log = Logger(namespace="s2sproxy.test", observer=observer)
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("tick {part} failed", Failure(), part="iqs")
    log.warn("multi\nline {x}", x="y")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(x) for x in lines)
    assert first["level"] == "critical"     # log.failure's level
    assert "ZeroDivisionError" in first["traceback"] and first["part"] == "iqs"
    assert second["message"] == "multi\nline y" and second["level"] == "warn"


def test_expiry_warnings_from_fourteen_days():
    now = 1_000_000.0
    p = Path("/x.crt")
    ends = {"far": (p, now + CERT_EXPIRY_WARNING + 60), "near": (p, now + 3 * 86400),
            "gone": (p, now - 86400)}
    texts = expiry_warnings(ends, now)
    assert texts == ["certificate for near (/x.crt) expires in 3.0 days",
                     "certificate for gone (/x.crt) expired 1.0 days ago"]


def test_router_configure_keeps_queues_and_applies_new_limits():
    r = Router(queue_limit=5, max_age=30, idle_timeout=60, budget=ByteBudget(1 << 20))
    pair = ("remote.example", "local.example")
    from tests.unit.test_routing import st
    r.send(pair, [st(1)], 0)
    r.configure(queue_limit=1, max_age=30, idle_timeout=60, backoff_after=2,
                backoff_base=5, backoff_max=300, max_bytes=1 << 20)
    ops = r.send(pair, [st(2)], 1)       # over the new limit of 1: bounced
    assert [type(o).__name__ for o in ops] == ["Bounce"]
    assert r.stream_ready(pair, "s1", 2) == [Write("s1", b"<m1/>")]


def test_policy_reconfigure_keeps_pending_iqs():
    cfg = PolicyConfig({}, True, 30.0, 100, True)
    p = Policy(cfg, frozenset({"local.example"}))
    p.reconfigure(PolicyConfig({}, False, 5.0, 10, False))
    assert p.config.answer_pings is False
    assert (p.iqs.timeout, p.iqs.max_entries, p.cache) == (5.0, 10, None)


def test_write_counts_stanzas_but_compares_by_bytes():
    assert Write("h", b"<a/><b/>", 2) == Write("h", b"<a/><b/>")
    assert Write("h", b"<a/><b/>", 2).stanzas == 2



def test_check_secret_mode_and_expired_certificate(conf, tmp_path):  # noqa: F811
    import os
    import time

    from s2sproxy.check import OK, WARN, ERROR, certificate_findings, secret_findings
    from tests.unit.helpers import certificate
    from tests.unit.test_config import pem
    s = load(conf())
    assert [f.level for f in secret_findings(s)] == [OK]
    os.chmod(s.secret_file, 0o644)
    (f,) = secret_findings(s)
    assert f.level == WARN and "mode 0644: make it 0600" in f.text
    ca, _k, leaf, _key = certificate("local.example")
    (tmp_path / "c.pem").write_bytes(pem(leaf) + pem(ca))
    later = leaf.not_valid_after_utc.timestamp() + 2 * 86400
    levels = [(x.level, x.text) for x in certificate_findings(
        "local.example", tmp_path / "c.pem", __import__("OpenSSL").crypto.X509Store(),
        later)]
    assert (ERROR, "expired 2 days ago") in levels
    assert any(lv == WARN and "chain does not verify" in t for lv, t in levels)
    assert time.time() < later


def test_status_table_lists_streams_links_iqs_and_flags():
    from s2sproxy.cli import render_status
    st = {"version": "0.1.0", "domains": ["local.example"],
          "streams": [{"direction": "in", "role": "public", "peer": "192.0.2.1:4000",
                       "stream_id": "x", "authenticated": ["remote.example -> local.example"],
                       "carries": ["local.example -> remote.example"], "method": "external",
                       "tls": "TLSv1.3", "bidi": True, "age": 4000.0, "in_stanzas": 5,
                       "in_bytes": 900, "out_stanzas": 2, "out_bytes": 300, "queued": 0}],
          "links": [{"router": "to-remote", "pair": "local.example -> down.example",
                     "state": "backoff", "queued": 0, "queued_bytes": 0, "failures": 3,
                     "condition": "remote-server-not-found", "retry_in": 42.0}],
          "pending_iqs": 1, "oldest_iqs": [{"from": "a@local.example", "to":
                                            "remote.example", "id": "q1",
                                            "expires_in": 80.0}],
          "flags_total": 1, "last_flags": [{"reason": "unsolicited-response",
                                            "action": "drop", "peer": "remote.example",
                                            "direction": "in", "kind": "iq", "id": "z",
                                            "detail": ""}]}
    out = render_status(st).splitlines()
    row = next(x for x in out if "192.0.2.1:4000" in x)
    for cell in ("in", "public", "remote.example -> local.example", "external", "TLSv1.3",
                 "bidi", "66m", "5/900", "2/300"):
        assert cell in row, (cell, row)
    assert any("(carries local.example -> remote.example)" in x for x in out)
    assert any("backoff" in x and "42.0s" in x and "remote-server-not-found" in x
               for x in out)
    assert "Pending iqs: 1" in out and any("q1" in x for x in out)
    assert any("unsolicited-response" in x and "drop" in x for x in out)


def test_status_reads_control_socket_from_the_config(tmp_path):
    from s2sproxy.cli import CliError, control_socket
    (tmp_path / "a.toml").write_text('[control]\nsocket = "run/c.sock"\n')
    assert control_socket(str(tmp_path / "a.toml")) == tmp_path / "run/c.sock"
    (tmp_path / "b.toml").write_text('[control]\nsocket = ""\n')
    with pytest.raises(CliError, match="control socket is off"):
        control_socket(str(tmp_path / "b.toml"))
    with pytest.raises(CliError, match="cannot read"):
        control_socket(str(tmp_path / "none.toml"))


def test_shorter_iq_timeout_after_reload_expires_new_requests_in_time():
    from s2sproxy.core.stanza import Stanza
    from s2sproxy.policy.iq_tracker import IqTracker

    def iq(n):
        return Stanza("iq", b"", f"a@local.example/{n}", "b@remote.example", "get",
                      f"q{n}", "urn:x", "local.example", "remote.example")
    t = IqTracker(120.0, 100)
    t.request(iq(1), 0.0)               # deadline 120
    t.set_timeout(10.0, 5.0)
    t.request(iq(2), 5.0)               # deadline 15, behind the one of 120
    assert [p.request.id for p in t.expire(16.0)] == ["q2"]
    assert [p.request.id for p in t.expire(121.0)] == ["q1"]
    assert len(t) == 0


def test_load_without_generating_a_secret(conf, tmp_path):  # noqa: F811
    path = conf()
    (tmp_path / "secret").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="secret_file: .* does not exist"):
        load(path, generate_secret=False)
    assert not (tmp_path / "secret").exists()


def test_haproxy_prefix_only_on_public_listeners_and_never_over_ssl(conf):  # noqa: F811
    with pytest.raises(ConfigError, match="backend.listen: the PROXY protocol"):
        load(conf('[backend]\nlisten = "haproxy:tcp:15270"\n'))
    with pytest.raises(ConfigError, match="use a plain tcp: endpoint"):
        load(conf('[public]\ndirect_tls = ["haproxy:ssl:5270"]\n'))
    s = load(conf('[public]\nstarttls = ["haproxy:tcp:5269"]\n'
                  'proxy_sources = ["10.0.0.0/24", "::1"]\n'))
    assert [str(n) for n in s.proxy_sources] == ["10.0.0.0/24", "::1/128"]


def test_control_socket_empty_is_off_and_relative_to_the_file(conf, tmp_path):  # noqa: F811
    assert load(conf('[control]\nsocket = ""\n')).control_socket is None
    assert load(conf('[control]\nsocket = "run/c.sock"\n')).control_socket == \
        tmp_path / "run/c.sock"
    assert str(load(conf()).control_socket) == "/run/s2sproxy/control.sock"
    with pytest.raises(ConfigError, match="control.socket: must be a path"):
        load(conf('[control]\nsocket = 5\n'))
