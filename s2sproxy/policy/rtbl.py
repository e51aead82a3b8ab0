"""Real-time block lists (RTBL, ``[[filter.rtbl]]``, issue 11): remote domains published
as the items of a pubsub node (XEP-0060), such as ``spam_source_domains`` on
``xmppbl.org``, kept current from the node's event notifications, and refused like
``filter.deny`` (``policy.domains``).

Sans-IO: the shell hands in the stanzas that arrive (``take``) and the time (``poll``),
and runs what comes back: stanzas to send (``Send``) and facts to log.

Rules:

1. One ``Subscription`` per configured (service, node).  Its subscriber is a served
   domain's JID with the resource ``RESOURCE`` (``local.example/s2sproxy-rtbl``), as
   ejabberd's mod_antispam subscribes as ``domain/rtbl-<node id>``.  At start, and
   ``refresh`` seconds after each complete sync, it sends a subscribe request (iq set)
   and then an items request (iq get) for the whole node; the two go in that order on
   the same link, so no item published in between is missed: the items answer is the
   node as it is once we are subscribed, and it replaces what the source held.
   Subscribing again while subscribed is harmless (XEP-0060 section 6.1.6: the
   service answers with the existing subscription), so the periodic sync also mends
   a subscription the service lost (its restart, an owner removing it).
2. What comes for the subscriber JID (its domain compared canonically, its resource
   exactly) is consumed here and never reaches ejabberd: answers to our requests
   (matched by id and by ``from`` being the service, a bare domain whose stream
   authenticated it), and the service's messages (notifications; one without a
   pubsub event is ignored).  Anything else sent to the subscriber JID is
   ``Unexpected``: the shell answers it ``service-unavailable`` (never an error for
   an error).
3. A notification (``<event xmlns='...pubsub#event'>`` in a message) for our node:
   ``<items>`` with ``<item id>`` adds, with ``<retract id>`` removes; ``<purge>``
   empties the list; ``<delete>`` empties it and syncs again after ``RTBL_RETRY_BASE``
   (the node may come back); ``<subscription subscription='none'>`` (in the event,
   as ejabberd sends it, or in a ``pubsub`` element) syncs at once.  Notifications
   for other nodes of the service are ignored.
4. A request that fails (an error answer, a bounce on the way, or no answer within
   ``RTBL_IQ_TIMEOUT``) is tried again, with its pair, after ``RTBL_RETRY_BASE *
   2 ** (n - 1)`` seconds (n syncs in a row with a failure), at most ``refresh``.  What the source held stays in
   force meanwhile: a service that cannot be reached unblocks nobody.
5. Item ids: with ``ids = "domain"`` (what xmppbl.org, ejabberd's mod_antispam and
   Prosody's mod_anti_spam use for ``spam_source_domains``) an id is a domain or
   ``*.domain``, canonicalised; with ``ids = "sha256"`` it is the lower-case hex
   SHA-256 of the canonical domain (the form of hashed lists such as
   ``spam_source_jids_sha256``).  A bad id is skipped and counted, never fatal.  A
   source holds at most ``RTBL_MAX_ENTRIES`` ids; more are skipped and reported.
6. The services themselves are never denied by an RTBL (``policy.domains``): a list
   that named its own service would cut us off from its retractions.
7. A source removed from the configuration is retired: its entries stop denying at
   once, and it sends an unsubscribe request, tried again as in rule 4 until the
   service answers it.  Until then what comes for its subscriber JID is still
   consumed (rule 2), and a notification from its service asks for the unsubscribe
   again.
8. Cost: a notification changes the filter by its own items only; a sync parses only
   the ids it did not hold (a list of 100,000 that did not change costs a pass over
   a dict, not 100,000 domain checks).  The whole list comes in one answer (neither
   Prosody's mod_pubsub nor ejabberd's mod_antispam pages with RSM), so it must fit
   ``limits.max_stanza_size``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from s2sproxy.core.jid import InvalidJid, nameprep_domain
from s2sproxy.core.limits import RTBL_IQ_TIMEOUT, RTBL_MAX_ENTRIES, RTBL_RETRY_BASE
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.stanza import NS_STANZAS, Stanza, UnreadableStanza, stanza_tree
from s2sproxy.policy.domains import DomainFilter, parse_entry

NS_PUBSUB = "http://jabber.org/protocol/pubsub"
NS_EVENT = NS_PUBSUB + "#event"
RESOURCE = "s2sproxy-rtbl"
DEFAULT_NODE = "spam_source_domains"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RtblSource:
    """One ``[[filter.rtbl]]`` entry (``config``)."""
    service: str                # the pubsub service: a domain (canonical)
    node: str = DEFAULT_NODE
    ids: str = "domain"         # "domain" | "sha256"
    domain: str = ""            # the served domain that subscribes

    @property
    def name(self) -> str:
        """How logs, flags, metrics and ``s2sproxy status`` name it."""
        return f"rtbl {self.service}/{self.node}"

    @property
    def subscriber(self) -> str:
        return f"{self.domain}/{RESOURCE}"


def parse_source(service: str, node: str, ids: str, domain: str) -> RtblSource:
    """``ValueError`` (with why) for a bad entry; ``domain`` must already be canonical."""
    try:
        service = nameprep_domain(service)
    except InvalidJid as e:
        raise ValueError(f"service: not a domain: {service!r} ({e})") from None
    if not node or len(node) > 1023:
        raise ValueError(f"node: must be a pubsub node name, not {node!r}")
    if ids not in ("domain", "sha256"):
        raise ValueError(f"ids: must be domain or sha256, not {ids!r}")
    return RtblSource(service, node, ids, domain)


# -- what the shell is told ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Send:
    stanza: Stanza


@dataclass(frozen=True, slots=True)
class Subscribed:
    name: str
    state: str              # the service's word: subscribed, pending, unconfigured


@dataclass(frozen=True, slots=True)
class Synced:
    """A complete items answer: the source now holds ``total`` entries."""
    name: str
    total: int
    added: int
    removed: int
    skipped: int


@dataclass(frozen=True, slots=True)
class Updated:
    """A notification changed the source."""
    name: str
    added: tuple[str, ...]
    removed: tuple[str, ...]
    purged: bool = False
    skipped: int = 0


@dataclass(frozen=True, slots=True)
class Failed:
    name: str
    request: str            # "subscribe" | "items"
    condition: str
    retry_in: float


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """A retired source's unsubscribe was answered (rule 7)."""
    name: str
    answer: str             # "result" or the error condition


@dataclass(frozen=True, slots=True)
class Ignored:
    """A message from the service that is no notification we act on (debug)."""
    stanza: Stanza
    why: str


@dataclass(frozen=True, slots=True)
class Unexpected:
    stanza: Stanza
    why: str


Decision = Send | Subscribed | Synced | Updated | Failed | Unsubscribed | Ignored | Unexpected


class Subscription:
    """One source's state: its ids and what it waits for."""

    def __init__(self, source: RtblSource, refresh: float) -> None:
        self.source = source
        self.refresh = refresh
        self.entries: dict[str, str] = {}   # item id -> what it denies (pattern or hash)
        self.counts: dict[str, int] = {}    # what it denies -> how many ids say so
        self.retired = False                # rule 7: being unsubscribed
        self.pending: dict[str, tuple[str, float]] = {}    # our iq id -> (request, sent)
        self.next_sync = 0.0                # at once
        self.failures = 0                   # syncs in a row with a failed request
        self.round_failed = False
        self.state = "starting"             # starting, subscribed, pending, failed
        self.synced_at: float | None = None
        self.last_error = ""

    def add(self, item_id: str, key: str, added: list[str]) -> None:
        old = self.entries.get(item_id)
        if old == key:
            return
        if old is not None:
            self.remove(item_id, [])
        self.entries[item_id] = key
        n = self.counts.get(key, 0)
        self.counts[key] = n + 1
        if not n:
            added.append(key)

    def remove(self, item_id: str, removed: list[str]) -> None:
        key = self.entries.pop(item_id, None)
        if key is None:
            return
        n = self.counts[key] - 1
        if n:
            self.counts[key] = n
        else:
            del self.counts[key]
            removed.append(key)

    def key_of(self, item_id: str) -> str | None:
        """What ``item_id`` denies, or None for a bad id (rule 5)."""
        if self.source.ids == "sha256":
            h = item_id.strip().lower()
            return h if _SHA256.fullmatch(h) else None
        try:
            return str(parse_entry(item_id))
        except ValueError:
            return None


class Rtbl:
    """Every RTBL source; changes ``domains`` in place (``DomainFilter.rtbl``)."""

    def __init__(self, domains: DomainFilter, new_id: Callable[[], str]) -> None:
        self.domains = domains
        self.new_id = new_id
        self.subs: dict[RtblSource, Subscription] = {}
        self.retired: dict[RtblSource, Subscription] = {}      # rule 7
        self.refresh = 3600.0
        self._by_id: dict[str, Subscription] = {}
        self._domains: set[str] = set()     # subscriber JIDs' domains (canonical)
        self.active = False

    def configure(self, sources: Iterable[RtblSource], refresh: float,
                  now: float) -> list[Decision]:
        """A (re)loaded ``[[filter.rtbl]]``: new sources sync at once, kept ones keep
        their entries, removed ones are unsubscribed and their entries dropped."""
        wanted = list(dict.fromkeys(sources))
        out: list[Decision] = []
        for src in [s for s in self.subs if s not in wanted]:
            sub = self.subs.pop(src)
            self.domains.set_rtbl(src.name, None)
            sub.retired, sub.entries, sub.counts = True, {}, {}
            sub.failures, sub.round_failed = 0, False
            self.retired[src] = sub
            if not sub.pending:
                out.append(Send(self._request(sub, "unsubscribe", now)))
            else:
                sub.next_sync = now     # once what is pending is answered or expires
        self.refresh = refresh
        for src in wanted:
            sub = self.subs.get(src) or self.retired.pop(src, None)
            if sub is None or sub.retired:
                if sub is not None:     # back before its unsubscribe was answered
                    self._forget(sub)
                self.subs[src] = Subscription(src, refresh)
                self.domains.set_rtbl(src.name, {}, hashed=src.ids == "sha256")
            else:
                sub.refresh = refresh
                if sub.synced_at is not None:
                    sub.next_sync = min(sub.next_sync, sub.synced_at + refresh)
        self.domains.rtbl_services = frozenset(s.service for s in self.subs)
        self.domains.changed()
        self._changed_sources()
        return out

    def _changed_sources(self) -> None:
        self._domains = {s.domain for s in (*self.subs, *self.retired)}
        self.active = bool(self.subs or self.retired)

    def _forget(self, sub: Subscription) -> None:
        for i in sub.pending:
            self._by_id.pop(i, None)
        sub.pending.clear()

    # -- time ----------------------------------------------------------------------------

    def poll(self, now: float) -> list[Decision]:
        out: list[Decision] = []
        for sub in (*self.subs.values(), *self.retired.values()):
            for iq_id, (request, sent) in list(sub.pending.items()):
                if now - sent >= RTBL_IQ_TIMEOUT:
                    out.append(self._failed(sub, iq_id, request, "no answer within "
                                            f"{RTBL_IQ_TIMEOUT:g} s", now))
            if not sub.pending and now >= sub.next_sync:
                if sub.retired:
                    sub.next_sync = now + sub.refresh
                    sub.round_failed = False
                    out.append(Send(self._request(sub, "unsubscribe", now)))
                else:
                    out += self._sync(sub, now)
        return out

    def _sync(self, sub: Subscription, now: float) -> list[Decision]:
        sub.next_sync = now + sub.refresh     # until an answer says otherwise
        sub.round_failed = False
        return [Send(self._request(sub, "subscribe", now)),
                Send(self._request(sub, "items", now))]

    def _request(self, sub: Subscription, request: str, now: float) -> Stanza:
        src = sub.source
        iq_id = self.new_id()
        jid, node = xml_escape(src.subscriber), xml_escape(src.node)
        if request == "items":
            iq_type, payload = "get", f"<items node='{node}'/>"
        else:
            iq_type, payload = "set", f"<{request} node='{node}' jid='{jid}'/>"
        raw = (f"<iq type='{iq_type}' id='{xml_escape(iq_id)}' from='{jid}' "
               f"to='{xml_escape(src.service)}'><pubsub xmlns='{NS_PUBSUB}'>{payload}"
               f"</pubsub></iq>").encode()
        sub.pending[iq_id] = (request, now)
        self._by_id[iq_id] = sub
        return Stanza("iq", raw, src.subscriber, src.service, iq_type, iq_id, NS_PUBSUB,
                      src.domain, src.service)

    def _failed(self, sub: Subscription, iq_id: str, request: str, condition: str,
                now: float) -> Failed:
        sub.pending.pop(iq_id, None)
        self._by_id.pop(iq_id, None)
        if not sub.round_failed:    # one failure per sync, however many requests fail
            sub.failures += 1
            sub.round_failed = True
        delay = min(RTBL_RETRY_BASE * 2 ** (sub.failures - 1), sub.refresh)
        sub.next_sync = now + delay
        sub.last_error = f"{request}: {condition}"
        if request == "subscribe":
            sub.state = "failed"
        # the other request of the pair is still answered; the retry sends both again
        return Failed(sub.source.name, request, condition, delay)

    def _unsubscribed(self, sub: Subscription, s: Stanza) -> list[Decision]:
        self._forget(sub)
        if self.retired.get(sub.source) is sub:
            del self.retired[sub.source]
            self._changed_sources()
        return [Unsubscribed(sub.source.name,
                             "result" if s.type == "result" else _condition(s))]

    # -- stanzas -------------------------------------------------------------------------

    def take(self, stanzas: list[Stanza], now: float) -> tuple[list[Stanza], list[Decision]]:
        """Split off what is addressed to a subscriber JID (rule 2)."""
        doms = self._domains
        rest: list[Stanza] | None = None
        out: list[Decision] = []
        for i, s in enumerate(stanzas):
            if s.to_domain in doms and _resource(s.to) == RESOURCE:
                if rest is None:
                    rest = stanzas[:i]
                out += self._handle(s, now)
            elif rest is not None:
                rest.append(s)
        return (stanzas if rest is None else rest), out

    def _handle(self, s: Stanza, now: float) -> list[Decision]:
        sub = self._by_id.get(s.id) if s.kind == "iq" and s.id is not None else None
        if sub is not None and s.type in ("result", "error") and self._from_service(s, sub) \
                and sub.source.domain == s.to_domain:
            request = sub.pending.get(s.id, ("", 0.0))[0]
            if request == "unsubscribe":
                return self._unsubscribed(sub, s)
            return self._answer(sub, s, request, now)
        if s.kind == "message":
            subs = [x for x in self.subs.values()
                    if x.source.domain == s.to_domain and self._from_service(s, x)]
            if subs:
                return self._event(subs, s, now)
            gone = [x for x in self.retired.values()
                    if x.source.domain == s.to_domain and self._from_service(s, x)]
            if gone:
                for x in gone:      # rule 7: ask again, at the next poll
                    if not x.pending:
                        x.next_sync = min(x.next_sync, now)
                return [Ignored(s, "from a block list service we unsubscribe from")]
        return [Unexpected(s, "not from a block list service we subscribe to")]

    @staticmethod
    def _from_service(s: Stanza, sub: Subscription) -> bool:
        return s.from_domain == sub.source.service and "@" not in s.from_ \
            and "/" not in s.from_

    def _answer(self, sub: Subscription, s: Stanza, request: str,
                now: float) -> list[Decision]:
        if s.type == "error":
            return [self._failed(sub, s.id, request, _condition(s), now)]
        sub.pending.pop(s.id, None)
        self._by_id.pop(s.id, None)
        try:
            tree = stanza_tree(s)
        except UnreadableStanza:
            tree = None
        if request == "subscribe":
            state = "subscribed"
            el = None if tree is None else tree.find(
                f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}subscription")
            if el is not None:
                state = el.get("subscription") or state
            sub.state = "subscribed" if state == "unconfigured" else state
            return [Subscribed(sub.source.name, state)]
        items = None if tree is None else tree.find(
            f"{{{NS_PUBSUB}}}pubsub/{{{NS_PUBSUB}}}items")
        if items is None or items.get("node") != sub.source.node:
            return [self._failed(sub, s.id, request, "answer without the node's items",
                                 now)]
        held = sub.entries
        seen: set[str] = set()
        added: list[str] = []
        removed: list[str] = []
        skipped = 0
        for it in items.iter(f"{{{NS_PUBSUB}}}item"):
            item_id = it.get("id")
            if not item_id or item_id in seen:
                continue
            if item_id in held:         # rule 8: what we hold is not parsed again
                seen.add(item_id)
                continue
            key = sub.key_of(item_id)
            if key is None or len(held) >= RTBL_MAX_ENTRIES:
                skipped += 1
                continue
            seen.add(item_id)
            sub.add(item_id, key, added)
        for item_id in [i for i in held if i not in seen]:
            sub.remove(item_id, removed)
        if added or removed:
            self.domains.update_rtbl(sub.source.name, added, removed)
        sub.synced_at = now
        if sub.state != "failed":     # both answered: the back-off starts over
            sub.failures = 0
            sub.last_error = ""
        return [Synced(sub.source.name, len(sub.counts), len(added), len(removed),
                       skipped)]

    def _event(self, subs: list[Subscription], s: Stanza, now: float) -> list[Decision]:
        try:
            tree = stanza_tree(s)
        except UnreadableStanza:
            return []
        event = tree.find(f"{{{NS_EVENT}}}event")
        if event is None:
            event = tree.find(f"{{{NS_PUBSUB}}}pubsub")    # a subscription state
        if event is None:
            return [Ignored(s, "a message from the service without a pubsub event")]
        out: list[Decision] = []
        for sub in subs:
            node = sub.source.node
            added: list[str] = []
            removed: list[str] = []
            skipped = 0
            purged = False
            for el in event:
                tag = el.tag
                if el.get("node") != node:
                    continue
                if tag == f"{{{NS_EVENT}}}items":
                    for child in el:
                        item_id = child.get("id")
                        if not item_id:
                            continue
                        if child.tag == f"{{{NS_EVENT}}}item":
                            key = sub.key_of(item_id)
                            if key is None or (item_id not in sub.entries and
                                               len(sub.entries) >= RTBL_MAX_ENTRIES):
                                skipped += 1
                            else:
                                sub.add(item_id, key, added)
                        elif child.tag == f"{{{NS_EVENT}}}retract":
                            sub.remove(item_id, removed)
                elif tag in (f"{{{NS_EVENT}}}purge", f"{{{NS_EVENT}}}delete"):
                    removed += sub.counts
                    sub.entries, sub.counts = {}, {}
                    purged = True
                    if tag == f"{{{NS_EVENT}}}delete":
                        sub.next_sync = min(sub.next_sync, now + RTBL_RETRY_BASE)
                elif tag in (f"{{{NS_EVENT}}}subscription", f"{{{NS_PUBSUB}}}subscription"):
                    if el.get("subscription") == "none":
                        sub.state = "starting"
                        sub.next_sync = now
            if added or removed:
                self.domains.update_rtbl(sub.source.name, added, removed)
            if added or removed or purged or skipped:
                out.append(Updated(sub.source.name, tuple(added), tuple(removed), purged,
                                   skipped))
        return out

    def rows(self, now: float) -> list[dict]:
        """For ``s2sproxy status``."""
        return [{"source": sub.source.name, "subscriber": sub.source.subscriber,
                 "state": sub.state, "entries": len(sub.counts),
                 "synced_ago": None if sub.synced_at is None
                 else round(now - sub.synced_at, 1),
                 "next_sync_in": round(max(sub.next_sync - now, 0.0), 1),
                 "last_error": sub.last_error} for sub in self.subs.values()]


def _condition(s: Stanza) -> str:
    try:
        err = stanza_tree(s).find("{jabber:server}error")
    except UnreadableStanza:
        return "undefined-condition"
    if err is not None:
        for child in err:
            if isinstance(child.tag, str) and child.tag.startswith(f"{{{NS_STANZAS}}}") \
                    and not child.tag.endswith("}text"):
                return child.tag.split("}", 1)[1]
    return "undefined-condition"


def _resource(jid: str) -> str:
    """The resourcepart of a domain JID (none with a localpart)."""
    bare, slash, resource = jid.partition("/")
    return resource if slash and "@" not in bare else ""
