"""The public listeners of a real `twistd s2sproxy` process on loopback, spoken to with
Python's ssl module: TLS floor, certificate by SNI or stream 'to', ALPN, STARTTLS rule."""

from __future__ import annotations

import socket
import ssl
import warnings

import pytest
from cryptography import x509

import harness

HEADER = ("<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
          "xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' "
          "to='{to}' from='remote.test' version='1.0'>")
ADDR = (harness.PROXY_IP, harness.PROXY_STARTTLS_PORT)
DIRECT = (harness.PROXY_IP, harness.PROXY_DIRECT_TLS_PORT)


@pytest.fixture(scope="module")
def proxy():
    run = harness.RunDir.create()
    d = run.path / "s2sproxy"
    d.mkdir(exist_ok=True)
    run.ca.issue("other.test").write(d / "other.test.crt", d / "other.test.key")
    p = harness.start_s2sproxy(run, nameservers=[], extra_toml=(
        f'[[domain]]\nname = "other.test"\ncertificate = "{d}/other.test.crt"\n'
        f'key = "{d}/other.test.key"\n'))
    yield p
    p.stop()
    run.cleanup()


def client_context(max_version=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["xmpp-server"])
    if max_version is not None:
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # TLS 1.1 on purpose
            ctx.maximum_version = max_version
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


def read_until(sock, marker: bytes, limit: int = 65536) -> bytes:
    data = b""
    while marker not in data and len(data) < limit:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def names(sock: ssl.SSLSocket) -> list[str]:
    cert = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


@pytest.mark.parametrize("sni, expected", [("other.test", "other.test"),
                                           (None, "local.test")])
def test_direct_tls_certificate_by_sni_and_alpn(proxy, sni, expected):
    """Direct TLS picks the certificate by SNI (first domain without SNI), selects ALPN
    xmpp-server, and offers dialback and bidi but no STARTTLS."""
    with socket.create_connection(DIRECT, timeout=10) as raw:
        with client_context().wrap_socket(raw, server_hostname=sni) as s:
            assert names(s) == [expected]
            assert s.selected_alpn_protocol() == "xmpp-server"
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            s.sendall(HEADER.format(to=expected).encode())
            data = read_until(s, b"</stream:features>")
    assert b"<bidi xmlns='urn:xmpp:features:bidi'/>" in data
    assert b"urn:xmpp:features:dialback" in data
    assert b"starttls" not in data


def test_direct_tls_refuses_tls_1_1(proxy):
    """TLS below 1.2 is refused at the handshake, by the server's protocol_version
    alert (not by our own client's settings)."""
    with socket.create_connection(DIRECT, timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as e:
            client_context(ssl.TLSVersion.TLSv1_1).wrap_socket(raw, server_hostname="local.test")
    assert e.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


def test_starttls_certificate_by_stream_to_without_sni(proxy):
    """On STARTTLS without SNI, the certificate is the one for the stream's 'to'."""
    with socket.create_connection(ADDR, timeout=10) as s:
        s.sendall(HEADER.format(to="other.test").encode())
        features = read_until(s, b"</stream:features>")
        assert b"<required/>" in features
        s.sendall(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert b"<proceed" in read_until(s, b"/>")
        with client_context().wrap_socket(s, server_hostname=None) as t:
            assert names(t) == ["other.test"]


def test_starttls_listener_refuses_stanza_before_tls(proxy):
    """On the STARTTLS listener a stanza before TLS ends the stream: not-authorized."""
    with socket.create_connection(ADDR, timeout=10) as s:
        s.sendall(HEADER.format(to="local.test").encode()
                  + b"<message from='a@remote.test' to='b@local.test'/>")
        data = read_until(s, b"</stream:stream>")
    assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in data


def test_starttls_listener_unknown_domain_is_host_unknown(proxy):
    """A stream to a domain that is not served: host-unknown."""
    with socket.create_connection(ADDR, timeout=10) as s:
        s.sendall(HEADER.format(to="nobody.test").encode())
        data = read_until(s, b"</stream:stream>")
    assert b"<host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" in data
