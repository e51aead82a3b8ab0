"""Namespace names that expat accepts and lxml (libxml2) refuses (issue 7, defect 6).

libxml2 refuses a namespace name that is not an RFC 3986 URI (``%zz``, ``>``, ``\\``,
``{``, ``|``, an escaped ``<``, any non-ASCII character); expat, like the parsers of
Prosody and ejabberd, accepts them.  Wherever s2sproxy reads peer bytes with lxml,
that refusal is the peer's error: a stream error, never an exception out of
``handle()``.  Stanzas only forwarded are never read with lxml and pass unchanged.
"""

from __future__ import annotations

import pytest

from s2sproxy.core import actions as A
from s2sproxy.core import events as E
from s2sproxy.core.errors import RemoteProtocolError
from s2sproxy.core.inbound import InboundState
from s2sproxy.core.outbound import OutboundState
from s2sproxy.core.stanza import Stanza
from s2sproxy.core.xmlstream import Element, ParseError, StreamOpened, XmlStreamParser
from s2sproxy.policy.classify import DEFAULT_ACTIONS, Policy, PolicyConfig
from tests.unit.helpers import HEADER, LOCAL, REMOTE, inbound, merge
from tests.unit.test_inbound import DIALBACK_OK, SECURE
from tests.unit.test_outbound import (FEATURES_TLS, PEER_HEADER, backend)

BAD_URIS = [b"%zz", b">", b"\\", b"{", b"|", b"&lt;", b"\xc3\xa9"]
NS_HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
             b"streams' version='1.0'>")


def closes_with(actions, condition):
    closes = [a for a in actions if isinstance(a, A.CloseConnection)]
    assert [c.condition for c in closes] == [condition], actions
    assert b"<" + condition.encode() + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" \
        in b"".join(a.data for a in actions if isinstance(a, A.SendBytes))


@pytest.mark.parametrize("uri", BAD_URIS)
def test_element_tree_with_bad_namespace_is_remote_protocol_error(uri):
    """Element.tree() turns lxml's refusal into the peer's invalid-namespace."""
    p = XmlStreamParser(10000, 10)
    items = p.feed(NS_HEADER + b"<db:result xmlns:db='jabber:server:dialback' xmlns:q='"
                   + uri + b"' from='a' to='b'>k</db:result>")
    el = items[-1]
    assert isinstance(el, Element)
    with pytest.raises(RemoteProtocolError) as info:
        el.tree()
    assert info.value.condition == "invalid-namespace"


@pytest.mark.parametrize("uri", BAD_URIS)
def test_header_declaring_bad_namespace_is_refused_at_the_header(uri):
    """A namespace declaration on the stream header that lxml would refuse is refused
    there (every later tree() would fail on it): invalid-namespace, no StreamOpened."""
    items = XmlStreamParser(10000, 10).feed(
        NS_HEADER.replace(b"version=", b"xmlns:q='" + uri + b"' version="))
    assert len(items) == 1 and isinstance(items[0], ParseError)
    assert items[0].condition == "invalid-namespace"


def test_header_with_good_namespaces_is_opened():
    """Ordinary declarations (the dialback prefix, extra URNs) are still accepted."""
    items = XmlStreamParser(10000, 10).feed(
        NS_HEADER.replace(b"version=", b"xmlns:db='jabber:server:dialback' "
                                       b"xmlns:q='urn:x:y%41' version="))
    assert [type(i) for i in items] == [StreamOpened]


@pytest.mark.parametrize("where", ["header", "restarted header", "db:result", "db:verify",
                                   "stream error"])
def test_inbound_bad_namespace_is_invalid_namespace(where):
    """Wherever the inbound machine reads peer bytes with lxml, a namespace lxml
    refuses ends the stream with invalid-namespace."""
    bad = b" xmlns:q='%zz'"
    prelude = {"header": [], "restarted header": SECURE[:-1], "db:result": SECURE,
               "db:verify": SECURE, "stream error": SECURE}[where]
    data = {
        "header": HEADER.replace(b" version='1.0'>", bad + b" version='1.0'>"),
        "restarted header": HEADER.replace(b" version='1.0'>", bad + b" version='1.0'>"),
        "db:result": f"<db:result{bad.decode()} from='{REMOTE}' to='{LOCAL}'>k</db:result>"
                     .encode(),
        "db:verify": f"<db:verify{bad.decode()} from='{REMOTE}' to='{LOCAL}' id='x'>k"
                     f"</db:verify>".encode(),
        "stream error": b"<stream:error" + bad + b"><conflict xmlns='urn:ietf:params:xml:"
                        b"ns:xmpp-streams'/></stream:error>",
    }[where]
    s = inbound()
    for ev in prelude:
        s.handle(ev)
    actions = merge(s.handle(E.DataReceived(data)))
    closes_with(actions, "invalid-namespace")
    assert s.state is InboundState.CLOSED


@pytest.mark.parametrize("where", ["header", "features", "stream error", "db:result"])
def test_outbound_bad_namespace_is_invalid_namespace(where):
    """The same on our outgoing stream: the peer's header, features, stream error and
    dialback answer."""
    bad = b" xmlns:q='&lt;'"
    header = PEER_HEADER.replace(b" version='1.0'>", bad + b" version='1.0'>") \
        if where == "header" else PEER_HEADER
    plain = b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>" \
            b"</stream:features>"
    data = {
        "header": header + FEATURES_TLS,
        "features": header + FEATURES_TLS.replace(b"<stream:features", b"<stream:features"
                                                  + bad),
        "stream error": header + b"<stream:error" + bad + b"><conflict xmlns='urn:ietf:"
                        b"params:xml:ns:xmpp-streams'/></stream:error>",
        "db:result": header + plain + f"<db:result{bad.decode()} from='{LOCAL}' "
                     f"to='{REMOTE}' type='error'><error type='cancel'/></db:result>".encode(),
    }[where]
    s = backend("never")
    s.start()
    actions = merge(s.handle(E.DataReceived(data)))
    closes_with(actions, "invalid-namespace")
    assert A.StreamFailed("remote-server-not-found", "stream error: invalid-namespace") \
        in actions
    assert s.state is OutboundState.CLOSED


def test_inbound_forwarded_stanza_with_bad_namespace_is_delivered_unchanged():
    """A stanza that nothing reads as a tree is forwarded byte for byte."""
    msg = (b"<message from='juliet@remote.example' to='romeo@local.example'>"
           b"<x xmlns='%zz'/></message>")
    s = inbound()
    for ev in DIALBACK_OK:
        s.handle(ev)
    assert merge(s.handle(E.DataReceived(msg))) == [("deliver", [msg])]


# -- the policy reads some stanzas as trees ------------------------------------------

NS_DISCO = "http://jabber.org/protocol/disco#info"


def _stanza(kind, type_, raw, child_ns=None, frm=f"juliet@{REMOTE}/b", to=f"romeo@{LOCAL}/o",
            id_="d1"):
    return Stanza(kind, raw, frm, to, type_, id_, child_ns, frm.split("@")[1].split("/")[0],
                  to.split("@")[1].split("/")[0], 1)


def test_policy_unreadable_caps_presence_is_forwarded_without_caps():
    """A presence whose caps need the lxml fallback and cannot be read announces
    nothing, and is forwarded."""
    p = Policy(PolicyConfig(actions=dict(DEFAULT_ACTIONS)), frozenset({LOCAL}))
    raw = (b"<presence><caps:c xmlns:caps='http://jabber.org/protocol/caps' xmlns:q='%zz' "
           b"hash='sha-1' node='n' ver='v'/></presence>")
    assert p.check(_stanza("presence", None, raw), 0) is None
    assert p.announced.algo("n#v") is None


def test_policy_unreadable_disco_get_is_forwarded_and_tracked_without_node():
    """A disco#info request that cannot be read is relayed (its answer is expected),
    but no caps node is taken from it, so nothing is answered from the cache."""
    p = Policy(PolicyConfig(actions=dict(DEFAULT_ACTIONS), caps_cache=True),
               frozenset({LOCAL}))
    raw = (f"<iq type='get' id='d1'><query xmlns='{NS_DISCO}' xmlns:q='%zz' "
           f"node='n#v'/></iq>").encode()
    assert p.check(_stanza("iq", "get", raw, NS_DISCO), 0) is None
    assert len(p.iqs) == 1


def test_policy_unreadable_caps_result_is_unverified():
    """A disco#info result for an announced caps node that cannot be read cannot be
    verified: flagged caps-hash-mismatch (forwarded by default) and never cached."""
    p = Policy(PolicyConfig(actions=dict(DEFAULT_ACTIONS), caps_cache=True),
               frozenset({LOCAL}))
    presence = (b"<presence><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' "
                b"node='n' ver='v'/></presence>")
    assert p.check(_stanza("presence", None, presence), 0) is None
    get = (f"<iq type='get' id='d1'><query xmlns='{NS_DISCO}' node='n#v'/></iq>").encode()
    assert p.check(_stanza("iq", "get", get, NS_DISCO, frm=f"romeo@{LOCAL}/o",
                           to=f"juliet@{REMOTE}/b"), 0) is None
    result = (f"<iq type='result' id='d1'><query xmlns='{NS_DISCO}' node='n#v'>"
              f"<feature xmlns:q='%zz' var='x'/></query></iq>").encode()
    out = p.check(_stanza("iq", "result", result, NS_DISCO), 1)
    assert (out.forward, out.unexpected.reason) == (True, "caps-hash-mismatch")
    assert p.cache.get("n#v") is None
