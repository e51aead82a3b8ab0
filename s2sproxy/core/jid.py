"""Domain names and JIDs, as far as routing needs them (RFC 7622).

Only the domainpart matters to a server-to-server proxy: stream headers carry
domains, and a stanza's ``from``/``to`` are checked by their domainpart.
"""

from __future__ import annotations

import re
from functools import lru_cache

_LABEL = re.compile(r"^(?!-)[^\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]{1,63}(?<!-)$")


class InvalidJid(ValueError):
    pass


@lru_cache(maxsize=4096)
def nameprep_domain(domain: str) -> str:
    """Return the canonical (lowercase, no trailing dot) form of a domainpart.

    Raises ``InvalidJid`` for an empty name, a label over 63 characters, a name over
    1023 bytes (RFC 7622 section 3.2) or characters not allowed in a hostname label.
    IP literals are accepted as RFC 7622 allows them.  Cached: stanzas on a stream
    name the same few domains over and over (the per-stanza path calls this twice).
    """
    d = domain.rstrip(".").lower()
    if not d or len(d.encode("utf-8")) > 1023:
        raise InvalidJid("empty or too long")
    if d.startswith("[") and d.endswith("]"):
        return d
    for label in d.split("."):
        if not _LABEL.match(label):
            raise InvalidJid(f"bad label {label!r}")
    return d


# RFC 7622 sections 3.3 and 3.4: a localpart or resourcepart is 1 to 1023 bytes.  A
# part of at most 255 characters is at most 1020 bytes in UTF-8, so only a longer one
# is encoded to be measured: the per-stanza path never encodes.
_MAX_PART_BYTES = 1023
_SURELY_SHORT = _MAX_PART_BYTES // 4


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
    """
    slash = jid.find("/")
    if slash >= 0:
        size = len(jid) - slash - 1
        if size == 0 or (size > _SURELY_SHORT
                         and len(jid[slash + 1:].encode("utf-8")) > _MAX_PART_BYTES):
            raise InvalidJid("empty or over-long resourcepart")
        jid = jid[:slash]
    at = jid.find("@")
    if at >= 0:
        if at == 0 or (at > _SURELY_SHORT
                       and len(jid[:at].encode("utf-8")) > _MAX_PART_BYTES):
            raise InvalidJid("empty or over-long localpart")
        jid = jid[at + 1:]
    return nameprep_domain(jid)
