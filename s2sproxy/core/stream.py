"""What every s2s stream does, whichever side opened it.

Rules:

1. One entry point: ``handle(event) -> list[Action]``.  Network input that breaks the
   protocol raises ``RemoteProtocolError`` inside; ``handle`` turns it into a stream
   error (preceded by our header if we had not sent one, RFC 6120 section 4.9.1.2),
   ``</stream:stream>`` and ``CloseConnection``.
2. A stream restart (after STARTTLS and SASL) makes a new parser.  Bytes the peer sent
   after ``<starttls/>`` in the same read are a protocol error; bytes after a SASL
   success are fed to the new parser.
3. After ``CLOSED`` every event is ignored and yields no action.
"""

from __future__ import annotations

import re
from typing import Callable

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.errors import RemoteProtocolError, stream_error_bytes
from s2sproxy.core.jid import InvalidJid, cached_domain_of
from s2sproxy.core.stanza import Stanza
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.xmlstream import (NS_SERVER, NS_STREAMS, NS_XML, Element, ParseError,
                                     StreamClosed, StreamOpened, XmlStreamParser)

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
NS_SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
NS_DIALBACK = "jabber:server:dialback"
NS_DIALBACK_FEATURE = "urn:xmpp:features:dialback"
NS_BIDI = "urn:xmpp:bidi"
NS_BIDI_FEATURE = "urn:xmpp:features:bidi"
NS_LIMITS = "urn:xmpp:stream-limits:0"       # XEP-0478
_DIGITS = re.compile(r"[0-9]{1,10}")


def limits_element(max_bytes: int, idle_seconds: int | None) -> str:
    """XEP-0478: the limits we enforce on what we receive on a stream."""
    idle = f"<idle-seconds>{idle_seconds}</idle-seconds>" if idle_seconds else ""
    return f"<limits xmlns='{NS_LIMITS}'><max-bytes>{max_bytes}</max-bytes>{idle}</limits>"


def peer_max_bytes(tree) -> int | None:
    """The ``max-bytes`` a peer advertised in ``tree`` (its features, or the ``<bidi>``
    element it sent: XEP-0478 section 3 for bidi), or None.  Nonsense is ignored,
    and a figure below RFC 6120's floor of 10000 bytes is read as 10000."""
    el = tree.find(f"{{{NS_LIMITS}}}limits/{{{NS_LIMITS}}}max-bytes")
    text = (el.text or "").strip() if el is not None else ""
    if not _DIGITS.fullmatch(text):     # not str.isdigit: "²" passes it, int() fails
        return None
    return max(10000, int(text))

STREAM_NAME = f"{NS_STREAMS} stream"
FEATURES = f"{NS_STREAMS} features"
STREAM_ERROR = f"{NS_STREAMS} error"
DB_RESULT = f"{NS_DIALBACK} result"
DB_VERIFY = f"{NS_DIALBACK} verify"


# Parse errors by policy reason; these always close the stream (the parser cannot
# resynchronise after them).
_PARSE_REASONS = {"restricted-xml": "restricted-xml", "policy-violation": "oversize",
                  "not-well-formed": "malformed-xml", "unsupported-encoding": "malformed-xml"}
_ALWAYS_CLOSE = frozenset({"restricted-xml", "oversize", "malformed-xml", "before-auth"})
_XML_LANG = f"{NS_XML} lang"
_QNAME_END = re.compile(rb"[\s/>]")
#: why a stanza is refused: (reason, text, whether policy.actions may close the stream)
Refusal = tuple[str, str, bool]
#: the language our own stream headers declare
OUR_LANG = "en"


class StreamBase:
    """Parser management, headers, stream errors.  Subclasses implement
    ``_on_header``, ``_on_element``, ``_on_tls`` and set ``self.state``."""

    closed_state: object
    #: reason code -> "close" | "drop", from the configuration (policy.actions)
    stream_actions: dict[str, str] = {}

    def __init__(self, max_size: int, max_depth: int) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self.parser = XmlStreamParser(max_size, max_depth)
        self.header_sent = False
        self.secure = False
        self.local_closed = False
        self.end_reason = ""        # how the stream ended cleanly, for the closing log line
        self.bidi = False
        self._old_parser: XmlStreamParser | None = None
        self._tls_restart = False
        self._out: list[A.Action] = []
        # The peer's stream language, as an attribute for stanzas that have none
        # (None when it is ours, or not given).
        self._lang_attr: bytes | None = None

    # -- the entry point -----------------------------------------------------------

    def handle(self, event: object) -> list[A.Action]:
        if self.state is self.closed_state:
            return []
        out = self._out = []
        try:
            if isinstance(event, E.DataReceived):
                self._data(event.data)
            elif isinstance(event, E.TlsEstablished):
                self._on_tls(event)
            elif isinstance(event, E.ConnectionLost):
                self.state = self.closed_state
                self._on_lost(event)
            elif isinstance(event, E.TimerFired) and event.name == "close":
                # The peer did not answer our </stream:stream> in time.
                self._emit(A.CloseConnection())
                self.state = self.closed_state
            else:
                self._on_other(event)
        except RemoteProtocolError as e:
            self._stream_error(e.condition, e.text)
        self._out = []
        return out

    def _data(self, data: bytes) -> None:
        items = self.parser.feed(data)
        i = 0
        while i < len(items):
            item = items[i]
            i += 1
            if isinstance(item, Element):
                self._on_element(item)
                if self.state is self.closed_state:
                    return
                if self._old_parser is not None:
                    # The element just handled restarted the stream: what the old
                    # parser made of the bytes after it is void.  After SASL the new
                    # parser reads them; after STARTTLS they were sent in the clear
                    # and are never parsed (whitespace is dropped, anything else is
                    # a protocol error).
                    leftover = self._old_parser.leftover(item.end)
                    self._old_parser = None
                    if self._tls_restart:
                        if leftover.strip():
                            raise RemoteProtocolError("policy-violation",
                                                      "data pipelined after STARTTLS")
                    elif leftover:
                        self._data(leftover)
                    return
            elif isinstance(item, StreamOpened):
                self._check_header(item)
                self._on_header(item)
            elif isinstance(item, StreamClosed):
                if not self.local_closed:
                    self._send(b"</stream:stream>")
                    self.end_reason = "stream closed by the peer"
                else:
                    self._emit(A.CancelTimer("close"))
                    self.end_reason = "stream closed by s2sproxy"

                self._emit(A.CloseConnection())
                self.state = self.closed_state
                self._on_closed("")
                return
            elif isinstance(item, ParseError):
                self._violation(_PARSE_REASONS.get(item.condition, "malformed-xml"),
                                item.condition, item.text)

    # -- helpers for subclasses ----------------------------------------------------

    def _violation(self, reason: str, condition: str, text: str,
                   el: Element | None = None, closes: bool = True) -> None:
        """Flag an unexpected element with ``reason``; then close the stream with
        ``condition`` (the default), or drop the element if so configured, or always
        when not ``closes``."""
        if reason in _ALWAYS_CLOSE:
            action = "close"
        else:
            action = self.stream_actions.get(reason, "close") if closes else "drop"
        if el is not None:
            a = el.attrs
            self._emit(A.Flag(reason, action, text, el.name.rsplit(" ", 1)[-1],
                              a.get("type"), a.get("id"), a.get("from"), a.get("to"),
                              el.raw))
        else:
            self._emit(A.Flag(reason, action, text))
        if action == "close":
            raise RemoteProtocolError(condition, text)

    def _send(self, data: bytes) -> None:
        if self.local_closed:
            return          # RFC 6120 section 4.4: nothing after our closing tag
        out = self._out
        if out and type(out[-1]) is A.SendBytes:
            out[-1] = A.SendBytes(out[-1].data + data)
        else:
            out.append(A.SendBytes(data))

    def _emit(self, action: A.Action) -> None:
        self._out.append(action)

    def release_parser(self) -> bool:
        """Drop the framer's expat parser while nothing is half-parsed (an idle
        stream; ``policy.keepalive`` rule 7).  True if one was dropped now."""
        held = self.parser.holds_parser
        return self.parser.release() and held

    def _restart(self, tls: bool = False) -> None:
        """The stream restarts after the element being handled: new parser, new
        header expected.  Before a STARTTLS handshake completes our old header still
        stands (``tls=True``): the TLS handshake itself resets it."""
        self._old_parser = self.parser
        self._tls_restart = tls
        self.parser = XmlStreamParser(self.max_size, self.max_depth)
        if not tls:
            self.header_sent = False

    def _check_header(self, h: StreamOpened) -> None:
        if h.name != STREAM_NAME:
            raise RemoteProtocolError("invalid-namespace",
                                      "the stream element must be qualified by "
                                      f"{NS_STREAMS}")
        if h.namespaces.get(None) != NS_SERVER:
            raise RemoteProtocolError("invalid-namespace",
                                      f"default namespace must be {NS_SERVER}")
        lang = h.attrs.get("xml:lang")
        self._lang_attr = (f" xml:lang='{xml_escape(lang)}'".encode()
                           if lang and lang != OUR_LANG else None)
        version = h.attrs.get("version", "")
        major = version.split(".")[0]
        if not major.isdigit() or int(major) != 1:
            raise RemoteProtocolError("unsupported-version",
                                      "version='1.0' is required (RFC 6120 section 4.7.5)")

    def _header_bytes(self, from_: str | None, to: str | None, stream_id: str | None) -> bytes:
        attrs = ""
        if from_:
            attrs += f" from='{xml_escape(from_)}'"
        if to:
            attrs += f" to='{xml_escape(to)}'"
        if stream_id:
            attrs += f" id='{xml_escape(stream_id)}'"
        self.header_sent = True
        return (f"<?xml version='1.0'?><stream:stream xmlns='{NS_SERVER}' "
                f"xmlns:stream='{NS_STREAMS}' xmlns:db='{NS_DIALBACK}'{attrs} "
                f"version='1.0' xml:lang='{OUR_LANG}'>").encode("utf-8")

    def _stream_error(self, condition: str, text: str = "") -> None:
        if getattr(self.state, "value", "") == "tls-handshake":
            # Between <proceed/> (or a Direct TLS accept) and the end of the handshake
            # nothing can be said: the peer reads TLS records only.
            self._emit(A.CloseConnection(condition, text, abort=True))
            self.state = self.closed_state
            self._on_closed(condition)
            return
        if not self.header_sent:
            self._send(self._error_header())
        self._send(stream_error_bytes(condition, text))
        self._emit(A.CloseConnection(condition, text))
        self.state = self.closed_state
        self._on_closed(condition)

    def _stanza(self, kind: str, el: Element) -> None:
        """Check a stanza's addressing, then deliver it (one DeliverStanzas per read
        batch).  Answers to our keepalive pings are delivered too: the shell consumes
        them (policy.keepalive), wherever they arrive."""
        attrs = el.attrs
        frm, to = attrs.get("from"), attrs.get("to")
        if not frm or not to:
            return self._violation("improper-addressing", "improper-addressing",
                                   "stanzas between servers need 'from' and 'to'", el)
        try:
            frm_domain, to_domain = cached_domain_of(frm), cached_domain_of(to)
        except InvalidJid:
            return self._violation("improper-addressing", "improper-addressing",
                                   "malformed JID", el)
        refused = self._stanza_refused(frm_domain, to_domain)
        if refused is not None:
            reason, text, closes = refused
            return self._violation(reason, reason, text, el, closes)
        raw = el.raw
        if self._lang_attr is not None and _XML_LANG not in attrs:
            # RFC 6120 section 4.7.4: a stanza without xml:lang is in the stream's
            # language.  Forwarded on a stream of ours (xml:lang='en'), it says so
            # itself (ejabberd's xmpp_stream_in and Prosody set a stanza's lang from
            # its stream in the same way).
            at = _QNAME_END.search(raw, 1).start()
            raw = raw[:at] + self._lang_attr + raw[at:]
        stanza = Stanza(kind, raw, frm, to, attrs.get("type"), attrs.get("id"),
                        el.child_ns, frm_domain, to_domain, el.children)
        out = self._out
        last = out[-1] if out else None
        if type(last) is A.DeliverStanzas:
            last.stanzas.append(stanza)
        else:
            out.append(A.DeliverStanzas([stanza]))

    def _stanza_refused(self, frm_domain: str, to_domain: str) -> Refusal | None:
        """(reason, text, closes) when this stream may not carry a stanza between
        these domains; None when it may.  Not ``closes``: the stanza is dropped
        whatever ``policy.actions`` say for the reason."""
        raise NotImplementedError

    def fail(self, condition: str, text: str = "") -> list[A.Action]:
        """End the stream from our side with a stream error (e.g. a dead peer)."""
        if self.state is self.closed_state:
            return []
        out = self._out = []
        self._stream_error(condition, text)
        self._out = []
        return out

    def shutdown_phase(self) -> int:
        """When this stream is closed as s2sproxy stops (``tx.shutdown``): 1 for a
        remote's stream (it can send on it; what it sends while we close is routed on
        the streams of later phases, still open), 2 for ejabberd's own outgoing
        streams (closed once they went quiet: see ``tx.shutdown``), 3 for a stream
        only we send on."""
        return 1

    def close(self, wait: float = 10.0) -> list[A.Action]:
        """Close cleanly from our side: ``</stream:stream>``, then wait up to ``wait``
        seconds for the peer's before closing the connection (RFC 6120 section 4.4).
        Stanzas the peer sent meanwhile are still handled."""
        if self.state is self.closed_state or self.local_closed:
            return []
        if not self.header_sent:
            self.state = self.closed_state
            return [A.CloseConnection()]
        self.local_closed = True
        return [A.SendBytes(b"</stream:stream>"), A.SetTimer("close", wait)]

    # -- to be provided ------------------------------------------------------------

    def _error_header(self) -> bytes:
        return self._header_bytes(None, None, None)

    def _on_header(self, h: StreamOpened) -> None:
        raise NotImplementedError

    def _on_element(self, el: Element) -> None:
        raise NotImplementedError

    def _on_tls(self, ev: E.TlsEstablished) -> None:
        raise RemoteProtocolError("policy-violation", "unexpected TLS")

    def _on_lost(self, ev: E.ConnectionLost) -> None:
        pass

    def _on_other(self, ev: object) -> None:
        pass

    def _on_closed(self, condition: str) -> None:
        pass


def peer_stream_error(el: Element) -> tuple[str, str]:
    """(condition, text) of a ``<stream:error>`` the peer sent."""
    cond, text = "undefined-condition", ""
    for child in el.tree():
        local = child.tag.rsplit("}", 1)[-1]
        if local == "text":
            text = child.text or ""
        else:
            cond = local
    return cond, text


NewStreamId = Callable[[], str]
