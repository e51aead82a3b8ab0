"""[filter] decisions (policy.domains): entries, wildcards, modes, blocklist files."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from s2sproxy.policy.domains import DomainFilter, parse_blocklist, parse_entry


def test_entries_are_normalised_and_checked():
    assert parse_entry(" Spam.Example ") == "spam.example"
    assert parse_entry("*.Bad.Example") == "*.bad.example"
    assert parse_entry("bücher.example") == "bücher.example"
    for bad in ("", "*.", "a*.example", "user@spam.example", "spam.example/r",
                "two words.example"):
        with pytest.raises(ValueError):
            parse_entry(bad)


def test_deny_mode_exact_and_wildcard():
    f = DomainFilter("deny", [], [parse_entry("spam.example"), parse_entry("*.bad.example")])
    assert f.active
    assert f.verdict("spam.example") == "filter.deny: spam.example"
    assert f.verdict("sub.spam.example") is None               # exact means exact
    assert f.verdict("bad.example") == "filter.deny: *.bad.example"
    assert f.verdict("a.b.bad.example") == "filter.deny: *.bad.example"
    assert f.verdict("notbad.example") is None
    assert f.verdict("good.example") is None


def test_allow_mode_admits_only_the_listed():
    f = DomainFilter("allow", [parse_entry("*.friends.example"), parse_entry("ally.org")])
    assert f.verdict("friends.example") is None and f.verdict("x.friends.example") is None
    assert f.verdict("ally.org") is None
    assert f.verdict("stranger.example") == "not in filter.allow"


def test_empty_filter_is_inactive():
    f = DomainFilter()
    assert not f.active and f.verdict("anything.example") is None


def test_blocklist_file_lines_comments_and_bad_lines():
    text = "# JabberSPAM\nspam.example\n\n  *.bad.example   # and subdomains\nnot a domain\nok.org\n"
    entries, errors = parse_blocklist(text)
    assert entries == ["spam.example", "*.bad.example", "ok.org"]
    assert [n for n, _ in errors] == [5]
    f = DomainFilter()
    f.set_file("/etc/s2sproxy/list.txt", entries)
    assert f.active and f.verdict("x.bad.example") == "/etc/s2sproxy/list.txt: *.bad.example"
    v = f.version
    f.set_file("/etc/s2sproxy/list.txt", None)
    assert not f.active and f.version > v


@given(st.lists(st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,3}", fullmatch=True),
                min_size=1, max_size=20),
       st.from_regex(r"[a-z]{1,8}(\.[a-z]{1,8}){0,4}", fullmatch=True))
def test_wildcard_matches_exactly_the_domain_and_its_subdomains(names, domain):
    f = DomainFilter("deny", [], [parse_entry("*." + n) for n in names])
    expected = any(domain == n or domain.endswith("." + n) for n in names)
    assert (f.verdict(domain) is not None) == expected
