"""The outgoing-connection plan (core.connect): targets, address order, refusals, and
what follows each kind of failure.  No bytes, no reactor: answers in, steps out."""

from __future__ import annotations

import pytest

from s2sproxy.core import actions as A
from s2sproxy.core import connect as C
from s2sproxy.core import events as E
from s2sproxy.core.srv import Target

DOMAIN = "remote.example"
K = C.FailureKind
REFUSED = C.AttemptFailed(K.CONNECT, "remote-server-not-found",
                          "unreachable: Connection was refused")
TIMED_OUT = C.AttemptFailed(K.TIMEOUT, "remote-server-timeout", "connect timed out")
NO_SRV = C.SrvAnswer(error="NXDOMAIN")


def first(_low: float, _high: float) -> float:
    return 0.0      # RFC 2782 draw: always the first of a priority group


def rules(*listeners: tuple[str, int], allow_private: bool = False, local=()):
    r = C.rules_from(listeners or [("0.0.0.0", 5269), ("127.0.0.1", 15270)], allow_private)
    r.local.update(C.parse_ip(a) for a in local)
    return r


def plan(override=None, **kw) -> C.ConnectPlan:
    return C.ConnectPlan(DOMAIN, kw.pop("rules", None) or rules(), first, override,
                         connect_timeout=10.0, **kw)


def srv(host: str, port: int, direct: bool = False, priority: int = 0) -> Target:
    return Target(host, port, direct, priority, 0)


def run(p: C.ConnectPlan, dns: dict[str, tuple[list[str], list[str]]],
        srv_answers=(NO_SRV, NO_SRV), fail=lambda a: REFUSED) -> tuple[list, C.Exhausted]:
    """Answer every step from ``dns`` and fail every attempt with ``fail(attempt)``:
    the attempts made, in order, and the plan's final step."""
    attempts = []
    for _ in range(100):
        step = p.next()
        if isinstance(step, C.Exhausted):
            return attempts, step
        if isinstance(step, C.LookupSrv):
            assert step.domain == DOMAIN
            p.srv_answered(*srv_answers)
        elif isinstance(step, C.LookupAddresses):
            v6, v4 = dns.get(step.host, ([], []))
            p.addresses_answered(step.host, v6, v4, "" if v6 or v4 else "NXDOMAIN")
        else:
            attempts.append(step)
            p.attempt_failed(step, fail(step))
    raise AssertionError("plan never ended")


def test_plan_tries_every_address_interleaved_ipv6_first_then_next_target():
    """AAAA and A answers are interleaved starting with IPv6 (RFC 8305 section 4); all
    addresses of a target are tried before the next SRV target (RFC 6120 3.2.1)."""
    p = plan()
    attempts, end = run(p, {
        "a.remote.example": (["2001:db8::1", "2001:db8::2", "2001:db8::3"], ["192.0.2.1"]),
        "b.remote.example": ([], ["192.0.2.2"]),
    }, (NO_SRV, C.SrvAnswer((srv("a.remote.example", 5269, priority=1),
                             srv("b.remote.example", 5279, priority=2)))))
    assert [(a.address, a.port, a.direct_tls) for a in attempts] == [
        ("2001:db8::1", 5269, False), ("192.0.2.1", 5269, False),
        ("2001:db8::2", 5269, False), ("2001:db8::3", 5269, False),
        ("192.0.2.2", 5279, False)]
    # Every address but the last one known gets a short connect timeout.
    assert [a.connect_timeout for a in attempts] == [3.0, 3.0, 3.0, 3.0, 10.0]
    assert end.condition == "remote-server-not-found"
    assert end.text.startswith("remote.example: _xmpps-server: NXDOMAIN; "
                               "[2001:db8::1]:5269 unreachable: Connection was refused")


def test_plan_direct_tls_and_starttls_records_are_merged_by_priority():
    """XEP-0368: _xmpps-server and _xmpp-server records form one priority order, and
    the domain on 5269 is not added when _xmpp-server has records."""
    p = plan()
    attempts, _end = run(p, {"x.remote.example": ([], ["192.0.2.1"]),
                             "y.remote.example": ([], ["192.0.2.2"])},
                         (C.SrvAnswer((srv("y.remote.example", 5270, True, 5),)),
                          C.SrvAnswer((srv("x.remote.example", 5269, False, 10),))))
    assert [(a.host, a.port, a.direct_tls) for a in attempts] == [
        ("y.remote.example", 5270, True), ("x.remote.example", 5269, False)]


@pytest.mark.parametrize("error", ["NXDOMAIN", "SERVFAIL", "FORMERR", "NOTIMP", "REFUSED",
                                   "timeout"])
def test_plan_srv_error_falls_back_to_domain_on_5269(error):
    """Every DNS error of the SRV lookups falls back as NXDOMAIN does: the domain on
    5269 (RFC 6120 section 3.2.2)."""
    p = plan()
    bad = C.SrvAnswer(error=error)
    attempts, _end = run(p, {DOMAIN: ([], ["192.0.2.7"])}, (bad, bad))
    assert [(a.host, a.address, a.port) for a in attempts] == [(DOMAIN, "192.0.2.7", 5269)]


def test_plan_direct_tls_records_only_still_fall_back_for_starttls():
    """_xmpps-server records and no _xmpp-server record: the Direct TLS targets first,
    then the domain on 5269 (as Prosody's chain of resolvers does)."""
    p = plan()
    attempts, _end = run(p, {"d.remote.example": ([], ["192.0.2.1"]),
                             DOMAIN: ([], ["192.0.2.2"])},
                         (C.SrvAnswer((srv("d.remote.example", 5270, True),)), NO_SRV))
    assert [(a.address, a.port, a.direct_tls) for a in attempts] == [
        ("192.0.2.1", 5270, True), ("192.0.2.2", 5269, False)]


def test_plan_srv_target_dot_means_no_service():
    """A single SRV record with target '.' means no service: no fallback, nothing to
    try, remote-server-not-found saying why."""
    p = plan()
    attempts, end = run(p, {DOMAIN: ([], ["192.0.2.2"])},
                        (NO_SRV, C.SrvAnswer((srv(".", 0),))))
    assert attempts == []
    assert end == C.Exhausted("remote-server-not-found",
                              "remote.example: _xmpps-server: NXDOMAIN; "
                              "_xmpp-server: no service (SRV target '.')")


def test_plan_address_lookup_failure_skips_the_target():
    """A target whose A and AAAA lookups fail is skipped; the next one is tried."""
    p = plan()
    attempts, end = run(p, {"b.remote.example": ([], ["192.0.2.2"])},
                        (NO_SRV, C.SrvAnswer((srv("a.remote.example", 5269, priority=1),
                                              srv("b.remote.example", 5269, priority=2)))))
    assert [a.host for a in attempts] == ["b.remote.example"]
    assert "a.remote.example: NXDOMAIN" in end.text


def test_plan_srv_target_that_is_an_address_needs_no_lookup():
    """An address literal as SRV target is used as is (and still checked)."""
    p = plan()
    attempts, _end = run(p, {}, (NO_SRV, C.SrvAnswer((srv("192.0.2.9", 5269),))))
    assert [a.address for a in attempts] == ["192.0.2.9"]


# -- refusals (defect 1) -------------------------------------------------------------------

def test_plan_refuses_our_own_backend_listener_found_through_dns():
    """_xmpp-server._tcp.evil.example SRV 0 0 15270 localhost. with localhost at
    127.0.0.1: our backend listener is never a target, even with private targets
    allowed; with nothing left the domain is remote-server-not-found."""
    for allow in (False, True):
        p = plan(rules=rules(allow_private=allow))
        attempts, end = run(p, {"localhost": ([], ["127.0.0.1"])},
                            (NO_SRV, C.SrvAnswer((srv("localhost", 15270),))))
        assert attempts == []
        assert end.condition == "remote-server-not-found"
        assert "127.0.0.1:15270 refused: " in end.text
        assert "one of s2sproxy's own listeners" in end.text or not allow


@pytest.mark.parametrize("address, why", [
    ("127.0.0.1", "loopback"), ("127.5.6.7", "loopback"), ("::1", "loopback"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("10.1.2.3", "private"),
    ("172.16.0.1", "private"), ("172.31.255.254", "private"), ("192.168.1.1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fd12:3456::1", "private"),
    ("fc00::1", "private"), ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"),
    ("100.64.0.1", "shared"), ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
])
def test_plan_refuses_non_public_addresses_from_dns(address, why):
    """Addresses found through DNS that are not public are refused (rule 3b), with the
    reason in the bounce text."""
    p = plan(rules=rules(("127.0.0.1", 15270)))
    attempts, end = run(p, {DOMAIN: ([address], []) if ":" in address else ([], [address])})
    assert attempts == []
    assert end.condition == "remote-server-not-found"
    assert f" refused: {why}" in end.text and "dns.allow_private_targets" in end.text


@pytest.mark.parametrize("address", ["192.0.2.1", "198.51.100.7", "2001:db8::1",
                                     "172.32.0.1", "::ffff:192.0.2.1"])
def test_plan_allows_public_addresses(address):
    """Public addresses (and the IPv4-mapped form of one, tried as IPv4) are tried."""
    p = plan()
    attempts, _end = run(p, {DOMAIN: ([address], [])})
    assert [a.address for a in attempts] == [address.replace("::ffff:", "")]


def test_plan_allow_private_targets_allows_loopback_but_not_our_listeners():
    """With dns.allow_private_targets, loopback is tried unless it is our listener."""
    p = plan(rules=rules(allow_private=True))
    attempts, _end = run(p, {DOMAIN: (["::1"], ["127.0.0.1"])})
    # 0.0.0.0:5269 is ours: every local address on 5269 is refused.
    assert attempts == []
    p = plan(rules=rules(("127.0.0.1", 15270), allow_private=True))
    attempts, _end = run(p, {DOMAIN: (["::1"], ["127.0.0.1"])})
    assert [a.address for a in attempts] == ["::1", "127.0.0.1"]


def test_plan_unspecified_bind_matches_local_addresses_on_that_port_only():
    """A listener on 0.0.0.0:5269 makes every address of this host on 5269 ours
    (loopback, and the local addresses the shell learned), not other ports."""
    r = rules(("0.0.0.0", 5269), local=["192.0.2.50"])
    assert r.is_own(C.parse_ip("192.0.2.50"), 5269)
    assert r.is_own(C.parse_ip("127.0.0.1"), 5269)
    assert r.is_own(C.parse_ip("::ffff:127.0.0.1"), 5269)
    assert not r.is_own(C.parse_ip("192.0.2.50"), 5270)
    assert not r.is_own(C.parse_ip("192.0.2.51"), 5269)


def test_plan_operator_override_may_be_private_but_never_our_listener():
    """Addresses written in remote."DOMAIN" are the operator's choice (private allowed),
    except our own listeners."""
    p = plan([Target("10.0.0.5", 5269, False), Target("127.0.0.1", 15270, False),
              Target("127.0.0.1", 5269, True)])
    attempts, end = run(p, {})
    assert [(a.address, a.port) for a in attempts] == [("10.0.0.5", 5269)]
    assert "127.0.0.1:15270 refused: one of s2sproxy's own listeners" in end.text
    assert isinstance(p.next(), C.Exhausted)


def test_plan_override_host_names_resolve_and_count_as_operator_addresses():
    """A host name in remote."DOMAIN" is looked up; its addresses are the operator's."""
    p = plan([Target("lab.internal", 5269, False)])
    attempts, _end = run(p, {"lab.internal": ([], ["192.168.7.7"])})
    assert [a.address for a in attempts] == ["192.168.7.7"]


# -- after failures ------------------------------------------------------------------------

def test_plan_final_failure_stops_at_once():
    """The remote's dialback verdict on our key is final: no further address."""
    p = plan()
    final = C.AttemptFailed(K.FINAL, "remote-server-not-found", "dialback refused: invalid key")
    attempts, end = run(p, {DOMAIN: (["2001:db8::1"], ["192.0.2.1"])}, fail=lambda a: final)
    assert [a.address for a in attempts] == ["2001:db8::1"]
    assert end.condition == "remote-server-not-found"
    assert end.text.endswith("[2001:db8::1]:5269 dialback refused: invalid key")


def test_plan_every_attempt_timed_out_is_remote_server_timeout():
    """remote-server-timeout only when every attempt timed out."""
    dns = {DOMAIN: (["2001:db8::1"], ["192.0.2.1"])}
    _attempts, end = run(plan(), dns, fail=lambda a: TIMED_OUT)
    assert end.condition == "remote-server-timeout"
    _attempts, end = run(plan(), dns,
                         fail=lambda a: TIMED_OUT if ":" in a.address else REFUSED)
    assert end.condition == "remote-server-not-found"


def test_plan_bounds_attempts_and_lookups_whatever_dns_says():
    """A hostile DNS publishing hundreds of records gets at most MAX_ATTEMPTS
    connections and MAX_TARGETS lookups."""
    p = plan()
    records = tuple(srv(f"h{i}.remote.example", 5269) for i in range(50))
    dns = {f"h{i}.remote.example": ([], [f"192.0.2.{i}", f"198.51.100.{i}"])
           for i in range(50)}
    attempts, end = run(p, dns, (NO_SRV, C.SrvAnswer(records)))
    assert len(attempts) == C.MAX_ATTEMPTS
    assert "and " in end.text and "more" in end.text
    lookups = 0
    p = plan()
    p.srv_answered(NO_SRV, C.SrvAnswer(records))
    while not isinstance(step := p.next(), C.Exhausted):
        lookups += 1
        p.addresses_answered(step.host, [], [], "NXDOMAIN")
    assert lookups == C.MAX_TARGETS


def test_plan_same_address_from_two_targets_is_tried_once():
    """Two SRV targets resolving to one address and port make one attempt."""
    p = plan()
    attempts, _end = run(p, {"a.remote.example": ([], ["192.0.2.1"]),
                             "b.remote.example": ([], ["192.0.2.1"])},
                         (NO_SRV, C.SrvAnswer((srv("a.remote.example", 5269, priority=1),
                                               srv("b.remote.example", 5269, priority=2)))))
    assert [a.host for a in attempts] == ["a.remote.example"]


def test_plan_step_repeats_until_answered():
    """next() gives the same pending step until its answer comes."""
    p = plan()
    assert p.next() == p.next() == C.LookupSrv(DOMAIN)


@pytest.mark.parametrize("action, refused, kind", [
    (A.StreamReady(), False, None),
    (E.DialbackVerdict("a", "b", True), False, None),
    (E.DialbackVerdict("a", "b", False), False, None),
    (E.DialbackVerdict("a", "b", None, "remote-server-timeout"), False, C.FailureKind.TIMEOUT),
    (E.DialbackVerdict("a", "b", None, "remote-server-not-found"), False, C.FailureKind.SETUP),
    (A.StreamFailed("remote-server-not-found", "lost"), False, C.FailureKind.SETUP),
    (A.StreamFailed("remote-server-timeout", "slow"), False, C.FailureKind.TIMEOUT),
    (A.StreamFailed("remote-server-not-found", "invalid key"), True, C.FailureKind.FINAL),
])
def test_attempt_outcome_kinds(action, refused, kind):
    """Rule 4: which outcomes move on to the next address (the decision is the core's;
    tx only translates Twisted's connect failure)."""
    out = C.attempt_outcome(action, refused)
    assert (out.kind if out else None) is kind
    assert C.connect_failed(True, "").kind is C.FailureKind.TIMEOUT
    assert C.connect_failed(False, "refused").text == "unreachable: refused"
