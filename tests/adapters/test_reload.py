"""Proxy.reload on Twisted's memory reactor: new connections get the new certificate
and limits, an open stream keeps its own, a bad file or a restart-only change is
refused with one error line, and the closing log line of a stream."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent

from s2sproxy.config import load
from s2sproxy.core.inbound import Role
from s2sproxy.tx.service import Proxy
from tests.adapters.helpers import LOCAL, REMOTE, public_stream
from tests.adapters.test_connector import logged  # noqa: F401 (fixture)
from tests.unit.helpers import certificate
from tests.unit.test_config import pem


def write_conf(tmp_path, extra: str = "") -> str:
    path = tmp_path / "s2sproxy.toml"
    path.write_text('secret_file = "secret"\n[[domain]]\nname = "local.example"\n'
                    'certificate = "l.crt"\nkey = "l.key"\n'
                    '[dns]\nnameservers = ["127.0.0.1:1"]\n' + extra)
    return str(path)


def new_leaf(tmp_path):
    _ca, _ck, leaf, key = certificate(LOCAL)
    (tmp_path / "l.crt").write_bytes(pem(leaf))
    (tmp_path / "l.key").write_bytes(pem(key))
    return leaf


def served(p: Proxy):
    """The certificate a new Direct TLS connection would be offered (the context the
    listener's factory asks for now)."""
    return SSL.Connection(p.direct_ctx.for_domain(None)).get_certificate().to_cryptography()


def lines(events, level=None) -> list[str]:
    return [formatEvent(e) for e in events
            if level is None or e.get("log_level") == level]


def test_reload_applies_certificate_and_limits_to_new_connections(tmp_path, logged):
    first = new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    assert served(p) == first
    old_proto, _ = public_stream(p, p.reactor)
    assert old_proto.stream.config.max_size == 512 * 1024

    second = new_leaf(tmp_path)
    write_conf(tmp_path, "[limits]\nmax_stanza_size = 100000\n")
    assert p.reload() is True
    assert served(p) == second
    new_proto, _ = public_stream(p, p.reactor, host="192.0.2.8")
    assert new_proto.stream.config.max_size == 100000
    assert old_proto.stream.config.max_size == 512 * 1024      # open streams keep theirs
    assert (REMOTE, LOCAL) in old_proto.stream.authenticated
    assert any(x.startswith("reloaded ") for x in lines(logged, LogLevel.info))


@pytest.mark.parametrize("extra, expected", [
    ("[limits]\nmax_stanza_size = 5\n", "limits.max_stanza_size: must be an integer"),
    ("[limits\n", "not valid TOML"),
    ('[public]\nstarttls = ["tcp:5369"]\n', "public.starttls changed (listeners are bound "
                                            "at start): restart s2sproxy to apply it"),
])
def test_reload_refuses_with_one_line_and_keeps_the_running_config(tmp_path, logged,
                                                                    extra, expected):
    first = new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    before = p.settings
    new_leaf(tmp_path)          # a new certificate too: not applied either
    write_conf(tmp_path, extra)
    assert p.reload() is False
    errors = lines(logged, LogLevel.error)
    assert len(errors) == 1 and expected in errors[0], errors
    assert errors[0].startswith("reload refused: ")
    assert p.settings is before and served(p) == first


def test_stream_closing_line_names_reason_and_counts(tmp_path, logged):
    new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    proto, transport = public_stream(p, p.reactor)
    assert any(x == "public stream 192.0.2.7:40000 accepted" for x in lines(logged))
    proto.dataReceived(b"</stream:stream>")
    proto.connectionLost(None)
    closing = [x for x in lines(logged) if x.startswith("public stream 192.0.2.7:40000 "
                                                        "closed: ")]
    assert len(closing) == 1, closing
    assert closing[0].startswith("public stream 192.0.2.7:40000 closed: stream closed by "
                                 "the peer (after 0.0 s; in 0 stanzas, ")
    assert proto.rx_bytes > 0 and proto.tx_bytes > 0


def test_listener_factories_are_quiet(tmp_path):
    new_leaf(tmp_path)
    p = Proxy(load(write_conf(tmp_path)), MemoryReactorClock())
    f = p.listener(Role.PUBLIC, False)
    assert f.noisy is False and f.logPrefix() == "s2sproxy public STARTTLS listener"


def test_reload_that_fails_midway_changes_nothing(tmp_path, logged, monkeypatch):
    """OpenSSL refusing what the config checks accepted (a weak key, say): the reload
    is refused and everything stays as it was, settings and contexts alike."""
    import s2sproxy.tx.reloading as service
    first = new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    before, ctx = p.settings, p.public_ctx
    new_leaf(tmp_path)
    write_conf(tmp_path, "[queue]\nlimit = 3\n")
    calls = []

    def refuse(*a, **kw):
        calls.append(a)
        if len(calls) == 2:
            raise ValueError("ee key too small")
        return real(*a, **kw)
    real = service.ServerContexts
    monkeypatch.setattr(service, "ServerContexts", refuse)
    assert p.reload() is False
    errors = lines(logged, LogLevel.error)
    assert errors == ["reload refused: ValueError: ee key too small; the running "
                      "configuration stays in force"]
    assert p.settings is before and p.public_ctx is ctx and served(p) == first
    assert p.to_backend.queue_limit == before.queue.limit


def test_reload_never_makes_a_secret(tmp_path, logged):
    new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    (tmp_path / "secret").unlink()
    assert p.reload() is False
    assert not (tmp_path / "secret").exists()
    assert any("secret_file: " in x and "does not exist" in x
               for x in lines(logged, LogLevel.error))


def test_proxy_header_only_from_proxy_sources(tmp_path):
    from twisted.internet.address import IPv4Address
    from s2sproxy.tx.proxyprotocol import ProxyHeaderFactory
    from tests.adapters.helpers import Transport
    import ipaddress
    new_leaf(tmp_path)
    p = Proxy(load(write_conf(tmp_path)), MemoryReactorClock())
    f = ProxyHeaderFactory(p.listener(Role.PUBLIC, False), p.reactor,
                           [ipaddress.ip_network("10.0.0.0/24")])
    w = f.buildProtocol(IPv4Address("TCP", "192.0.2.66", 4000))
    t = Transport("192.0.2.66", 4000)
    w.makeConnection(t)
    assert t.aborted and f.refused == 1
    w.dataReceived(b"PROXY TCP4 198.51.100.1 10.0.0.1 1 5269\r\n")
    w.connectionLost(None)
    assert p.streams == set()
    ok = f.buildProtocol(None)
    t2 = Transport("10.0.0.9", 4000)
    ok.makeConnection(t2)
    assert not t2.aborted


def test_reload_enabling_rate_limits_reaches_streams_already_authenticated(tmp_path):
    """A stream authenticated while [ratelimit] was off is limited once a reload turns
    it on; a reload that changes nothing keeps a remote's debt."""
    new_leaf(tmp_path)
    path = write_conf(tmp_path)
    p = Proxy(load(path), MemoryReactorClock(), config_path=path)
    proto, _ = public_stream(p, p.reactor)
    assert proto.rate is None
    write_conf(tmp_path, "[ratelimit]\nbytes_per_second = 1000\nburst_seconds = 1\n")
    assert p.reload() is True
    assert proto.rate is not None and proto.rate[0] == REMOTE
    assert p.account_read(proto, 3000, 0) == 2.0        # 2000 bytes owed at 1000/s
    assert p.reload() is True                           # the same file again
    assert p.account_read(proto, 1000, 0) == 3.0        # the debt was kept
    write_conf(tmp_path, "[ratelimit]\nbytes_per_second = 2000\nburst_seconds = 1\n")
    assert p.reload() is True                           # new rate, the debt carried
    assert p.account_read(proto, 1, 0) == pytest.approx(3001 / 2000)
