"""Inbound s2s stream: we are the receiving server.

Two roles share this machine:

* ``PUBLIC``: a remote server connected to one of our public listeners.  TLS first
  (STARTTLS required, or Direct TLS), then SASL EXTERNAL (XEP-0178) when its certificate
  is valid for its domain, or dialback (XEP-0220); bidi (XEP-0288) offered after TLS.
* ``BACKEND``: ejabberd connected to the backend listener, either to verify a dialback
  key we issued (``db:verify``) or, for its own outgoing traffic, to send stanzas to
  remote domains.  Its ``db:result`` is checked with ejabberd itself (the shell sends
  ``db:verify`` to ejabberd's internal listener, or trusts its source address); its
  ``from`` must be a served domain.  STARTTLS offered, never required; no bidi.

Invariants:

1. A stanza is accepted only when its ``from`` domain has authenticated on this stream
   (else ``invalid-from``, or ``not-authorized`` if nothing has) and, on PUBLIC, its
   ``to`` domain is served (else ``host-unknown``).
2. On PUBLIC nothing but ``<starttls/>`` is accepted before TLS.
3. ``db:verify`` is answered from the XEP-0185 derivation only, in constant time.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field
from typing import Any

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys
from s2sproxy.core.errors import RemoteProtocolError
from s2sproxy.core.identity import certificate_valid_for
from s2sproxy.core.jid import InvalidJid, nameprep_domain
from s2sproxy.core.limits import MAX_PENDING_DIALBACK
from s2sproxy.core.serialize import escape as xml_escape
from s2sproxy.core.stanza import ERROR_TYPES, STANZA_NAMES
from s2sproxy.core.stream import (DB_RESULT, DB_VERIFY, NS_BIDI, NS_BIDI_FEATURE,
                                  NS_DIALBACK_FEATURE, NS_SASL, NS_TLS, STREAM_ERROR,
                                  NewStreamId, Refusal, StreamBase, limits_element,
                                  peer_max_bytes, peer_stream_error)
from s2sproxy.core.xmlstream import Element, StreamOpened


class Role(enum.Enum):
    PUBLIC = "public"
    BACKEND = "backend"


class InboundState(enum.Enum):
    TLS_HANDSHAKE = "tls-handshake"   # Direct TLS, or <proceed/> sent
    HEADER = "header"                 # waiting for the (restarted) stream header
    STARTTLS = "starttls"             # features sent, TLS required before anything else
    OPEN = "open"                     # secure (or TLS optional): auth, stanzas
    CLOSED = "closed"


_OPEN = InboundState.OPEN


@dataclass
class TrustPolicy:
    """Which remotes may authenticate by dialback alone."""
    require_valid_certificates: bool = False
    secure_domains: frozenset[str] = frozenset()
    insecure_domains: frozenset[str] = frozenset()

    def dialback_allowed(self, domain: str) -> bool:
        if domain in self.insecure_domains:
            return True
        return not (self.require_valid_certificates or domain in self.secure_domains)


@dataclass
class InboundConfig:
    role: Role
    served: frozenset[str]
    keys: DialbackKeys
    new_stream_id: NewStreamId
    max_size: int
    max_depth: int
    trust: TrustPolicy = field(default_factory=TrustPolicy)
    starttls_available: bool = True     # BACKEND: a certificate is configured
    direct_tls: bool = False
    actions: dict[str, str] = field(default_factory=dict)   # policy.actions
    auth_timeout: float = 30.0       # from TCP accept to an authenticated pair
    max_pending_dialback: int = MAX_PENDING_DIALBACK   # db:result in flight per stream
    # PUBLIC, before the first pair is authenticated (ejabberd 26.04's
    # pre_auth_max_stanza_size uses the same figures): bytes per element, and elements.
    pre_auth_max_size: int = 8192
    pre_auth_max_elements: int = 32
    # PUBLIC: which remote domains may authenticate (policy.domains.DomainFilter)
    domains: Any = None
    idle_seconds: int | None = None     # XEP-0478 idle-seconds (keepalive.ping)


_SASL_AUTH = f"{NS_SASL} auth"
_STARTTLS = f"{NS_TLS} starttls"
_BIDI = f"{NS_BIDI} bidi"
_PROCEED = f"<proceed xmlns='{NS_TLS}'/>".encode()


class InboundStream(StreamBase):
    closed_state = InboundState.CLOSED

    def shutdown_phase(self) -> int:
        """ejabberd's outgoing streams (the backend listener) after the remotes' ones:
        see ``StreamBase.shutdown_phase``."""
        return 2 if self.role is Role.BACKEND else 1

    def __init__(self, config: InboundConfig) -> None:
        pre_auth = config.role is Role.PUBLIC
        super().__init__(min(config.pre_auth_max_size, config.max_size) if pre_auth
                         else config.max_size, config.max_depth)
        self._pre_auth_elements = config.pre_auth_max_elements if pre_auth else -1
        self.config = config
        self.stream_actions = config.actions
        self.role = config.role
        self.state = (InboundState.TLS_HANDSHAKE if config.direct_tls
                      else InboundState.HEADER)
        self.stream_id = ""
        self.local_domain = ""            # the header's 'to'
        self.peer_max_bytes: int | None = None   # XEP-0478, from its <bidi/>
        self.remote_domain = ""           # the header's 'from' (may be empty)
        self.chain_valid = False
        self.certificate = None
        self.sasl_domain = ""             # authenticated by SASL EXTERNAL
        self.authenticated: set[tuple[str, str]] = set()   # (originating, receiving)
        self.authenticated_from: set[str] = set()
        self.pending_dialback: dict[tuple[str, str], str] = {}   # pair -> key
        self.bidi = False
        self.bidi_offered = False
        self.auth_method = ""

    def start(self) -> list[A.Action]:
        """The TCP connection was accepted: the authentication timeout runs from now
        (as ejabberd's negotiation_timeout does), so that it bounds every connection
        that never authenticates, whatever it sends or withholds."""
        return [A.SetTimer("auth", self.config.auth_timeout)]

    # -- header and features ---------------------------------------------------------

    def _on_header(self, h: StreamOpened) -> None:
        if self.state is not InboundState.HEADER:
            raise RemoteProtocolError("not-well-formed", "stream header out of place")
        to = h.attrs.get("to", "")
        frm = h.attrs.get("from", "")
        try:
            to = nameprep_domain(to) if to else ""
            frm = nameprep_domain(frm) if frm else ""
        except InvalidJid:
            raise RemoteProtocolError("improper-addressing",
                                      "bad domain in stream header") from None
        self.stream_id = self.config.new_stream_id()
        if self.role is Role.PUBLIC and to not in self.config.served:
            self.local_domain = ""
            raise RemoteProtocolError("host-unknown", f"{to or '(no to)'} is not served here")
        if self.role is Role.BACKEND and frm and frm not in self.config.served:
            raise RemoteProtocolError("invalid-from",
                                      f"{frm} is not served behind this proxy")
        if self.local_domain and to != self.local_domain:
            raise RemoteProtocolError("host-unknown", "'to' changed on stream restart")
        if self.remote_domain and frm and frm != self.remote_domain:
            raise RemoteProtocolError("invalid-from", "'from' changed on stream restart")
        self.local_domain = to
        self.remote_domain = frm or self.remote_domain
        self._send(self._header_bytes(to or None, self.remote_domain or None,
                                      self.stream_id))
        self._send_features()
        if self.sasl_domain and (self.sasl_domain, to) not in self.authenticated:
            # [filter] changed between our SASL success and this restart: refused now
            if not self._denied(self.sasl_domain, to, "late"):
                self._authenticate(self.sasl_domain, to, "external")

    def _error_header(self) -> bytes:
        return self._header_bytes(self.local_domain or None, None,
                                  self.stream_id or self.config.new_stream_id())

    def _send_features(self) -> None:
        parts = []
        tls_offer = not self.secure and (self.role is Role.PUBLIC
                                         or self.config.starttls_available)
        if tls_offer:
            required = "<required/>" if self.role is Role.PUBLIC else ""
            parts.append(f"<starttls xmlns='{NS_TLS}'>{required}</starttls>")
        if self.role is Role.PUBLIC and not self.secure:
            self.state = InboundState.STARTTLS
        else:
            self.state = InboundState.OPEN
            if (self.role is Role.PUBLIC and not self.sasl_domain and self.remote_domain
                    and certificate_valid_for(self.chain_valid, self.certificate,
                                              self.remote_domain)):
                parts.append(f"<mechanisms xmlns='{NS_SASL}'>"
                             f"<mechanism>EXTERNAL</mechanism></mechanisms>")
            parts.append(f"<dialback xmlns='{NS_DIALBACK_FEATURE}'><errors/></dialback>")
            if self.role is Role.PUBLIC and self.secure and not self.sasl_domain:
                parts.append(f"<bidi xmlns='{NS_BIDI_FEATURE}'/>")
                self.bidi_offered = True
            if self.role is Role.PUBLIC:
                parts.append(limits_element(self.config.max_size, self.config.idle_seconds))
        self._send(b"<stream:features>" + "".join(parts).encode() + b"</stream:features>")

    # -- TLS -------------------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self.state is InboundState.TLS_HANDSHAKE:
            # Plaintext between <starttls/> and the handshake (or before a Direct TLS
            # handshake completed) is never parsed.
            raise RemoteProtocolError("policy-violation", "data pipelined after STARTTLS")
        super()._data(data)

    def _on_tls(self, ev: E.TlsEstablished) -> None:
        if self.state is not InboundState.TLS_HANDSHAKE:
            raise RemoteProtocolError("policy-violation", "unexpected TLS handshake")
        self.secure = True
        self.header_sent = False
        self.chain_valid = ev.chain_valid
        self.certificate = ev.certificate
        self.state = InboundState.HEADER

    # -- elements ------------------------------------------------------------------------

    def _on_element(self, el: Element) -> None:
        kind = STANZA_NAMES.get(el.name)
        if kind is not None and self.authenticated_from and self.state is _OPEN:
            return StreamBase._stanza(self, kind, el)   # the hot path: a stanza
        if self._pre_auth_elements >= 0:
            if self._pre_auth_elements == 0:
                raise RemoteProtocolError(
                    "policy-violation", f"more than {self.config.pre_auth_max_elements} "
                                        f"elements before authentication")
            self._pre_auth_elements -= 1
        name = el.name
        if self.state is InboundState.OPEN:
            if kind is not None:
                self._stanza(kind, el)
            elif name == DB_RESULT:
                self._db_result(el)
            elif name == DB_VERIFY:
                self._db_verify(el)
            elif name == _SASL_AUTH:
                self._sasl_auth(el)
            elif name == _BIDI and self.bidi_offered and not self.authenticated:
                # Only before authentication, as Prosody's mod_s2s_bidi: bidi cannot
                # be switched on for pairs already authenticated one-way.
                if not self.bidi:
                    self.bidi = True
                    # XEP-0478 section 3: its limits for what we send back on it
                    self.peer_max_bytes = peer_max_bytes(el.tree())
                    self._emit(A.BidiNegotiated())
            elif name == STREAM_ERROR:
                self._peer_error(el)
            elif name == _STARTTLS and self.role is Role.BACKEND and not self.secure \
                    and self.config.starttls_available:
                self._starttls(el)
            else:
                self._violation("not-a-stanza", "unsupported-stanza-type",
                                f"unexpected element {name.rsplit(' ', 1)[-1]!r}", el)
        elif self.state is InboundState.STARTTLS:
            if name == _STARTTLS:
                self._starttls(el)
            elif name == STREAM_ERROR:
                self._peer_error(el)
            elif kind is not None:
                self._violation("before-auth", "not-authorized",
                                "stanza before authentication", el)
            else:
                self._violation("before-auth", "policy-violation",
                                "STARTTLS is required before anything else", el)
        else:
            raise RemoteProtocolError("not-well-formed", "element before stream header")

    def _starttls(self, el: Element) -> None:
        if self.parser.leftover(el.end).strip():
            raise RemoteProtocolError("policy-violation", "data pipelined after STARTTLS")
        self._send(_PROCEED)
        self._emit(A.StartTls(self.local_domain or None))
        self._restart(tls=True)
        self.state = InboundState.TLS_HANDSHAKE

    def _peer_error(self, el: Element) -> None:
        cond, text = peer_stream_error(el)
        self._send(b"</stream:stream>")
        self._emit(A.CloseConnection(f"peer:{cond}", text))
        self.state = InboundState.CLOSED

    # -- SASL EXTERNAL (XEP-0178) ----------------------------------------------------------

    def _sasl_auth(self, el: Element) -> None:
        if self.role is not Role.PUBLIC or self.sasl_domain or not self.secure:
            raise RemoteProtocolError("policy-violation", "SASL not offered")
        tree = el.tree()
        mech = tree.get("mechanism", "")
        failure = None
        authzid = ""
        if mech != "EXTERNAL":
            failure = "invalid-mechanism"
        else:
            text = (tree.text or "").strip()
            if text and text != "=":
                try:
                    authzid = base64.b64decode(text, validate=True).decode("utf-8")
                except (binascii.Error, UnicodeDecodeError):
                    failure = "incorrect-encoding"
        domain = ""
        if failure is None:
            try:
                domain = nameprep_domain(authzid or self.remote_domain)
            except InvalidJid:
                failure = "invalid-authzid"
            else:
                if self.remote_domain and domain != self.remote_domain:
                    failure = "invalid-authzid"
                elif not certificate_valid_for(self.chain_valid, self.certificate, domain):
                    failure = "not-authorized"
        if failure is None and self._denied(domain, self.local_domain or "", "external"):
            return
        if failure is not None:
            self._send(f"<failure xmlns='{NS_SASL}'><{failure}/></failure>".encode())
            self._emit(A.AuthFailed("external", failure))
            return
        self.sasl_domain = self.remote_domain = domain
        self._send(f"<success xmlns='{NS_SASL}'/>".encode())
        # Authenticated when the restarted stream is open (_on_header): see
        # _authenticate.
        self._restart()
        self.state = InboundState.HEADER

    # -- dialback (XEP-0220) -------------------------------------------------------------

    def _denied(self, remote: str, local: str, method: str) -> bool:
        """A remote domain ``[filter]`` refuses (``policy.domains``): the dialback
        result an error ``forbidden`` or SASL ``not-authorized``, a ``denied-domain``
        flag, then the stream error ``policy-violation``, as Prosody's
        mod_s2s_blacklist does.  True when refused.  Asked again when the
        authentication completes (``method`` "late": a SASL success already sent, or
        a dialback verdict that came back), so a change of ``[filter]`` meanwhile is
        not missed."""
        domains = self.config.domains
        if domains is None or not domains.active or self.role is not Role.PUBLIC:
            return False
        why = domains.verdict(remote)
        if why is None:
            return False
        text = f"{remote} may not federate with this server"
        if method == "dialback":
            self._db_result_reply(local, remote, "error", "forbidden", text)
        elif method == "external":
            self._send(f"<failure xmlns='{NS_SASL}'><not-authorized/></failure>".encode())
            self._emit(A.AuthFailed("external", "denied-domain"))
        else:
            self._emit(A.AuthFailed("external", "denied-domain"))
        self._emit(A.Flag("denied-domain", "refuse", why, from_=remote, to=local))
        self._stream_error("policy-violation", text)
        return True

    def _db_addressing(self, el: Element) -> tuple[str, str]:
        try:
            return nameprep_domain(el.attrs["from"]), nameprep_domain(el.attrs["to"])
        except (KeyError, InvalidJid):
            raise RemoteProtocolError("improper-addressing",
                                      "dialback element needs valid from and to") from None

    def _db_result(self, el: Element) -> None:
        if "type" in el.attrs:
            raise RemoteProtocolError("unsupported-stanza-type",
                                      "db:result with a type on an inbound stream")
        frm, to = self._db_addressing(el)
        if self.role is Role.BACKEND:
            # ejabberd's own outgoing stream: it must speak for a domain we serve.
            if frm not in self.config.served:
                self._db_result_reply(to, frm, "error", "forbidden",
                                      f"{frm} is not served behind this proxy")
                return
        elif to not in self.config.served:
            self._db_result_reply(to, frm, "error", "item-not-found")
            return
        elif self._denied(frm, to, "dialback"):
            return
        key = (el.tree().text or "").strip()
        pair = (frm, to)
        if pair in self.authenticated:
            self._db_result_reply(to, frm, "valid")
            return
        if self.role is Role.PUBLIC:
            if certificate_valid_for(self.chain_valid, self.certificate, frm):
                # XEP-0344 section 2.3: a certificate valid for the domain makes the
                # callback unnecessary.
                self._db_result_reply(to, frm, "valid")
                self._authenticate(frm, to, "dialback")
                return
            if not self.config.trust.dialback_allowed(frm):
                self._db_result_reply(to, frm, "error", "not-authorized",
                                      f"{frm} must present a valid certificate")
                return
        if pair in self.pending_dialback:
            return
        if len(self.pending_dialback) >= self.config.max_pending_dialback:
            self._db_result_reply(to, frm, "error", "resource-constraint",
                                  "too many dialback requests in flight on this stream")
            return
        self.pending_dialback[pair] = key
        self._emit(A.VerifyDialback(frm, to, self.stream_id, key))

    def _on_other(self, ev: object) -> None:
        if isinstance(ev, E.TimerFired) and ev.name == "auth" and not self.authenticated:
            self._stream_error("connection-timeout", "not authenticated in time")
        elif isinstance(ev, E.DialbackVerdict):
            pair = (ev.originating, ev.receiving)
            if self.pending_dialback.pop(pair, None) is None:
                return
            if ev.valid:
                if self._denied(ev.originating, ev.receiving, "dialback"):
                    return      # [filter] changed while the key was being verified
                # 'valid' first: see _authenticate.
                self._db_result_reply(ev.receiving, ev.originating, "valid")
                self._authenticate(ev.originating, ev.receiving, "dialback")
            elif ev.valid is False:
                self._db_result_reply(ev.receiving, ev.originating, "invalid")
            else:
                self._db_result_reply(ev.receiving, ev.originating, "error",
                                      ev.condition or "remote-server-not-found")

    def _db_result_reply(self, frm: str, to: str, type_: str, condition: str = "",
                         text: str = "") -> None:
        attrs = f"from='{xml_escape(frm)}' to='{xml_escape(to)}' type='{type_}'"
        if type_ == "error":
            body = (f"<error type='{ERROR_TYPES.get(condition, 'cancel')}'>"
                    f"<{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>")
            if text:
                body += (f"<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>"
                         f"{xml_escape(text)}</text>")
            self._send(f"<db:result {attrs}>{body}</error></db:result>".encode())
        else:
            self._send(f"<db:result {attrs}/>".encode())
        if type_ != "valid":
            self._emit(A.AuthFailed("dialback", condition or type_))

    def _db_verify(self, el: Element) -> None:
        if "type" in el.attrs:
            raise RemoteProtocolError("unsupported-stanza-type",
                                      "db:verify with a type on an inbound stream")
        receiving, originating = self._db_addressing(el)
        stream_id = el.attrs.get("id", "")
        key = (el.tree().text or "").strip()
        ok = bool(stream_id) and self.config.keys.check(receiving, originating, stream_id, key)
        self._send(f"<db:verify from='{xml_escape(originating)}' to='{xml_escape(receiving)}'"
                   f" id='{xml_escape(stream_id)}' type='{'valid' if ok else 'invalid'}'/>"
                   .encode())
        self._emit(A.DialbackAnswered(originating, receiving, ok))

    def _authenticate(self, originating: str, receiving: str, method: str) -> None:
        """Record the pair and report ``Authenticated``.  Called only after the bytes
        that complete the authentication for the peer (db:result 'valid', or SASL
        success and our restarted header), because on a bidi stream Authenticated
        lets the router write our stanzas, which the peer must read after those."""
        if not self.authenticated:
            self._emit(A.CancelTimer("auth"))
            # Authenticated: the full element size, no element count.
            self._pre_auth_elements = -1
            self.max_size = self.parser.max_size = self.config.max_size
        self.authenticated.add((originating, receiving))
        self.authenticated_from.add(originating)
        self.auth_method = self.auth_method or method
        self._emit(A.Authenticated(originating, receiving, method))

    # -- stanzas -------------------------------------------------------------------------

    def _stanza(self, kind: str, el: Element) -> None:
        if not self.authenticated_from:
            return self._violation("before-auth", "not-authorized",
                                   "stanza before authentication", el)
        return super()._stanza(kind, el)

    def _stanza_refused(self, frm_domain: str, to_domain: str) -> Refusal | None:
        """XEP-0220: stanzas are accepted per authenticated (from, to) domain pair."""
        if (frm_domain, to_domain) in self.authenticated:
            return None
        if self.role is Role.PUBLIC and to_domain not in self.config.served:
            return "host-unknown", f"{to_domain} is not served here", True
        return "invalid-from", (f"{frm_domain} is not authenticated for {to_domain} "
                                f"on this stream"), True
