"""The compiled framer (``_framer.c``) against the Python one, its reference.

The whole unit suite runs with the compiled framer (the default when it is built) and
again with ``S2SPROXY_PURE_PYTHON=1`` (scripts/test); here both run side by side on
the same bytes: hypothesis builds stream bodies from valid and hostile pieces, splits
them anywhere, and both framers must give the same items.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from s2sproxy.core import xmlstream
from s2sproxy.core.xmlstream import (Element, ParseError, StreamClosed, StreamOpened,
                                     XmlStreamParser)
from tests.unit.helpers import FRAMERS
from tests.unit.test_xmlstream import HEADER

compiled_only = pytest.mark.skipif(xmlstream._framer is None,
                                   reason="S2SPROXY_PURE_PYTHON: the Python framer alone")


def test_compiled_framer_is_built():
    """scripts/setup builds it (a C compiler and Python's headers are installed): a
    test run without it would test the fallback alone and say nothing about it."""
    if os.environ.get("S2SPROXY_PURE_PYTHON"):
        assert xmlstream._framer is None and not xmlstream.COMPILED
    else:
        assert xmlstream._framer is not None and xmlstream.COMPILED


def test_pure_python_framer_has_no_compiled_body():
    p = XmlStreamParser(10000, 10, compiled=False)
    assert [type(i) for i in p.feed(HEADER + b"<message/>")] == [StreamOpened, Element]
    assert p._body is None


@compiled_only
def test_compiled_framer_takes_the_body_after_the_header():
    p = XmlStreamParser(10000, 10, compiled=True)
    items = p.feed(HEADER[:20])
    items += p.feed(HEADER[20:] + b"<message to='a' from='b'><body>x</body></message>  ")
    assert [type(i) for i in items] == [StreamOpened, Element]
    assert p._body is not None and p._p is None
    el = items[1]
    assert (el.name, el.attrs, el.child_ns, el.children) == (
        "jabber:server message", {"to": "a", "from": "b"}, "jabber:server", 1)
    assert el.end == len(HEADER) + len(el.raw)
    assert p.leftover(el.end) == b"  "


@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_empty_stream_element(compiled):
    """``<stream:stream .../>`` opens and closes the stream; what follows is junk (the
    compiled framer once took the body over and read on as if the stream were open)."""
    header = HEADER[:-1] + b"/>"
    items = XmlStreamParser(10000, 10, compiled=compiled).feed(header + b"<message to='a'/>")
    assert [type(i) for i in items] == [StreamOpened, StreamClosed, ParseError]
    assert items[-1].condition == "not-well-formed"


@pytest.mark.parametrize("compiled", FRAMERS)
@pytest.mark.parametrize("split", [False, True])
def test_framer_restricted_xml_after_the_stream(compiled, split):
    """After ``</stream:stream>`` a comment or a processing instruction is restricted
    XML at once, however long it goes on (expat is never left holding it)."""
    for tail, text in [(b"<!--", "comment"), (b"<?pi", "processing instruction")]:
        p = XmlStreamParser(10000, 10, compiled=compiled)
        items = p.feed(HEADER + b"</stream:stream> " + (tail[:2] if split else tail))
        if split and not isinstance(items[-1], ParseError):
            items += p.feed(tail[2:])
        for _ in range(100):
            if items and isinstance(items[-1], ParseError):
                break
            items += p.feed(b"x" * 1000)
        assert [type(i) for i in items] == [StreamOpened, StreamClosed, ParseError]
        assert (items[-1].condition, items[-1].text) == ("restricted-xml", text)


@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_header_bounds(compiled):
    """A stream header may declare at most MAX_HEADER_NAMESPACES namespaces (each
    declared prefix is looked for in every stanza) and take MAX_HEADER_SIZE bytes, also
    when it arrives in one read."""
    from s2sproxy.core.limits import MAX_HEADER_NAMESPACES, MAX_HEADER_SIZE
    def header(n: int) -> bytes:     # HEADER declares 4 namespaces; n in all
        return HEADER[:-1] + b"".join(b" xmlns:p%d='urn:p'" % i for i in range(n - 4)) + b">"
    ok = XmlStreamParser(10000, 10, compiled=compiled).feed(header(MAX_HEADER_NAMESPACES))
    assert isinstance(ok[0], StreamOpened) and len(ok[0].namespaces) == MAX_HEADER_NAMESPACES
    many = header(MAX_HEADER_NAMESPACES + 1)
    items = XmlStreamParser(10000, 10, compiled=compiled).feed(many)
    assert [type(i) for i in items] == [ParseError]
    assert items[0].condition == "policy-violation" and "namespace" in items[0].text
    big = HEADER[:-1] + b" a='" + b"x" * MAX_HEADER_SIZE + b"'>"
    items = XmlStreamParser(10000, 10, compiled=compiled).feed(big)
    assert [type(i) for i in items] == [ParseError]
    assert items[0].condition == "policy-violation" and "header" in items[0].text


# -- differential ---------------------------------------------------------------------

PIECES = [
    b"<message from='a@x' to='b@y' type='chat' id='1'><body>hi &amp; &#65;</body></message>",
    b"<presence from='a@x/r' to='b@y'><c xmlns='http://jabber.org/protocol/caps'/></presence>",
    b"<iq type='get' id='p' from='x' to='y'><ping xmlns='urn:xmpp:ping'/></iq>",
    b"<db:result from='x' to='y'>abc</db:result>",
    b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>",
    b"<message b='>>' c=\"'>'\"/>",
    b"<message xml:lang='de'><body><![CDATA[<b>]]></b>]]></body></message>",
    b"<x:y xmlns:x='urn:x'><x:z/></x:y>",
    b"<a><b><c><d><e><f/></e></d></c></b></a>",
    b"<message>" + b"x" * 200 + b"</message>",
    b" ", b"\n", b"\r\n\t",
    b"</stream:stream>",
    # hostile or malformed
    b"text", b"&amp;", b"&bogus;", b"<!-- c -->", b"<?pi x?>", b"<!DOCTYPE x>",
    b"<![CDATA[x]]>", b"<message><!-- c --></message>", b"<message><?pi?></message>",
    b"<message>&bogus;</message>", b"<message a='<'/>", b"<message a=b/>",
    b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>",
    b"<message></presence>", b"</message>", b"<message>]]></message>", b"<>", b"< a/>",
    b"<message a='1' a='2'/>", b"<q:x/>", b"<message xmlns:q='%zz'/>", b"\xff\xfe",
    b"<message>\xc3</message>", b"<message>\x00</message>", b"<", b">", b"/>", b"'",
    b"<message", b"<message a='", b"&#0;", b"<m>&#x110000;</m>", b"<!", b"<!-", b"<!x>",
]


def items_of(compiled: bool, chunks: list[bytes], max_size: int, max_depth: int) -> list:
    p = XmlStreamParser(max_size, max_depth, compiled=compiled)
    out = []
    for c in chunks:
        out += p.feed(c)
        if out and isinstance(out[-1], ParseError):
            break
    return [normal(i) for i in out]


def normal(item):
    if isinstance(item, Element):
        return ("element", item.name, item.attrs, item.raw, item.end, item.child_ns,
                item.children)
    if isinstance(item, ParseError):
        return ("error", item.condition)
    if isinstance(item, StreamOpened):
        return ("opened", item.name, item.attrs, item.namespaces)
    assert isinstance(item, StreamClosed)
    return ("closed",)


def agree(python: list, compiled: list, conditions: bool = True) -> bool:
    """The same items; where one framer found an error in bytes the other still holds
    as an unfinished token (the Python framer hands a long token's first bytes to
    expat, the compiled one holds it whole), the other has no error yet.

    Not ``conditions``: where both found an error, its condition may differ.  Bytes
    with two faults split across reads (text, then a comment in the next read) are
    such a case: the Python framer itself reports the first fault or the second
    depending on the split, so only a whole read pins the condition down."""
    if python == compiled:
        return True
    a, b = (python, compiled) if len(python) >= len(compiled) else (compiled, python)
    if a[:-1] == b and a[-1][0] == "error":
        return True
    return (not conditions and len(a) == len(b) and a[:-1] == b[:-1]
            and a[-1][0] == b[-1][0] == "error")


HEADERS = [
    HEADER,
    b"<?xml version='1.0'?>\n" + HEADER,
    HEADER[:-1] + b"/>",
    b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns:db='jabber:server:dialback' xmlns:db2='jabber:server:dialback' to='x' >",
    b"<s:s xmlns:s='http://etherx.jabber.org/streams' xmlns='jabber:server'>",
]


def ends_in_error(compiled: bool, chunks: list[bytes], max_size: int, max_depth: int):
    """The items once more than max_size bytes of text follow: whatever the input left
    open (a tag, an element, the stream), the framer must end in an error now.  (After
    the stream's end the Python framer bounds what expat holds by MAX_HEADER_SIZE, as
    before the header: a quote there opens a literal that expat holds.)"""
    from s2sproxy.core.limits import MAX_HEADER_SIZE
    tail = b"x" * (max(max_size, MAX_HEADER_SIZE) + 1)
    return items_of(compiled, chunks + [tail, tail], max_size, max_depth)


@compiled_only
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(HEADERS), st.lists(st.sampled_from(PIECES), max_size=12),
       st.lists(st.integers(1, 2000), max_size=8), st.sampled_from([(10000, 16), (120, 3)]))
def test_compiled_framer_gives_the_python_framers_items(header, pieces, cuts, limits):
    data = header + b"".join(pieces)
    points = sorted({c for c in cuts if c < len(data)})
    chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    whole_python = items_of(False, [data], *limits)
    whole_compiled = items_of(True, [data], *limits)
    assert agree(whole_python, whole_compiled), (whole_python, whole_compiled)
    python = items_of(False, chunks, *limits)
    compiled = items_of(True, chunks, *limits)
    assert agree(python, compiled, conditions=False), (python, compiled)
    assert agree(whole_compiled, compiled, conditions=False), (whole_compiled, compiled)
    # nothing is held for ever: with enough bytes after it, both framers end in an error
    # (the conditions may differ: one reports a malformed token, the other its size)
    python_end = ends_in_error(False, chunks, *limits)
    compiled_end = ends_in_error(True, chunks, *limits)
    assert python_end[-1][0] == compiled_end[-1][0] == "error", (python_end, compiled_end)
    assert python_end[:-1] == compiled_end[:-1], (python_end, compiled_end)


@compiled_only
@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 300))
def test_compiled_framer_on_arbitrary_bytes(body, cut):
    data = HEADER + body
    chunks = [data[:len(HEADER) + cut], data[len(HEADER) + cut:]]
    assert agree(items_of(False, [data], 10000, 16), items_of(True, [data], 10000, 16))
    assert agree(items_of(False, chunks, 10000, 16), items_of(True, chunks, 10000, 16),
                 conditions=False)


@compiled_only
def test_compiled_framer_releases_and_resumes():
    p = XmlStreamParser(10000, 10, compiled=True)
    p.feed(HEADER + b"<message/> ")
    assert p.release()
    items = p.feed(b"<db:result from='a' to='b'>k</db:result>")
    assert [normal(i)[:4] for i in items] == [
        ("element", "jabber:server:dialback result", {"from": "a", "to": "b"},
         b"<db:result xmlns:db='jabber:server:dialback' from='a' to='b'>k</db:result>")]
    p.feed(b"<message>")
    assert not p.release()
