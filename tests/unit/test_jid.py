"""JIDs and domainparts (RFC 7622): where a JID is cut, and what a valid domain is."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from s2sproxy.core.jid import InvalidJid, dns_name, domain_of, nameprep_domain


def reference_split(jid: str) -> tuple[str | None, str, str | None]:
    """(localpart, domainpart, resourcepart) by the steps of RFC 7622 section 3.1,
    written as plainly as the RFC says them, character by character:

    1. Remove any portion from the first '/' character to the end of the string (if
       there is a '/' character present).
    2. Remove any portion from the beginning of the string to the first '@' character
       (if there is an '@' character present).
    3. What remains is the domainpart."""
    resource = None
    for i, c in enumerate(jid):
        if c == "/":
            jid, resource = jid[:i], jid[i + 1:]
            break
    local = None
    for i, c in enumerate(jid):
        if c == "@":
            local, jid = jid[:i], jid[i + 1:]
            break
    return local, jid, resource


def reference_domain(jid: str) -> str | None:
    """The canonical domainpart, or None when RFC 7622 section 3 makes the JID invalid
    (an empty or over-long localpart or resourcepart, an invalid domainpart)."""
    local, domain, resource = reference_split(jid)
    for part in (local, resource):
        if part is not None and not 1 <= len(part.encode("utf-8")) <= 1023:
            return None
    try:
        return nameprep_domain(domain)
    except InvalidJid:
        return None


_PIECES = st.sampled_from(["@", "/", ".", "a", "b", "example", "x", "é", "", "-", " "])
_JIDS = st.lists(_PIECES, max_size=12).map("".join)


@given(_JIDS)
@example("evil.example/x@victim.example")
@example("remote.example/a@b.example")
@example("a@b@c.example")
@example("a@b.example/c/d@e")
@example("@b.example")
@example("b.example/")
def test_domain_of_matches_the_rfc_7622_split(jid):
    """domain_of cuts every string where RFC 7622 section 3.1 cuts it, and refuses
    exactly the JIDs the RFC makes invalid."""
    expected = reference_domain(jid)
    if expected is None:
        with pytest.raises(InvalidJid):
            domain_of(jid)
    else:
        assert domain_of(jid) == expected


@pytest.mark.parametrize("jid, domain", [
    ("evil.example/x@victim.example", "evil.example"),
    ("remote.example/a@b.example", "remote.example"),
    ("juliet@remote.example/balcony", "remote.example"),
    ("juliet@remote.example/bal@cony/x", "remote.example"),
    ("juliet@remote.example", "remote.example"),
    ("remote.example", "remote.example"),
    ("remote.example/r", "remote.example"),
])
def test_domain_of_resource_starts_at_first_slash(jid, domain):
    """The resourcepart starts at the first '/', the localpart ends at the first '@'
    before it; an '@' or '/' inside the resourcepart is part of the resource."""
    assert domain_of(jid) == domain


@pytest.mark.parametrize("jid", [
    "@remote.example",                       # empty localpart
    "remote.example/",                       # empty resourcepart
    "juliet@remote.example/",
    "juliet@",                               # empty domainpart
    "/resource",
    "juliet@/resource",
    "",
    "a" * 1024 + "@remote.example",          # localpart over 1023 bytes
    "remote.example/" + "r" * 1024,          # resourcepart over 1023 bytes
    "remote.example/" + "é" * 512,           # 1024 bytes in UTF-8
    "a@b@remote.example",                    # '@' is not allowed in a domainpart
])
def test_domain_of_invalid_jid_raises(jid):
    """RFC 7622 section 3: empty or over-long parts make the JID invalid."""
    with pytest.raises(InvalidJid):
        domain_of(jid)


def test_domain_of_parts_of_exactly_1023_bytes_are_valid():
    """1023 bytes is the limit, not beyond it (RFC 7622 sections 3.3 and 3.4)."""
    assert domain_of("a" * 1023 + "@remote.example/" + "é" * 511 + "r") == "remote.example"


# -- domainparts: IDNA2008 with UTS #46 mapping (RFC 7622 section 3.2) -------------------

@pytest.mark.parametrize("given_, canonical", [
    ("ＥＸＡＭＰＬＥ.com", "example.com"),            # fullwidth: UTS #46 maps it
    ("EXAMPLE.com", "example.com"),
    ("example。com", "example.com"),                  # ideographic full stop
    ("example.com.", "example.com"),                  # one trailing dot stripped
    ("xn--bcher-kva.example", "bücher.example"),      # A-label to U-label
    ("XN--BCHER-KVA.example", "bücher.example"),
    ("bücher.example", "bücher.example"),
    ("BÜCHER.example", "bücher.example"),
    ("faß.example", "faß.example"),                   # non-transitional: ß kept
    ("Ⅻ.example", "xii.example"),                     # compatibility mapping
    ("127.0.0.1", "127.0.0.1"),
    ("[::1]", "[::1]"),
    ("[2001:DB8::1]", "[2001:db8::1]"),
    ("[2001:db8:0:0:0:0:0:1]", "[2001:db8::1]"),
])
def test_nameprep_domain_canonical_form(given_, canonical):
    """Every spelling of a domain has one canonical form: UTS #46 mapped, IDNA2008
    valid, U-labels (RFC 7622 section 3.2 compares domainparts as U-labels)."""
    assert nameprep_domain(given_) == canonical


@pytest.mark.parametrize("domain, reason", [
    ("", "empty"),
    (".", "empty"),
    ("example.com..", "empty label"),
    ("a..example", "empty label"),
    ("a" * 64 + ".example", "label too long"),
    ("ü" + "a" * 61 + ".example", "label too long"),     # 62 characters, 69-octet A-label
    (("a" * 63 + ".") * 16 + "b", "over 1023 bytes"),      # 1025 bytes
    ("☃.example", "not allowed"),                          # DISALLOWED in IDNA2008
    ("a_b.example", "not allowed"),                        # STD3: not a hostname
    ("ex ample.com", "not allowed"),
    ("-a.example", "hyphen"),
    ("xn--zz-.example", "a-label"),                        # not valid Punycode
    ("[::1", "not allowed"),
    ("[not-an-address]", "ip"),
    ("[127.0.0.1]", "ip"),                                 # brackets are for IPv6 only
])
def test_nameprep_domain_invalid_raises_with_reason(domain, reason):
    """Invalid domainparts raise InvalidJid saying why."""
    with pytest.raises(InvalidJid) as e:
        nameprep_domain(domain)
    assert reason in str(e.value).lower()


def test_nameprep_domain_1023_bytes_is_valid():
    """RFC 7622 section 3.2 allows 1023 bytes, more than DNS's 253."""
    name = ("a" * 63 + ".") * 15 + "b" * 63             # 15 * 64 + 63 = 1023
    assert nameprep_domain(name) == name


def test_nameprep_domain_is_cached_and_bounded():
    """The per-stanza path pays a cache lookup; the cache cannot grow without bound."""
    assert nameprep_domain.cache_info().maxsize is not None
    nameprep_domain("cached.example")
    hits = nameprep_domain.cache_info().hits
    nameprep_domain("cached.example")
    assert nameprep_domain.cache_info().hits == hits + 1


@pytest.mark.parametrize("domain, name", [
    ("bücher.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("ＥＸＡＭＰＬＥ.com", "example.com"),
    ("example.com", "example.com"),
])
def test_dns_name_is_the_a_label_form(domain, name):
    """DNS queries and SNI use the A-label form of the canonical domain."""
    assert dns_name(domain) == name


def test_domain_of_uses_the_canonical_domain():
    """A JID's domainpart is canonicalised like any domain."""
    assert domain_of("Juliet@XN--BCHER-KVA.example/Balcony") == "bücher.example"
    assert domain_of("juliet@ＥＸＡＭＰＬＥ.com") == "example.com"


def test_nameprep_ascii_names_skip_the_idna_package(monkeypatch):
    """Letter-digit-hyphen names (the common case, and a hostile peer's cheap long
    names) are canonicalised without the idna package; others still go through it."""
    import s2sproxy.core.jid as J

    calls = []
    real = J.idna.uts46_remap
    monkeypatch.setattr(J.idna, "uts46_remap", lambda *a, **k: calls.append(a) or real(*a, **k))
    long_ascii = ".".join(["a" * 63] * 15)           # 959 characters, valid
    assert J.nameprep_domain.__wrapped__(long_ascii.upper()) == long_ascii
    assert J.nameprep_domain.__wrapped__("Remote-1.Example.") == "remote-1.example"
    assert calls == []
    assert J.nameprep_domain.__wrapped__("xn--bcher-kva.example") == "bücher.example"
    assert len(calls) == 1


def test_nameprep_long_internationalised_name_refused_before_mapping():
    """A name that needs IDNA processing and could not resolve in DNS (over 253
    characters) is refused without the costly mapping."""
    from s2sproxy.core.jid import InvalidJid, nameprep_domain
    with pytest.raises(InvalidJid, match="over 253 characters"):
        nameprep_domain.__wrapped__(".".join(["ü" * 60] * 5))


def test_cached_domain_of_is_domain_of_and_bounded():
    """The hot path's cache answers as domain_of does, refuses what it refuses, and
    never holds more than JID_CACHE_ENTRIES JIDs, nor long ones."""
    from s2sproxy.core import jid as J
    from s2sproxy.core.limits import JID_CACHE_ENTRIES, JID_CACHE_MAX_LENGTH
    J._DOMAINS.clear()
    assert J.cached_domain_of("a@B\u00fccher.Example/r") == J.domain_of("a@bücher.example/r")
    assert J.cached_domain_of("a@B\u00fccher.Example/r") == "bücher.example"
    for bad in ("@x", "a@", "evil.example/x@victim.example"):
        try:
            expected = J.domain_of(bad)
        except J.InvalidJid:
            with pytest.raises(J.InvalidJid):
                J.cached_domain_of(bad)
            with pytest.raises(J.InvalidJid):
                J.cached_domain_of(bad)
        else:
            assert J.cached_domain_of(bad) == expected
    for i in range(JID_CACHE_ENTRIES + 10):
        J.cached_domain_of(f"u{i}@example.org")
        assert len(J._DOMAINS) <= JID_CACHE_ENTRIES
    J.cached_domain_of("u" * JID_CACHE_MAX_LENGTH + "@example.org")
    assert "u" * JID_CACHE_MAX_LENGTH + "@example.org" not in J._DOMAINS
