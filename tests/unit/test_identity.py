"""Certificate names (RFC 6120 section 13.7.1.2, RFC 9525 section 6): one answer for
the peer check (core.identity) and for the start-up check of our own certificates
(config.check_certificate)."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from s2sproxy.config import ConfigError, check_certificate
from s2sproxy.core.identity import certificate_valid_for

ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_ON_DNSSRV = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")


def _der_string(tag: int, text: str) -> bytes:
    """A DER UTF8String (tag 12) or IA5String (tag 22), long-form length when needed."""
    body = text.encode("utf-8")
    n = len(body)
    length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) \
        + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + body


def dns(name):
    return x509.DNSName(name)


def srv(name):
    return x509.OtherName(ID_ON_DNSSRV, _der_string(22, name))


def xmpp(name):
    return x509.OtherName(ID_ON_XMPPADDR, _der_string(12, name))


_KEY = ec.generate_private_key(ec.SECP256R1())


def make_certificate(names: list, cn: str = "unit test") -> x509.Certificate:
    """A self-signed certificate with these subjectAltNames (none: no extension)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(_KEY.public_key()).serial_number(7)
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
    return builder.sign(_KEY, hashes.SHA256())


LONG = "a" * 63 + "." + "b" * 63 + ".example"           # a 136-byte XmppAddr

CASES = [
    # (subjectAltNames, CN, domain, covered)
    ([dns("remote.example")], "x", "remote.example", True),
    ([dns("REMOTE.example")], "x", "remote.example", True),
    ([dns("other.example")], "remote.example", "remote.example", False),
    ([dns("xn--bcher-kva.example")], "x", "bücher.example", True),
    ([dns("xn--bcher-kva.example")], "x", "BÜCHER.example", True),
    # SRV-ID (RFC 4985), service _xmpp-server (RFC 6120 section 13.7.1.2.1)
    ([srv("_xmpp-server.remote.example")], "x", "remote.example", True),
    ([srv("_XMPP-Server.Remote.Example")], "x", "remote.example", True),
    ([srv("_xmpp-client.remote.example")], "x", "remote.example", False),
    ([srv("_xmpp-server.other.example")], "x", "remote.example", False),
    ([srv("_xmpp-server.xn--bcher-kva.example")], "x", "bücher.example", True),
    # XmppAddr (RFC 6120 section 13.7.1.4): a UTF8String, exact domain, no wildcard
    ([xmpp("remote.example")], "x", "remote.example", True),
    ([xmpp("bücher.example")], "x", "xn--bcher-kva.example", True),
    ([xmpp("xn--bcher-kva.example")], "x", "bücher.example", True),
    ([xmpp(LONG)], "x", LONG, True),
    ([xmpp("*.example")], "x", "remote.example", False),
    ([xmpp("juliet@remote.example")], "x", "remote.example", False),
    ([xmpp("remote.example/r")], "x", "remote.example", False),
    ([xmpp("other.example")], "x", "remote.example", False),
    # DNS-ID wildcard: the whole left-most label, exactly one label (RFC 9525 6.3)
    ([dns("*.example.com")], "x", "a.example.com", True),
    ([dns("*.example.com")], "x", "example.com", False),
    ([dns("*.example.com")], "x", "a.b.example.com", False),
    ([dns("f*.example.com")], "x", "foo.example.com", False),
    ([dns("a.*.example.com")], "x", "a.b.example.com", False),
    ([dns("*.com")], "x", "example.com", False),
    # one unusable name does not spoil the others
    ([dns("*.com"), dns("remote.example")], "x", "remote.example", True),
    # CN-ID is not used, even without any subjectAltName (RFC 9525 section 6.3)
    ([], "remote.example", "remote.example", False),
    ([dns("other.example")], "remote.example", "remote.example", False),
]


def _case_id(case) -> str:
    names, cn, domain, covered = case
    kinds = ",".join(
        repr(n.value) if isinstance(n, x509.DNSName) else
        f"{'srv' if n.type_id == ID_ON_DNSSRV else 'xmpp'}:{n.value[-14:].decode(errors='replace')}"
        for n in names) or f"cn:{cn}"
    return f"{kinds}->{domain[:20]}:{'yes' if covered else 'no'}"


def _write_pair(tmp_path, cert) -> None:
    """The certificate and the test key as c.pem and k.pem, for the start-up check."""
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


@pytest.mark.parametrize("names, cn, domain, covered", CASES, ids=[_case_id(c) for c in CASES])
def test_certificate_names_same_answer_for_peer_and_config(tmp_path, names, cn, domain,
                                                           covered):
    """The peer check and the start-up check accept exactly the same names."""
    cert = make_certificate(names, cn)
    assert certificate_valid_for(True, cert, domain) is covered
    _write_pair(tmp_path, cert)
    if covered:
        check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", domain, "d.certificate")
    else:
        with pytest.raises(ConfigError) as e:
            check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", domain,
                              "d.certificate")
        assert f"does not cover {domain}" in str(e.value)


def test_certificate_valid_for_needs_a_valid_chain():
    """The name alone is not enough: an untrusted chain is never valid."""
    cert = make_certificate([dns("remote.example")])
    assert certificate_valid_for(False, cert, "remote.example") is False
    assert certificate_valid_for(True, None, "remote.example") is False


def test_config_message_lists_every_kind_of_name(tmp_path):
    """The start-up refusal names what the certificate does cover, by kind."""
    cert = make_certificate([dns("a.example"), srv("_xmpp-server.b.example"),
                             xmpp("c.example")], cn="d.example")
    _write_pair(tmp_path, cert)
    with pytest.raises(ConfigError) as e:
        check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", "x.example", "d.cert")
    assert str(e.value) == (f"d.cert: {tmp_path}/c.pem does not cover x.example (names: "
                            f"a.example, _xmpp-server.b.example, xmppAddr c.example)")


def test_config_message_for_cn_only_certificate_says_cn_is_not_used(tmp_path):
    cert = make_certificate([], cn="x.example")
    _write_pair(tmp_path, cert)
    with pytest.raises(ConfigError) as e:
        check_certificate(tmp_path / "c.pem", tmp_path / "k.pem", "x.example", "d.cert")
    assert str(e.value) == (f"d.cert: {tmp_path}/c.pem does not cover x.example (names: "
                            f"none; the subject CN x.example is not used, RFC 9525)")
