"""Proxy.reload on Twisted's memory reactor: new connections get the new certificate
and limits, an open stream keeps its own, a bad file or a restart-only change is
refused with one error line, and the closing log line of a stream."""

from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from s2sproxy.config import load
from s2sproxy.core.inbound import Role
from s2sproxy.tx.service import Proxy
from tests.adapters.helpers import LOCAL, REMOTE, public_stream
from tests.unit.helpers import certificate
from tests.unit.test_config import pem


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


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
