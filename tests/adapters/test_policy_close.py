"""A policy ``close`` ends the stream at once: nothing after the offending stanza in the
same read reaches ejabberd, and the stream error is a stream condition."""

from __future__ import annotations

from tests.adapters.helpers import LOCAL, REMOTE, message, proxy, public_stream


def test_policy_close_stops_the_rest_of_the_read(tmp_path):
    """unknown-type = "close": the stanza before the offending one is forwarded, the
    offending one and the one after it in the same read are not."""
    p, reactor = proxy(tmp_path, policy={"actions": {"unknown-type": "close"}})
    proto, transport = public_stream(p, reactor)
    proto.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "m1")
                       + message(f"a@{REMOTE}", f"b@{LOCAL}", "m2", type_="shout")
                       + message(f"a@{REMOTE}", f"b@{LOCAL}", "m3"))
    link = p.to_backend.links[(REMOTE, LOCAL)]
    assert [s.id for s, _ in link.queue] == ["m1"]
    assert proto.closing
    assert transport.value().startswith(
        b"<stream:error><policy-violation xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>")
    assert p.flags.count == 1


def test_policy_close_of_unsolicited_response_uses_undefined_condition(tmp_path):
    """Each reason's close uses a stream error condition of RFC 6120 section 4.9.3."""
    p, reactor = proxy(tmp_path, policy={"actions": {"unsolicited-iq-response": "close"}})
    proto, transport = public_stream(p, reactor)
    proto.dataReceived(f"<iq from='a@{REMOTE}/r' to='b@{LOCAL}/r' type='result' "
                       f"id='x'/>".encode())
    assert b"<undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" \
        in transport.value()


def test_policy_close_voids_everything_after_it_in_the_read(tmp_path):
    """A close in the middle of one read's actions: a later batch of stanzas, and a
    db:result for another domain (which would start a verification, or attach the
    closed stream as a bidi link), are not acted upon."""
    p, reactor = proxy(tmp_path, policy={"actions": {"unknown-type": "close"}})
    proto, transport = public_stream(p, reactor)
    proto.dataReceived(message(f"a@{REMOTE}", f"b@{LOCAL}", "m1")
                       + message(f"a@{REMOTE}", f"b@{LOCAL}", "m2", type_="shout")
                       + b"<db:result from='other.example' to='local.example'>k</db:result>"
                       + message(f"a@{REMOTE}", f"b@{LOCAL}", "m3"))
    link = p.to_backend.links[(REMOTE, LOCAL)]
    assert [s.id for s, _ in link.queue] == ["m1"]
    assert reactor.tcpClients == [c for c in reactor.tcpClients if c[1] == 15269]
    assert (LOCAL, "other.example") not in p.to_remote.links
