"""Outbound s2s stream: we are the initiating server.

Modes:

* ``ORIGINATE``: authenticate as ``originating`` to ``receiving`` by dialback, then carry
  stanzas.  The backend leg uses it toward ejabberd (s2sproxy sends ``db:result`` with a
  XEP-0185 key; ejabberd calls the authoritative server for ``originating``, which
  resolves to our backend listener, which answers ``db:verify`` from the same key).
* ``VERIFY``: ask an authoritative server whether a dialback key is its key
  (``db:verify``), report a ``DialbackVerdict``, close.

Invariants:

1. STARTTLS is used whenever offered (unless ``tls='never'``); with ``tls='required'``
   a peer that does not offer it fails the stream.
2. Bidi is never requested here toward ejabberd (``request_bidi=False``).
3. Exactly one ``StreamReady`` or ``StreamFailed``/``DialbackVerdict`` per stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.errors import RemoteProtocolError
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.stream import (DB_RESULT, DB_VERIFY, FEATURES, NS_TLS, STREAM_ERROR,
                                  StreamBase, peer_stream_error)
from s2sproxy.core.xmlstream import Element, StreamOpened


class Mode(enum.Enum):
    ORIGINATE = "originate"
    VERIFY = "verify"


class OutboundState(enum.Enum):
    HEADER = "header"           # our header sent, waiting for theirs
    FEATURES = "features"
    PROCEED = "proceed"         # <starttls/> sent
    TLS_HANDSHAKE = "tls-handshake"
    DIALBACK = "dialback"       # db:result or db:verify sent
    READY = "ready"
    CLOSED = "closed"


@dataclass
class OutboundConfig:
    mode: Mode
    originating: str
    receiving: str
    keys: DialbackKeys | None
    max_size: int
    max_depth: int
    tls: str = "auto"           # "auto" | "required" | "never"
    verify_stream_id: str = ""  # VERIFY: the id of the stream the key was given on
    verify_key: str = ""
    timeout: float = 30.0       # from TCP connect to ready/verdict


class OutboundStream(StreamBase):
    closed_state = OutboundState.CLOSED

    def __init__(self, config: OutboundConfig) -> None:
        super().__init__(config.max_size, config.max_depth)
        self.config = config
        self.state = OutboundState.HEADER
        self.stream_id = ""
        self._finished = False

    def start(self) -> list[A.Action]:
        """The TCP connection is up: send our stream header."""
        return [A.SendBytes(self._header()), A.SetTimer("handshake", self.config.timeout)]

    def _header(self) -> bytes:
        return self._header_bytes(self.config.originating, self.config.receiving, None)

    def _error_header(self) -> bytes:
        return self._header()

    def send_stanzas(self, raw: list[bytes]) -> list[A.Action]:
        assert self.state is OutboundState.READY
        return [A.SendBytes(b"".join(raw))]

    # -- events ------------------------------------------------------------------------

    def _on_header(self, h: StreamOpened) -> None:
        if self.state is not OutboundState.HEADER:
            raise RemoteProtocolError("not-well-formed", "stream header out of place")
        self.stream_id = h.attrs.get("id", "")
        if not self.stream_id:
            raise RemoteProtocolError("invalid-xml", "stream header without id")
        self.state = OutboundState.FEATURES

    def _on_element(self, el: Element) -> None:
        name = el.name
        st = self.state
        if name == STREAM_ERROR:
            cond, text = peer_stream_error(el)
            self._send(b"</stream:stream>")
            self._emit(A.CloseConnection(f"peer:{cond}", text))
            self.state = OutboundState.CLOSED
            self._fail("remote-server-not-found", f"stream error from peer: {cond} {text}")
            return
        if st is OutboundState.FEATURES and name == FEATURES:
            self._features(el)
        elif st is OutboundState.PROCEED and name == f"{NS_TLS} proceed":
            self._emit(A.StartTls(self.config.receiving))
            self._restart(tls=True)
            self.state = OutboundState.TLS_HANDSHAKE
        elif st is OutboundState.PROCEED and name == f"{NS_TLS} failure":
            self._fail("remote-server-not-found", "peer refused STARTTLS")
            self._emit_close()
        elif st is OutboundState.DIALBACK and name == DB_RESULT \
                and self.config.mode is Mode.ORIGINATE:
            self._dialback_result(el)
        elif st is OutboundState.DIALBACK and name == DB_VERIFY \
                and self.config.mode is Mode.VERIFY:
            self._verify_result(el)
        elif st is OutboundState.READY:
            # A peer that was never asked for bidi must not send stanzas here.
            raise RemoteProtocolError("unsupported-stanza-type",
                                      "stanza on a unidirectional outgoing stream")
        else:
            raise RemoteProtocolError("unsupported-stanza-type",
                                      f"unexpected {name.split(' ')[1]!r} in state {st.value}")

    def _features(self, el: Element) -> None:
        tree = el.tree()
        offers_tls = tree.find(f"{{{NS_TLS}}}starttls") is not None
        tls = self.config.tls
        if not self.secure and offers_tls and tls != "never":
            self._send(f"<starttls xmlns='{NS_TLS}'/>".encode())
            self.state = OutboundState.PROCEED
            return
        if not self.secure and tls == "required":
            self._fail("remote-server-not-found", "peer does not offer STARTTLS")
            self._emit_close()
            return
        c = self.config
        if c.mode is Mode.ORIGINATE:
            key = c.keys.key(c.receiving, c.originating, self.stream_id)
            self._send(f"<db:result from='{xml_escape(c.originating)}' "
                       f"to='{xml_escape(c.receiving)}'>{key}</db:result>".encode())
        else:
            self._send(f"<db:verify from='{xml_escape(c.originating)}' "
                       f"to='{xml_escape(c.receiving)}' id='{xml_escape(c.verify_stream_id)}'>"
                       f"{xml_escape(c.verify_key)}</db:verify>".encode())
        self.state = OutboundState.DIALBACK

    def _on_tls(self, ev: E.TlsEstablished) -> None:
        if self.state is not OutboundState.TLS_HANDSHAKE:
            raise RemoteProtocolError("policy-violation", "unexpected TLS handshake")
        self.secure = True
        self.state = OutboundState.HEADER
        self._send(self._header())

    def _dialback_result(self, el: Element) -> None:
        c = self.config
        if el.attrs.get("from") != c.receiving or el.attrs.get("to") != c.originating:
            raise RemoteProtocolError("invalid-from", "db:result for another domain pair")
        t = el.attrs.get("type")
        if t == "valid":
            self.state = OutboundState.READY
            self._finished = True
            self._emit(A.CancelTimer("handshake"))
            self._emit(A.StreamReady())
        else:
            detail = "invalid key" if t == "invalid" else _db_error(el)
            self._fail("remote-server-not-found", f"dialback refused: {detail}")
            self._emit_close()

    def _verify_result(self, el: Element) -> None:
        c = self.config
        if el.attrs.get("id") != c.verify_stream_id or el.attrs.get("from") != c.receiving:
            raise RemoteProtocolError("undefined-condition",
                                      "db:verify answer for another request")
        t = el.attrs.get("type")
        self._finished = True
        self._emit(A.CancelTimer("handshake"))
        if t in ("valid", "invalid"):
            self._emit(E.DialbackVerdict(c.receiving, c.originating, t == "valid"))
        else:
            self._emit(E.DialbackVerdict(c.receiving, c.originating, None,
                                         "remote-server-not-found"))
        self._emit_close()

    # -- endings -------------------------------------------------------------------------

    def _emit_close(self) -> None:
        self._send(b"</stream:stream>")
        self._emit(A.CloseConnection())
        self.state = OutboundState.CLOSED

    def _fail(self, condition: str, text: str) -> None:
        if self._finished:
            return
        self._finished = True
        if self.config.mode is Mode.VERIFY:
            self._emit(E.DialbackVerdict(self.config.receiving, self.config.originating,
                                         None, condition))
        else:
            self._emit(A.StreamFailed(condition, text))

    def _on_closed(self, condition: str) -> None:
        self._fail("remote-server-not-found", f"stream error: {condition}")

    def _on_lost(self, ev: E.ConnectionLost) -> None:
        self._fail("remote-server-not-found", f"connection lost: {ev.reason}")

    def _on_other(self, ev: object) -> None:
        if isinstance(ev, E.TimerFired) and not self._finished:
            self._fail("remote-server-timeout", "no answer in time")
            self._stream_error("connection-timeout")

    def abort(self, condition: str, text: str) -> list[A.Action]:
        """Give up on this stream (connection failed before it began, etc.)."""
        self._out = out = []
        self._fail(condition, text)
        self.state = OutboundState.CLOSED
        self._out = []
        return out


def _db_error(el: Element) -> str:
    err = el.tree().find("{jabber:server:dialback}error")
    if err is None:
        err = el.tree().find("{jabber:server}error")
    if err is not None and len(err):
        return err[0].tag.rsplit("}", 1)[-1]
    return "error"
