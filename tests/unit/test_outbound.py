"""Outbound (initiating server) transcripts: the backend leg and dialback verification."""

from __future__ import annotations

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundState, OutboundStream
from tests.unit.helpers import KEYS, LOCAL, REMOTE, every_split, merge

NS_TLS = "urn:ietf:params:xml:ns:xmpp-tls"
PEER_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
               b"xmlns:stream='http://etherx.jabber.org/streams' "
               b"xmlns:db='jabber:server:dialback' id='ej1' from='local.example' "
               b"version='1.0'>")
PEER_HEADER2 = PEER_HEADER.replace(b"ej1", b"ej2")
FEATURES_TLS = (f"<stream:features><starttls xmlns='{NS_TLS}'/>"
                f"<dialback xmlns='urn:xmpp:features:dialback'/></stream:features>").encode()
FEATURES_TLS_REQUIRED = FEATURES_TLS.replace(b"'/><dialback", b"'><required/></starttls>"
                                             b"<dialback")
FEATURES_PLAIN = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>" \
                 b"</stream:features>"
# What ejabberd 24.12 sends after TLS: EXTERNAL (we have no client certificate) + dialback.
FEATURES_AFTER_TLS = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                      b"<mechanism>EXTERNAL</mechanism></mechanisms><dialback "
                      b"xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                      b"</stream:features>")
OUR_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
              b"xmlns:stream='http://etherx.jabber.org/streams' "
              b"xmlns:db='jabber:server:dialback' from='remote.example' to='local.example' "
              b"version='1.0' xml:lang='en'>")


def backend(tls="auto"):
    return OutboundStream(OutboundConfig(Mode.ORIGINATE, REMOTE, LOCAL, KEYS, 20000, 16,
                                         tls=tls, timeout=5))


def test_outbound_start_sends_header_and_arms_timer():
    """Connecting sends our header (never a bidi request) and arms the handshake timer."""
    assert backend().start() == [A.SendBytes(OUR_HEADER), A.SetTimer("handshake", 5)]


def test_outbound_backend_starttls_then_dialback_then_ready():
    """STARTTLS when offered, then db:result with the XEP-0185 key for the new stream
    id, then ready on type='valid'."""
    actions = every_split(backend, PEER_HEADER + FEATURES_TLS)
    assert actions == [A.SendBytes(f"<starttls xmlns='{NS_TLS}'/>".encode())]
    actions = every_split(backend, f"<proceed xmlns='{NS_TLS}'/>".encode(),
                          [E.DataReceived(PEER_HEADER + FEATURES_TLS)])
    assert actions == [A.StartTls(LOCAL)]
    pre = [E.DataReceived(PEER_HEADER + FEATURES_TLS),
           E.DataReceived(f"<proceed xmlns='{NS_TLS}'/>".encode())]
    s = backend()
    for ev in pre:
        s.handle(ev)
    assert s.handle(E.TlsEstablished(False, None)) == [A.SendBytes(OUR_HEADER)]
    pre.append(E.TlsEstablished(False, None))
    key = KEYS.key(LOCAL, REMOTE, "ej2")
    actions = every_split(backend, PEER_HEADER2 + FEATURES_AFTER_TLS, pre)
    assert actions == [A.SendBytes(f"<db:result from='{REMOTE}' to='{LOCAL}'>{key}"
                                   f"</db:result>".encode())]
    pre.append(E.DataReceived(PEER_HEADER2 + FEATURES_AFTER_TLS))
    valid = f"<db:result from='{LOCAL}' to='{REMOTE}' type='valid'/>".encode()
    actions = every_split(backend, valid, pre)
    assert actions == [A.CancelTimer("handshake"), A.StreamReady()]


def test_outbound_tls_required_but_not_offered_fails():
    """With tls='required', a backend that offers no STARTTLS fails the link."""
    s = backend("required")
    actions = merge(s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN)))
    assert actions == [A.StreamFailed("remote-server-not-found",
                                      "peer does not offer STARTTLS"),
                       A.SendBytes(b"</stream:stream>"), A.CloseConnection()]


def test_outbound_tls_never_skips_offered_starttls():
    """With tls='never', dialback goes over the plain stream even if TLS is offered."""
    s = backend("never")
    actions = merge(s.handle(E.DataReceived(PEER_HEADER + FEATURES_TLS_REQUIRED)))
    assert actions[0].data.startswith(b"<db:result ")


def test_outbound_dialback_refused_fails_with_condition():
    """An invalid dialback result fails the link so waiting stanzas can be bounced."""
    s = backend("never")
    s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN))
    actions = merge(s.handle(E.DataReceived(
        f"<db:result from='{LOCAL}' to='{REMOTE}' type='invalid'/>".encode())))
    assert actions[0] == A.StreamFailed("remote-server-not-found",
                                        "dialback refused: invalid key")
    assert s.state is OutboundState.CLOSED


def test_outbound_timeout_fails_with_remote_server_timeout():
    """No answer before the handshake timer: remote-server-timeout, connection-timeout."""
    s = backend()
    s.start()
    actions = merge(s.handle(E.TimerFired("handshake")))
    assert actions[0] == A.StreamFailed("remote-server-timeout", "no answer in time")
    assert actions[-1] == A.CloseConnection("connection-timeout", "")


def test_outbound_connection_lost_before_ready_fails():
    """Losing the connection during set-up fails the link."""
    s = backend()
    s.start()
    assert s.handle(E.ConnectionLost("refused")) == [
        A.StreamFailed("remote-server-not-found", "connection lost: refused")]


def test_outbound_peer_stream_error_fails():
    """A stream error from the peer fails the link with its condition in the text."""
    s = backend()
    actions = merge(s.handle(E.DataReceived(
        PEER_HEADER + b"<stream:error><host-unknown xmlns='urn:ietf:params:xml:ns:xmpp-"
                      b"streams'/></stream:error>")))
    assert actions == [A.SendBytes(b"</stream:stream>"),
                       A.CloseConnection("peer:host-unknown", ""),
                       A.StreamFailed("remote-server-not-found",
                                      "stream error from peer: host-unknown ")]


def test_outbound_verify_reports_verdict_and_closes():
    """VERIFY mode sends db:verify and reports the authoritative server's verdict."""
    def make():
        return OutboundStream(OutboundConfig(Mode.VERIFY, LOCAL, REMOTE, None, 20000, 16,
                                             verify_stream_id="in-1", verify_key="abc"))
    header = PEER_HEADER.replace(b"from='local.example'", b"from='remote.example'")
    actions = every_split(make, header + FEATURES_PLAIN)
    assert actions == [A.SendBytes(f"<db:verify from='{LOCAL}' to='{REMOTE}' id='in-1'>abc"
                                   f"</db:verify>".encode())]
    answer = f"<db:verify from='{REMOTE}' to='{LOCAL}' id='in-1' type='valid'/>".encode()
    actions = every_split(make, answer, [E.DataReceived(header + FEATURES_PLAIN)])
    assert actions == [A.CancelTimer("handshake"),
                       E.DialbackVerdict(REMOTE, LOCAL, True),
                       A.SendBytes(b"</stream:stream>"), A.CloseConnection()]


def test_outbound_stanza_on_unidirectional_stream_is_refused():
    """ejabberd must not send stanzas on our outgoing stream: unsupported-stanza-type."""
    s = backend("never")
    s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN))
    s.handle(E.DataReceived(f"<db:result from='{LOCAL}' to='{REMOTE}' type='valid'/>".encode()))
    actions = merge(s.handle(E.DataReceived(b"<message from='a@local.example' "
                                            b"to='b@remote.example'/>")))
    assert actions[-1].condition == "unsupported-stanza-type"


# -- toward a remote server: EXTERNAL, dialback fallback, bidi, certificate policy ------

from s2sproxy.core.inbound import TrustPolicy  # noqa: E402
from tests.unit.helpers import certificate  # noqa: E402

REMOTE_HEADER = PEER_HEADER.replace(b"from='local.example'", b"from='remote.example'")
REMOTE_HEADER2 = REMOTE_HEADER.replace(b"ej1", b"ej2")
REMOTE_HEADER3 = REMOTE_HEADER.replace(b"ej1", b"ej3")
# What Prosody 0.12 offers an authenticated-by-certificate peer after TLS.
PROSODY_FEATURES = (b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                    b"<mechanism>EXTERNAL</mechanism></mechanisms>"
                    b"<bidi xmlns='urn:xmpp:features:bidi'/>"
                    b"<dialback xmlns='urn:xmpp:features:dialback'><errors/></dialback>"
                    b"</stream:features>")
OUR_REMOTE_HEADER = (b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
                     b"xmlns:stream='http://etherx.jabber.org/streams' "
                     b"xmlns:db='jabber:server:dialback' from='local.example' "
                     b"to='remote.example' version='1.0' xml:lang='en'>")


def to_remote(trust=None, direct_tls=False):
    return OutboundStream(OutboundConfig(
        Mode.ORIGINATE, LOCAL, REMOTE, KEYS, 20000, 16, tls="required", timeout=5,
        request_bidi=True, sasl_external=True, trust=trust or TrustPolicy(),
        direct_tls=direct_tls))


def secured(s, tls_event):
    """Drive ``s`` through STARTTLS; return the actions of the TLS event."""
    s.start()
    s.handle(E.DataReceived(REMOTE_HEADER + FEATURES_TLS))
    s.handle(E.DataReceived(f"<proceed xmlns='{NS_TLS}'/>".encode()))
    return s.handle(tls_event)


def test_outbound_remote_requests_bidi_then_sasl_external():
    """Toward a remote: bidi is requested when offered, then SASL EXTERNAL with our
    domain as authzid; success restarts the stream and the next features make it ready."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    s = to_remote()
    assert secured(s, E.TlsEstablished(True, leaf)) == [A.SendBytes(OUR_REMOTE_HEADER)]
    assert s.peer_verified
    actions = merge(s.handle(E.DataReceived(REMOTE_HEADER2 + PROSODY_FEATURES)))
    # XEP-0478 section 3: our limits for what comes back on it, inside the request
    assert actions == [A.SendBytes(b"<bidi xmlns='urn:xmpp:bidi'><limits xmlns='urn:xmpp:"
                                   b"stream-limits:0'><max-bytes>20000</max-bytes></limits>"
                                   b"</bidi>"), A.BidiNegotiated(),
                       A.SendBytes(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                                   b"mechanism='EXTERNAL'>bG9jYWwuZXhhbXBsZQ==</auth>")]
    actions = merge(s.handle(E.DataReceived(
        b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")))
    assert actions == [A.SendBytes(OUR_REMOTE_HEADER)]
    actions = merge(s.handle(E.DataReceived(REMOTE_HEADER3 + b"<stream:features/>")))
    assert actions == [A.CancelTimer("handshake"), A.StreamReady()]
    assert (s.auth_method, s.bidi) == ("external", True)


def test_outbound_remote_bidi_in_the_request_namespace_is_not_requested():
    """ejabberd 24.12 (Debian) offers <bidi xmlns='urn:xmpp:bidi'/> as its feature: that
    is the request's namespace, not an XEP-0288 offer.  Nothing is requested, the stream
    goes on with SASL EXTERNAL as if bidi were not offered, and the misnaming is noted."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    s = to_remote()
    secured(s, E.TlsEstablished(True, leaf))
    features = PROSODY_FEATURES.replace(b"<bidi xmlns='urn:xmpp:features:bidi'/>",
                                        b"<bidi xmlns='urn:xmpp:bidi'/>")
    actions = merge(s.handle(E.DataReceived(REMOTE_HEADER2 + features)))
    assert actions == [A.SendBytes(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                                   b"mechanism='EXTERNAL'>bG9jYWwuZXhhbXBsZQ==</auth>")]
    assert (s.bidi, s.peer_bidi_misnamed) == (False, True)
    s.handle(E.DataReceived(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    actions = merge(s.handle(E.DataReceived(REMOTE_HEADER3 + b"<stream:features/>")))
    assert actions == [A.CancelTimer("handshake"), A.StreamReady()]


def test_outbound_remote_external_failure_falls_back_to_dialback():
    """When the remote refuses EXTERNAL, dialback is used on the same stream."""
    s = to_remote()
    secured(s, E.TlsEstablished(False, None))
    s.handle(E.DataReceived(REMOTE_HEADER2 + PROSODY_FEATURES))
    actions = merge(s.handle(E.DataReceived(
        b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>")))
    key = KEYS.key(REMOTE, LOCAL, "ej2")
    assert actions == [A.SendBytes(f"<db:result from='{LOCAL}' to='{REMOTE}'>{key}"
                                   f"</db:result>".encode())]
    actions = merge(s.handle(E.DataReceived(
        f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>".encode())))
    assert actions == [A.CancelTimer("handshake"), A.StreamReady()]
    assert s.auth_method == "dialback"


def test_outbound_remote_untrusted_certificate_refused_for_secure_domain():
    """A remote that must have a valid certificate and has none fails the stream."""
    s = to_remote(trust=TrustPolicy(secure_domains=frozenset({REMOTE})))
    actions = merge(secured(s, E.TlsEstablished(False, None)))
    assert actions[0] == A.StreamFailed("remote-server-not-found",
                                        f"certificate not valid for {REMOTE}")
    assert actions[-1].condition == "policy-violation"


def test_outbound_remote_stanzas_on_bidi_stream_are_delivered():
    """On our bidi stream the remote's stanzas to our domain are delivered; one from
    another domain is invalid-from."""
    s = to_remote()
    secured(s, E.TlsEstablished(False, None))
    s.handle(E.DataReceived(REMOTE_HEADER2 + PROSODY_FEATURES))
    s.handle(E.DataReceived(b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    s.handle(E.DataReceived(f"<db:result from='{REMOTE}' to='{LOCAL}' type='valid'/>"
                            .encode()))
    msg = b"<message from='juliet@remote.example' to='romeo@local.example'/>"
    assert merge(s.handle(E.DataReceived(msg))) == [("deliver", [msg])]
    actions = merge(s.handle(E.DataReceived(
        b"<message from='x@evil.example' to='romeo@local.example'/>")))
    assert actions[-1].condition == "invalid-from"


def test_outbound_direct_tls_sends_header_after_handshake():
    """With Direct TLS nothing is sent before the handshake; then our header."""
    s = to_remote(direct_tls=True)
    assert s.start() == [A.SetTimer("handshake", 5)]
    assert s.handle(E.TlsEstablished(False, None)) == [A.SendBytes(OUR_REMOTE_HEADER)]


def test_outbound_clean_close_waits_for_peer():
    """Our close sends </stream:stream> and waits for the peer's before closing."""
    s = backend("never")
    s.start()
    s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN))
    s.handle(E.DataReceived(f"<db:result from='{LOCAL}' to='{REMOTE}' type='valid'/>"
                            .encode()))
    assert s.close(wait=7) == [A.SendBytes(b"</stream:stream>"), A.SetTimer("close", 7)]
    assert s.close() == []
    assert merge(s.handle(E.DataReceived(b"</stream:stream>"))) == [
        A.CancelTimer("close"), A.CloseConnection()]


def test_outbound_clean_close_gives_up_after_timer():
    """A peer that never answers our </stream:stream> is disconnected by the timer."""
    s = backend("never")
    s.start()
    s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN))
    s.close()
    assert s.handle(E.TimerFired("close")) == [A.CloseConnection()]
    assert s.state is OutboundState.CLOSED


# -- dialback verification obeys the trust settings (issue 7, defect 14) ----------------

import pytest  # noqa: E402


def verify_stream(trust):
    return OutboundStream(OutboundConfig(Mode.VERIFY, LOCAL, REMOTE, None, 20000, 16,
                                         verify_stream_id="in-1", verify_key="abc",
                                         trust=trust))


SECURE = [TrustPolicy(secure_domains=frozenset({REMOTE})),
          TrustPolicy(require_valid_certificates=True)]
VERIFY_REQUEST = A.SendBytes(b"<db:verify from='local.example' to='remote.example' "
                             b"id='in-1'>abc</db:verify>")


@pytest.mark.parametrize("trust", SECURE)
def test_outbound_verify_toward_secure_domain_without_starttls_is_an_error(trust):
    """An authoritative server that must prove its domain with a certificate and offers
    no STARTTLS is never asked: the verdict is an error, not a key check."""
    s = verify_stream(trust)
    s.start()
    actions = merge(s.handle(E.DataReceived(REMOTE_HEADER + FEATURES_PLAIN)))
    assert actions == [E.DialbackVerdict(REMOTE, LOCAL, None, "remote-server-not-found"),
                       A.SendBytes(b"</stream:stream>"), A.CloseConnection()]


@pytest.mark.parametrize("trust", SECURE)
def test_outbound_verify_toward_secure_domain_with_invalid_certificate_is_an_error(trust):
    """After TLS, a certificate not valid for the domain ends the verification with an
    error verdict and a policy-violation stream error; no db:verify is sent."""
    _ca, _ck, leaf, _k = certificate("other.example")
    s = verify_stream(trust)
    actions = merge(secured(s, E.TlsEstablished(True, leaf)))
    assert actions[0] == E.DialbackVerdict(REMOTE, LOCAL, None, "remote-server-not-found")
    assert actions[-1].condition == "policy-violation"
    assert VERIFY_REQUEST not in actions


def test_outbound_verify_toward_secure_domain_with_valid_certificate_asks():
    """With a certificate valid for the domain, db:verify is sent over TLS."""
    _ca, _ck, leaf, _k = certificate(REMOTE)
    s = verify_stream(SECURE[0])
    assert secured(s, E.TlsEstablished(True, leaf)) == [A.SendBytes(OUR_REMOTE_HEADER)]
    assert merge(s.handle(E.DataReceived(REMOTE_HEADER2 + FEATURES_PLAIN))) == \
        [VERIFY_REQUEST]


def test_outbound_verify_toward_other_domain_without_tls_still_asks():
    """A domain allowed to use dialback alone is asked over a plain stream if the
    authoritative server offers no TLS, as before."""
    s = verify_stream(TrustPolicy())
    s.start()
    assert merge(s.handle(E.DataReceived(REMOTE_HEADER + FEATURES_PLAIN))) == \
        [VERIFY_REQUEST]


def test_outbound_dialback_refused_by_remote_is_marked_final():
    """type='invalid' on our db:result is the remote's verdict (refused_by_peer, which
    core.connect does not retry elsewhere); a stream error is not."""
    s = backend("never")
    s.handle(E.DataReceived(PEER_HEADER + FEATURES_PLAIN))
    s.handle(E.DataReceived(f"<db:result from='{LOCAL}' to='{REMOTE}' type='invalid'/>"
                            .encode()))
    assert s.refused_by_peer
    s = backend("never")
    s.handle(E.DataReceived(PEER_HEADER + b"<stream:error><host-unknown xmlns='urn:ietf:"
                            b"params:xml:ns:xmpp-streams'/></stream:error>"))
    assert not s.refused_by_peer
