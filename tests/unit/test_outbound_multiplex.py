"""Sender multiplexing on our outgoing stream to a remote (XEP-0220 section
2.6.1): a further served domain asks for its own domain pair on a ready stream with a
second db:result, and only a 'valid' answer for exactly that pair makes the stream
carry it."""

from __future__ import annotations

import pytest

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.inbound import TrustPolicy
from s2sproxy.core.limits import MAX_MULTIPLEXED_PAIRS
from s2sproxy.core.outbound import Mode, OutboundConfig, OutboundState, OutboundStream
from tests.unit.helpers import KEYS, LOCAL, REMOTE, every_split, merge
from tests.unit.test_outbound import (FEATURES_TLS, NS_TLS, PEER_HEADER, REMOTE_HEADER,
                                      REMOTE_HEADER2, REMOTE_HEADER3, backend)

OTHER = "other.example"          # a second served domain
THIRD = "third.example"
FEATURES_DB = (b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'><errors/>"
               b"</dialback></stream:features>")
FEATURES_DB_BIDI = FEATURES_DB.replace(b"<dialback ", b"<bidi xmlns='urn:xmpp:features:"
                                                      b"bidi'/><dialback ")
KEY2 = KEYS.key(REMOTE, OTHER, "ej2")        # over the stream id of REMOTE_HEADER2
ASK2 = A.SendBytes(f"<db:result from='{OTHER}' to='{REMOTE}'>{KEY2}</db:result>".encode())
NOT_AUTHORIZED = (b"<error type='cancel'><not-authorized xmlns='urn:ietf:params:xml:ns:"
                  b"xmpp-stanzas'/></error>")


def result(local: str, type_: str, frm: str = REMOTE, body: bytes = b"") -> bytes:
    if body:
        return (f"<db:result from='{frm}' to='{local}' type='{type_}'>".encode() + body
                + b"</db:result>")
    return f"<db:result from='{frm}' to='{local}' type='{type_}'/>".encode()


def make(max_pairs: int = MAX_MULTIPLEXED_PAIRS) -> OutboundStream:
    return OutboundStream(OutboundConfig(
        Mode.ORIGINATE, LOCAL, REMOTE, KEYS, 20000, 16, tls="required", timeout=5,
        request_bidi=True, sasl_external=True, trust=TrustPolicy(), max_pairs=max_pairs))


def ready(bidi: bool = False, max_pairs: int = MAX_MULTIPLEXED_PAIRS,
          features: bytes | None = None) -> OutboundStream:
    """Our stream local.example -> remote.example, ready after dialback (bidi
    negotiated when ``bidi``); after TLS the remote offered dialback with errors
    (unless other ``features`` are given)."""
    s = make(max_pairs)
    s.start()
    s.handle(E.DataReceived(REMOTE_HEADER + FEATURES_TLS))
    s.handle(E.DataReceived(f"<proceed xmlns='{NS_TLS}'/>".encode()))
    s.handle(E.TlsEstablished(False, None))
    if features is None:
        features = FEATURES_DB_BIDI if bidi else FEATURES_DB
    s.handle(E.DataReceived(REMOTE_HEADER2 + features))
    assert merge(s.handle(E.DataReceived(result(LOCAL, "valid")))) == [
        A.CancelTimer("handshake"), A.StreamReady()]
    assert s.bidi is bidi
    return s


def multiplexing(bidi: bool = False) -> OutboundStream:
    """``ready()`` with other.example -> remote.example asked for."""
    s = ready(bidi)
    assert s.multiplex(OTHER)[0]
    return s


def test_outbound_multiplex_sends_db_result_for_the_second_pair_over_the_stream_id():
    """A ready stream whose peer advertised dialback takes a further sender domain: one
    db:result with the XEP-0185 key for (remote, other, this stream's id) and a timer
    for the answer, and multiplex() says it asked (True); nothing is verified yet."""
    s = ready()
    assert s.multiplex_refusal() is None
    assert s.multiplex(OTHER) == (True, [ASK2, A.SetTimer(f"pair {OTHER}", 5)])
    assert s.verified == {LOCAL}
    assert s.multiplex(OTHER) == (False, [])    # asked once; the answer will come


def test_outbound_multiplex_valid_makes_the_pair_ready():
    """type='valid' from the remote to the asking domain: the pair is ready on this
    stream (the same actions whatever the chunking)."""
    actions = every_split(multiplexing, result(OTHER, "valid"))
    assert actions == [A.CancelTimer(f"pair {OTHER}"), A.PairReady(OTHER, REMOTE)]
    s = multiplexing()
    s.handle(E.DataReceived(result(OTHER, "valid")))
    assert s.verified == {LOCAL, OTHER} and s.state is OutboundState.READY
    assert s.multiplex(OTHER) == (False, [A.PairReady(OTHER, REMOTE)])   # verified


def test_outbound_multiplex_invalid_fails_the_pair_and_retires_the_stream():
    """type='invalid': the pair fails with internal-server-error (XEP-0220 section
    2.1.1: return queued stanzas with internal-server-error) and, because the remote
    MUST close the stream after 'invalid' and the initiating server SHOULD NOT send
    further stanzas for the other pairs on it, the stream retires: nothing more is
    written on it by the router, and it takes no further pair."""
    actions = every_split(multiplexing, result(OTHER, "invalid"))
    assert actions == [
        A.CancelTimer(f"pair {OTHER}"),
        A.PairFailed(OTHER, REMOTE, "invalid", "internal-server-error",
                     "dialback refused by remote.example: invalid key"),
        A.RetireStream("remote.example refused other.example's dialback key "
                       "(the remote closes the stream after 'invalid')")]
    s = multiplexing()
    s.handle(E.DataReceived(result(OTHER, "invalid")))
    assert s.state is OutboundState.READY and s.verified == {LOCAL}
    assert s.multiplex_refusal() == "the stream is retired"


def test_outbound_multiplex_error_fails_the_pair_only():
    """type='error' is no stream error (XEP-0220 section 2.5): the pair fails with
    remote-server-timeout (the condition XEP-0220 requires for queued stanzas), the
    stream goes on carrying local.example and may take further pairs."""
    actions = every_split(multiplexing, result(OTHER, "error", body=NOT_AUTHORIZED))
    assert actions == [
        A.CancelTimer(f"pair {OTHER}"),
        A.PairFailed(OTHER, REMOTE, "error not-authorized", "remote-server-timeout",
                     "dialback error from remote.example: not-authorized")]
    s = multiplexing()
    s.handle(E.DataReceived(result(OTHER, "error", body=NOT_AUTHORIZED)))
    assert s.state is OutboundState.READY and s.verified == {LOCAL}
    assert s.multiplex_refusal() is None


def test_outbound_multiplex_no_answer_in_time_fails_the_pair_and_a_late_valid_counts():
    """Without an answer before the pair's timer, the pair fails with
    remote-server-timeout; a 'valid' that comes later is the remote's word all the
    same (from now on it may use the pair, over bidi): the pair is verified on the
    stream and reported ready again (the router uses it only if the pair still wants
    this stream); on this one-way stream it is no protocol error either."""
    s = multiplexing()
    assert s.handle(E.TimerFired(f"pair {OTHER}")) == [
        A.PairFailed(OTHER, REMOTE, "timeout", "remote-server-timeout",
                     "no dialback answer in 5 s")]
    assert s.handle(E.DataReceived(result(OTHER, "valid"))) == [A.PairReady(OTHER, REMOTE)]
    assert s.verified == {LOCAL, OTHER} and s.state is OutboundState.READY
    assert s.multiplex(OTHER) == (False, [A.PairReady(OTHER, REMOTE)])   # ready now
    assert s.handle(E.DataReceived(result(OTHER, "valid"))) == []   # told twice


RETIRE = A.RetireStream("remote.example refused other.example's dialback key (the remote "
                        "closes the stream after 'invalid')")


@pytest.mark.parametrize("bidi", [False, True])
@pytest.mark.parametrize("first", [
    E.TimerFired(f"pair {OTHER}"),                             # our timer fired
    E.DataReceived(result(OTHER, "error", body=NOT_AUTHORIZED)),   # a dialback error
])
def test_outbound_multiplex_invalid_after_the_pairs_outcome_still_retires(first, bidi):
    """'invalid' for a pair we asked for, once it no longer waits (our timer fired, or
    an 'error' came first): nothing more is reported for the pair, but the remote MUST
    close the stream after 'invalid' (section 2.2.1) and we SHOULD NOT write other
    pairs on it (section 2.1.1): the stream retires all the same, once."""
    s = multiplexing(bidi=bidi)
    s.handle(first)
    assert s.handle(E.DataReceived(result(OTHER, "invalid"))) == [RETIRE]
    assert s.retired and s.multiplex_refusal() == "the stream is retired"
    assert s.handle(E.DataReceived(result(OTHER, "invalid"))) == []


@pytest.mark.parametrize("answer", [
    result(OTHER, "valid", frm="evil.example"),        # another sender of the answer
    result(THIRD, "valid"),                            # a pair never asked for
    f"<db:result from='{REMOTE}' to='{OTHER}'>k</db:result>".encode(),   # no type
])
def test_outbound_multiplex_unsolicited_valid_on_bidi_stream_authenticates_nothing(answer):
    """XEP-0220 section 3.1 (unsolicited dialback): on a bidi stream, an answer that is
    not the remote's answer for a pair we asked for is ignored; other.example stays
    waiting, no pair becomes ready."""
    s = multiplexing(bidi=True)
    actions = s.handle(E.DataReceived(answer))
    assert not any(isinstance(a, A.PairReady) for a in actions)
    assert s.verified == {LOCAL} and s.state is OutboundState.READY
    actions = s.handle(E.DataReceived(result(OTHER, "valid")))
    assert actions[-1] == A.PairReady(OTHER, REMOTE)


def test_outbound_multiplex_unsolicited_valid_on_one_way_stream_is_refused():
    """On a one-way stream, a dialback answer for a pair never asked for is refused as
    today: unsupported-stanza-type, and nothing is authenticated."""
    s = multiplexing()
    actions = merge(s.handle(E.DataReceived(result(THIRD, "valid"))))
    assert not any(isinstance(a, A.PairReady) for a in actions)
    assert actions[-1].condition == "unsupported-stanza-type"


MSG2 = b"<message from='juliet@remote.example' to='romeo@other.example'/>"


def test_outbound_multiplex_bidi_stanzas_for_the_second_pair_only_after_valid():
    """Invariant 2: on our bidi stream the remote may send to other.example only once
    (other, remote) is verified on it; to a domain never asked for, a stanza is
    host-unknown (closing the stream by default, policy.actions)."""
    s = multiplexing(bidi=True)
    s.handle(E.DataReceived(result(OTHER, "valid")))
    assert merge(s.handle(E.DataReceived(MSG2))) == [("deliver", [MSG2])]
    to_third = MSG2.replace(b"other.example", b"third.example")
    actions = merge(s.handle(E.DataReceived(to_third)))
    assert actions[0].reason == "host-unknown" and actions[0].action == "close"
    assert actions[-1] == A.CloseConnection(
        "host-unknown", "this stream serves local.example, other.example only")


@pytest.mark.parametrize("before", [
    [],                                                         # still waiting
    [E.TimerFired(f"pair {OTHER}")],                            # no answer in time
    [E.DataReceived(result(OTHER, "error", body=NOT_AUTHORIZED))],
])
def test_outbound_multiplex_bidi_stanza_to_an_asked_unverified_domain_is_dropped(before):
    """A stanza to other.example, asked for but not verified on the stream: flagged
    host-unknown and dropped, whatever policy.actions say -- never a stream error on a
    stream that carries local.example too; local.example's stanzas go on."""
    s = multiplexing(bidi=True)
    for event in before:
        s.handle(event)
    actions = merge(s.handle(E.DataReceived(MSG2)))
    assert [(a.reason, a.action, a.detail) for a in actions] == [
        ("host-unknown", "drop",
         "other.example was asked for on this stream but is not verified")]
    to_local = MSG2.replace(b"other.example", b"local.example")
    assert merge(s.handle(E.DataReceived(to_local))) == [("deliver", [to_local])]
    assert s.state is OutboundState.READY


def test_outbound_multiplex_late_valid_then_bidi_stanza_is_delivered():
    """'valid' after our timer fired, then the remote (XEP-0288) sends to other.example
    on the bidi stream: delivered, the stream carrying local.example goes on."""
    s = multiplexing(bidi=True)
    s.handle(E.TimerFired(f"pair {OTHER}"))
    s.handle(E.DataReceived(result(OTHER, "valid")))
    assert merge(s.handle(E.DataReceived(MSG2))) == [("deliver", [MSG2])]


def test_outbound_multiplex_answer_after_our_close_is_ignored():
    """Once we closed the stream, a pair's answer makes nothing ready (the router has
    moved that pair elsewhere)."""
    s = multiplexing(bidi=True)
    s.close()
    assert s.handle(E.DataReceived(result(OTHER, "valid"))) == []


def test_outbound_multiplex_stream_lost_reports_nothing_for_waiting_pairs():
    """The stream going away is reported once, by the router's stream_closed: the
    stream itself emits nothing for pairs still waiting."""
    s = multiplexing()
    assert s.handle(E.ConnectionLost("reset")) == []


def header_without_db(header: bytes) -> bytes:
    return header.replace(b" xmlns:db='jabber:server:dialback'", b"")


def sasl_ready_without_dialback() -> OutboundStream:
    """Authenticated by SASL EXTERNAL with a peer that never declared the dialback
    namespace nor offered the dialback feature."""
    s = make()
    s.start()
    s.handle(E.DataReceived(header_without_db(REMOTE_HEADER) + FEATURES_TLS.replace(
        b"<dialback xmlns='urn:xmpp:features:dialback'/>", b"")))
    s.handle(E.DataReceived(f"<proceed xmlns='{NS_TLS}'/>".encode()))
    s.handle(E.TlsEstablished(False, None))
    s.handle(E.DataReceived(header_without_db(REMOTE_HEADER2) + b"<stream:features>"
                            b"<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
                            b"<mechanism>EXTERNAL</mechanism></mechanisms>"
                            b"</stream:features>"))
    s.handle(E.DataReceived(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"))
    s.handle(E.DataReceived(header_without_db(REMOTE_HEADER3) + b"<stream:features/>"))
    assert s.state is OutboundState.READY and s.auth_method == "external"
    return s


def not_tried(reason: str) -> tuple:
    return False, [A.PairFailed(OTHER, REMOTE, "not tried", "", reason, tried=False)]


NO_FEATURE = "the peer did not offer the dialback feature"


def test_outbound_multiplex_refused_without_the_peers_dialback():
    """A peer that advertised no dialback (no db namespace on its header, no dialback
    feature) is asked nothing: the pair is 'not tried' and no byte is sent."""
    s = sasl_ready_without_dialback()
    assert s.multiplex_refusal() == NO_FEATURE
    assert s.multiplex(OTHER) == not_tried(NO_FEATURE)


def test_outbound_multiplex_with_the_dialback_feature_without_errors():
    """The dialback feature without <errors/> is enough (Prosody 0.12 and 13 send it so):
    sender multiplexing needs no further negotiation (XEP-0220 section 2.6.1)."""
    plain = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>" \
            b"</stream:features>"
    s = ready(features=plain)
    assert s.multiplex_refusal() is None
    asked, actions = s.multiplex(OTHER)
    assert asked and any(type(a) is A.SendBytes and b"<db:result" in a.data
                         for a in actions)


def test_outbound_multiplex_refused_before_ready_after_close_and_toward_ejabberd():
    """Only our ready stream to a remote, not closing, multiplexes: not during set-up,
    not once we sent </stream:stream>, never toward ejabberd (max_pairs 1)."""
    s = make()
    s.start()
    assert s.multiplex(OTHER) == not_tried("the stream is not ready")
    s = ready()
    s.close()
    assert s.multiplex(OTHER) == not_tried("the stream is closing")
    b = backend("never")
    b.handle(E.DataReceived(PEER_HEADER + FEATURES_DB))
    b.handle(E.DataReceived(f"<db:result from='{LOCAL}' to='{REMOTE}' type='valid'/>"
                            .encode()))
    assert b.state is OutboundState.READY
    assert b.multiplex_refusal() == "multiplexing is off for this stream"


def test_outbound_multiplex_bound_counts_the_first_pair_and_waiting_ones():
    """At most max_pairs domain pairs per stream, the first and the waiting ones
    included; beyond, the pair is not tried."""
    s = ready(max_pairs=2)
    assert s.multiplex(OTHER) == (True, [ASK2, A.SetTimer(f"pair {OTHER}", 5)])
    assert s.multiplex(THIRD) == (False, [A.PairFailed(
        THIRD, REMOTE, "not tried", "", "2 domain pairs on this stream already",
        tried=False)])
    s.handle(E.DataReceived(result(OTHER, "error", body=NOT_AUTHORIZED)))
    assert s.multiplex(THIRD)[1][0].data.startswith(b"<db:result from='third.example'")


# -- the stream and the router together: what goes on the wire ------------------------

def wired(stream: OutboundStream):
    """A router toward remotes whose ops, and the stream's actions, are run as the
    shell runs them; returns (router, run, wire) with everything written in order."""
    from s2sproxy.core.routing import Multiplex, Router, Write
    r = Router(queue_limit=10, max_age=60, idle_timeout=600,
               max_pairs=MAX_MULTIPLEXED_PAIRS)
    wire: list[bytes] = []

    def actions(out) -> None:
        for a in out:
            if isinstance(a, A.SendBytes):
                wire.append(a.data)
            elif isinstance(a, A.PairReady):
                run(r.pair_ready((a.originating, a.receiving), stream, 0))
            elif isinstance(a, A.PairFailed):
                run(r.pair_failed((a.originating, a.receiving), stream, a.condition,
                                  a.text, 0, tried=a.tried))

    def run(ops) -> None:
        for op in ops:
            if isinstance(op, Write):
                assert op.handle is stream
                wire.append(op.data)
            elif isinstance(op, Multiplex):
                actions(op.handle.multiplex(op.pair[0])[1])
    run(r.stream_ready((LOCAL, REMOTE), stream, 0, shareable=stream.shareable))
    return r, run, actions, wire


def stanza(local: str, n: int):
    from s2sproxy.core.stanza import Stanza
    raw = f"<message from='a@{local}' to='b@{REMOTE}' id='{n}'/>".encode()
    return Stanza("message", raw, f"a@{local}", f"b@{REMOTE}", None, str(n), None, local,
                  REMOTE)


def test_outbound_multiplex_wire_has_a_pairs_stanzas_only_after_its_valid():
    """On the wire of one stream: the db:result for other.example, then local.example's
    stanzas as they come, and other.example's only after the remote's 'valid', in
    order, in one write."""
    s = ready()
    r, run, actions, wire = wired(s)
    run(r.send((OTHER, REMOTE), [stanza(OTHER, 1)], 1))
    run(r.send((LOCAL, REMOTE), [stanza(LOCAL, 2)], 1))
    run(r.send((OTHER, REMOTE), [stanza(OTHER, 3)], 2))
    assert wire == [ASK2.data, stanza(LOCAL, 2).raw]
    actions(s.handle(E.DataReceived(result(OTHER, "valid"))))
    assert wire == [ASK2.data, stanza(LOCAL, 2).raw,
                    stanza(OTHER, 1).raw + stanza(OTHER, 3).raw]


@pytest.mark.parametrize("answer", [
    result(OTHER, "error", body=NOT_AUTHORIZED), result(OTHER, "valid", frm="evil.example"),
    result(THIRD, "valid")])
def test_outbound_multiplex_wire_never_has_an_unverified_pairs_stanzas(answer):
    """An error, an answer from another domain or for another pair: nothing of
    other.example's is ever written on the stream (bidi, so the stray answers are
    not even a stream error)."""
    s = ready(bidi=True)
    r, run, actions, wire = wired(s)
    run(r.send((OTHER, REMOTE), [stanza(OTHER, 1)], 1))
    actions(s.handle(E.DataReceived(answer)))
    run(r.send((OTHER, REMOTE), [stanza(OTHER, 2)], 2))
    assert not any(b"a@other.example" in w for w in wire)
