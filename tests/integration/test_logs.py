"""``log.format = "json"`` with a real ``twistd s2sproxy`` (issue 10): every line of
the log file is one JSON object, s2sproxy's events carry their named fields, and
Twisted's factory noise is gone in either format."""

from __future__ import annotations

import json
import socket

import pytest

import harness

pytestmark = pytest.mark.integration

HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          "xmlns:stream='http://etherx.jabber.org/streams' to='local.test' "
          "from='probe.test' version='1.0'>")


def probe() -> None:
    with socket.create_connection((harness.PROXY_IP, harness.PROXY_STARTTLS_PORT),
                                  timeout=10) as s:
        s.sendall(HEADER.encode() + b"<message/>")     # before STARTTLS: refused
        while s.recv(4096):
            pass


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_log_format(run_dir, fmt):
    backend_port, dns_port = harness.free_port(), harness.free_port(udp_too=True)
    path = harness.write_s2sproxy_config(run_dir, backend_port=backend_port,
                                         dns_port=dns_port, nameservers=[],
                                         log_level="info")
    path.write_text(path.read_text().replace('[log]\nlevel = "info"',
                                             f'[log]\nlevel = "info"\nformat = "{fmt}"'))
    proxy = harness.start_s2sproxy(run_dir, config_path=path, backend_port=backend_port,
                                   dns_port=dns_port)
    try:
        probe()
        harness.wait_for(lambda: "closed" in proxy.log_text(), 10, "the closing line")
    finally:
        proxy.stop()
    text = proxy.log_text()
    assert "Starting factory" not in text and "Stopping factory" not in text
    assert "/etc/resolv.conf" not in text
    if fmt == "text":
        assert "s2sproxy 0.1.0 serving local.test; public STARTTLS " in text
        return
    records = [json.loads(line) for line in text.splitlines()]
    start = next(r for r in records if r["message"].startswith("s2sproxy 0.1.0 serving"))
    assert start["namespace"] == "s2sproxy.tx.service" and start["level"] == "info"
    assert start["domains"] == "local.test" and start["version"] == "0.1.0"
    closed = next(r for r in records if " closed: " in r["message"])
    assert closed["label"] == "public" and closed["reason"].startswith("not-authorized")
    assert isinstance(closed["rx_bytes"], int) and closed["peer"].startswith("127.0.0.1:")
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)
