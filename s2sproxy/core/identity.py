"""Is a peer's certificate valid for an XMPP domain? (RFC 6120 section 13.7.2, RFC 6125)

Chain validation is the shell's job (it owns the trust store and reports the result in
``TlsEstablished``); this module checks the *name*: DNS-ID, SRV-ID (``_xmpp-server``)
or XmppAddr, through service-identity.  The clientAuth extended key usage is not
required: many CAs stopped issuing it, and Prosody does not require it either.
"""

from __future__ import annotations

from typing import Any

from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname


def certificate_valid_for(chain_valid: bool, certificate: Any, domain: str) -> bool:
    if not chain_valid or certificate is None:
        return False
    try:
        verify_certificate_hostname(certificate, domain)
    except (VerificationError, CertificateError, ValueError):
        return False
    return True
