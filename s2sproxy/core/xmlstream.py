"""Incremental, hardened XML stream framer.

Why expat frames and lxml builds trees (measured, see DESIGN.md "Performance"):

1. The hot path forwards a stanza's *original bytes*: 2-3x cheaper than re-serialising,
   and it sidesteps lxml's ``ns0:`` trap.  lxml's pull parser reports no byte offsets;
   stdlib expat reports ``CurrentByteIndex`` for every event, so it can cut stanzas
   out of the byte stream while still checking well-formedness fully.
2. What the router needs (from, to, type, id, the first child's namespace) comes from
   the expat events; no tree is built for an ordinary stanza.
3. Stream-level elements (features, SASL, dialback) and, later, the stanzas policy must
   read as trees are parsed again from their bytes with lxml (``Element.tree()``), under
   a synthetic root carrying the stream's namespace declarations.

Restricted XML (RFC 6120 section 11.1): a DTD, comment, processing instruction or
entity reference other than the five predefined ones is a ``restricted-xml`` stream
error.  A stanza over ``max_size`` bytes or nested over ``max_depth`` is a
``policy-violation``.  The framer never holds more than one stanza's bytes plus the
unparsed tail of the last read.

Invariant: ``feed()`` returns items in stream order; a ``ParseError`` item is always the
last one, so a caller that restarts the stream (after STARTTLS or SASL) before reaching
it can discard it together with the old parser.

Linear parse cost (issue 7, defect 5).  expat re-tokenises an unfinished token from its
first byte on every ``Parse()`` call, so a token that stays open across many small
reads (a 600 KiB start tag in 16-byte TLS records) costs quadratic CPU.  expat 2.6.0
fixed this itself (reparse deferral, CVE-2023-52425); the stdlib expat here is 2.5.0,
without it.  The framer therefore holds back the bytes of an open token until they
could complete it:

1. After each ``Parse()``, expat's ``CurrentByteIndex`` is where the token it could not
   finish starts (measured on expat 2.5: the ``<`` or ``&`` that opened it).  Character
   data and CDATA content are not held: expat reports them as they arrive (linear
   already), so at most a trailing ``]]``, CR or partial UTF-8 character stays open.
2. A start tag (the stream header too) can end only at a ``>`` outside quotes; its quote
   state is tracked incrementally with C-speed scans, so ``<a b='>>>>...`` is held.  A
   ``<`` is never legal in a tag, so it hands the bytes over at once (expat reports the
   error).  An end tag ends at ``>``; a reference at the first byte that is not a name
   character; a processing instruction before the header (the XML declaration) at
   ``?>``.  Comments, processing instructions after the header and ``<!`` before it
   (a DTD) are restricted XML (RFC 6120 section 11.1): refused as soon as they are
   recognisable, not when complete.
3. So expat sees each byte once as new and at most once more as a carried token: the
   work is linear for every split.  In the common case (16 KiB reads of complete
   stanzas) the cost is one scan of the token the last read ended in.
4. Held bytes are in the buffer: size limits count them as they arrive (as Prosody's
   util/xmppstream.lua counts bytes outstanding in expat against its stanza size
   limit), and ``leftover()`` returns them.  A malformed token may be reported only when the byte
   that would end it (or the size limit) arrives: the items of valid input are the same
   for every split, an error in a long malformed token can come later than expat alone
   would find it.
"""

from __future__ import annotations

import os
import pyexpat
import re
from dataclasses import dataclass

from lxml import etree

from s2sproxy.core.errors import RemoteProtocolError
from s2sproxy.core.limits import MAX_HEADER_NAMESPACES, MAX_HEADER_SIZE
from s2sproxy.core.serialize import escape

NS_STREAMS = "http://etherx.jabber.org/streams"
_STREAM = f"{NS_STREAMS} stream"
NS_SERVER = "jabber:server"
NS_XML = "http://www.w3.org/XML/1998/namespace"

_ERR = pyexpat.errors
_RESTRICTED_CODES = {
    pyexpat.errors.codes[_ERR.XML_ERROR_UNDEFINED_ENTITY],
    pyexpat.errors.codes[_ERR.XML_ERROR_RECURSIVE_ENTITY_REF],
    pyexpat.errors.codes[_ERR.XML_ERROR_BINARY_ENTITY_REF],
    pyexpat.errors.codes[_ERR.XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF],
    pyexpat.errors.codes[_ERR.XML_ERROR_EXTERNAL_ENTITY_HANDLING],
    pyexpat.errors.codes[_ERR.XML_ERROR_MISPLACED_XML_PI],
}
_ENCODING_CODES = {
    pyexpat.errors.codes[_ERR.XML_ERROR_UNKNOWN_ENCODING],
    pyexpat.errors.codes[_ERR.XML_ERROR_INCORRECT_ENCODING],
}
_QNAME = re.compile(rb"[^\s/>]+")
_TAG_END = re.compile(rb"""<[^'">]*(?:(?:"[^"]*"|'[^']*')[^'">]*)*>""")

# What may end an open token (see the module docstring): outside quotes in a start
# tag, runs of anything but quotes and angle brackets, or whole quoted values without
# '<' (possessive: nothing here ever backtracks).
_TAG_OUTSIDE = re.compile(rb"""(?:[^'"<>]++|'[^'<]*+'|"[^"<]*+")*+""")
_ANGLE = re.compile(rb"[<>]")
_NOT_NAME = re.compile(rb"[^A-Za-z0-9._:\-\x80-\xff]")
_LT, _GT, _AMP, _SLASH, _QMARK, _EXCL, _DASH = b"<>&/?!-"
_NO_TOKEN, _START_TAG, _END_TAG, _REFERENCE, _PI = range(5)

# lxml re-parses only bytes expat already accepted; the settings below are belt and
# braces against anything an lxml default might still resolve.
_TREE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                               huge_tree=False, remove_comments=True, remove_pis=True)


# The compiled framer (_framer.c, README.md "Design notes: the framer"): the stream body after the
# header, with the same items and checks.  Optional: without a compiler at install
# time, or with S2SPROXY_PURE_PYTHON=1, this module's Python framer does the work.
try:
    if os.environ.get("S2SPROXY_PURE_PYTHON"):
        raise ImportError("S2SPROXY_PURE_PYTHON is set")
    from s2sproxy.core import _framer
except ImportError:
    _framer = None

#: Whether XmlStreamParser uses the compiled framer by default.
COMPILED = _framer is not None
#: Which framer frames, for the start-up log line.
FRAMER = ("compiled (s2sproxy.core._framer)" if COMPILED else
          "Python, S2SPROXY_PURE_PYTHON is set (about twice the CPU per stanza)"
          if os.environ.get("S2SPROXY_PURE_PYTHON") else
          "Python, the compiled framer is not built (about twice the CPU per stanza)")


class _Abort(Exception):
    def __init__(self, condition: str, text: str) -> None:
        self.condition = condition
        self.text = text


@dataclass(slots=True)
class StreamOpened:
    """The peer's stream header: ``name`` is the Clark-ish expat name
    (``"uri local"``), ``namespaces`` maps prefix (None for the default) to URI."""
    name: str
    attrs: dict[str, str]
    namespaces: dict[str | None, str]


@dataclass(slots=True)
class StreamClosed:
    """The peer sent ``</stream:stream>``."""


@dataclass(slots=True)
class ParseError:
    condition: str
    text: str


class _ElementFields:
    __slots__ = ("name", "attrs", "raw", "end", "child_ns", "children", "_root_decls")

    def __init__(self, name: str, attrs: dict[str, str], raw: bytes, end: int,
                 child_ns: str | None, root_decls: bytes, children: int = 0) -> None:
        self.children = children
        self.name = name
        self.attrs = attrs
        self.raw = raw
        self.end = end
        self.child_ns = child_ns
        self._root_decls = root_decls


class _HandOver(Exception):
    """Raised in the header's handler: the compiled framer takes the body."""


class Element(_framer.ElementBase if _framer else _ElementFields):
    """One top-level element of the stream, with its original bytes.

    ``name`` is ``"namespace localname"``; ``attrs`` holds the attributes as expat
    names them (``"from"``, ``"uri local"`` for a prefixed one).  ``raw`` is what the
    peer sent, made self-contained if it used a namespace prefix that only the stream
    header declared.  ``end`` is the absolute index after it in the stream's bytes.
    The fields are compiled (``_framer.ElementBase``) when the compiled framer is
    there, so that it makes elements without a Python call.
    """

    __slots__ = ()

    def tree(self) -> etree._Element:
        """Parse ``raw`` with lxml under a root that declares the stream's namespaces.

        expat accepted these bytes, but libxml2 is stricter: it refuses namespace
        names that are not RFC 3986 URIs (``xmlns:q='%zz'``, ``'>'``, ``'{'``, any
        non-ASCII character).  That is the peer's error, not ours: a
        ``RemoteProtocolError`` (``invalid-namespace`` for a namespace name, else
        ``not-well-formed``) that ends the stream with one log line, as Prosody
        answers any parse error of a peer (mod_s2s.lua ``stream_callbacks.error``:
        ``not-well-formed``, one debug line)."""
        try:
            doc = etree.fromstring(b"<s " + self._root_decls + b">" + self.raw + b"</s>",
                                   _TREE_PARSER)
        except etree.XMLSyntaxError as e:
            raise RemoteProtocolError(lxml_condition(e), lxml_text(e)) from None
        return doc[0]

    def __repr__(self) -> str:
        return f"Element({self.name!r}, {self.raw[:80]!r})"


Item = StreamOpened | StreamClosed | Element | ParseError


def lxml_condition(e: etree.XMLSyntaxError) -> str:
    """The stream error for bytes expat accepted and lxml refused."""
    namespace = etree.ErrorDomains.NAMESPACE
    if any(entry.domain == namespace for entry in e.error_log):
        return "invalid-namespace"
    return "not-well-formed"


def lxml_text(e: etree.XMLSyntaxError) -> str:
    """lxml's message, bounded (it quotes the peer's bytes)."""
    text = str(e)
    return text if len(text) <= 200 else text[:200] + "..."


def _xml_attr(value: str) -> bytes:
    return escape(value).encode("utf-8")


def _self_contained(raw: bytes, root_prefixes: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """Declare on the element itself each prefix it uses that only the stream header
    declared, so its bytes stand alone on another stream.  A prefix merely mentioned
    in text gets a harmless unused declaration."""
    top = _TAG_END.match(raw)
    head = raw[:top.end()] if top else raw
    at = 1 + len(_QNAME.match(raw, 1).group())
    decls = b"".join(
        decl for prefix, decl in root_prefixes
        if prefix in raw and not re.search(rb"xmlns:" + re.escape(prefix[:-1]) + rb"\s*=",
                                           head))
    return raw[:at] + decls + raw[at:]


if _framer is not None:
    _framer.configure(Element, ParseError, StreamClosed, _self_contained)


class XmlStreamParser:
    """Feed bytes, get ``Item``s.  One instance per stream (a restart makes a new one)."""

    def __init__(self, max_size: int, max_depth: int, compiled: bool | None = None) -> None:
        self._max_size = max_size
        self.max_depth = max_depth
        if compiled and _framer is None:
            raise RuntimeError("the compiled framer is not built")
        self._compiled = COMPILED if compiled is None else compiled
        # The compiled framer, once the header is read (``_hand_over``).
        self._body: _framer.Framer | None = None
        p = self._new_expat()
        # Only the stream header's declarations are collected; _open_root unhooks this
        # so that stanzas cost no extra handler calls.
        p.StartNamespaceDeclHandler = self._ns_start
        # Before the header, every prolog token without a handler of its own comes
        # here: "<!DOCTYPE" is refused as soon as expat has read it, not when the
        # whole (possibly endless) declaration is complete.  (A StartDoctypeDeclHandler
        # would only fire at its end, and would keep this one from being called.)
        # Unhooked by _open_root.
        p.DefaultHandler = self._prolog
        self._p: pyexpat.XMLParserType | None = p
        self._pofs = 0          # absolute byte index of the parser's byte 0
        self._root_qname = b""
        self._buf = bytearray()
        self._base = 0          # absolute byte index of _buf[0]
        self._consumed = 0      # absolute index after the last complete element or header
        self._depth = 0
        self._items: list[Item] = []
        self._failed: ParseError | None = None
        # root state
        self._root_ns: dict[str | None, str] = {}
        self._root_decls = b""
        # current top-level element
        self._el_start = -1
        self._el_name = ""
        self._el_attrs: dict[str, str] = {}
        self._el_child_ns: str | None = None
        self._el_children = 0
        self._root_prefixes: tuple[tuple[bytes, bytes], ...] = ()   # (b"db:", b" xmlns:db='...'")
        self._opened = False    # the stream header was read (depth 0 is then the epilog)
        # The token expat could not finish (see the module docstring): its kind, where
        # it starts, how far it was scanned for a possible end, and the quote that
        # is open at that point (a start tag's attribute value).  All bytes before
        # ``_fed`` were handed to expat; the rest of the buffer is held back.
        self._fed = 0
        self._tok = _NO_TOKEN
        self._tok_start = 0
        self._scan = 0
        self._quote = 0

    @property
    def max_size(self) -> int:
        return self._max_size

    @max_size.setter
    def max_size(self, value: int) -> None:
        """The stanza size limit; a stream raises it once authenticated."""
        self._max_size = value
        if self._body is not None:
            self._body.max_size = value

    def _new_expat(self) -> pyexpat.XMLParserType:
        # No buffer_text: no character-data handler is set (text is taken from the raw
        # bytes), and the buffer would cost every stream 8 KiB for nothing.
        p = pyexpat.ParserCreate("UTF-8", " ")
        p.StartElementHandler = self._start
        p.EndElementHandler = self._end
        p.XmlDeclHandler = self._xml_decl
        p.EntityDeclHandler = self._restricted_entity
        p.CommentHandler = self._restricted_comment
        p.ProcessingInstructionHandler = self._restricted_pi
        return p

    def release(self) -> bool:
        """Drop the expat parser of an idle stream (about 10 KiB: its tag stack, name
        pools and buffers) when nothing is half-parsed: the header read, no element
        open, no token held back, nothing but whitespace after the last element.  The
        next ``feed()`` makes a new one, primed with a copy of the stream header, so
        its items are the same as if the parser had never gone.  True if released."""
        if self._body is not None:
            return self._body.release()
        if self._p is None:
            return True
        if not self._opened or self._depth != 1 or self._tok != _NO_TOKEN \
                or self._failed is not None or self._items:
            return False
        if not self._buf[max(0, self._consumed - self._base):].isspace() and \
                self._consumed - self._base < len(self._buf):
            return False
        self._p = None
        return True

    @property
    def holds_parser(self) -> bool:
        """Whether an expat parser is held now (``release`` drops it)."""
        if self._body is not None:
            return self._body.holds_parser
        return self._p is not None

    def _resume(self) -> None:
        """A new parser inside the root element, as the released one was."""
        p = self._new_expat()
        replay = b"<" + self._root_qname + b" " + self._root_decls + b">"
        p.StartElementHandler = None        # the replayed header is no item
        p.Parse(replay, False)
        p.StartElementHandler = self._start
        self._pofs = self._fed - len(replay)
        self._p = p

    def feed(self, data: bytes) -> list[Item]:
        if self._body is not None:
            return self._body.feed(data)
        if self._failed is not None:
            return [self._failed]
        if self._p is None:
            self._resume()
        self._trim()
        self._buf += data
        try:
            if self._tok == _NO_TOKEN:
                self._p.Parse(data, False)
                self._after_parse()
            elif self._may_end():
                self._p.Parse(bytes(self._buf[self._fed - self._base:]), False)
                self._after_parse()
        except _HandOver:
            return self._hand_over()
        except _Abort as e:
            self._fail(e.condition, e.text)
        except pyexpat.ExpatError as e:
            if e.code in _RESTRICTED_CODES:
                self._fail("restricted-xml", str(e))
            elif e.code in _ENCODING_CODES:
                self._fail("unsupported-encoding", str(e))
            else:
                self._fail("not-well-formed", str(e))
        else:
            self._check_size()
        items, self._items = self._items, []
        return items

    def leftover(self, end: int) -> bytes:
        """Bytes received after absolute index ``end`` (the end of some ``Element``)."""
        if self._body is not None:
            return self._body.leftover(end)
        return bytes(self._buf[max(0, end - self._base):])

    def _hand_over(self) -> list[Item]:
        """The header is read: the compiled framer takes the rest, primed with a copy
        of the header (as ``_resume`` primes a new expat)."""
        replay = b"<" + self._root_qname + b" " + self._root_decls + b">"
        body = self._body = _framer.Framer(replay, self._root_decls, self._root_prefixes,
                                           self.max_size, self.max_depth, self._consumed)
        rest = bytes(self._buf[self._consumed - self._base:])
        self._p = None
        self._buf = bytearray()
        items, self._items = self._items, []
        if rest:
            items += body.feed(rest)
        return items

    # -- holding back an open token (module docstring, "Linear parse cost") ----------

    def _after_parse(self) -> None:
        """Note the token expat left open, if it is one worth holding back; refuse
        restricted XML as soon as it is recognisable."""
        buf = self._buf
        base = self._base
        end = self._fed = base + len(buf)
        start = (self._p.CurrentByteIndex + self._pofs)
        if start < base or start >= end:
            self._tok = _NO_TOKEN
            return
        rel = start - base
        c = buf[rel]
        tok = _NO_TOKEN
        if c == _AMP:
            tok = _REFERENCE
            if buf.startswith(b"&#", rel):
                start += 1      # a character reference: digits follow the '#'
        elif c == _LT and rel + 1 < len(buf):
            c = buf[rel + 1]
            if c == _SLASH:
                tok = _END_TAG
            elif c == _QMARK:
                if self._depth or self._opened:
                    raise _Abort("restricted-xml", "processing instruction")
                tok = _PI       # the XML declaration (or a PI expat will refuse)
            elif c == _EXCL:
                if self._depth == 0:
                    if rel + 2 < len(buf):
                        raise _Abort("restricted-xml", "comment" if buf[rel + 2] == _DASH
                                     else "document type declaration")
                elif buf.startswith(b"<!--", rel):
                    raise _Abort("restricted-xml", "comment")
                # else "<![CDATA[" (at most 9 bytes) or an error expat reports itself
            else:
                tok = _START_TAG
        # A token of one byte ("<") or "<!", "<!-" stays unclassified: expat gets the
        # next read directly and it is looked at again then.
        self._tok = tok
        self._tok_start = start
        self._scan = start + 1
        self._quote = 0

    def _may_end(self) -> bool:
        """Whether the bytes received so far could end the open token; if not, remember
        how far they were scanned so that no byte is scanned twice."""
        buf = self._buf
        base = self._base
        tok = self._tok
        pos = self._scan - base
        if tok == _START_TAG:
            q = self._quote
            n = len(buf)
            while True:
                if q:
                    close = buf.find(q, pos)
                    if buf.find(_LT, pos, n if close < 0 else close) >= 0:
                        return True       # '<' is never legal in a tag
                    if close < 0:
                        self._quote = q
                        self._scan = base + n
                        return False
                    pos = close + 1
                    q = 0
                pos = _TAG_OUTSIDE.match(buf, pos).end()
                if pos == n:
                    self._quote = 0
                    self._scan = base + n
                    return False
                q = buf[pos]
                if q == _GT or q == _LT:
                    return True
                pos += 1                  # an attribute value with no end yet
        if tok == _END_TAG:
            found = _ANGLE.search(buf, pos) is not None
        elif tok == _REFERENCE:
            found = _NOT_NAME.search(buf, pos) is not None
        else:
            found = buf.find(b"?>", max(pos - 1, self._tok_start + 2 - base)) >= 0
        if not found:
            self._scan = base + len(buf)
        return found

    # -- buffer upkeep ---------------------------------------------------------------

    def _fail(self, condition: str, text: str) -> None:
        self._failed = ParseError(condition, text)
        self._items.append(self._failed)

    def _trim(self) -> None:
        """Drop consumed bytes.  Runs at the start of ``feed()``, never inside a
        handler, so that ``leftover()`` works for every element of the last read."""
        if self._el_start >= 0:
            keep_from = self._el_start - self._base
        else:
            # Between elements only whitespace or the start of a tag can be pending.
            keep_from = self._buf.find(b"<", max(0, self._consumed - self._base))
            if keep_from < 0:
                keep_from = len(self._buf)
        # Never drop bytes expat has not seen, nor the token it holds open.
        keep_from = min(keep_from, (self._tok_start if self._tok else self._fed)
                        - self._base)
        if keep_from > 0:
            del self._buf[:keep_from]
            self._base += keep_from
            if self._consumed < self._base:
                self._consumed = self._base      # what was dropped was whitespace

    def _check_size(self) -> None:
        if self._depth == 0:
            # Before the stream header is complete nothing is consumed: bound it.
            if len(self._buf) > MAX_HEADER_SIZE:
                self._fail("policy-violation",
                           f"stream header larger than {MAX_HEADER_SIZE} bytes")
        elif self._el_start >= 0:
            if self._base + len(self._buf) - self._el_start > self.max_size:
                self._fail("policy-violation", f"stanza larger than {self.max_size} bytes")
        elif self._depth >= 1:
            # Between elements only whitespace (keepalives) may stand.
            done = max(0, self._consumed - self._base)
            lt = self._buf.find(b"<", done)
            gap = self._buf[done:lt if lt >= 0 else len(self._buf)]
            if gap and not gap.isspace():
                self._fail("not-well-formed", "text between top-level elements")
            elif lt >= 0 and len(self._buf) - lt > self.max_size:
                self._fail("policy-violation", f"tag larger than {self.max_size} bytes")

    # -- expat handlers --------------------------------------------------------------

    def _xml_decl(self, version: str, encoding: str | None, standalone: int) -> None:
        if encoding is not None and encoding.lower().replace("_", "-") not in ("utf-8",
                                                                               "utf8"):
            raise _Abort("unsupported-encoding", f"encoding {encoding!r}; XMPP is UTF-8")

    def _prolog(self, data: str) -> None:
        if data.startswith("<!"):
            raise _Abort("restricted-xml", "document type declaration")

    def _restricted_entity(self, *args: object) -> None:
        raise _Abort("restricted-xml", "entity declaration")

    def _restricted_comment(self, data: str) -> None:
        raise _Abort("restricted-xml", "comment")

    def _restricted_pi(self, target: str, data: str) -> None:
        raise _Abort("restricted-xml", "processing instruction")

    def _ns_start(self, prefix: str | None, uri: str) -> None:
        self._root_ns[prefix] = uri

    def _start(self, name: str, attrs: dict[str, str]) -> None:
        depth = self._depth = self._depth + 1
        if depth == 2:
            if name == _STREAM:
                # A second header would open an element that never ends, holding every
                # later stanza until the size limit: refused at its start tag.
                raise _Abort("not-well-formed", "stream header inside the stream")
            self._el_start = (self._p.CurrentByteIndex + self._pofs)
            self._el_name = name
            self._el_attrs = attrs
            self._el_child_ns = None
            self._el_children = 0
            if self._el_start > self._consumed:
                gap = self._buf[self._consumed - self._base:self._el_start - self._base]
                if not gap.isspace():
                    raise _Abort("not-well-formed", "text between top-level elements")
        elif depth > 2:
            if depth == 3:
                self._el_children += 1
                if self._el_child_ns is None:
                    self._el_child_ns = name.split(" ", 1)[0]
            if depth > self.max_depth + 1:
                raise _Abort("policy-violation", f"elements nested deeper than "
                                                 f"{self.max_depth}")
        else:
            self._open_root(name, attrs)

    def _open_root(self, name: str, attrs: dict[str, str]) -> None:
        if len(self._root_ns) > MAX_HEADER_NAMESPACES:
            raise _Abort("policy-violation", f"more than {MAX_HEADER_NAMESPACES} namespace "
                                             f"declarations in the stream header")
        at = self._p.CurrentByteIndex + self._pofs - self._base
        m = _TAG_END.match(self._buf, at)
        if (self._base + m.end() if m else len(self._buf)) > MAX_HEADER_SIZE:
            # (a header spread over reads is refused in _check_size, sooner)
            raise _Abort("policy-violation",
                         f"stream header larger than {MAX_HEADER_SIZE} bytes")
        self._p.StartNamespaceDeclHandler = None
        self._p.DefaultHandler = None
        self._opened = True
        self._root_qname = _QNAME.match(self._buf, at + 1).group()
        self._root_prefixes = tuple(
            (p.encode() + b":", b" xmlns:" + p.encode() + b"='" + _xml_attr(u) + b"'")
            for p, u in self._root_ns.items() if p is not None)
        self._root_decls = b" ".join(
            (b"xmlns" if p is None else b"xmlns:" + p.encode()) + b"='" + _xml_attr(u)
            + b"'" for p, u in self._root_ns.items())
        # Every Element.tree() parses under these declarations: one that libxml2
        # refuses would make each of them fail, so the header itself is refused.
        try:
            etree.fromstring(b"<s " + self._root_decls + b"/>", _TREE_PARSER)
        except etree.XMLSyntaxError as e:
            raise _Abort("invalid-namespace", lxml_text(e)) from None
        plain = {}
        for k, v in attrs.items():
            if k.startswith(NS_XML + " "):
                plain["xml:" + k.split(" ")[1]] = v
            elif " " not in k:
                plain[k] = v
        self._items.append(StreamOpened(name, plain, dict(self._root_ns)))
        if m:
            self._consumed = self._base + m.end()
            if self._compiled and not m.group().endswith(b"/>"):
                # (an empty stream element, "<stream:stream .../>", has no body: the
                # Python framer reads its close and whatever junk follows)
                raise _HandOver

    def _end(self, name: str) -> None:
        depth = self._depth
        self._depth = depth - 1
        if depth == 2:
            idx = (self._p.CurrentByteIndex + self._pofs)
            rel = idx - self._base
            buf = self._buf
            # expat reports the end of <x/> just past "/>", and the end of <x>...</x>
            # at its "</x".  Only "<x/></y" and "<x>../></x" look alike: the element
            # is empty when its start tag is what ends at "/>".  (Its own closing tag
            # does not tell them apart: "<x/></x>" is an empty x and a stray end tag.)
            if buf[rel:rel + 2] != b"</":
                end = idx
            elif buf[rel - 2:rel] != b"/>" or not self._empty_at(rel):
                end = buf.index(b">", rel) + 1 + self._base
            else:
                end = idx
            start = self._el_start - self._base
            if end - self._el_start > self.max_size:
                raise _Abort("policy-violation", f"stanza larger than {self.max_size} bytes")
            raw = bytes(buf[start:end - self._base])
            for prefix, _decl in self._root_prefixes:
                if prefix in raw:
                    raw = _self_contained(raw, self._root_prefixes)
                    break
            self._items.append(Element(self._el_name, self._el_attrs, raw, end,
                                       self._el_child_ns, self._root_decls,
                                       self._el_children))
            self._consumed = end
            self._el_start = -1
        elif depth == 1:
            idx = self._p.CurrentByteIndex + self._pofs
            gap = self._buf[self._consumed - self._base:idx - self._base]
            if not gap.isspace() and gap:
                raise _Abort("not-well-formed", "text between top-level elements")
            self._items.append(StreamClosed())

    def _empty_at(self, rel: int) -> bool:
        """Whether the open element's own start tag ends at ``rel`` (with "/>")."""
        m = _TAG_END.match(self._buf, self._el_start - self._base)
        return m is not None and m.end() == rel
