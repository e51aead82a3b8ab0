"""Classification: every stanza gets one verdict.

* answered here: an XEP-0199 ping to a served domain (``answer_pings``), or a disco#info
  for a ``node#ver`` in the optional caps cache;
* forwarded as expected: everything else that is normal XMPP (the fast path: a message
  or presence without caps costs one dict lookup);
* unexpected, with a stable reason code and the action configured for it.

Reasons raised by the stream machines (the stanza never reaches this module) are in
the same table, so that one ``[policy.actions]`` section configures all of them.

A stanza that lxml cannot read as a tree (``UnreadableStanza``: expat accepted it, but
libxml2 refuses one of its namespace names, e.g. ``xmlns:q='%zz'``) is forwarded unread,
as if it carried nothing a content check looks for: it is well-formed XML, Prosody and
ejabberd (whose parsers are expat too) forward such stanzas, and refusing it would
make a harmless oddity of one client a reason to drop traffic.  So unreadable caps in
presence announce nothing, an unreadable disco#info request is relayed and tracked
without a caps node (never answered from the cache), and an unreadable disco#info
result for an announced node cannot be verified: it is flagged ``caps-hash-mismatch``
like any result that fails verification, and never enters the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from s2sproxy.core.serialize import escape
from s2sproxy.core.stanza import Stanza, UnreadableStanza, stanza_tree
from lxml import etree

from s2sproxy.policy.caps import (HASHES, NS_DISCO_INFO, AnnouncedCaps, CapsCache,
                                  InvalidDisco, presence_caps, verification_string)
from s2sproxy.policy.iq_tracker import IqTracker, Pending

FORWARD, DROP, BOUNCE, CLOSE = "forward", "drop", "bounce", "close"
NS_PING = "urn:xmpp:ping"


@dataclass(frozen=True)
class Reason:
    default: str
    allowed: frozenset[str]
    condition: str          # stanza error (bounce), or stream error (close)
    description: str
    # The stream error for ``close`` when ``condition`` is a stanza error condition.
    stream_condition: str = ""


REASONS: dict[str, Reason] = {
    # Forwarded by default: a request relayed by another s2sproxy instance (scale-out),
    # before a restart, or evicted from a full tracker has a legitimate answer too.
    "unsolicited-iq-response": Reason(
        FORWARD, frozenset({FORWARD, DROP, CLOSE}), "undefined-condition",
        "an iq result or error that answers no request relayed by s2sproxy"),
    "iq-child-count": Reason(
        BOUNCE, frozenset({FORWARD, DROP, BOUNCE, CLOSE}), "bad-request",
        "an iq get/set without exactly one child element (RFC 6120 section 8.2.3)",
        "policy-violation"),
    "unknown-type": Reason(
        FORWARD, frozenset({FORWARD, DROP, BOUNCE, CLOSE}), "bad-request",
        "a stanza whose type attribute RFC 6120/6121 does not define", "policy-violation"),
    "caps-hash-mismatch": Reason(
        FORWARD, frozenset({FORWARD, DROP}), "not-acceptable",
        "a disco#info result whose XEP-0115 hash differs from the announced ver",
        "policy-violation"),
    "invalid-from": Reason(
        CLOSE, frozenset({DROP, CLOSE}), "invalid-from",
        "a stanza whose from domain is not authenticated on its stream"),
    "host-unknown": Reason(
        CLOSE, frozenset({DROP, CLOSE}), "host-unknown",
        "a stanza to a domain this stream does not serve"),
    "improper-addressing": Reason(
        CLOSE, frozenset({DROP, CLOSE}), "improper-addressing",
        "a stanza without from or to, or with a malformed JID"),
    "not-a-stanza": Reason(
        CLOSE, frozenset({DROP, CLOSE}), "unsupported-stanza-type",
        "a top-level element that is not a stanza after authentication"),
    "before-auth": Reason(
        CLOSE, frozenset({CLOSE}), "not-authorized",
        "a stanza (or, before TLS, anything but STARTTLS) before the stream was "
        "authenticated"),
    "oversize": Reason(
        CLOSE, frozenset({CLOSE}), "policy-violation",
        "a stanza over limits.max_stanza_size or nested over limits.max_depth"),
    "restricted-xml": Reason(
        CLOSE, frozenset({CLOSE}), "restricted-xml",
        "a comment, processing instruction, DTD or entity (RFC 6120 section 11.1)"),
    "malformed-xml": Reason(
        CLOSE, frozenset({CLOSE}), "not-well-formed",
        "XML that is not well-formed, or not UTF-8"),
}

DEFAULT_ACTIONS = {name: r.default for name, r in REASONS.items()}

TYPES = {
    "message": frozenset({None, "chat", "error", "groupchat", "headline", "normal"}),
    "presence": frozenset({None, "error", "probe", "subscribe", "subscribed",
                           "unavailable", "unsubscribe", "unsubscribed"}),
    "iq": frozenset({"get", "set", "result", "error"}),
}


@dataclass(slots=True)
class Unexpected:
    reason: str
    action: str
    condition: str          # the stanza error of a bounce
    detail: str = ""
    stream_condition: str = ""   # the stream error of a close


@dataclass
class Outcome:
    """What to do with one stanza that is not simply forwarded."""
    forward: bool
    replies: list[Stanza] = field(default_factory=list)   # answered here
    unexpected: Unexpected | None = None


@dataclass
class PolicyConfig:
    actions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ACTIONS))
    answer_pings: bool = True
    iq_timeout: float = 120.0
    iq_max_pending: int = 10000
    caps_cache: bool = False


class Policy:
    def __init__(self, config: PolicyConfig, served: frozenset[str]) -> None:
        self.config = config
        self.served = served
        self.iqs = IqTracker(config.iq_timeout, config.iq_max_pending)
        self.announced = AnnouncedCaps()
        self.cache = CapsCache() if config.caps_cache else None

    def reconfigure(self, config: PolicyConfig, now: float = 0.0) -> None:
        """A reloaded configuration: new stanzas are checked with it; pending iqs keep
        their deadlines, and the caps cache is kept unless it was turned off."""
        self.config = config
        self.iqs.set_timeout(config.iq_timeout, now)
        self.iqs.max_entries = config.iq_max_pending
        if not config.caps_cache:
            self.cache = None
        elif self.cache is None:
            self.cache = CapsCache()

    def unexpected(self, reason: str, detail: str = "") -> Unexpected:
        spec = REASONS[reason]
        return Unexpected(reason, self.config.actions[reason], spec.condition, detail,
                          spec.stream_condition or spec.condition)

    def check(self, s: Stanza, now: float) -> Outcome | None:
        """None: forward as expected.  The stanza is parsed into a tree only when a
        check must read its content (caps presence, disco#info); most never are."""
        kind = s.kind
        if s.type not in TYPES[kind]:
            u = self.unexpected("unknown-type", f"type={s.type!r}")
            return Outcome(u.action == FORWARD, unexpected=u)
        if kind == "presence":
            if s.type is None:
                try:
                    caps = presence_caps(s.raw, lambda: stanza_tree(s))
                except UnreadableStanza:
                    caps = None         # announces nothing (module docstring)
                if caps is not None:
                    self.announced.add(*caps)
            return None
        if kind != "iq":
            return None
        if s.type in ("get", "set"):
            return self._request(s, now)
        return self._response(s)

    def _request(self, s: Stanza, now: float) -> Outcome | None:
        if s.children != 1:
            u = self.unexpected("iq-child-count", f"{s.children} children")
            return Outcome(u.action == FORWARD, unexpected=u)
        if s.child_ns == NS_PING and s.type == "get" and self.config.answer_pings \
                and s.to in self.served:
            return Outcome(False, replies=[_result(s)])
        node = None
        if s.child_ns == NS_DISCO_INFO and s.type == "get":
            try:
                node = stanza_tree(s)[0].get("node")
            except UnreadableStanza:
                node = None             # relayed, no caps node (module docstring)
            if node and self.cache is not None:
                cached = self.cache.get(node)
                if cached is not None:
                    return Outcome(False, replies=[_result(s, cached)])
        self.iqs.request(s, now, node)
        return None

    def _response(self, s: Stanza) -> Outcome | None:
        pending = self.iqs.response(s)
        if pending is None:
            u = self.unexpected("unsolicited-iq-response",
                                f"no request {s.id!r} from {s.to} pending")
            return Outcome(u.action == FORWARD, unexpected=u)
        if pending.node and s.type == "result" and s.child_ns == NS_DISCO_INFO:
            return self._check_caps(s, pending)
        return None

    def _check_caps(self, s: Stanza, pending: Pending) -> Outcome | None:
        node_ver = pending.node
        algo = self.announced.algo(node_ver)
        if algo is None or "#" not in node_ver:
            return None                 # not a caps node we saw announced
        ver = node_ver.rsplit("#", 1)[1]
        try:
            query = stanza_tree(s)[0]
            ok = algo in HASHES and verification_string(query, algo) == ver
        except (InvalidDisco, UnreadableStanza):
            ok = False                  # unverifiable (module docstring)
        if ok:
            if self.cache is not None:
                self.cache.put(node_ver, etree.tostring(query))
            return None
        u = self.unexpected("caps-hash-mismatch", f"{node_ver} ({algo})")
        return Outcome(u.action == FORWARD, unexpected=u)

    def expired(self, now: float) -> list[Stanza]:
        """Error replies (remote-server-timeout) for requests left unanswered."""
        return [p.request for p in self.iqs.expire(now)]

    def unanswered(self) -> list[Stanza]:
        """Every request still waiting for its answer (s2sproxy is stopping)."""
        return [p.request for p in self.iqs.fail_all()]

    def stream_died(self, pair: tuple[str, str]) -> list[Stanza]:
        return [p.request for p in self.iqs.fail_pair(pair)]


def _result(request: Stanza, payload: bytes = b"") -> Stanza:
    """The iq result answering ``request`` (swapped addresses, same id)."""
    raw = (f"<iq from='{escape(request.to)}' to='{escape(request.from_)}' type='result'"
           f" id='{escape(request.id or '')}'>").encode() + payload + b"</iq>"
    return Stanza("iq", raw, request.to, request.from_, "result", request.id, None,
                  request.to_domain, request.from_domain)
