"""Dialback keys, SRV order, bounces, and the sans-IO rule."""

from __future__ import annotations

import ast
import pathlib

import pytest

from s2sproxy.core import events as E
from s2sproxy.core.dialback import DialbackKeys, verification_route
from s2sproxy.core.srv import Target, order
from s2sproxy.core.stanza import ERROR_TYPES, Stanza, bounce


def test_dialback_key_matches_xep_0185_and_xep_0220_vectors():
    """Our derivation gives the published example keys."""
    k = DialbackKeys(b"s3cr3tf0rd14lb4ck")
    assert k.key("xmpp.example.com", "example.org", "D60000229F") == \
        "37c69b1cf07a3f67c04a5ef5902fa5114f2c76fe4a2686482ba5b89323075643"
    assert k.key("montague.example", "capulet.example", "D60000229F") == \
        "b4835385f37fe2895af6c196b59097b16862406db80559900d96bf6fa7d23df3"


def test_dialback_check_rejects_other_pair_or_id():
    """A key is bound to both domains and the stream id."""
    k = DialbackKeys(b"secret-secret-secret")
    key = k.key("a.example", "b.example", "id1")
    assert k.check("a.example", "b.example", "id1", key)
    assert not k.check("b.example", "a.example", "id1", key)
    assert not k.check("a.example", "b.example", "id2", key)
    assert not DialbackKeys(b"another-secret-xx").check("a.example", "b.example", "id1", key)


@pytest.mark.parametrize("own, backend, host, in_flight, route", [
    (True, True, "127.0.0.1", 0, "refuse"),      # our own connection: even if trusted
    (False, True, "127.0.0.1", 999, "trusted"),  # trusted backend address: no bound
    (False, False, "127.0.0.1", 0, "ask"),       # the public side is never trusted
    (False, True, "127.0.0.2", 0, "ask"),
    (False, False, "192.0.2.1", 256, "busy"),
    (False, False, "192.0.2.1", 255, "ask"),
])
def test_verification_route(own, backend, host, in_flight, route):
    """Who checks a dialback key given to us: refused, trusted, busy or asked."""
    assert verification_route(own_connection=own, backend=backend, peer_host=host,
                              trusted_addresses=("127.0.0.1",), in_flight=in_flight,
                              bound=256) == route


def test_srv_order_priority_then_weight():
    """Lower priority first; within a priority, the weighted draw decides."""
    ts = [Target("c", 1, False, 20, 0), Target("a", 1, True, 10, 10),
          Target("b", 1, False, 10, 90)]
    assert [t.host for t in order(ts, lambda lo, hi: hi)] == ["b", "a", "c"]
    assert [t.host for t in order(ts, lambda lo, hi: lo + 1)] == ["a", "b", "c"]


def test_srv_dot_target_means_no_service():
    """A lone '.' target says the service is decidedly not available (RFC 2782)."""
    assert order([Target(".", 0, False)], lambda lo, hi: lo) == []


def _stanza(kind, type_=None, id_="i1"):
    return Stanza(kind, b"", "juliet@remote.example/x", "romeo@local.example", type_, id_,
                  None)


def test_bounce_swaps_addresses_and_keeps_id():
    """A bounce answers the sender with the condition and the original id."""
    assert bounce(_stanza("message", "chat"), "remote-server-not-found") == (
        b"<message from='romeo@local.example' to='juliet@remote.example/x' type='error' "
        b"id='i1'><error type='cancel'><remote-server-not-found "
        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>")


def test_bounce_bad_request_is_type_modify():
    """RFC 6120 section 8.3.3.1: bad-request goes with the error type 'modify'."""
    assert bounce(_stanza("iq", "get"), "bad-request", "iq get needs one child") == (
        b"<iq from='romeo@local.example' to='juliet@remote.example/x' type='error' "
        b"id='i1'><error type='modify'><bad-request "
        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text "
        b"xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>iq get needs one child</text>"
        b"</error></iq>")


# RFC 6120 sections 8.3.3.1-8.3.3.22, the type each condition's text names ("the
# associated error type SHOULD be ..."; where two are named, the first).
RFC_6120_ERROR_TYPES = {
    "bad-request": "modify", "conflict": "cancel", "feature-not-implemented": "cancel",
    "forbidden": "auth", "gone": "cancel", "internal-server-error": "cancel",
    "item-not-found": "cancel", "jid-malformed": "modify", "not-acceptable": "modify",
    "not-allowed": "cancel", "not-authorized": "auth", "policy-violation": "modify",
    "recipient-unavailable": "wait", "redirect": "modify",
    "registration-required": "auth", "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait", "resource-constraint": "wait",
    "service-unavailable": "cancel", "subscription-required": "auth",
    "undefined-condition": "cancel", "unexpected-request": "wait",
}


@pytest.mark.parametrize("condition, etype", sorted(RFC_6120_ERROR_TYPES.items()))
def test_bounce_error_type_follows_rfc_6120(condition, etype):
    """Every condition RFC 6120 section 8.3.3 defines is bounced with its type."""
    assert ERROR_TYPES[condition] == etype
    assert f"<error type='{etype}'><{condition} ".encode() in bounce(
        _stanza("message", "chat"), condition)


def test_bounce_never_answers_errors_or_iq_results():
    """Never an error for an error, nor for an iq result."""
    assert bounce(_stanza("message", "error"), "remote-server-timeout") is None
    assert bounce(_stanza("iq", "result"), "remote-server-timeout") is None
    assert bounce(_stanza("iq", "get"), "remote-server-timeout").startswith(b"<iq ")


def test_core_never_imports_twisted():
    """core/ and policy/ stay sans-IO: no module there imports twisted."""
    root = pathlib.Path(__file__).resolve().parents[2] / "s2sproxy"
    for sub in ("core", "policy"):
        for path in (root / sub).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not any(n.split(".")[0] == "twisted" for n in names), path


def test_flag_subject_names_only_authenticated_peers_for_labels():
    """A flag's peer becomes a metric label only once it proved itself: a public stream
    before authentication is 'inbound' from its claimed domain, not authenticated; a
    stanza to a served domain is inbound and authenticated (it came on such a stream);
    one to a remote is authenticated only if its pair has a ready link."""
    from s2sproxy.core.subject import flag_subject
    from tests.unit.helpers import LOCAL, REMOTE, inbound
    s = inbound()
    s.handle(E.DataReceived(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
        b"streams' xmlns:db='jabber:server:dialback' to='" + LOCAL.encode()
        + b"' from='" + REMOTE.encode() + b"' version='1.0'>"))
    assert flag_subject(s, None, frozenset({LOCAL}), False, lambda p: True) == \
        ("inbound", REMOTE, False)
    to_us = Stanza("message", b"", f"a@{REMOTE}", f"b@{LOCAL}", "chat", "1", None,
                   REMOTE, LOCAL)
    assert flag_subject(None, to_us, frozenset({LOCAL}), False, lambda p: False) == \
        ("inbound", REMOTE, True)
    out = Stanza("message", b"", f"b@{LOCAL}", f"a@{REMOTE}", "chat", "1", None,
                 LOCAL, REMOTE)
    assert flag_subject(None, out, frozenset({LOCAL}), False, lambda p: False) == \
        ("outbound", REMOTE, False)
    assert flag_subject(None, out, frozenset({LOCAL}), False, lambda p: True)[2] is True
