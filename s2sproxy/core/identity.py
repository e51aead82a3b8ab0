"""Is a certificate valid for an XMPP domain?  (RFC 6120 sections 13.7.1.2 and 13.7.2,
RFC 9525 section 6, which obsoletes RFC 6125.)

Chain validation is the shell's job (it owns the trust store and reports the result in
``TlsEstablished``); this module checks the *name*.  ``names_cover`` is the one answer,
used for a peer's certificate (``certificate_valid_for``: SASL EXTERNAL, dialback
without a callback, our outgoing streams) and for our own certificates at start-up
(``config.check_certificate``), so that what we present is what we would accept.

The names that cover a domain, compared in canonical form (``core.jid``: UTS #46,
IDNA2008), so an A-label name covers the U-label domain and the reverse:

1. DNS-ID, a subjectAltName dNSName.  A wildcard is allowed only as the whole
   left-most label and matches exactly one label: '*.example.com' covers
   'a.example.com', neither 'example.com' nor 'a.b.example.com' (RFC 9525 section
   6.3; RFC 6120 section 13.7.1.2.1).
2. SRV-ID '_xmpp-server.<domain>', an id-on-dnsSRV otherName (RFC 4985; RFC 6120
   section 13.7.1.2.1).  Another service ('_xmpp-client') does not cover the domain.
3. XmppAddr, an id-on-xmppAddr otherName holding a UTF8String (RFC 6120 section
   13.7.1.4): the domain exactly, no wildcard, no localpart or resourcepart.

DNS-IDs and SRV-IDs are matched by service-identity (``DNS_ID``, ``SRV_ID``,
``verify_service_identity``).  It has no XmppAddr support (its ``extract_patterns``
reads dNSName, URI, IP address and id-on-dnsSRV only), so that part is read here with
cryptography's x509 API.  The certificate's names are read one by one rather than
through ``extract_patterns``, which refuses the whole certificate over one name it
cannot use (a '*.com' or an IP address written as a dNSName).

CN-ID: not used, with or without a subjectAltName.  RFC 9525 section 6.3 says a client
"MUST NOT seek a match for a reference identifier of CN-ID"; Prosody 13 removed its
fallback (util/x509.lua, "Per RFC 9525, remove obsolete Common Name check"), and
service-identity has ignored the CN since 23.1, so the peer check never used it; the
start-up check now agrees.  Publicly trusted certificates always carry subjectAltNames
(CA/Browser Forum baseline requirements), so this refuses only hand-made certificates,
with a message saying why.

The clientAuth extended key usage is not required: many CAs stopped issuing it, and
Prosody does not require it either.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (DNS_ID, SRV_ID, DNSPattern, SRVPattern,
                                     verify_service_identity)

from s2sproxy.core.jid import InvalidJid, dns_name, nameprep_domain

ID_ON_XMPPADDR = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.5")    # RFC 6120 13.7.1.4
ID_ON_DNSSRV = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.7")      # RFC 4985
XMPP_SERVER = "_xmpp-server"
_UTF8_STRING, _IA5_STRING = 0x0C, 0x16


def certificate_valid_for(chain_valid: bool, certificate: Any, domain: str) -> bool:
    """True when the chain verified and the certificate's names cover ``domain``."""
    if not chain_valid or certificate is None:
        return False
    return names_cover(certificate, domain)


def names_cover(certificate: x509.Certificate, domain: str) -> bool:
    """Whether a DNS-ID, SRV-ID or XmppAddr of ``certificate`` covers ``domain``
    (rules in the module docstring).  Never raises on odd certificate content: a name
    that cannot be read covers nothing."""
    try:
        canonical = nameprep_domain(domain)
    except InvalidJid:
        return False
    if canonical[0] == "[":
        return False            # an IP literal is no DNS name; XMPP servers have names
    dns_names, srv_names, xmpp_addrs = _san_names(certificate)
    for addr in xmpp_addrs:
        try:
            if nameprep_domain(addr) == canonical:
                return True
        except InvalidJid:
            continue             # 'juliet@domain', 'domain/r', '*.domain': never a domain
    ascii_domain = dns_name(canonical)
    patterns: list[Any] = []
    for name in dns_names:
        try:
            patterns.append(DNSPattern.from_bytes(_canonical_pattern(name)))
        except (CertificateError, InvalidJid, UnicodeError):
            continue
    for name in srv_names:
        service, _, rest = name.partition(".")
        try:
            patterns.append(SRVPattern.from_bytes(
                f"{service}.{_canonical_pattern(rest).decode()}".encode("ascii")))
        except (CertificateError, InvalidJid, UnicodeError):
            continue
    if not patterns:
        return False
    try:
        references = (DNS_ID(ascii_domain), SRV_ID(f"{XMPP_SERVER}.{ascii_domain}"))
    except ValueError:
        return False            # an IPv4 literal: service-identity takes no DNS-ID for it
    for reference in references:
        try:
            verify_service_identity(patterns, obligatory_ids=[reference], optional_ids=[])
        except VerificationError:
            continue
        return True
    return False


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """The names a certificate offers, for messages: DNS-IDs and SRV-IDs as written,
    XmppAddrs as 'xmppAddr NAME'."""
    dns_names, srv_names, xmpp_addrs = _san_names(certificate)
    return dns_names + srv_names + [f"xmppAddr {a}" for a in xmpp_addrs]


def subject_common_names(certificate: x509.Certificate) -> list[str]:
    """The subject's CNs, only to say in a message that they are not used."""
    return [str(a.value) for a in
            certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _canonical_pattern(name: str) -> bytes:
    """A dNSName in the A-label form of its canonical domain, keeping a left-most '*'
    label as it is (service-identity decides whether the wildcard is usable)."""
    if name.startswith("*."):
        return b"*." + dns_name(name[2:]).encode("ascii")
    if "*" in name:
        return name.encode("ascii")     # a wildcard elsewhere: service-identity refuses it
    return dns_name(name).encode("ascii")


def _san_names(certificate: x509.Certificate) -> tuple[list[str], list[str], list[str]]:
    """(dNSNames, SRV-IDs, XmppAddrs) of the subjectAltName extension; empty lists when
    there is none.  Values that are not well-formed DER strings are skipped."""
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return [], [], []
    srv_names: list[str] = []
    xmpp_addrs: list[str] = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == ID_ON_XMPPADDR:
            value = _der_string(other.value, _UTF8_STRING)
            if value is not None:
                xmpp_addrs.append(value)
        elif other.type_id == ID_ON_DNSSRV:
            value = _der_string(other.value, _IA5_STRING)
            if value is not None and value.isascii():
                srv_names.append(value)
    return list(san.get_values_for_type(x509.DNSName)), srv_names, xmpp_addrs


def _der_string(der: bytes, tag: int) -> str | None:
    """The text of a DER string with this universal ``tag`` (definite length, short or
    long form, nothing after it), or None."""
    if len(der) < 2 or der[0] != tag:
        return None
    first = der[1]
    if first < 0x80:
        length, start = first, 2
    else:
        count = first & 0x7F
        if not 1 <= count <= 2 or len(der) < 2 + count:
            return None
        length, start = int.from_bytes(der[2:2 + count], "big"), 2 + count
        if length < 0x80 or (count == 2 and length < 0x100):
            return None                 # not the shortest form: not DER
    if start + length != len(der):
        return None
    try:
        return der[start:].decode("utf-8")
    except UnicodeDecodeError:
        return None
