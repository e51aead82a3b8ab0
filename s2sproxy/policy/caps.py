"""XEP-0115 entity capabilities: the verification string, and a bounded memory of the
caps nodes seen announced in presence, so that a disco#info result for ``node#ver``
can be checked against ``ver`` (caps cache poisoning, XEP-0115 section 5.4)."""

from __future__ import annotations

import base64
import hashlib
import re
from collections import OrderedDict

from lxml import etree

from s2sproxy.core.limits import CAPS_ANNOUNCED_MAX, CAPS_CACHE_MAX

NS_CAPS = "http://jabber.org/protocol/caps"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DATA = "jabber:x:data"
NS_XML = "http://www.w3.org/XML/1998/namespace"
_CAPS_BYTES = NS_CAPS.encode()

# XEP-0115 section 5.1 names the hash functions by their IANA names.
HASHES = {"sha-1": hashlib.sha1, "sha-224": hashlib.sha224, "sha-256": hashlib.sha256,
          "sha-384": hashlib.sha384, "sha-512": hashlib.sha512, "md5": hashlib.md5}


class InvalidDisco(ValueError):
    """The disco#info cannot yield a verification string (XEP-0115 section 5.4 3.)."""


def verification_string(query: etree._Element, algo: str = "sha-1") -> str:
    """XEP-0115 section 5.1 over a ``<query xmlns='disco#info'/>`` element."""
    identities = []
    for ident in query.iterfind(f"{{{NS_DISCO_INFO}}}identity"):
        identities.append("/".join((ident.get("category", ""), ident.get("type", ""),
                                    ident.get(f"{{{NS_XML}}}lang", ""),
                                    ident.get("name", ""))))
    features = [f.get("var", "") for f in query.iterfind(f"{{{NS_DISCO_INFO}}}feature")]
    if len(set(identities)) != len(identities) or len(set(features)) != len(features):
        raise InvalidDisco("duplicate identity or feature")
    s = "".join(i + "<" for i in sorted(identities))
    s += "".join(f + "<" for f in sorted(features))
    forms = []
    for x in query.iterfind(f"{{{NS_DATA}}}x"):
        fields = {}
        form_type = None
        for field in x.iterfind(f"{{{NS_DATA}}}field"):
            values = [v.text or "" for v in field.iterfind(f"{{{NS_DATA}}}value")]
            if field.get("var") == "FORM_TYPE":
                if field.get("type") != "hidden" or len(values) != 1:
                    raise InvalidDisco("FORM_TYPE must be one hidden value")
                form_type = values[0]
            else:
                fields[field.get("var", "")] = sorted(values)
        if form_type is None:
            continue            # forms without FORM_TYPE are ignored (section 5.4)
        part = form_type + "<" + "".join(
            var + "<" + "".join(v + "<" for v in vals) for var, vals in sorted(fields.items()))
        forms.append((form_type, part))
    if len({t for t, _ in forms}) != len(forms):
        raise InvalidDisco("two forms with the same FORM_TYPE")
    s += "".join(part for _t, part in sorted(forms))
    digest = HASHES[algo](s.encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


_C_TAG = re.compile(rb"""<c\s[^>]*xmlns\s*=\s*(['"])http://jabber\.org/protocol/caps\1[^>]*>""")
_ATTR = re.compile(rb"""\s(node|ver|hash)\s*=\s*(['"])(.*?)\2""", re.S)
_ENTITIES = {"&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'", "&amp;": "&"}


def _unescape(value: bytes) -> str:
    text = value.decode("utf-8")
    if "&" in text:
        text = re.sub(r"&(lt|gt|quot|apos|amp|#x?[0-9a-fA-F]+);", _entity, text)
    return text


def _entity(m: re.Match) -> str:
    e = m.group(0)
    if e in _ENTITIES:
        return _ENTITIES[e]
    return chr(int(e[3:-1], 16) if e[2] in "xX" else int(e[2:-1]))


def presence_caps(raw: bytes, tree_of) -> tuple[str, str, str] | None:
    """(node, ver, hash) announced by a presence, or None.

    Nearly every client presence carries caps, so the usual ``<c xmlns='...caps'
    hash=.. node=.. ver=../>`` is read with a regular expression from the already
    well-formed bytes; only an unusual spelling (a prefixed element) falls back to
    ``tree_of()``, an lxml parse."""
    at = raw.find(_CAPS_BYTES)
    if at < 0:
        return None
    # The tag is usually from the "<c" nearest before the namespace to the next ">"
    # (what the regular expression would match there): looked up as it is, matched
    # only when new, searched for in the whole stanza only if that fails.
    start, end = raw.rfind(b"<c", 0, at), raw.find(b">", at)
    m = None
    if start >= 0 and end >= 0:
        tag = raw[start:end + 1]
        known = _TAG_CACHE.get(tag)
        if known is not None:
            return known or None
        m = _C_TAG.fullmatch(tag)
    if m is None:
        m = _C_TAG.search(raw)
    if m is not None:
        tag = m.group(0)
        known = _TAG_CACHE.get(tag)
        if known is not None:
            return known or None
        attrs = {k.decode(): _unescape(v) for k, _q, v in _ATTR.findall(tag)}
        if len(_TAG_CACHE) >= 4096:
            _TAG_CACHE.clear()
        _TAG_CACHE[tag] = _announced(attrs) or ()
        return _TAG_CACHE[tag] or None
    else:
        c = tree_of().find(f"{{{NS_CAPS}}}c")
        return _announced(dict(c.attrib) if c is not None else {})


# The same few <c/> tags come back in presence after presence: remember their reading.
_TAG_CACHE: dict[bytes, tuple] = {}


def _announced(attrs: dict[str, str]) -> tuple[str, str, str] | None:
    if not attrs.get("node") or not attrs.get("ver") or not attrs.get("hash"):
        return None     # legacy caps (no 'hash') cannot be verified
    return attrs["node"], attrs["ver"], attrs["hash"].lower()


class AnnouncedCaps:
    """``node#ver`` strings seen in presence, with their hash function; bounded LRU."""

    def __init__(self, max_entries: int = CAPS_ANNOUNCED_MAX) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, str] = OrderedDict()

    def add(self, node: str, ver: str, algo: str) -> None:
        key = f"{node}#{ver}"
        if self._seen.get(key) == algo:
            self._seen.move_to_end(key)
            return
        self._seen[key] = algo
        while len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)

    def algo(self, node_ver: str) -> str | None:
        return self._seen.get(node_ver)


class CapsCache:
    """Verified disco#info results by ``node#ver`` (bounded LRU): the optional cache
    that answers a remote's disco#info for a known ``node#ver`` without a round trip."""

    def __init__(self, max_entries: int = CAPS_CACHE_MAX) -> None:
        self.max_entries = max_entries
        self._info: OrderedDict[str, bytes] = OrderedDict()

    def put(self, node_ver: str, query_xml: bytes) -> None:
        self._info[node_ver] = query_xml
        self._info.move_to_end(node_ver)
        while len(self._info) > self.max_entries:
            self._info.popitem(last=False)

    def get(self, node_ver: str) -> bytes | None:
        q = self._info.get(node_ver)
        if q is not None:
            self._info.move_to_end(node_ver)
        return q
