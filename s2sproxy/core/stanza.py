"""Stanzas as the router sees them: original bytes plus the few facts it needs."""

from __future__ import annotations

from lxml import etree

from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.xmlstream import NS_SERVER

STANZA_NAMES = {f"{NS_SERVER} message": "message", f"{NS_SERVER} presence": "presence",
                f"{NS_SERVER} iq": "iq"}
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

# RFC 6120 section 8.3.3: the error type that goes with each defined condition ("the
# associated error type SHOULD be ..."; where the RFC names two, the first: 8.3.3.3
# feature-not-implemented cancel or modify, 8.3.3.12 policy-violation modify or wait,
# 8.3.3.22 unexpected-request wait or modify).  8.3.3.21 undefined-condition allows
# any type; cancel, as for an unknown condition, says "do not retry".
ERROR_TYPES = {
    "bad-request": "modify",                # 8.3.3.1
    "conflict": "cancel",                   # 8.3.3.2
    "feature-not-implemented": "cancel",    # 8.3.3.3
    "forbidden": "auth",                    # 8.3.3.4
    "gone": "cancel",                       # 8.3.3.5
    "internal-server-error": "cancel",      # 8.3.3.6
    "item-not-found": "cancel",             # 8.3.3.7
    "jid-malformed": "modify",              # 8.3.3.8
    "not-acceptable": "modify",             # 8.3.3.9
    "not-allowed": "cancel",                # 8.3.3.10
    "not-authorized": "auth",               # 8.3.3.11
    "policy-violation": "modify",           # 8.3.3.12
    "recipient-unavailable": "wait",        # 8.3.3.13
    "redirect": "modify",                   # 8.3.3.14
    "registration-required": "auth",        # 8.3.3.15
    "remote-server-not-found": "cancel",    # 8.3.3.16
    "remote-server-timeout": "wait",        # 8.3.3.17
    "resource-constraint": "wait",          # 8.3.3.18
    "service-unavailable": "cancel",        # 8.3.3.19
    "subscription-required": "auth",        # 8.3.3.20
    "undefined-condition": "cancel",        # 8.3.3.21
    "unexpected-request": "wait",           # 8.3.3.22
}


class Stanza:
    """A message, presence or iq with its original bytes (``raw``)."""

    __slots__ = ("kind", "raw", "from_", "to", "type", "id", "child_ns", "from_domain",
                 "to_domain", "children")

    def __init__(self, kind: str, raw: bytes, from_: str, to: str, type_: str | None,
                 id_: str | None, child_ns: str | None, from_domain: str = "",
                 to_domain: str = "", children: int = 0) -> None:
        self.children = children
        self.from_domain = from_domain
        self.to_domain = to_domain
        self.kind = kind
        self.raw = raw
        self.from_ = from_
        self.to = to
        self.type = type_
        self.id = id_
        self.child_ns = child_ns

    def __repr__(self) -> str:
        return f"<Stanza {self.kind} type={self.type} id={self.id} {self.from_}->{self.to}>"

    @property
    def bounceable(self) -> bool:
        """Never an error for an error (RFC 6120 section 8.3.1), nor for an iq result."""
        t = self.type
        return t != "error" and not (self.kind == "iq" and t == "result")


_TREE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)


class UnreadableStanza(ValueError):
    """lxml refused a stanza expat accepted (a namespace name that is not an RFC 3986
    URI, such as ``xmlns:q='%zz'``): it cannot be read as a tree."""


def stanza_tree(stanza: Stanza) -> etree._Element:
    """The stanza as an lxml tree, for the few checks that read content.  Its bytes
    are self-contained (the framer declared any stream-header prefix it uses), so a
    synthetic root with the default namespace is all it needs.  Raises
    ``UnreadableStanza`` when lxml refuses the bytes."""
    try:
        return etree.fromstring(b"<s xmlns='jabber:server'>" + stanza.raw + b"</s>",
                                _TREE_PARSER)[0]
    except etree.XMLSyntaxError as e:
        raise UnreadableStanza(str(e)[:200]) from None


def bounce_stanza(stanza: Stanza, condition: str, text: str = "") -> Stanza | None:
    """The error stanza answering ``stanza``, ready to be routed back to its sender."""
    raw = bounce(stanza, condition, text)
    if raw is None:
        return None
    return Stanza(stanza.kind, raw, stanza.to, stanza.from_, "error", stanza.id, None,
                  stanza.to_domain, stanza.from_domain)


def bounce(stanza: Stanza, condition: str, text: str = "") -> bytes | None:
    """The error stanza that answers ``stanza`` (swapped addresses, same id), or None
    when ``stanza`` must not be answered with an error."""
    if not stanza.bounceable:
        return None
    etype = ERROR_TYPES.get(condition, "cancel")
    attrs = f" from='{xml_escape(stanza.to)}' to='{xml_escape(stanza.from_)}' type='error'"
    if stanza.id is not None:
        attrs += f" id='{xml_escape(stanza.id)}'"
    body = f"<{condition} xmlns='{NS_STANZAS}'/>"
    if text:
        body += f"<text xmlns='{NS_STANZAS}'>{xml_escape(text)}</text>"
    return (f"<{stanza.kind}{attrs}><error type='{etype}'>{body}</error>"
            f"</{stanza.kind}>").encode("utf-8")
