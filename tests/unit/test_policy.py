"""The stanza policy: every reason code with its actions, ping answering, the iq
tracker (match, timeout, stream loss, bound) and XEP-0115 verification strings."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from lxml import etree

from s2sproxy.core.stanza import Stanza
from s2sproxy.policy.caps import InvalidDisco, verification_string
from s2sproxy.policy.classify import (BOUNCE, CLOSE, DEFAULT_ACTIONS, DROP, FORWARD,
                                      REASONS, Policy, PolicyConfig)
from s2sproxy.policy.iq_tracker import IqTracker

LOCAL, REMOTE = "local.example", "remote.example"


def stanza(kind="iq", type_="get", id_="q1", frm=f"juliet@{REMOTE}/balcony",
           to=f"romeo@{LOCAL}/orchard", child_ns="jabber:iq:version", children=1,
           raw=None) -> Stanza:
    raw = raw or f"<{kind} type='{type_}' id='{id_}' from='{frm}' to='{to}'/>".encode()
    return Stanza(kind, raw, frm, to, type_, id_, child_ns, frm.split("@")[-1].split("/")[0],
                  to.split("@")[-1].split("/")[0], children)


def policy(**kw) -> Policy:
    actions = dict(DEFAULT_ACTIONS)
    actions.update(kw.pop("actions", {}))
    return Policy(PolicyConfig(actions=actions, **kw), frozenset({LOCAL}))


def answer(req: Stanza, type_="result", frm=None) -> Stanza:
    return stanza("iq", type_, req.id, frm or req.to, req.from_, None, 0)


# -- normal traffic is forwarded without a flag ------------------------------------------

@pytest.mark.parametrize("s", [
    stanza("message", "chat", child_ns="jabber:client"),
    stanza("message", None),
    stanza("presence", None),
    stanza("presence", "subscribe"),
    stanza("presence", "unavailable"),
    stanza("iq", "set", child_ns="http://jabber.org/protocol/pubsub"),
])
def test_policy_normal_stanzas_are_forwarded_quietly(s):
    """Messages, presence and requests need no action: check() returns None."""
    assert policy().check(s, 0) is None


def test_policy_answer_to_relayed_request_is_expected():
    """A result that answers a relayed request is forwarded, and settles it."""
    p = policy()
    req = stanza()
    assert p.check(req, 0) is None
    assert p.check(answer(req), 1) is None
    assert len(p.iqs) == 0


# -- reason codes raised here, each with its default and the other allowed actions ----

def test_policy_unsolicited_result_is_forwarded_and_flagged_by_default():
    """An iq result matching no request: unsolicited-iq-response, forwarded (it may
    answer a request another instance relayed) and flagged."""
    out = policy().check(answer(stanza()), 0)
    assert (out.forward, out.unexpected.reason, out.unexpected.action) == \
        (True, "unsolicited-iq-response", FORWARD)


def test_policy_unsolicited_result_from_another_domain_is_not_a_match():
    """An answer must come from the requested domain."""
    p = policy()
    req = stanza()
    p.check(req, 0)
    out = p.check(answer(req, frm="mallory@evil.example"), 1)
    assert out.unexpected.reason == "unsolicited-iq-response"
    assert len(p.iqs) == 1


@pytest.mark.parametrize("children", [0, 2])
def test_policy_iq_without_exactly_one_child_is_bounced(children):
    """RFC 6120 8.2.3: a get/set carries exactly one child; default bounce bad-request."""
    out = policy().check(stanza(children=children), 0)
    assert (out.forward, out.unexpected.reason, out.unexpected.action,
            out.unexpected.condition) == (False, "iq-child-count", BOUNCE, "bad-request")


@pytest.mark.parametrize("kind, type_", [("message", "shout"), ("presence", "available"),
                                         ("iq", "query"), ("iq", None)])
def test_policy_unknown_type_is_forwarded_and_flagged(kind, type_):
    """An undefined type attribute is flagged and (by default) forwarded."""
    out = policy().check(stanza(kind, type_), 0)
    assert (out.forward, out.unexpected.reason, out.unexpected.action) == \
        (True, "unknown-type", FORWARD)


@pytest.mark.parametrize("reason, action, forward", [
    ("unknown-type", DROP, False), ("unknown-type", BOUNCE, False),
    ("iq-child-count", FORWARD, True), ("unsolicited-iq-response", DROP, False),
])
def test_policy_configured_action_is_applied(reason, action, forward):
    """The action configured for a reason replaces its default."""
    s = {"unknown-type": stanza("message", "shout"),
         "iq-child-count": stanza(children=0),
         "unsolicited-iq-response": answer(stanza())}[reason]
    out = policy(actions={reason: action}).check(s, 0)
    assert (out.forward, out.unexpected.reason, out.unexpected.action) == \
        (forward, reason, action)


def test_policy_reason_table_defaults_are_allowed_actions():
    """Every default is one of its reason's allowed actions (config validates the rest)."""
    assert all(r.default in r.allowed for r in REASONS.values())


# -- answered here ---------------------------------------------------------------------

def test_policy_ping_to_served_domain_is_answered_here():
    """An XEP-0199 ping to a served bare domain gets a result from s2sproxy and is not
    forwarded (yax.im's keepalive:<time> ids included)."""
    ping = stanza(id_="keepalive:1732000000", to=LOCAL, child_ns="urn:xmpp:ping")
    p = policy()
    out = p.check(ping, 0)
    assert out.forward is False and out.unexpected is None
    (reply,) = out.replies
    assert reply.raw == (b"<iq from='local.example' to='juliet@remote.example/balcony' "
                         b"type='result' id='keepalive:1732000000'></iq>")
    assert (reply.from_domain, reply.to_domain) == (LOCAL, REMOTE)


def test_policy_ping_forwarded_when_configured_or_not_to_domain():
    """answer_pings = false forwards domain pings; pings to users are always forwarded
    (and tracked)."""
    domain_ping = stanza(to=LOCAL, child_ns="urn:xmpp:ping")
    assert policy(answer_pings=False).check(domain_ping, 0) is None
    p = policy()
    assert p.check(stanza(child_ns="urn:xmpp:ping"), 0) is None
    assert len(p.iqs) == 1


# -- the iq tracker ----------------------------------------------------------------------

def test_iq_tracker_timeout_returns_requests_in_order():
    """Requests unanswered by their deadline come back, oldest first, once."""
    t = IqTracker(timeout=10, max_entries=100)
    t.request(stanza(id_="a"), 0)
    t.request(stanza(id_="b"), 5)
    assert t.expire(9.9) == []
    assert [p.request.id for p in t.expire(10)] == ["a"]
    assert [p.request.id for p in t.expire(20)] == ["b"]
    assert t.expire(30) == []


def test_iq_tracker_stream_loss_returns_requests_of_that_pair():
    """When the stream of a pair dies, that pair's requests come back."""
    t = IqTracker(timeout=10, max_entries=100)
    t.request(stanza(id_="a"), 0)
    t.request(stanza(id_="b", frm=f"romeo@{LOCAL}/o", to=f"juliet@{REMOTE}/b"), 0)
    assert [p.request.id for p in t.fail_pair((REMOTE, LOCAL))] == ["a"]
    assert len(t) == 1


def test_iq_tracker_is_bounded():
    """Beyond max_entries the oldest request is forgotten and counted."""
    t = IqTracker(timeout=10, max_entries=3)
    for i in range(5):
        t.request(stanza(id_=str(i)), 0)
    assert len(t) == 3 and t.evicted == 2
    assert t.response(answer(stanza(id_="0"))) is None
    assert t.response(answer(stanza(id_="4"))) is not None


def test_iq_tracker_same_id_to_several_responders_is_several_requests():
    """Prosody's PEP asks every resource of a contact for disco#info at once, all with
    id 'disco' (RFC 6120 8.1.3 lets an id be unique per stream only): each answer
    matches its own request, and one unanswered comes back on expiry."""
    t = IqTracker(timeout=10, max_entries=100)
    frm = f"juliet@{REMOTE}"
    for res in ("a", "b", "c"):
        t.request(stanza(id_="disco", frm=frm, to=f"romeo@{LOCAL}/{res}"), 0)
    assert len(t) == 3
    for res in ("b", "a"):
        got = t.response(stanza(type_="result", id_="disco", frm=f"romeo@{LOCAL}/{res}",
                                to=frm))
        assert got is not None and got.request.to == f"romeo@{LOCAL}/{res}"
    assert t.response(stanza(type_="result", id_="disco", frm=f"romeo@{LOCAL}/b",
                             to=frm)) is None          # answered already
    assert [p.request.to for p in t.expire(10)] == [f"romeo@{LOCAL}/c"]


def test_iq_tracker_the_same_request_twice_gets_two_answers():
    """Prosody 13 sent one caps query twice (two presences) before the first answer."""
    t = IqTracker(timeout=10, max_entries=100)
    req = stanza(id_="disco", frm=f"juliet@{REMOTE}", to=f"romeo@{LOCAL}/a")
    t.request(req, 0)
    t.request(req, 1)
    answer_ = stanza(type_="result", id_="disco", frm=req.to, to=req.from_)
    assert [t.response(answer_) is not None for _ in range(3)] == [True, True, False]
    assert len(t) == 0


def test_iq_tracker_answer_from_another_address_of_the_responder_matches():
    """A request to a bare JID answered from a full one of that account (or in other
    letter case) still matches; from another account it never does."""
    t = IqTracker(timeout=10, max_entries=100)
    req = stanza(id_="v1", frm=f"juliet@{REMOTE}/b", to=f"romeo@{LOCAL}")
    t.request(req, 0)
    for other in ("romeo@other.example/x", f"mercutio@{LOCAL}/x", LOCAL):
        assert t.response(stanza(type_="result", id_="v1", frm=other, to=req.from_)) is None
    got = t.response(stanza(type_="result", id_="v1", frm=f"Romeo@{LOCAL}/orchard",
                            to=req.from_))
    assert got is not None and len(t) == 0


def test_policy_expired_requests_are_returned_for_timeout_errors():
    """Policy.expired gives the requests to answer with remote-server-timeout."""
    p = policy(iq_timeout=5)
    p.check(stanza(id_="slow"), 0)
    assert [s.id for s in p.expired(5)] == ["slow"]


# -- XEP-0115 ----------------------------------------------------------------------------

SIMPLE = """<query xmlns='http://jabber.org/protocol/disco#info'
  node='http://code.google.com/p/exodus#QgayPKawpkPSDYmwT/WM94uAlu0='>
  <identity category='client' name='Exodus 0.9.1' type='pc'/>
  <feature var='http://jabber.org/protocol/caps'/>
  <feature var='http://jabber.org/protocol/disco#info'/>
  <feature var='http://jabber.org/protocol/disco#items'/>
  <feature var='http://jabber.org/protocol/muc'/>
</query>"""

COMPLEX = """<query xmlns='http://jabber.org/protocol/disco#info'
  node='http://psi-im.org#q07IKJEyjvHSyhy//CH0CxmKi8w='>
  <identity xml:lang='en' category='client' name='Psi 0.11' type='pc'/>
  <identity xml:lang='el' category='client' name='\u03a8 0.11' type='pc'/>
  <feature var='http://jabber.org/protocol/caps'/>
  <feature var='http://jabber.org/protocol/disco#info'/>
  <feature var='http://jabber.org/protocol/disco#items'/>
  <feature var='http://jabber.org/protocol/muc'/>
  <x xmlns='jabber:x:data' type='result'>
    <field var='FORM_TYPE' type='hidden'><value>urn:xmpp:dataforms:softwareinfo</value></field>
    <field var='ip_version' type='text-multi'><value>ipv4</value><value>ipv6</value></field>
    <field var='os'><value>Mac</value></field>
    <field var='os_version'><value>10.5.1</value></field>
    <field var='software'><value>Psi</value></field>
    <field var='software_version'><value>0.11</value></field>
  </x>
</query>"""


def test_caps_verification_string_xep_0115_examples():
    """Sections 5.2 and 5.3 of XEP-0115 give these verification strings."""
    assert verification_string(etree.fromstring(SIMPLE)) == "QgayPKawpkPSDYmwT/WM94uAlu0="
    assert verification_string(etree.fromstring(COMPLEX.encode())) == \
        "q07IKJEyjvHSyhy//CH0CxmKi8w="


def test_caps_duplicate_feature_is_invalid():
    """Section 5.4: duplicate identities or features make the result invalid."""
    dup = SIMPLE.replace("</query>", "<feature var='http://jabber.org/protocol/muc'/></query>")
    with pytest.raises(InvalidDisco):
        verification_string(etree.fromstring(dup))


def _caps_exchange(p: Policy, query: str, ver: str):
    node = "http://code.google.com/p/exodus"
    presence = stanza("presence", None, raw=(
        f"<presence from='juliet@{REMOTE}/balcony' to='romeo@{LOCAL}'><c xmlns='http://"
        f"jabber.org/protocol/caps' hash='sha-1' node='{node}' ver='{ver}'/></presence>"
    ).encode())
    assert p.check(presence, 0) is None
    get = stanza("iq", "get", "d1", frm=f"romeo@{LOCAL}/orchard",
                 to=f"juliet@{REMOTE}/balcony", child_ns="http://jabber.org/protocol/disco#info",
                 raw=(f"<iq type='get' id='d1'><query xmlns='http://jabber.org/protocol/"
                      f"disco#info' node='{node}#{ver}'/></iq>").encode())
    assert p.check(get, 0) is None
    result = stanza("iq", "result", "d1", frm=f"juliet@{REMOTE}/balcony",
                    to=f"romeo@{LOCAL}/orchard", child_ns="http://jabber.org/protocol/disco#info",
                    raw=f"<iq type='result' id='d1'>{query}</iq>".encode())
    return p.check(result, 1)


def test_policy_caps_result_matching_announced_ver_is_expected():
    """A disco#info result whose hash is the announced ver passes quietly."""
    assert _caps_exchange(policy(), SIMPLE, "QgayPKawpkPSDYmwT/WM94uAlu0=") is None


def test_policy_caps_result_not_matching_announced_ver_is_flagged():
    """A result whose hash differs from the announced ver: caps-hash-mismatch."""
    out = _caps_exchange(policy(), SIMPLE, "AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
    assert (out.forward, out.unexpected.reason) == (True, "caps-hash-mismatch")


def test_policy_caps_cache_answers_verified_node():
    """With caps_cache on, a later disco#info for a verified node#ver is answered here."""
    p = policy(caps_cache=True)
    ver = "QgayPKawpkPSDYmwT/WM94uAlu0="
    assert _caps_exchange(p, SIMPLE, ver) is None
    again = stanza("iq", "get", "d2", frm=f"romeo@{LOCAL}/other",
                   to=f"juliet@{REMOTE}/balcony", child_ns="http://jabber.org/protocol/disco#info",
                   raw=(f"<iq type='get' id='d2'><query xmlns='http://jabber.org/protocol/"
                        f"disco#info' node='http://code.google.com/p/exodus#{ver}'/></iq>")
                   .encode())
    out = p.check(again, 2)
    assert out.forward is False and len(out.replies) == 1
    reply = out.replies[0].raw
    assert reply.startswith(b"<iq from='juliet@remote.example/balcony' "
                            b"to='romeo@local.example/other' type='result' id='d2'><query")
    assert b"Exodus 0.9.1" in reply


@pytest.mark.parametrize("c", [
    b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n&amp;x' ver='v/1='/>",
    b'<c node="n&amp;x" ver="v/1=" hash="SHA-1" xmlns="http://jabber.org/protocol/caps"/>',
    b"<caps:c xmlns:caps='http://jabber.org/protocol/caps' hash='sha-1' node='n&amp;x' "
    b"ver='v/1='/>",
])
def test_caps_announced_in_presence_read_in_any_spelling(c):
    """The fast path and the lxml fallback read the same (node, ver, hash)."""
    from s2sproxy.core.stanza import stanza_tree
    from s2sproxy.policy.caps import presence_caps
    s = stanza("presence", None, raw=b"<presence from='a@r' to='b@l'><priority>1</priority>"
               + c + b"</presence>")
    assert presence_caps(s.raw, lambda: stanza_tree(s)) == ("n&x", "v/1=", "sha-1")


def test_policy_every_close_is_a_stream_error_condition():
    """A reason that may close names an RFC 6120 section 4.9.3 stream condition for it
    (bad-request is a stanza error: its close is policy-violation)."""
    from s2sproxy.core.errors import STREAM_CONDITIONS
    for name, r in REASONS.items():
        if CLOSE in r.allowed:
            u = policy(actions={name: CLOSE}).unexpected(name)
            assert u.stream_condition in STREAM_CONDITIONS, name


_CAPS_PIECES = [
    b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n1' ver='v1'/>",
    b"<c ver='v2' xmlns=\"http://jabber.org/protocol/caps\" node='n2' hash='sha-256'/>",
    b"<c xmlns='urn:other' node='x' ver='y' hash='sha-1'/>",
    b"<caps xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n3' ver='v3'/>",
    b"<status>see http://jabber.org/protocol/caps &gt; here</status>",
    b"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='a&amp;b' ver='w=='/>",
    b"<c xmlns='http://jabber.org/protocol/caps' node='legacy' ver='1.0'/>",
    b"<x xmlns='urn:x'><c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='n4'"
    b" ver='v4'></c></x>",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(_CAPS_PIECES), max_size=4))
def test_presence_caps_fast_path_reads_what_the_search_reads(pieces):
    """The lookup at the namespace's "<c" gives what a search of the whole stanza with
    the caps regular expression gives (the reading before that shortcut)."""
    from s2sproxy.policy import caps as C
    raw = b"<presence from='a@x/r' to='b@y'>" + b"".join(pieces) + b"</presence>"

    def reference(raw):
        if C._CAPS_BYTES not in raw:
            return None
        m = C._C_TAG.search(raw)
        if m is None:
            return "tree"
        return C._announced({k.decode(): C._unescape(v)
                             for k, _q, v in C._ATTR.findall(m.group(0))})

    C._TAG_CACHE.clear()
    for _ in range(2):      # the second time from the cache
        got = C.presence_caps(raw, lambda: (_ for _ in ()).throw(AssertionError("tree")))\
            if reference(raw) != "tree" else "tree"
        assert got == reference(raw)
