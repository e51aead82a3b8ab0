"""Bounds on unauthenticated connections (issue 7, defect 7)."""

from __future__ import annotations

from s2sproxy.core.admission import LOG_INTERVAL, PER_SOURCE, TOTAL, Admission, source_key


def test_admission_per_source_bound():
    """The per-source bound refuses the next connection from that source only."""
    a = Admission(max_total=10, max_per_source=2)
    assert a.admit(1, "192.0.2.1") is None
    assert a.admit(2, "192.0.2.1") is None
    assert a.admit(3, "192.0.2.1") == PER_SOURCE
    assert a.admit(4, "192.0.2.2") is None
    a.release(1)
    assert a.admit(5, "192.0.2.1") is None
    assert len(a) == 3 and a.refused == {TOTAL: 0, PER_SOURCE: 1}


def test_admission_total_bound():
    a = Admission(max_total=3, max_per_source=3)
    for i in range(3):
        assert a.admit(i, f"192.0.2.{i}") is None
    assert a.admit(9, "192.0.2.9") == TOTAL
    a.release(0)
    a.release(0)                 # idempotent: counted once
    assert len(a) == 2
    assert a.admit(9, "192.0.2.9") is None


def test_admission_ipv6_counts_by_slash_64():
    """IPv6 sources count per /64; IPv4-mapped addresses count as IPv4."""
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") \
        == "2001:db8:1:2::/64"
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("::ffff:192.0.2.1") == "192.0.2.1"
    a = Admission(max_total=10, max_per_source=1)
    assert a.admit(1, "2001:db8::1") is None
    assert a.admit(2, "2001:db8::2") == PER_SOURCE


def test_admission_refusals_logged_at_most_once_per_interval():
    a = Admission(max_total=0, max_per_source=1)
    assert a.log_due(0) == 0
    a.admit(1, "192.0.2.1")
    assert a.log_due(0) == 1
    for i in range(5):
        a.admit(i, "192.0.2.1")
    assert a.log_due(1) == 0
    assert a.log_due(LOG_INTERVAL) == 5
    assert a.log_due(LOG_INTERVAL + 1) == 0
