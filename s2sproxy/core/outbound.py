"""Outbound s2s stream: we are the initiating server.

Modes:

* ``ORIGINATE``: authenticate as ``originating`` to ``receiving``, then carry stanzas.
  Toward ejabberd (the backend leg) only dialback is used: s2sproxy sends ``db:result``
  with a XEP-0185 key; ejabberd calls the authoritative server for ``originating``,
  which resolves to our backend listener, which answers ``db:verify`` from the same
  key.  Toward a remote server, SASL EXTERNAL (XEP-0178) is tried when offered and we
  present a certificate, with dialback as the fallback, and bidi (XEP-0288) is
  requested when offered.
* ``VERIFY``: ask an authoritative server whether a dialback key is its key
  (``db:verify``), report a ``DialbackVerdict``, close.

Invariants:

1. STARTTLS is used whenever offered (unless ``tls='never'``); with ``tls='required'``
   a peer that does not offer it fails the stream.
2. Bidi is requested only with ``request_bidi`` (never toward ejabberd).  Stanzas from
   the peer are accepted only on a bidi stream, only from ``receiving`` to a domain
   verified on it: ``originating``, or a further one once the peer answered 'valid' to
   its ``db:result`` (invariant 6; XEP-0288 lets the peer use every such pair).  One
   to a further domain we asked for that is not verified (waiting, refused, timed
   out) is flagged ``host-unknown`` and dropped: never a reason to end the stream
   that carries the verified pairs.
3. Exactly one ``StreamReady`` or ``StreamFailed``/``DialbackVerdict`` per stream.
4. The remote's certificate must be valid for ``receiving`` when the trust policy says
   the domain may not use dialback; otherwise an invalid one is only noted.  This holds
   in both modes: a ``VERIFY`` stream to the authoritative server of such a domain
   (``trust.secure_domains``, ``trust.require_valid_certificates``) requires TLS and a
   certificate valid for the domain, else its verdict is an error
   (``remote-server-not-found``), never a valid key.
5. ``refused_by_peer`` is set when the remote answered our ``db:result`` with
   ``invalid`` or an error: its verdict on our key, which another address of the same
   domain would repeat (``core.connect`` rule 4a).
6. Sender multiplexing (XEP-0220 section 2.6.1, "MAY be used without further
   negotiation"): ``multiplex(domain)`` asks for (domain, ``receiving``) on this stream
   with a further ``db:result``.  Only with ``max_pairs`` > 1 (our streams to remotes,
   never toward ejabberd), on a READY stream we are not closing and that did not retire,
   whose peer offered the dialback stream feature (``<dialback
   xmlns='urn:xmpp:features:dialback'/>``, section 2.4; Prosody 0.12 and 13, ejabberd
   and s2sproxy offer it): the dialback namespace on its header alone is not enough, an
   old server that knows dialback only as RFC 3920 had it may answer a further
   ``db:result`` with a stream error, and the stanzas of the pairs already on the stream
   would be lost (the router's hold-off then stops multiplexing to that remote).  The
   feature's ``<errors/>`` child is not required: sender multiplexing "MAY be used
   without further negotiation" and Prosody does not send it;
   lost; at most ``max_pairs`` pairs, the first and the waiting ones included.  A pair
   is verified only by a 'valid' ``db:result`` from ``receiving`` to a domain we asked
   for on this stream; anything else authenticates nothing (section 3.1, unsolicited
   dialback).  While the pair waits, its outcome is one ``PairReady`` or ``PairFailed``:
   'valid'; 'invalid' (``internal-server-error`` for what waited, section 2.1.1);
   'error' (``remote-server-timeout``, section 2.5: not a stream error, the stream goes
   on); no answer within ``timeout``.  Late answers count: a 'valid' after the pair's
   timer fired verifies it all the same (the peer may use it from then on) and reports
   ``PairReady`` (the router takes it only if the pair still waits for this stream).
   After 'invalid' for a pair we asked for, even one that no longer waits, the stream
   retires (``RetireStream``, once): the peer MUST close it (section 2.2.1), and we
   SHOULD NOT send stanzas for the other pairs on it (section 2.1.1).  A stream that
   ends while pairs wait reports nothing more for them (the router's ``stream_closed``
   does).
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.errors import RemoteProtocolError
from s2sproxy.core.identity import certificate_valid_for
from s2sproxy.core.inbound import TrustPolicy
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.stanza import STANZA_NAMES
from s2sproxy.core.stream import (DB_RESULT, DB_VERIFY, FEATURES, NS_BIDI, NS_BIDI_FEATURE,
                                  NS_DIALBACK_FEATURE, NS_SASL, NS_TLS, STREAM_ERROR,
                                  Refusal, StreamBase, limits_element, peer_max_bytes,
                                  peer_stream_error)
from s2sproxy.core.xmlstream import Element, StreamOpened


class Mode(enum.Enum):
    ORIGINATE = "originate"
    VERIFY = "verify"


class OutboundState(enum.Enum):
    HEADER = "header"           # our header sent, waiting for theirs
    FEATURES = "features"
    PROCEED = "proceed"         # <starttls/> sent
    TLS_HANDSHAKE = "tls-handshake"
    SASL = "sasl"               # <auth mechanism='EXTERNAL'/> sent
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
    direct_tls: bool = False    # XEP-0368: TLS from the first byte
    request_bidi: bool = False
    sasl_external: bool = False  # we present a certificate for ``originating``
    trust: TrustPolicy | None = None   # None: the peer's certificate is not checked
    actions: dict | None = None        # policy.actions (reason -> close | drop)
    max_pairs: int = 1          # domain pairs this stream may carry (1: no multiplexing)


_PEER_CLOSE_WAIT = 10.0


class OutboundStream(StreamBase):
    closed_state = OutboundState.CLOSED

    def __init__(self, config: OutboundConfig) -> None:
        super().__init__(config.max_size, config.max_depth)
        self.config = config
        self.stream_actions = config.actions or {}
        self.state = (OutboundState.TLS_HANDSHAKE if config.direct_tls
                      else OutboundState.HEADER)
        self.stream_id = ""
        self.bidi = False
        self.peer_max_bytes: int | None = None   # XEP-0478, from its features
        # The peer offered bidi as <bidi xmlns='urn:xmpp:bidi'/>, the request's
        # namespace (ejabberd 24.10 to 25.02): not a XEP-0288 offer, so not requested.
        self.peer_bidi_misnamed = False
        self.auth_method = ""
        self.peer_verified = False
        self._sasl_done = False
        self._external_failed = False
        self._finished = False
        self.refused_by_peer = False
        # Sender multiplexing (invariant 6): whether the peer offered the dialback feature
        # (in any features of this stream), the sender domains verified on this stream
        # (``originating`` once ready), those waiting for the peer's answer, and every
        # one ever asked for (late answers count: 'valid' verifies, 'invalid' retires).
        self.peer_dialback_feature = False
        self.verified: set[str] = set()
        self.retired = False
        self._pending: set[str] = set()
        self._asked: set[str] = set()

    def start(self) -> list[A.Action]:
        """The TCP connection is up: send our header (after the handshake, for Direct
        TLS) and arm the set-up timer."""
        timer = A.SetTimer("handshake", self.config.timeout)
        if self.config.direct_tls:
            return [timer]
        return [A.SendBytes(self._header()), timer]

    def _header(self) -> bytes:
        return self._header_bytes(self.config.originating, self.config.receiving, None)

    def _error_header(self) -> bytes:
        return self._header()

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
        if st is OutboundState.READY:
            if name == DB_RESULT and self._pair_answer(el):
                return
            kind = STANZA_NAMES.get(name)
            if kind is not None and self.bidi:
                self._stanza(kind, el)
                return
            if name in (DB_RESULT, DB_VERIFY) and self.bidi:
                return   # dialback for further domain pairs: not used toward us
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
        elif st is OutboundState.SASL and name == f"{NS_SASL} success":
            self._sasl_done = True
            self.auth_method = "external"
            self._restart()
            self._send(self._header())
            self.state = OutboundState.HEADER
        elif st is OutboundState.SASL and name == f"{NS_SASL} failure":
            self._external_failed = True
            self._dialback()
        elif st is OutboundState.DIALBACK and name == DB_RESULT \
                and self.config.mode is Mode.ORIGINATE:
            self._dialback_result(el)
        elif st is OutboundState.DIALBACK and name == DB_VERIFY \
                and self.config.mode is Mode.VERIFY:
            self._verify_result(el)
        elif st is OutboundState.READY:
            self._violation("not-a-stanza", "unsupported-stanza-type",
                            "stanza on a unidirectional outgoing stream"
                            if name in STANZA_NAMES else "unexpected element", el)
        else:
            raise RemoteProtocolError("unsupported-stanza-type",
                                      f"unexpected {name.rsplit(' ', 1)[-1]!r} in state {st.value}")

    def _features(self, el: Element) -> None:
        tree = el.tree()
        c = self.config
        if self.secure:     # XEP-0478: what the peer accepts, never from plain text
            self.peer_max_bytes = peer_max_bytes(tree)
        if tree.find(f"{{{NS_DIALBACK_FEATURE}}}dialback") is not None:
            self.peer_dialback_feature = True   # XEP-0220 section 2.4
        if not self.secure:
            if tree.find(f"{{{NS_TLS}}}starttls") is not None and c.tls != "never":
                self._send(f"<starttls xmlns='{NS_TLS}'/>".encode())
                self.state = OutboundState.PROCEED
                return
            if c.tls == "required" or self._certificate_required():
                self._fail("remote-server-not-found", "peer does not offer STARTTLS")
                self._emit_close()
                return
        if self._sasl_done:
            self._ready()
            return
        if c.mode is Mode.VERIFY:
            self._send(f"<db:verify from='{xml_escape(c.originating)}' "
                       f"to='{xml_escape(c.receiving)}' id='{xml_escape(c.verify_stream_id)}'>"
                       f"{xml_escape(c.verify_key)}</db:verify>".encode())
            self.state = OutboundState.DIALBACK
            return
        if c.request_bidi and not self.bidi and self.secure:
            if tree.find(f"{{{NS_BIDI_FEATURE}}}bidi") is not None:
                # XEP-0478 section 3: our limits for what the peer sends back on it
                self._send(f"<bidi xmlns='{NS_BIDI}'>{limits_element(c.max_size, None)}"
                           f"</bidi>".encode())
                self.bidi = True
                self._emit(A.BidiNegotiated())
            elif tree.find(f"{{{NS_BIDI}}}bidi") is not None:
                self.peer_bidi_misnamed = True
        mechanisms = [m.text for m in
                      tree.iterfind(f"{{{NS_SASL}}}mechanisms/{{{NS_SASL}}}mechanism")]
        if c.sasl_external and self.secure and "EXTERNAL" in mechanisms \
                and not self._external_failed:
            authzid = base64.b64encode(c.originating.encode()).decode()
            self._send(f"<auth xmlns='{NS_SASL}' mechanism='EXTERNAL'>{authzid}</auth>"
                       .encode())
            self.state = OutboundState.SASL
            return
        self._dialback()

    def _dialback(self) -> None:
        c = self.config
        key = c.keys.key(c.receiving, c.originating, self.stream_id)
        self._send(f"<db:result from='{xml_escape(c.originating)}' "
                   f"to='{xml_escape(c.receiving)}'>{key}</db:result>".encode())
        self.state = OutboundState.DIALBACK

    def _on_tls(self, ev: E.TlsEstablished) -> None:
        if self.state is not OutboundState.TLS_HANDSHAKE:
            raise RemoteProtocolError("policy-violation", "unexpected TLS handshake")
        self.secure = True
        self.header_sent = False
        c = self.config
        if c.trust is not None:
            self.peer_verified = certificate_valid_for(ev.chain_valid, ev.certificate,
                                                       c.receiving)
            if not self.peer_verified and self._certificate_required():
                self._fail("remote-server-not-found",
                           f"certificate not valid for {c.receiving}")
                self._stream_error("policy-violation", "certificate not trusted")
                return
        self.state = OutboundState.HEADER
        self._send(self._header())

    def _dialback_result(self, el: Element) -> None:
        c = self.config
        if el.attrs.get("from") != c.receiving or el.attrs.get("to") != c.originating:
            raise RemoteProtocolError("invalid-from", "db:result for another domain pair")
        t = el.attrs.get("type")
        if t == "valid":
            self.auth_method = "dialback"
            self._ready()
        else:
            detail = "invalid key" if t == "invalid" else _db_error(el)
            self.refused_by_peer = True
            self._fail("remote-server-not-found", f"dialback refused: {detail}")
            self._emit_close()

    def _certificate_required(self) -> bool:
        """Invariant 4: the peer must prove ``receiving`` with its certificate."""
        c = self.config
        return c.trust is not None and not c.trust.dialback_allowed(c.receiving)

    def _ready(self) -> None:
        self.state = OutboundState.READY
        self.verified.add(self.config.originating)
        self._finished = True
        self._emit(A.CancelTimer("handshake"))
        self._emit(A.StreamReady())

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

    def _stanza_refused(self, frm_domain: str, to_domain: str) -> Refusal | None:
        """On our bidi stream the remote may send only from receiving to a domain
        verified here (invariant 2).  One to a domain we asked for but that is not
        verified (waiting, refused, timed out) is dropped: it never ends the stream
        that carries the verified pairs."""
        if frm_domain != self.config.receiving:
            return "invalid-from", f"{frm_domain} is not authenticated on this stream", True
        if to_domain in self._asked and to_domain not in self.verified:
            return ("host-unknown",
                    f"{to_domain} was asked for on this stream but is not verified", False)
        if to_domain not in self.verified:
            served = ", ".join(sorted(self.verified))
            return "host-unknown", f"this stream serves {served} only", True
        return None

    # -- sender multiplexing (invariant 6) ---------------------------------------------

    def multiplex_refusal(self) -> str | None:
        """Why this stream cannot take a further domain pair now; None when it can."""
        c = self.config
        refusal = self._carry_refusal()
        if refusal is not None:
            return refusal
        if not self.peer_dialback_feature:
            return "the peer did not offer the dialback feature"
        if len(self.verified) + len(self._pending) >= c.max_pairs:
            return f"{c.max_pairs} domain pairs on this stream already"
        return None

    def _carry_refusal(self) -> str | None:
        """Why this stream may not be used for a further pair at all, even one already
        verified on it."""
        if self.config.mode is not Mode.ORIGINATE or self.config.max_pairs <= 1:
            return "multiplexing is off for this stream"
        if self.state is not OutboundState.READY:
            return "the stream is not ready"
        if self.local_closed:
            return "the stream is closing"
        if self.retired:
            return "the stream is retired"
        return None

    @property
    def shareable(self) -> bool:
        """May this stream take a further domain pair now?"""
        return self.multiplex_refusal() is None

    def multiplex(self, originating: str) -> tuple[bool, list[A.Action]]:
        """Ask the peer to accept stanzas from ``originating`` to ``receiving`` on this
        stream too: a ``db:result`` with the XEP-0185 key over this stream's id, and a
        timer for the answer.  Returns whether it asked (False: already verified,
        already asked, or not possible here) and the actions.  The outcome comes as
        ``PairReady`` or ``PairFailed`` (at once when the pair is already verified, or
        cannot be asked for here)."""
        c = self.config
        if originating in self.verified and self._carry_refusal() is None:
            return False, [A.PairReady(originating, c.receiving)]
        if originating in self._pending:
            return False, []
        refusal = self.multiplex_refusal()
        if refusal is not None:
            return False, [A.PairFailed(originating, c.receiving, "not tried", "", refusal,
                                        tried=False)]
        self._pending.add(originating)
        self._asked.add(originating)
        key = c.keys.key(c.receiving, originating, self.stream_id)
        out = self._out = []
        self._send(f"<db:result from='{xml_escape(originating)}' "
                   f"to='{xml_escape(c.receiving)}'>{key}</db:result>".encode())
        self._emit(A.SetTimer(f"pair {originating}", c.timeout))
        self._out = []
        return True, out

    def _pair_answer(self, el: Element) -> bool:
        """The peer's typed db:result for a pair we asked for on this stream (True:
        handled); anything else is not an answer.  While the pair waits, the answer is
        its outcome; later (its timer fired, an 'error' came first) only 'invalid'
        still counts: the peer closes the stream after it, which therefore retires."""
        a = el.attrs
        local = a.get("to")
        c = self.config
        if local not in self._asked or "type" not in a or a.get("from") != c.receiving:
            return False
        if self.local_closed:
            return True     # we are closing: the router moved its pairs elsewhere
        waiting = local in self._pending
        if waiting:
            self._pending.discard(local)
            self._emit(A.CancelTimer(f"pair {local}"))
        r = c.receiving
        t = a["type"]
        if t == "valid":
            if local not in self.verified:      # late, too: the remote may use it now
                self.verified.add(local)
                self._emit(A.PairReady(local, r))
        elif t == "invalid":
            self.verified.discard(local)
            if waiting:
                self._emit(A.PairFailed(local, r, "invalid", "internal-server-error",
                                        f"dialback refused by {r}: invalid key"))
            if not self.retired:
                self.retired = True
                self._emit(A.RetireStream(f"{r} refused {local}'s dialback key (the "
                                          f"remote closes the stream after 'invalid')"))
        elif waiting:
            cond = _db_error(el)
            self._emit(A.PairFailed(local, r, f"error {cond}", "remote-server-timeout",
                                    f"dialback error from {r}: {cond}"))
        return True

    # -- endings -------------------------------------------------------------------------

    def shutdown_phase(self) -> int:
        """Only our bidi streams bring stanzas from the peer (see StreamBase)."""
        return 1 if self.bidi else 3

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
        if isinstance(ev, E.TimerFired):
            if ev.name == "handshake" and not self._finished:
                self._fail("remote-server-timeout", "no answer in time")
                self._stream_error("connection-timeout")
            elif ev.name.startswith("pair ") and ev.name[5:] in self._pending:
                local = ev.name[5:]
                self._pending.discard(local)
                self._emit(A.PairFailed(local, self.config.receiving, "timeout",
                                        "remote-server-timeout",
                                        f"no dialback answer in {self.config.timeout:g} s"))


def _db_error(el: Element) -> str:
    err = el.tree().find("{jabber:server:dialback}error")
    if err is None:
        err = el.tree().find("{jabber:server}error")
    if err is not None and len(err):
        return err[0].tag.rsplit("}", 1)[-1]
    return "error"
