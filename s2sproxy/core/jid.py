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


def domain_of(jid: str) -> str:
    """The domainpart of a JID string, canonicalised; ``InvalidJid`` if it has none."""
    at = jid.find("@")
    slash = jid.find("/", at + 1)
    domain = jid[at + 1: slash if slash >= 0 else len(jid)]
    return nameprep_domain(domain)
