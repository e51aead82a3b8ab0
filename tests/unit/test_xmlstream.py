"""The framer: original bytes out, restricted XML refused, limits enforced."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from tests.unit.helpers import FRAMERS
from s2sproxy.core.xmlstream import (Element, ParseError, StreamClosed, StreamOpened,
                                     XmlStreamParser)

HEADER = (b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/"
          b"streams' xmlns:db='jabber:server:dialback' xmlns:x='urn:x' version='1.0'>")
BODY = (b"<message a='x&gt;y' to='b'/> \n<db:result to='x'>k</db:result >"
        b"<iq type='get' id='1'><q xmlns='urn:q'/></iq>"
        b"<message><x:foo x:bar='1'/><b>\xc3\xa9t\xc3\xa9 /&gt;</b></message>"
        b"<presence><c xmlns='http://jabber.org/protocol/caps' ver='a/b=='/></presence>"
        b"</stream:stream>")


def parse(chunks, max_size=10000, max_depth=10):
    p = XmlStreamParser(max_size, max_depth)
    out = []
    for c in chunks:
        out += p.feed(c)
    return out


def summary(items):
    return [(type(i).__name__, i.raw if isinstance(i, Element) else None) for i in items]


def test_framer_forwards_original_bytes():
    """Each top-level element comes out as the exact bytes the peer sent."""
    items = parse([HEADER + BODY])
    assert isinstance(items[0], StreamOpened) and isinstance(items[-1], StreamClosed)
    raws = [i.raw for i in items if isinstance(i, Element)]
    assert raws[0] == b"<message a='x&gt;y' to='b'/>"
    assert raws[2] == b"<iq type='get' id='1'><q xmlns='urn:q'/></iq>"
    assert raws[4] == b"<presence><c xmlns='http://jabber.org/protocol/caps' ver='a/b=='/>" \
                      b"</presence>"


def test_framer_makes_root_prefixes_self_contained():
    """A prefix declared only on the stream header is declared on the forwarded stanza."""
    items = parse([HEADER + BODY])
    assert items[2].raw == (b"<db:result xmlns:db='jabber:server:dialback' to='x'>k"
                            b"</db:result >")
    assert items[4].raw.startswith(b"<message xmlns:x='urn:x'><x:foo")


def test_framer_facts_for_routing():
    """Name, attributes and first child namespace come from the parse, no tree built."""
    iq = parse([HEADER + BODY])[3]
    assert iq.name == "jabber:server iq"
    assert iq.attrs == {"type": "get", "id": "1"}
    assert iq.child_ns == "urn:q"
    assert iq.tree().tag == "{jabber:server}iq"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(HEADER + BODY) - 1), max_size=8))
def test_framer_same_items_for_any_split(cuts):
    """Whatever the read boundaries, the items are the same."""
    data = HEADER + BODY
    points = sorted(set(cuts))
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    assert summary(parse(chunks)) == summary(parse([data]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_framer_never_raises_on_garbage(junk):
    """Arbitrary bytes after a header yield items or a ParseError, never an exception."""
    items = parse([HEADER, junk])
    assert all(isinstance(i, (Element, StreamOpened, StreamClosed, ParseError))
               for i in items)
    errors = [i for i in items if isinstance(i, ParseError)]
    assert not errors or items[-1] is errors[0]


def test_framer_oversize_start_tag_is_policy_violation():
    """An endless start tag cannot grow the buffer past the limit."""
    items = parse([HEADER, b"<message a='" + b"x" * 2000], max_size=1000)
    assert items[-1] == ParseError("policy-violation", "stanza larger than 1000 bytes") or \
        items[-1] == ParseError("policy-violation", "tag larger than 1000 bytes")


def test_framer_whitespace_keepalives_do_not_accumulate():
    """Whitespace between stanzas is dropped, so keepalives never fill the buffer."""
    p = XmlStreamParser(100, 10)
    p.feed(HEADER)
    for _ in range(50):
        assert p.feed(b"    \n") == []
    assert p.feed(b"<message/>")[0].raw == b"<message/>"


def test_framer_other_encoding_is_unsupported_encoding():
    """XMPP is UTF-8 only (RFC 6120 section 11.6)."""
    items = parse([b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER])
    assert items[-1].condition == "unsupported-encoding"


def test_framer_unbounded_header_is_policy_violation():
    """Bytes before the stream header completes are bounded too (8 KiB)."""
    items = parse([b"<stream:stream xmlns='jabber:server' " + b"a='b' " * 3000])
    assert items[-1] == ParseError("policy-violation", "stream header larger than 8192 bytes")


def test_framer_size_limit_is_per_stanza_not_per_read():
    """Many small stanzas in one large read are not mistaken for one big stanza."""
    many = b"<message to='b'><body>hi</body></message>" * 1000
    items = parse([HEADER + many], max_size=10000)
    assert len([i for i in items if isinstance(i, Element)]) == 1000


def test_framer_prefix_declared_with_spaces_is_not_declared_twice():
    """A stanza declaring a root prefix itself (even as xmlns:db = '...') keeps its own
    declaration and gets no duplicate."""
    raw = b"<presence from='a@r' to='b@l' xmlns:db = 'urn:x:y'><db:c/></presence>"
    (el,) = [i for i in parse([HEADER + raw]) if isinstance(i, Element)]
    assert el.raw.count(b"xmlns:db") == 1
    assert el.tree()[0].tag == "{urn:x:y}c"      # well-formed, own binding kept


def test_framer_second_stream_header_is_refused_at_its_start_tag():
    """A stream header inside the stream is refused when its start tag arrives, not
    held as an element that never ends (it would swallow every later stanza)."""
    items = parse([HEADER, HEADER + b"<message/>"])
    assert [type(i).__name__ for i in items] == ["StreamOpened", "ParseError"]
    assert (items[-1].condition, items[-1].text) == ("not-well-formed",
                                                     "stream header inside the stream")


def full(items):
    """Everything an item says, for comparing two runs."""
    out = []
    for i in items:
        if isinstance(i, Element):
            out.append(("E", i.name, i.attrs, i.raw, i.end, i.child_ns, i.children))
        elif isinstance(i, ParseError):
            out.append(("P", i.condition))
        else:
            out.append((type(i).__name__,))
    return out


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(HEADER + BODY) - 1), max_size=10),
       st.binary(max_size=40), st.integers(min_value=0, max_value=len(BODY)))
def test_framer_released_parser_changes_nothing(cuts, junk, at):
    """release() after every read (dropping expat when nothing is half-parsed, issue 9
    memory) gives exactly the items of a framer that never releases: the same elements,
    bytes, offsets and errors, valid input or not."""
    data = HEADER + BODY[:at] + junk + BODY[at:]
    points = sorted(set(c for c in cuts if c < len(data)))
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    kept, released = XmlStreamParser(10000, 10), XmlStreamParser(10000, 10)
    a, b, drops = [], [], 0
    for c in chunks:
        a += kept.feed(c)
        b += released.feed(c)
        drops += released.release()
    assert full(b) == full(a)


def test_framer_release_frees_the_parser_only_between_elements():
    """Released only after the header, with no element open; a new expat afterwards
    reads on in the same namespaces (the stream's prefixes still resolve)."""
    p = XmlStreamParser(10000, 10)
    assert not p.release()                        # before the header
    p.feed(HEADER + b"<message to='a'><body>x")
    assert not p.release()                        # inside an element
    items = p.feed(b"</body></message> ")
    assert [i.raw for i in items] == [b"<message to='a'><body>x</body></message>"]
    assert p.release() and not p.holds_parser
    items = p.feed(b"<db:result to='x'>k</db:result></stream:stream>")
    assert items[0].name == "jabber:server:dialback result"
    assert items[0].raw == b"<db:result xmlns:db='jabber:server:dialback' to='x'>k" \
                           b"</db:result>"
    assert isinstance(items[1], StreamClosed)


@pytest.mark.parametrize("compiled", FRAMERS)
@pytest.mark.parametrize("split", [0, 10, 11, 12])
def test_framer_empty_element_then_its_own_end_tag(compiled, split):
    """``<message/></message>``: an empty message, then a stray end tag (a stream
    error).  The message's bytes are ``<message/>`` alone: the Python framer once took
    the stray tag into them (its own-closing-tag heuristic), so a peer could have us
    forward an end tag to ejabberd (found by test_framer_compiled's differential
    test)."""
    p = XmlStreamParser(10000, 10, compiled=compiled)
    data = b"<message/></message>"
    items = p.feed(HEADER) + p.feed(data[:split]) + p.feed(data[split:])
    assert summary(items) == [("StreamOpened", None), ("Element", b"<message/>"),
                              ("ParseError", None)]
    assert items[-1].condition == "not-well-formed"
    # the ambiguous shape that is one element
    items = XmlStreamParser(10000, 10, compiled=compiled).feed(
        HEADER + b"<message><x/></message>")
    assert summary(items)[1] == ("Element", b"<message><x/></message>")
