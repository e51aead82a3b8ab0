"""The framer's parse work is linear in the bytes received, for every split.

Nothing here is timed.  ``CountingExpat`` stands between the framer and its expat
parser and counts, for every ``Parse()`` call, the bytes expat must (re)scan: the
unfinished token it carried from the previous call (everything after the
``CurrentByteIndex`` that expat reports once a call returns, which is where the token
it could not finish starts) plus the new bytes.  expat re-tokenises that carried token
from its first byte on every call, so a framer that hands it every small read of a
long token does quadratic work (issue 7, defect 5).

The compiled framer (``_framer.c``) drives expat from C and hands it complete tokens
only, so its measure is simpler: ``Framer.work`` counts the bytes given to expat, each
received byte once.  Every test here runs both framers (the ``compiled`` fixture).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from s2sproxy.core.xmlstream import Element, ParseError, StreamOpened, XmlStreamParser
from tests.unit.helpers import FRAMERS
from tests.unit.test_xmlstream import BODY, HEADER

N = 16 * 1024          # long enough that a quadratic framer costs N/2 per byte here
BOUND = 4              # bytes expat may scan per byte received


class CountingExpat:
    """A transparent stand-in for a pyexpat parser that counts scanned bytes."""

    def __init__(self, parser) -> None:
        object.__setattr__(self, "_real", parser)
        object.__setattr__(self, "work", 0)
        object.__setattr__(self, "calls", 0)
        object.__setattr__(self, "_fed", 0)
        object.__setattr__(self, "_open", 0)

    def Parse(self, data, final=False):  # noqa: N802 (pyexpat's name)
        carried = self._fed - self._open
        object.__setattr__(self, "work", self.work + carried + len(data))
        object.__setattr__(self, "calls", self.calls + 1)
        object.__setattr__(self, "_fed", self._fed + len(data))
        try:
            return self._real.Parse(data, final)
        finally:
            index = self._real.CurrentByteIndex
            object.__setattr__(self, "_open", index if index >= 0 else self._fed)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __setattr__(self, name, value):
        setattr(self._real, name, value)


def counted(compiled: bool, max_size: int = 1 << 20, max_depth: int = 16) -> XmlStreamParser:
    p = XmlStreamParser(max_size, max_depth, compiled=compiled)
    p._counter = p._p = CountingExpat(p._p)
    return p


def work(p: XmlStreamParser) -> int:
    """Bytes expat scanned: the header's parser (counted), then the compiled body's."""
    return p._counter.work + (p._body.work if p._body is not None else 0)


def buffered(p: XmlStreamParser) -> int:
    return p._body.buffered if p._body is not None else len(p._buf)


def run(compiled: bool, data: bytes, size: int,
        prefix: bytes = b"") -> tuple[XmlStreamParser, list]:
    p = counted(compiled)
    items = p.feed(prefix) if prefix else []
    for i in range(0, len(data), size):
        items += p.feed(data[i:i + size])
    return p, items


# One long token of each kind that can stay open, after a complete stream header, and
# the bytes that end it.
IN_STREAM = {
    "start tag": (b"<message to='a' b='" + b"x" * N, b"'/>"),
    "'>' in attribute values": (b"<message b='" + b">" * N, b"'/>"),
    "many attributes with '>'": (b"<message" + b"".join(b" a%d='>'" % i
                                                        for i in range(N // 8)), b"/>"),
    "'>' in double quotes": (b'<message b="' + b"'>" * (N // 2), b'"/>'),
    "child start tag": (b"<message><body x='" + b"/>" * (N // 2), b"'/></message>"),
    "end tag": (b"<" + b"m" * N + b"></" + b"m" * N, b">"),
    "entity reference": (b"<message>&" + b"a" * N, b";</message>"),
    "character reference": (b"<message>&#" + b"0" * N, b"65;</message>"),
    "character data": (b"<message>" + b"x>" * (N // 2), b"</message>"),
    "CDATA section": (b"<message><![CDATA[" + b"]>" * (N // 2), b"]]></message>"),
    "comment": (b"<message><!--" + b"x>" * (N // 2), b"--></message>"),
    "processing instruction": (b"<message><?pi " + b"x>" * (N // 2), b"?></message>"),
    # between top-level elements (no element open: the tag itself is what is held)
    "end tag between stanzas": (b"</" + b"m" * N, b">"),
    "stream close with spaces": (b"</stream:stream" + b" " * N, b">"),
}
# Before the stream header (whose 8 KiB bound makes a quadratic cost "only" 4000x).
PROLOG = {
    "stream header": (b"<stream:stream xmlns='jabber:server' a='" + b">" * 8000, b"'>"),
    "XML declaration": (b"<?xml version='1.0' encoding='" + b">" * 8000, b"'?>"),
    "document type declaration": (b"<!DOCTYPE stream SYSTEM '" + b">" * 8000, b"'>"),
    "comment before the header": (b"<!--" + b">" * 8000, b"-->"),
}


@pytest.mark.parametrize("size", [1, 7, 16])
@pytest.mark.parametrize("name", sorted(IN_STREAM))
@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_long_open_token_in_small_reads_is_linear(compiled, name, size):
    """A token that stays open for many reads costs expat a bounded number of scans
    per byte, whatever the read size, while it is open and once it is closed."""
    opened, closer = IN_STREAM[name]
    for data in (opened, opened + closer):
        p, items = run(compiled, data, size, HEADER)
        assert work(p) <= BOUND * (len(HEADER) + len(data)), (work(p), len(data))


@pytest.mark.parametrize("size", [1, 7, 16])
@pytest.mark.parametrize("name", sorted(PROLOG))
@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_long_open_token_before_header_is_linear(compiled, name, size):
    """The same before and inside the stream header."""
    opened, closer = PROLOG[name]
    for data in (opened, opened + closer):
        p, items = run(compiled, data, size)
        assert work(p) <= BOUND * len(data), (work(p), len(data))


@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_comment_and_pi_refused_when_recognisable(compiled):
    """Restricted XML is refused as soon as it is recognisable (RFC 6120 section 11.1),
    not when the peer finally closes it."""
    for data, text in [(b"<message><!--", "comment"), (b"<message><?pi", "processing "
                                                                          "instruction")]:
        p, items = run(compiled, data + b"x" * 100, 1, HEADER)
        assert items[-1] == ParseError("restricted-xml", text)
    p, items = run(compiled, b"<!DOCTYPE stream", 1)
    assert items[-1] == ParseError("restricted-xml", "document type declaration")


@pytest.mark.parametrize("name", ["start tag", "'>' in attribute values", "end tag",
                                  "entity reference", "end tag between stanzas",
                                  "stream close with spaces"])
@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_limit_fires_while_token_is_held(compiled, name):
    """The stanza size limit fires as bytes arrive, even while none reach expat."""
    p = counted(compiled, max_size=4000)
    items = p.feed(HEADER)
    data = IN_STREAM[name][0]
    for i in range(0, len(data), 16):
        items += p.feed(data[i:i + 16])
        if items and isinstance(items[-1], ParseError):
            break
    assert items[-1].condition == "policy-violation"
    assert buffered(p) <= 4000 + 16 + len(b"<message>")


@pytest.mark.parametrize("size", [1, 3, 16])
@pytest.mark.parametrize("compiled", FRAMERS)
def test_framer_completing_bytes_reach_expat_in_the_same_feed(compiled, size):
    """A held token is handed to expat in the very read that completes it."""
    p = counted(compiled)
    p.feed(HEADER)
    data = (b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls' a='" + b">" * 3000 + b"'/>")
    items = []
    for i in range(0, len(data), size):
        items = p.feed(data[i:i + size])
        if i + size < len(data):
            assert items == []
    assert [type(i) for i in items] == [Element]


TRANSCRIPT = (b"<?xml version='1.0'?>" + HEADER + b"<x:y xmlns:x='urn:x'>a<![CDATA[<b>]]>"
              b"&amp;&#x41;</x:y>" + BODY)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT) - 1), max_size=60),
       st.booleans())
def test_framer_work_is_linear_for_any_split(cuts, bytewise):
    """Real stream bytes split anywhere (or byte by byte): expat scans each byte a
    bounded number of times, and the items are those of the whole read."""
    data = TRANSCRIPT
    if bytewise:
        chunks = [data[i:i + 1] for i in range(len(data))]
    else:
        points = sorted(set(cuts))
        chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
    whole = XmlStreamParser(1 << 20, 16, compiled=False).feed(data)
    for compiled in FRAMERS:
        p = counted(compiled)
        items = []
        for c in chunks:
            items += p.feed(c)
        assert work(p) <= BOUND * len(data), work(p)
        assert [(type(i), getattr(i, "raw", None)) for i in items] == \
            [(type(i), getattr(i, "raw", None)) for i in whole]
        assert isinstance(items[0], StreamOpened)
