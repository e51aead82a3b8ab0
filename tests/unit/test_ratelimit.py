"""Per-remote rate limits (policy.ratelimit) with a fake clock."""

from __future__ import annotations

from s2sproxy.policy.ratelimit import Bucket, Limiter, RateConfig


def test_bucket_burst_then_rate():
    b = Bucket(10.0, 2.0, 0.0)           # 10/s, 20 in a burst
    assert b.take(20, 0.0) == 0.0
    assert b.take(5, 0.0) == 0.5         # 5 in debt: half a second
    assert b.take(0, 0.5) == 0.0         # paid back
    assert b.take(5, 1.0) == 0.0         # 5 earned meanwhile


def test_domain_limit_pauses_only_that_remote_and_is_shared_by_its_connections():
    lim = Limiter(RateConfig(stanzas_per_second=5, burst_seconds=1), RateConfig())
    assert lim.account("spam.example", None, 100, 5, 0.0).pause == 0.0
    d = lim.account("spam.example", None, 100, 5, 0.0)      # a second connection
    assert d.pause == 1.0
    assert lim.account("ok.example", None, 100, 5, 0.0).pause == 0.0


def test_connection_limit_and_bytes():
    lim = Limiter(RateConfig(), RateConfig(bytes_per_second=1000, burst_seconds=1))
    c1, c2 = lim.new_connection(0.0), lim.new_connection(0.0)
    assert lim.account("r.example", c1, 3000, 1, 0.0).pause == 2.0
    assert lim.account("r.example", c2, 500, 1, 0.0).pause == 0.0


def test_flag_after_and_close_after():
    lim = Limiter(RateConfig(stanzas_per_second=1, burst_seconds=1, flag_after=10,
                             close_after=20), RateConfig())
    flags = closes = 0
    t = 0.0
    while t < 25:
        d = lim.account("spam.example", None, 10, 5, t)     # 5/s against 1/s
        flags += d.flag
        closes += d.close
        t += 1.0
    assert flags == 1                   # once while it stays over
    assert closes > 0
    # back under: the flag may come again next time
    assert lim.account("spam.example", None, 0, 0, 1000.0).pause == 0.0


def test_configure_unchanged_keeps_state_and_changed_carries_the_debt():
    cfg = RateConfig(bytes_per_second=100, burst_seconds=1)
    lim = Limiter(cfg, RateConfig())
    assert lim.account("r.example", None, 300, 0, 0.0).pause == 2.0
    assert lim.configure(cfg, RateConfig()) is False
    assert lim.account("r.example", None, 100, 0, 0.0).pause == 3.0
    assert lim.configure(RateConfig(bytes_per_second=300, burst_seconds=1),
                         RateConfig()) is False     # the connection limits did not change
    assert lim.account("r.example", None, 0, 0, 0.0).pause == 0.0   # nothing counted
    assert lim.account("r.example", None, 300, 0, 0.0).pause == 2.0  # 600 owed at 300/s
    assert lim.configure(RateConfig(), RateConfig(stanzas_per_second=1)) is True
    assert not lim._remotes
