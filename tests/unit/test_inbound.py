"""Inbound (receiving server) transcripts: each phase is fed whole, byte by byte and
split at every position, with the same resulting actions."""

from __future__ import annotations

import pytest

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.errors import stream_error_bytes
from s2sproxy.core.inbound import InboundState, Role, TrustPolicy
from tests.unit.helpers import (HEADER, KEYS, LOCAL, REMOTE, certificate, every_split,
                                inbound, merge, our_header)
from tests.unit.test_identity import make_certificate, srv, xmpp

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
STARTTLS = f"<starttls xmlns='{NS_TLS}'/>".encode()
FEATURES_TLS = (f"<stream:features><starttls xmlns='{NS_TLS}'><required/></starttls>"
                f"</stream:features>").encode()
# XEP-0478: the limits of what we accept, after TLS (the helpers' max_size is 20000)
LIMITS = b"<limits xmlns='urn:xmpp:stream-limits:0'><max-bytes>20000</max-bytes></limits>"
FEATURES_DB_BIDI = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'>"
                    b"<errors/></dialback><bidi xmlns='urn:xmpp:features:bidi'/>"
                    + LIMITS + b"</stream:features>")
FEATURES_EXTERNAL = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                     b"<mechanism>EXTERNAL</mechanism></mechanisms>"
                     b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                     b"<bidi xmlns='urn:xmpp:features:bidi'/>" + LIMITS
                     + b"</stream:features>")
KEY = KEYS.key(LOCAL, REMOTE, "remote-sid")   # any key: the verdict is the test's
DB_RESULT = f"<db:result from='{REMOTE}' to='{LOCAL}'>{KEY}</db:result>".encode()
MESSAGE = (b"<message from='juliet@remote.example/balcony' to='romeo@local.example' "
           b"type='chat' id='m1'><body>Wherefore &amp; why</body></message>")

PRE_TLS = [E.DataReceived(HEADER), E.DataReceived(STARTTLS)]
TLS_NO_CERT = E.TlsEstablished(False, None)
SECURE = PRE_TLS + [TLS_NO_CERT, E.DataReceived(HEADER)]
DIALBACK_OK = SECURE + [E.DataReceived(DB_RESULT),
                        E.DialbackVerdict(REMOTE, LOCAL, True)]


def run(prelude, data=b"", role=Role.PUBLIC, **kw):
    make = lambda: inbound(role, **kw)  # noqa: E731
    if not data:
        s = make()
        out = []
        for ev in prelude:
            out = s.handle(ev)
        return merge(out), s
    actions = every_split(make, data, prelude)
    s = make()
    for ev in prelude:
        s.handle(ev)
    s.handle(E.DataReceived(data))
    return actions, s


def error_close(condition, text, header=b""):
    return [A.SendBytes(header + stream_error_bytes(condition, text)),
            A.CloseConnection(condition, text)]


def flagged(actions, reason, action="close"):
    """Assert exactly one Flag with ``reason`` and ``action``; return the other actions."""
    flags = [a for a in actions if isinstance(a, A.Flag)]
    assert [(f.reason, f.action) for f in flags] == [(reason, action)], flags
    return [a for a in actions if not isinstance(a, A.Flag)]


def test_inbound_header_gets_header_and_required_starttls():
    """A remote's stream header is answered with ours and STARTTLS as required feature."""
    actions, s = run([], HEADER)
    assert actions == [A.SendBytes(our_header(LOCAL, REMOTE, "sid1") + FEATURES_TLS)]
    assert s.state is InboundState.STARTTLS


def test_inbound_starttls_proceeds_and_restarts():
    """<starttls/> gets <proceed/> and a StartTls order for the stream's 'to' domain."""
    actions, s = run([E.DataReceived(HEADER)], STARTTLS)
    assert actions == [A.SendBytes(f"<proceed xmlns='{NS_TLS}'/>".encode()),
                       A.StartTls(LOCAL)]
    assert s.state is InboundState.TLS_HANDSHAKE


def test_inbound_bytes_pipelined_after_starttls_are_policy_violation():
    """Bytes sent in the clear after <starttls/> are never parsed: policy-violation,
    whether they came in the same read (no <proceed/> then) or a later one."""
    s = inbound()
    s.handle(E.DataReceived(HEADER))
    actions = merge(s.handle(E.DataReceived(STARTTLS + b"<message/>")))
    assert actions == error_close("policy-violation", "data pipelined after STARTTLS")
    assert s.state is InboundState.CLOSED
    s = inbound()
    s.handle(E.DataReceived(HEADER))
    s.handle(E.DataReceived(STARTTLS))
    actions = merge(s.handle(E.DataReceived(b"<message/>")))
    # after <proceed/> only TLS can be written: the connection is dropped
    assert actions == [A.CloseConnection("policy-violation", "data pipelined after STARTTLS",
                                         abort=True)]


def test_inbound_after_tls_offers_dialback_and_bidi_but_not_external_without_cert():
    """After TLS, without a valid certificate, only dialback and bidi are offered."""
    actions, s = run(PRE_TLS + [TLS_NO_CERT], HEADER)
    assert actions == [A.SendBytes(our_header(LOCAL, REMOTE, "sid2") + FEATURES_DB_BIDI)]
    assert s.state is InboundState.OPEN and s.secure


def test_inbound_stanza_before_tls_is_not_authorized():
    """A stanza before STARTTLS ends the stream with not-authorized."""
    actions, s = run([E.DataReceived(HEADER)], MESSAGE)
    assert flagged(actions, "before-auth") == error_close("not-authorized",
                                                          "stanza before authentication")


def test_inbound_dialback_before_tls_is_policy_violation():
    """Dialback before STARTTLS on the public listener is refused: TLS is required."""
    actions, s = run([E.DataReceived(HEADER)], DB_RESULT)
    assert flagged(actions, "before-auth") == error_close(
        "policy-violation", "STARTTLS is required before anything else")


def test_inbound_dialback_result_asks_authoritative_server():
    """db:result makes a VerifyDialback order with the stream's id and the key."""
    actions, s = run(SECURE, DB_RESULT)
    assert actions == [A.VerifyDialback(REMOTE, LOCAL, "sid2", KEY)]


def test_inbound_dialback_valid_verdict_authenticates():
    """A valid verdict answers db:result type='valid' and authenticates the pair, in
    that order: on a bidi stream the peer may use the stream for our stanzas only after
    it read 'valid' (Prosody drops stanzas on a stream not yet authenticated), and
    Authenticated is what lets the router write them (defect 16)."""
    actions, s = run(DIALBACK_OK)
    assert actions == [A.SendBytes(f"<db:result from='{LOCAL}' to='{REMOTE}' "
                                   f"type='valid'/>".encode()),
                       A.CancelTimer("auth"), A.Authenticated(REMOTE, LOCAL, "dialback")]
    assert (REMOTE, LOCAL) in s.authenticated


def test_inbound_dialback_invalid_verdict_answers_invalid():
    """An invalid verdict answers type='invalid' and authenticates nothing."""
    actions, s = run(SECURE + [E.DataReceived(DB_RESULT),
                               E.DialbackVerdict(REMOTE, LOCAL, False)])
    assert actions == [A.SendBytes(f"<db:result from='{LOCAL}' to='{REMOTE}' "
                                   f"type='invalid'/>".encode()),
                       A.AuthFailed("dialback", "invalid")]
    assert not s.authenticated


def test_inbound_dialback_unreachable_authoritative_server_is_dialback_error():
    """When the authoritative server cannot be asked, a XEP-0220 dialback error."""
    actions, s = run(SECURE + [E.DataReceived(DB_RESULT),
                               E.DialbackVerdict(REMOTE, LOCAL, None,
                                                 "remote-server-not-found")])
    assert actions == [A.SendBytes(
        f"<db:result from='{LOCAL}' to='{REMOTE}' type='error'><error type='cancel'>"
        f"<remote-server-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
        f"</error></db:result>".encode()), A.AuthFailed("dialback", "remote-server-not-found")]


def test_inbound_dialback_for_unserved_domain_is_item_not_found():
    """db:result for a domain we do not serve gets the item-not-found dialback error."""
    data = f"<db:result from='{REMOTE}' to='nobody.example'>k</db:result>".encode()
    actions, s = run(SECURE, data)
    assert actions == [A.SendBytes(
        f"<db:result from='nobody.example' to='{REMOTE}' type='error'><error type='cancel'>"
        f"<item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
        f"</db:result>".encode()), A.AuthFailed("dialback", "item-not-found")]


def test_inbound_dialback_refused_for_secure_domain_without_certificate():
    """A domain listed as secure must present a valid certificate: no dialback."""
    actions, s = run(SECURE, DB_RESULT,
                     trust=TrustPolicy(secure_domains=frozenset({REMOTE})))
    assert b"<not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>" \
        in actions[0].data
    assert not s.pending_dialback


def test_inbound_db_verify_answers_from_derivation():
    """db:verify is answered valid for a key we derive, invalid otherwise."""
    good = KEYS.key("a.example", "b.example", "xyz")
    data = (f"<db:verify from='a.example' to='b.example' id='xyz'>{good}</db:verify>"
            f"<db:verify from='a.example' to='b.example' id='xyz'>00{good[2:]}</db:verify>"
            ).encode()
    actions, s = run(SECURE, data)
    assert actions == [
        A.SendBytes(b"<db:verify from='b.example' to='a.example' id='xyz' type='valid'/>"),
        A.DialbackAnswered("b.example", "a.example", True),
        A.SendBytes(b"<db:verify from='b.example' to='a.example' id='xyz' type='invalid'/>"),
        A.DialbackAnswered("b.example", "a.example", False)]


def test_inbound_bidi_request_is_negotiated():
    """<bidi xmlns='urn:xmpp:bidi'/> after the feature marks the stream bidirectional."""
    actions, s = run(SECURE, b"<bidi xmlns='urn:xmpp:bidi'/>")
    assert actions == [A.BidiNegotiated()]
    assert s.bidi


def test_inbound_authenticated_stanzas_are_delivered_as_original_bytes():
    """Stanzas of an authenticated pair are delivered in one batch, bytes untouched."""
    two = MESSAGE + b" \n" + MESSAGE.replace(b"m1", b"m2")
    actions, s = run(DIALBACK_OK, two)
    assert actions == [("deliver", [MESSAGE, MESSAGE.replace(b"m1", b"m2")])]


def test_inbound_stanza_before_authentication_is_not_authorized():
    """After TLS but before authentication, a stanza gets not-authorized."""
    actions, s = run(SECURE, MESSAGE)
    assert flagged(actions, "before-auth") == error_close("not-authorized",
                                                          "stanza before authentication")


def test_inbound_stanza_from_unauthenticated_domain_is_invalid_from():
    """A stanza whose 'from' domain was not authenticated on this stream: invalid-from."""
    data = MESSAGE.replace(b"remote.example/balcony", b"evil.example")
    actions, s = run(DIALBACK_OK, data)
    assert flagged(actions, "invalid-from") == error_close(
        "invalid-from", "evil.example is not authenticated for local.example on this stream")


def test_inbound_stanza_from_with_at_in_resource_is_invalid_from():
    """RFC 7622 section 3.1: 'evil.example/x@remote.example' is the domain evil.example
    with the resource 'x@remote.example', so on a stream authenticated for
    remote.example it is refused with invalid-from."""
    data = MESSAGE.replace(b"juliet@remote.example/balcony", b"evil.example/x@remote.example")
    actions, s = run(DIALBACK_OK, data)
    assert flagged(actions, "invalid-from") == error_close(
        "invalid-from", "evil.example is not authenticated for local.example on this stream")


def test_inbound_stanza_to_full_jid_with_at_in_resource_is_delivered():
    """'local.example/a@b.example' is a legal full JID of local.example: delivered."""
    data = MESSAGE.replace(b"romeo@local.example", b"local.example/a@b.example")
    actions, s = run(DIALBACK_OK, data)
    assert actions == [("deliver", [data])]
    assert s.state is InboundState.OPEN


def test_inbound_stanza_to_unserved_domain_is_host_unknown():
    """A stanza to a domain we do not serve: host-unknown."""
    data = MESSAGE.replace(b"romeo@local.example", b"x@elsewhere.example")
    actions, s = run(DIALBACK_OK, data)
    assert flagged(actions, "host-unknown") == error_close(
        "host-unknown", "elsewhere.example is not served here")


def test_inbound_stanza_without_addresses_is_improper_addressing():
    """Server-to-server stanzas need both from and to."""
    actions, s = run(DIALBACK_OK, b"<message to='romeo@local.example'/>")
    assert flagged(actions, "improper-addressing") == error_close(
        "improper-addressing", "stanzas between servers need 'from' and 'to'")


def test_inbound_header_for_unserved_domain_is_host_unknown():
    """A stream to a domain we do not serve gets our header, then host-unknown."""
    data = HEADER.replace(b"to='local.example'", b"to='nobody.example'")
    actions, s = run([], data)
    assert actions == error_close("host-unknown", "nobody.example is not served here",
                                  header=our_header(None, None, "sid1"))


@pytest.mark.parametrize("data, condition", [
    (HEADER.replace(b"xmlns='jabber:server'", b"xmlns='jabber:client'"), "invalid-namespace"),
    (HEADER.replace(b"version='1.0'", b"version='2.0'"), "unsupported-version"),
    (HEADER.replace(b"http://etherx.jabber.org/streams", b"urn:wrong"), "invalid-namespace"),
])
def test_inbound_bad_header_is_stream_error(data, condition):
    """Wrong namespaces or version in the header end the stream with the RFC condition."""
    actions, s = run([], data)
    assert actions[1].condition == condition
    assert actions[0].data.startswith(b"<?xml version='1.0'?><stream:stream")
    assert s.state is InboundState.CLOSED


@pytest.mark.parametrize("data, condition", [
    (b"<!-- hi -->", "restricted-xml"),
    (b"<?target data?>", "restricted-xml"),
    (b"<message from='a@remote.example' to='b@local.example'>&ent;</message>", "restricted-xml"),
    (b"<message><body>x</wrong></message>", "not-well-formed"),
    (b"stray text", "not-well-formed"),
])
def test_inbound_restricted_or_malformed_xml_is_stream_error(data, condition):
    """Comments, PIs, entities and malformed XML end the stream (RFC 6120 11.1)."""
    actions, s = run(DIALBACK_OK, data)
    assert actions[-1] == A.CloseConnection(condition, actions[-1].text)
    assert s.state is InboundState.CLOSED


def test_inbound_dtd_in_header_is_restricted_xml():
    """A document type declaration before the stream header: restricted-xml."""
    actions, s = run([], b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]>" + HEADER)
    assert actions[-1].condition == "restricted-xml"


def test_inbound_oversize_stanza_is_policy_violation():
    """A stanza over max_stanza_size ends the stream with policy-violation."""
    big = b"<message from='a@remote.example' to='b@local.example'><body>" \
        + b"x" * 1000 + b"</body></message>"
    actions, s = run(DIALBACK_OK, big, max_size=500)
    assert actions[-1] == A.CloseConnection("policy-violation",
                                            "stanza larger than 500 bytes")


def test_inbound_over_deep_stanza_is_policy_violation():
    """Nesting deeper than max_depth ends the stream with policy-violation."""
    deep = (b"<message from='a@remote.example' to='b@local.example'>" + b"<a>" * 10
            + b"</a>" * 10 + b"</message>")
    actions, s = run(DIALBACK_OK, deep, max_depth=5)
    assert actions[-1] == A.CloseConnection("policy-violation",
                                            "elements nested deeper than 5")


def test_inbound_sasl_external_with_valid_certificate_succeeds_and_restarts():
    """EXTERNAL is offered for a valid certificate, succeeds, and the stream restarts
    with a fresh parser fed the bytes that followed <auth/>."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    tls = E.TlsEstablished(True, leaf)
    actions, s = run(PRE_TLS + [tls], HEADER)
    assert actions == [A.SendBytes(our_header(LOCAL, REMOTE, "sid2") + FEATURES_EXTERNAL)]
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
    actions, s = run(PRE_TLS + [tls, E.DataReceived(HEADER)], auth + HEADER)
    # Authenticated only once the restarted stream is open: nothing of ours may be
    # written before <success/> and our new header.
    assert actions == [A.SendBytes(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"
                                   + our_header(LOCAL, REMOTE, "sid3")
                                   + b"<stream:features><dialback xmlns='urn:xmpp:"
                                     b"features:dialback'><errors/></dialback>"
                                   + LIMITS + b"</stream:features>"),
                       A.CancelTimer("auth"), A.Authenticated(REMOTE, LOCAL, "external")]
    assert s.sasl_domain == REMOTE


def test_inbound_sasl_external_certificate_without_clientauth_is_accepted():
    """A certificate without the clientAuth purpose still authenticates (as Prosody)."""
    _ca, _ck, leaf, _k = certificate(REMOTE, client_auth=False)
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
    actions, s = run(PRE_TLS + [E.TlsEstablished(True, leaf), E.DataReceived(HEADER)],
                     auth + HEADER)
    assert actions[-1] == A.Authenticated(REMOTE, LOCAL, "external")


@pytest.mark.parametrize("name", [srv("_xmpp-server.remote.example"),
                                  xmpp("remote.example")], ids=["srv-id", "xmppaddr"])
def test_inbound_sasl_external_with_srv_id_or_xmppaddr_certificate_succeeds(name):
    """A certificate naming the remote only by SRV-ID or XmppAddr (RFC 6120 section
    13.7.1.2) is offered EXTERNAL and authenticates with it."""
    tls = E.TlsEstablished(True, make_certificate([name]))
    actions, s = run(PRE_TLS + [tls], HEADER)
    assert actions == [A.SendBytes(our_header(LOCAL, REMOTE, "sid2") + FEATURES_EXTERNAL)]
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
    actions, s = run(PRE_TLS + [tls, E.DataReceived(HEADER)], auth + HEADER)
    assert actions[-1] == A.Authenticated(REMOTE, LOCAL, "external")


def test_inbound_sasl_external_for_another_domain_fails():
    """An authzid that is not the stream's 'from' fails with invalid-authzid."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    auth = (b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>"
            b"b3RoZXIuZXhhbXBsZQ==</auth>")          # other.example
    actions, s = run(PRE_TLS + [E.TlsEstablished(True, leaf), E.DataReceived(HEADER)], auth)
    assert actions == [A.SendBytes(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                   b"<invalid-authzid/></failure>"),
                       A.AuthFailed("external", "invalid-authzid")]
    assert not s.authenticated


def test_inbound_sasl_external_with_untrusted_chain_fails():
    """A certificate whose chain did not verify cannot be used for EXTERNAL."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"
    actions, s = run(PRE_TLS + [E.TlsEstablished(False, leaf), E.DataReceived(HEADER)], auth)
    assert actions == [A.SendBytes(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                                   b"<not-authorized/></failure>"),
                       A.AuthFailed("external", "not-authorized")]


def test_inbound_dialback_with_valid_certificate_needs_no_callback():
    """db:result from a domain whose certificate is valid is accepted at once."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    actions, s = run(PRE_TLS + [E.TlsEstablished(True, leaf), E.DataReceived(HEADER)],
                     DB_RESULT)
    assert actions[0] == A.SendBytes(f"<db:result from='{LOCAL}' to='{REMOTE}' "
                                     f"type='valid'/>".encode())
    assert actions[-1] == A.Authenticated(REMOTE, LOCAL, "dialback")


def test_inbound_direct_tls_starts_with_handshake():
    """On a Direct TLS listener the first event is the handshake; no STARTTLS offered."""
    actions, s = run([TLS_NO_CERT], HEADER, direct_tls=True)
    assert actions == [A.SendBytes(our_header(LOCAL, REMOTE, "sid1") + FEATURES_DB_BIDI)]


def test_inbound_peer_closing_stream_is_answered_and_closed():
    """</stream:stream> from the peer is answered in kind and the connection closed."""
    actions, s = run(DIALBACK_OK, b"</stream:stream>")
    assert actions == [A.SendBytes(b"</stream:stream>"), A.CloseConnection()]
    assert s.state is InboundState.CLOSED


def test_inbound_backend_role_accepts_any_to_and_never_offers_bidi():
    """The backend listener takes ejabberd's streams to remote domains; no bidi."""
    hdr = HEADER.replace(b"to='local.example' from='remote.example'",
                         b"to='remote.example' from='local.example'")
    s = inbound(Role.BACKEND)
    s.config.starttls_available = False
    actions = merge(s.handle(E.DataReceived(hdr)))
    assert actions == [A.SendBytes(our_header(REMOTE, LOCAL, "sid1")
                                   + b"<stream:features><dialback xmlns='urn:xmpp:features:"
                                     b"dialback'><errors/></dialback></stream:features>")]


# -- the backend role: ejabberd's own outgoing streams ----------------------------------

EJ_HEADER = HEADER.replace(b"to='local.example' from='remote.example'",
                           b"to='remote.example' from='local.example'")


def backend_stream():
    s = inbound(Role.BACKEND)
    s.config.starttls_available = False
    s.handle(E.DataReceived(EJ_HEADER))
    return s


def test_inbound_backend_db_result_is_verified_with_ejabberd():
    """ejabberd's db:result for a served domain asks for verification (the shell
    sends db:verify to ejabberd's internal listener); valid authenticates the pair."""
    s = backend_stream()
    actions = s.handle(E.DataReceived(
        f"<db:result from='{LOCAL}' to='{REMOTE}'>k3y</db:result>".encode()))
    assert actions == [A.VerifyDialback(LOCAL, REMOTE, "sid1", "k3y")]
    actions = merge(s.handle(E.DialbackVerdict(LOCAL, REMOTE, True)))
    assert actions == [A.SendBytes(f"<db:result from='{REMOTE}' to='{LOCAL}' "
                                   f"type='valid'/>".encode()),
                       A.CancelTimer("auth"), A.Authenticated(LOCAL, REMOTE, "dialback")]
    msg = b"<message from='romeo@local.example' to='juliet@remote.example'/>"
    assert merge(s.handle(E.DataReceived(msg))) == [("deliver", [msg])]


def test_inbound_backend_db_result_for_unserved_domain_is_forbidden():
    """The backend listener only speaks for served domains."""
    s = backend_stream()
    actions = merge(s.handle(E.DataReceived(
        f"<db:result from='evil.example' to='{REMOTE}'>k</db:result>".encode())))
    assert b"<forbidden xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>" in actions[0].data
    assert not s.pending_dialback


def test_inbound_backend_header_from_unserved_domain_is_invalid_from():
    """A backend stream claiming a domain we do not serve is refused: invalid-from."""
    s = inbound(Role.BACKEND)
    actions = merge(s.handle(E.DataReceived(
        EJ_HEADER.replace(b"from='local.example'", b"from='evil.example'"))))
    assert actions[-1] == A.CloseConnection("invalid-from",
                                            "evil.example is not served behind this proxy")


def test_inbound_invalid_from_can_be_dropped_instead_of_closing():
    """With policy.actions invalid-from = drop, the spoofed stanza is flagged and
    dropped; the stream and the stanzas after it are undisturbed."""
    s = inbound()
    s.stream_actions = {"invalid-from": "drop"}
    for ev in DIALBACK_OK:
        s.handle(ev)
    spoofed = MESSAGE.replace(b"remote.example/balcony", b"evil.example")
    actions = merge(s.handle(E.DataReceived(spoofed + MESSAGE)))
    assert flagged(actions, "invalid-from", "drop") == [("deliver", [MESSAGE])]
    assert s.state is InboundState.OPEN


def test_inbound_fail_sends_stream_error():
    """A dead peer's stream is ended with connection-timeout."""
    s = inbound()
    for ev in DIALBACK_OK:
        s.handle(ev)
    assert s.fail("connection-timeout", "no answer") == error_close("connection-timeout",
                                                                    "no answer")


def test_inbound_stream_not_authenticated_in_time_is_closed():
    """A stream that never authenticates is closed with connection-timeout."""
    actions, s = run(SECURE + [E.TimerFired("auth")])
    assert actions == error_close("connection-timeout", "not authenticated in time")


def test_inbound_dialback_requests_in_flight_are_bounded():
    """More than max_pending_dialback verifications on one stream: resource-constraint."""
    s = inbound()
    for ev in SECURE:
        s.handle(ev)
    out = []
    for i in range(10):
        out += s.handle(E.DataReceived(
            f"<db:result from='r{i}.example' to='{LOCAL}'>k</db:result>".encode()))
    assert len([a for a in out if isinstance(a, A.VerifyDialback)]) == 8
    assert sum(b"<resource-constraint " in a.data for a in out
               if isinstance(a, A.SendBytes)) == 2


def test_inbound_stanza_for_unauthenticated_pair_is_invalid_from():
    """Authenticated for (remote, local) only: a stanza to another served domain is
    refused (XEP-0220 authenticates domain pairs)."""
    data = MESSAGE.replace(b"romeo@local.example", b"romeo@other.example")
    actions, s = run(DIALBACK_OK, data)
    assert flagged(actions, "invalid-from") == error_close(
        "invalid-from", "remote.example is not authenticated for other.example on this stream")


def test_inbound_unqualified_element_is_not_a_stanza():
    """An element in no namespace is refused like any other non-stanza."""
    actions, s = run(DIALBACK_OK, b"<foo xmlns=''/>")
    assert flagged(actions, "not-a-stanza") == error_close("unsupported-stanza-type",
                                                           "unexpected element 'foo'")


def test_inbound_whitespace_after_starttls_is_dropped_not_parsed():
    """Whitespace after <starttls/> in the same read is harmless and never parsed."""
    s = inbound()
    s.handle(E.DataReceived(HEADER))
    actions = merge(s.handle(E.DataReceived(STARTTLS + b"\n ")))
    assert actions == [A.SendBytes(f"<proceed xmlns='{NS_TLS}'/>".encode()),
                       A.StartTls(LOCAL)]


# -- bounds on unauthenticated streams (issue 7, defects 4 and 7) ------------------------

def test_inbound_auth_timer_runs_from_accept():
    """The authentication timeout starts at TCP accept, before any byte: a peer that
    sends nothing, or one header byte at a time, is closed when it fires."""
    s = inbound()
    assert s.start() == [A.SetTimer("auth", 30.0)]
    out = merge(s.handle(E.DataReceived(b"<")))
    assert out == []
    out = merge(s.handle(E.TimerFired("auth")))
    assert out == error_close("connection-timeout", "not authenticated in time",
                              header=our_header(None, None, "sid1"))
    assert s.state is InboundState.CLOSED


def test_inbound_direct_tls_auth_timer_runs_before_handshake():
    """On Direct TLS the timer runs from accept too: a handshake that never completes
    is dropped (nothing can be written before the handshake)."""
    s = inbound(direct_tls=True)
    assert s.start() == [A.SetTimer("auth", 30.0)]
    out = merge(s.handle(E.TimerFired("auth")))
    assert out == [A.CloseConnection("connection-timeout", "not authenticated in time",
                                     abort=True)]


def test_inbound_header_sets_no_second_timer():
    """The header no longer (re)starts the timer: a restart cannot extend it."""
    actions, s = run([], HEADER)
    assert not [a for a in actions if isinstance(a, A.SetTimer)]


def test_inbound_element_over_pre_auth_limit_is_policy_violation():
    """Before authentication an element may take limits.pre_auth_max_stanza_size
    bytes (as ejabberd 26.04's pre_auth_max_stanza_size), not max_stanza_size."""
    s = inbound(max_size=20000)
    for ev in SECURE:
        s.handle(ev)
    big = f"<db:result from='{REMOTE}' to='{LOCAL}'>{'k' * 9000}</db:result>".encode()
    out = merge(s.handle(E.DataReceived(big)))
    assert flagged(out, "oversize")[-1] == A.CloseConnection(
        "policy-violation", "stanza larger than 8192 bytes")


def test_inbound_full_limit_after_authentication():
    """Once a pair is authenticated, the stream's limit is max_stanza_size."""
    s = inbound(max_size=20000)
    for ev in DIALBACK_OK:
        s.handle(ev)
    big = MESSAGE.replace(b"Wherefore", b"x" * 15000)
    out = merge(s.handle(E.DataReceived(big)))
    assert out == [("deliver", [big])]


def test_inbound_element_count_before_auth_is_bounded():
    """At most limits.pre_auth_max_elements top-level elements before authentication
    (ejabberd 26.04 allows 32): then policy-violation."""
    s = inbound()
    for ev in SECURE:
        s.handle(ev)
    out = []
    for i in range(40):
        out += s.handle(E.DataReceived(
            f"<db:verify from='{LOCAL}' to='r.example' id='i{i}'>k</db:verify>".encode()))
    out = merge(out)
    verifies = sum(a.data.count(b"<db:verify ") for a in out if isinstance(a, A.SendBytes))
    assert verifies == 31        # <starttls/> was the first
    assert out[-1] == A.CloseConnection(
        "policy-violation", "more than 32 elements before authentication")


# -- smaller protocol points (issue 7, defect 14) ----------------------------------------

def test_inbound_bidi_after_authentication_is_refused():
    """<bidi/> is honoured only before authentication (as Prosody's mod_s2s_bidi)."""
    s = inbound()
    for ev in DIALBACK_OK:
        s.handle(ev)
    out = merge(s.handle(E.DataReceived(b"<bidi xmlns='urn:xmpp:bidi'/>")))
    assert not s.bidi and A.BidiNegotiated() not in out
    assert flagged(out, "not-a-stanza")[-1] == A.CloseConnection(
        "unsupported-stanza-type", "unexpected element 'bidi'")


def test_inbound_stream_language_kept_on_stanzas_without_their_own():
    """A stanza on a stream with xml:lang='de' and no xml:lang of its own is forwarded
    saying xml:lang='de' (our streams to ejabberd declare 'en'); one with its own
    language, or on an 'en' stream, is forwarded as it came."""
    de = HEADER.replace(b"version='1.0'>", b"version='1.0' xml:lang='de'>")
    s = inbound()
    for ev in [E.DataReceived(de), E.DataReceived(STARTTLS), TLS_NO_CERT,
               E.DataReceived(de), E.DataReceived(DB_RESULT),
               E.DialbackVerdict(REMOTE, LOCAL, True)]:
        s.handle(ev)
    own = MESSAGE.replace(b"<message ", b"<message xml:lang='fr' ")
    out = merge(s.handle(E.DataReceived(MESSAGE + own)))
    assert out == [("deliver", [MESSAGE.replace(b"<message ", b"<message xml:lang='de' "),
                                own])]
    actions, _s = run(DIALBACK_OK, MESSAGE)
    assert actions == [("deliver", [MESSAGE])]


def _with_filter():
    from dataclasses import replace

    from s2sproxy.policy.domains import DomainFilter
    f = DomainFilter()
    s = inbound()
    s.config = replace(s.config, domains=f)
    return s, f


def test_filter_change_while_a_dialback_key_is_verified_refuses_at_the_verdict():
    """[filter] denies the remote after its db:result was sent off for verification:
    the 'valid' verdict is answered forbidden, and the stream closed."""
    from s2sproxy.policy.domains import parse_entry
    s, f = _with_filter()
    for ev in SECURE + [E.DataReceived(DB_RESULT)]:
        s.handle(ev)
    assert (REMOTE, LOCAL) in s.pending_dialback
    f.set_lists("deny", [], [parse_entry(REMOTE)])
    out = merge(s.handle(E.DialbackVerdict(REMOTE, LOCAL, True)))
    data = b"".join(a.data for a in out if isinstance(a, A.SendBytes))
    assert b"type='error'" in data and b"<forbidden " in data, data
    assert b"<policy-violation " in data
    assert not s.authenticated
    assert any(isinstance(a, A.Flag) and a.reason == "denied-domain" for a in out)


def test_filter_change_between_sasl_success_and_the_restart_refuses_at_the_restart():
    from s2sproxy.policy.domains import parse_entry
    s, f = _with_filter()
    _ca, _ck, leaf, _key = certificate(REMOTE)
    for ev in PRE_TLS + [E.TlsEstablished(True, leaf), E.DataReceived(HEADER),
                         E.DataReceived(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                                        b"mechanism='EXTERNAL'>=</auth>")]:
        out = s.handle(ev)
    assert any(isinstance(a, A.SendBytes) and b"<success " in a.data for a in out)
    f.set_lists("deny", [], [parse_entry(REMOTE)])
    out = merge(s.handle(E.DataReceived(HEADER)))
    data = b"".join(a.data for a in out if isinstance(a, A.SendBytes))
    assert b"<policy-violation " in data and not s.authenticated
    assert not any(isinstance(a, A.Authenticated) for a in out)
    assert A.AuthFailed("external", "denied-domain") in out
