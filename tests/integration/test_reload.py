"""Reload on SIGHUP (issue 10) with real Prosody and ejabberd: a certificate replaced on
disk is what new connections see, the open streams keep delivering both ways, and a
configuration with an error (or a change only a restart can make) is refused with one
line while the running one stays in force."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time

import pytest
from cryptography import x509

import harness
from harness import ALICE, BOB

pytestmark = pytest.mark.integration

HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
          "to='local.test' from='probe.test' version='1.0'>")


def served_certificate() -> x509.Certificate:
    """The certificate a new STARTTLS connection to the public listener gets."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    addr = (harness.PROXY_IP, harness.PROXY_STARTTLS_PORT)
    with socket.create_connection(addr, timeout=10) as s:
        s.sendall(HEADER.encode())
        data = b""
        while b"</stream:features>" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        s.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        data = b""
        while b"<proceed" not in data:
            chunk = s.recv(4096)
            assert chunk, data
            data += chunk
        with ctx.wrap_socket(s, server_hostname="local.test") as t:
            return x509.load_der_x509_certificate(t.getpeercert(binary_form=True))


def both_ways(fed, tag: str) -> None:
    got = fed.send(BOB, ALICE, f"in {tag}")
    assert got.body == f"in {tag}"
    got = fed.send(ALICE, BOB, f"out {tag}")
    assert got.body == f"out {tag}"


def sighup_and_wait(proxy, line: str, before: int, timeout: float = 10.0) -> str:
    """SIGHUP by pid; the log's text after ``before`` once ``line`` appears in it."""
    proxy.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = proxy.log_text()[before:]
        if line in text:
            return text
        assert proxy.proc.poll() is None, "s2sproxy exited on SIGHUP"
        time.sleep(0.1)
    raise AssertionError(f"no {line!r} in the log after SIGHUP:\n{proxy.log_text()[-3000:]}")


def test_sighup_reloads_certificate_keeps_streams_and_refuses_bad_config(federation):
    fed = federation(via_proxy=True, bidi=True)
    metrics_port = harness.free_port()
    proxy = fed.start_proxy(extra_toml=f'[metrics]\nlisten = '
                                       f'"tcp:{metrics_port}:interface=127.0.0.1"\n')
    both_ways(fed, "before")
    old = served_certificate()
    streams_before = len(re.findall(r"stream authenticated:", proxy.log_text()))

    # A renewed certificate (10 days left: inside the 14-day warning) on disk, SIGHUP.
    d = proxy.config_path.parent
    leaf = fed.run.ca.issue("local.test", days=10)
    leaf.write(d / "local.test.crt", d / "local.test.key")
    text = sighup_and_wait(proxy, "reloaded ", len(proxy.log_text()))
    assert re.search(r"certificate for local\.test \(\S+\) expires in (?:9\.9|10\.0) days", text)
    new = served_certificate()
    assert new.serial_number != old.serial_number
    assert new == x509.load_pem_x509_certificate(leaf.cert_pem)
    left = harness.metrics(metrics_port)[
        's2sproxy_certificate_expiry_seconds{domain="local.test"}']
    assert 9.9 * 86400 < left <= 10 * 86400, left

    # The streams open before the reload carry the conversation on: no new stream had
    # to be authenticated for it (a probe is no stream authenticated for a pair).
    both_ways(fed, "after reload")
    assert len(re.findall(r"stream authenticated:", proxy.log_text())) == streams_before

    # A broken file: refused with one line naming the problem, the old one stays.
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good + "\n[limits]\nmax_stanza_size = 5\n")
    text = sighup_and_wait(proxy, "reload refused", len(proxy.log_text()))
    refusals = [ln for ln in text.splitlines() if "reload refused" in ln]
    assert len(refusals) == 1 and "limits.max_stanza_size" in refusals[0], refusals
    # A change only a restart can make: refused too, naming the key.
    proxy.config_path.write_text(good.replace(
        f"tcp:{harness.PROXY_STARTTLS_PORT}:", f"tcp:{harness.free_port()}:"))
    text = sighup_and_wait(proxy, "reload refused", len(proxy.log_text()))
    assert "public.starttls changed" in text
    proxy.config_path.write_text(good)
    both_ways(fed, "after refusals")
    assert served_certificate() == new
    assert "Traceback" not in proxy.log_text()
