"""Domain names and JIDs, as far as routing needs them (RFC 7622).

Only the domainpart matters to a server-to-server proxy: stream headers carry
domains, and a stanza's ``from``/``to`` are checked by their domainpart.

Domains have ONE canonical form, used for routing keys, trust settings, the stream
headers we write and certificate names:

1. IDNA2008 (RFC 5890-5892) validity, after the UTS #46 mapping (case folding, width
   and compatibility mappings, non-transitional: 'ß' stays 'ß'), through the ``idna``
   package.  Python's built-in ``idna`` codec is IDNA2003 and knows neither.  So
   'ＥＸＡＭＰＬＥ.com' and 'example.com' are one domain.
2. U-labels, not A-labels: RFC 7622 section 3.2 compares domainparts as U-labels
   ("xn--bcher-kva.example" and "bücher.example" are one domain, spelt the second
   way).  Prosody does the same for certificate names (util.x509 get_identities:
   idna_to_unicode) and ``prosodyctl check`` asks for U-label host names; its JID
   prep and ejabberd's jid:nameprep apply IDNA2003 nameprep without decoding
   A-labels.  The bytes of a stanza are forwarded untouched, so ejabberd still sees
   what the remote wrote; only DNS queries and SNI need the A-label form, from
   ``dns_name``.
3. No trailing dot (RFC 7622 section 3.2: one final dot MUST be stripped, as
   Prosody's prepped_split does), and at most 1023 bytes (ejabberd's jid:nameprep
   has the same bound).
4. IPv6 literals in brackets, compressed ('[2001:db8::1]'); IPv4 literals as written.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import idna

from s2sproxy.core.limits import JID_CACHE_ENTRIES, JID_CACHE_MAX_LENGTH

# RFC 7622 section 3.2: "MUST NOT be more than 1023 octets in length", more than the
# 253 of a DNS name (a domain reached through a configured address need not be in DNS).
_MAX_DOMAIN_BYTES = 1023


# A name of LDH labels (RFC 5890 section 2.3.1) that are not R-LDH ("ab--", A-labels
# included): its canonical form is its lower case.
_LDH_NAME = re.compile(r"(?:(?!..--)(?!-)[a-z0-9-]{1,63}(?<!-)\.)*(?!..--)(?!-)[a-z0-9-]{1,63}"
                       r"(?<!-)")
# A name that needs IDNA processing must resolve in DNS to be of use for s2s: its
# A-label form is at most 253 octets (RFC 1035), so longer input is refused before the
# (costly) mapping.
_MAX_IDNA_CHARS = 253


class InvalidJid(ValueError):
    pass


@lru_cache(maxsize=4096)
def nameprep_domain(domain: str) -> str:
    """Return the canonical form of a domainpart (see the module docstring).

    Raises ``InvalidJid`` saying why for an empty name or label, a label over 63
    octets in its A-label form, a name over 1023 bytes, a code point IDNA2008 or the
    STD3 hostname rules do not allow, or a bracketed literal that is not an IPv6
    address.  Cached (bounded): stanzas on a stream name the same few domains over and
    over, and the per-stanza path calls this twice, so it pays one dict lookup.
    Refusals are not cached; each one ends a stream, so they are not repeated cheaply.
    """
    d = domain[:-1] if domain.endswith(".") else domain
    if not d:
        raise InvalidJid("empty domainpart")
    if len(d) > _MAX_DOMAIN_BYTES:
        # Bounds the work done on hostile input before any mapping.
        raise InvalidJid(f"domainpart over {_MAX_DOMAIN_BYTES} bytes")
    if d[0] == "[":
        if d[-1] != "]":
            raise InvalidJid(f"'[' not allowed outside an IPv6 literal: {domain!r}")
        try:
            return f"[{ipaddress.IPv6Address(d[1:-1]).compressed}]"
        except ValueError:
            raise InvalidJid(f"not an IPv6 address literal: {domain!r}") from None
    if d.isascii():
        low = d.lower()
        if _LDH_NAME.fullmatch(low):
            # The common case: letters, digits and hyphens only, no A-label.  The
            # mapping and IDNA2008 rules leave such a name as its lower case; skipping
            # them keeps a hostile peer's long names cheap (the idna package costs
            # about 2 ms for a 1 KB name).
            return low
    if len(d) > _MAX_IDNA_CHARS:
        raise InvalidJid(f"internationalised domainpart over {_MAX_IDNA_CHARS} characters")
    try:
        mapped = idna.uts46_remap(d, std3_rules=True)
        labels = []
        for label in mapped.split("."):
            if not label:
                raise InvalidJid(f"empty label in {domain!r}")
            # alabel checks IDNA2008 validity (and, for an A-label given, that it is
            # canonical Punycode) and the 63-octet limit on the A-label form.
            labels.append(idna.ulabel(idna.alabel(label)))
    except idna.IDNAError as e:
        raise InvalidJid(f"{e} ({domain!r})") from None
    except UnicodeError:
        raise InvalidJid(f"not a domain name: {domain!r}") from None
    canonical = ".".join(labels)
    if len(canonical.encode("utf-8")) > _MAX_DOMAIN_BYTES:
        raise InvalidJid(f"domainpart over {_MAX_DOMAIN_BYTES} bytes")
    return canonical


def dns_name(domain: str) -> str:
    """The A-label (ASCII) form of ``domain``, for DNS queries and TLS SNI (RFC 5890
    section 2.3.2.1): 'bücher.example' -> 'xn--bcher-kva.example'.  IP literals come
    back as their canonical form.  ``InvalidJid`` if ``domain`` is not valid."""
    canonical = nameprep_domain(domain)
    if canonical[0] == "[":
        return canonical
    return ".".join(idna.alabel(label).decode("ascii") for label in canonical.split("."))


# RFC 7622 sections 3.3 and 3.4: a localpart or resourcepart is 1 to 1023 bytes.  A
# part of at most 255 characters is at most 1020 bytes in UTF-8 (4 bytes a character at
# most), so the per-stanza path only compares lengths; a longer part is encoded and
# measured in ``_check_part``.
_MAX_PART_BYTES = 1023


def domain_of(jid: str) -> str:
    """The domainpart of a JID string, canonicalised; ``InvalidJid`` if the JID is not
    valid (RFC 7622 section 3).

    RFC 7622 section 3.1 fixes the order of the cuts: the resourcepart starts at the
    FIRST '/', and only then does the localpart end at the first '@' before it.  So
    'evil.example/x@victim.example' is the domain evil.example with the resource
    'x@victim.example', never a JID of victim.example; cutting at '@' first would let
    a peer authenticated for evil.example speak for victim.example.  Prosody's
    util.jid ``split`` cuts the same way (a localpart only when no '/' precedes the
    '@'; empty parts refused).

    Called twice per stanza: the common cases take two ``find`` calls, a few integer
    comparisons, one slice and the cached ``nameprep_domain``.
    """
    slash = jid.find("/")
    if slash < 0:
        at = jid.find("@")
        if at == 0 or at > 255:
            _check_part(jid[:at], "localpart")
        return nameprep_domain(jid[at + 1:])
    if not 1 < len(jid) - slash <= 256:
        _check_part(jid[slash + 1:], "resourcepart")
    at = jid.find("@", 0, slash)
    if at == 0 or at > 255:
        _check_part(jid[:at], "localpart")
    return nameprep_domain(jid[at + 1:slash])


_DOMAINS: dict[str, str] = {}


def cached_domain_of(jid: str) -> str:
    """``domain_of``, remembered for JIDs seen before (``core.limits``
    ``JID_CACHE_ENTRIES``): a dict lookup for the usual stanza.  Invalid JIDs raise
    ``InvalidJid`` every time and are not remembered."""
    d = _DOMAINS.get(jid)
    if d is None:
        d = domain_of(jid)
        if len(jid) <= JID_CACHE_MAX_LENGTH:
            if len(_DOMAINS) >= JID_CACHE_ENTRIES:
                _DOMAINS.clear()
            _DOMAINS[jid] = d
    return d


def _check_part(part: str, name: str) -> None:
    """Raise ``InvalidJid`` unless ``part`` is 1 to 1023 bytes in UTF-8."""
    if not part:
        raise InvalidJid(f"empty {name}")
    if len(part.encode("utf-8", "surrogatepass")) > _MAX_PART_BYTES:
        raise InvalidJid(f"{name} over {_MAX_PART_BYTES} bytes")
