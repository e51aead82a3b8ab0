"""Which remote domains may federate with the served ones (``[filter]``, issue 11).

``filter.mode = "deny"`` (the default): every remote domain except those denied, by
``filter.deny``, a blocklist file (``filter.deny_files``) or a real-time block list
(``[[filter.rtbl]]``, ``policy.rtbl``); ``"allow"``: only those in ``filter.allow``.
An entry is a domain (that domain only) or ``*.domain`` (the domain and every
subdomain).  A denied remote is refused when it authenticates (the
dialback result an error ``forbidden``, SASL ``not-authorized``, then the stream error
``policy-violation``), never reaches ejabberd, and ejabberd's stanzas to it bounce
``not-allowed`` without a connection being opened.  Each refusal is a flag with reason
``denied-domain``.

Sans-IO: the tx side reads the files (at start, on reload, when a file's modification
time changes) and hands their lines to ``parse_blocklist``; this module decides.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from s2sproxy.core.jid import InvalidJid, nameprep_domain

REASON = "denied-domain"


class Pattern(str):
    """A normalised entry: ``example.org`` or ``*.example.org``."""


def parse_entry(text: str) -> Pattern:
    """``ValueError`` (with why) for anything but a domain or ``*.domain``."""
    text = text.strip()
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if not name or "*" in name or "@" in name or "/" in name:
        raise ValueError(f"not a domain or *.domain: {text!r}")
    try:
        name = nameprep_domain(name)
    except InvalidJid as e:
        raise ValueError(f"not a domain: {text!r}") from e
    return Pattern(("*." if wildcard else "") + name)


def parse_blocklist(text: str) -> tuple[list[Pattern], list[tuple[int, str]]]:
    """A blocklist file (the JabberSPAM blacklist's format): one domain per line,
    ``#`` starts a comment, blank lines are ignored; ``*.domain`` is taken too.  Returns
    the entries and, for each bad line, (line number, why): skipped, never fatal."""
    entries: list[Pattern] = []
    errors: list[tuple[int, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entries.append(parse_entry(line))
        except ValueError as e:
            errors.append((n, str(e)))
    return entries, errors


@dataclass
class _Set:
    exact: set[str] = field(default_factory=set)
    suffixes: set[str] = field(default_factory=set)     # "*.x" stored as "x"

    def add(self, p: Pattern) -> None:
        if p.startswith("*."):
            self.suffixes.add(p[2:])
        else:
            self.exact.add(p)

    def discard(self, p: str) -> None:
        if p.startswith("*."):
            self.suffixes.discard(p[2:])
        else:
            self.exact.discard(p)

    def match(self, domain: str) -> str | None:
        """The entry that covers ``domain``, or None."""
        if domain in self.exact:
            return domain
        if self.suffixes:
            d = domain
            while True:
                if d in self.suffixes:
                    return "*." + d
                dot = d.find(".")
                if dot < 0:
                    return None
                d = d[dot + 1:]
        return None

    def __len__(self) -> int:
        return len(self.exact) + len(self.suffixes)


class DomainFilter:
    """The one object every part asks (``verdict``); changed in place by the tx side
    (``set_lists``, ``set_file``), so that streams made before a change see it."""

    def __init__(self, mode: str = "deny", allow: list[Pattern] | tuple = (),
                 deny: list[Pattern] | tuple = ()) -> None:
        self.files: dict[str, _Set] = {}
        # real-time block lists (``policy.rtbl``): name -> patterns, or SHA-256 hashes
        self.rtbl: dict[str, _Set] = {}
        self.rtbl_hashed: dict[str, set[str]] = {}
        self.rtbl_services: frozenset[str] = frozenset()    # never denied by an RTBL
        self.version = 0        # bumped at every change: what was allowed may not be
        self.set_lists(mode, allow, deny)

    def set_lists(self, mode: str, allow, deny) -> None:
        if mode not in ("deny", "allow"):
            raise ValueError(f"filter.mode: must be deny or allow, not {mode!r}")
        self.mode = mode
        self.allow = _Set()
        self.deny = _Set()
        for p in allow:
            self.allow.add(p)
        for p in deny:
            self.deny.add(p)
        self.changed()

    def changed(self) -> None:
        self.version += 1
        # read on the per-read path: a flag, not a computation
        self.active = self.mode == "allow" or bool(len(self.deny) or any(
            len(s) for s in self.files.values()) or any(
            len(s) for s in self.rtbl.values()) or any(self.rtbl_hashed.values()))

    def update_rtbl(self, name: str, added, removed) -> None:
        """Real-time block list ``name`` gained ``added`` and lost ``removed`` (its
        distinct entries, ``policy.rtbl`` counts duplicates): changed in place."""
        hashes = self.rtbl_hashed.get(name)
        if hashes is not None:
            hashes.update(added)
            hashes.difference_update(removed)
        else:
            s = self.rtbl.setdefault(name, _Set())
            for p in added:
                s.add(Pattern(p))
            for p in removed:
                s.discard(p)
        self.changed()

    def set_rtbl(self, name: str, keys, hashed: bool = False) -> None:
        """The entries of real-time block list ``name`` (``policy.rtbl``): patterns, or
        with ``hashed`` SHA-256 hex digests of domains; None: no longer used."""
        self.rtbl.pop(name, None)
        self.rtbl_hashed.pop(name, None)
        if keys is not None:
            if hashed:
                self.rtbl_hashed[name] = set(keys)
            else:
                s = _Set()
                for p in keys:
                    s.add(Pattern(p))
                self.rtbl[name] = s
        self.changed()

    def set_file(self, name: str, entries: list[Pattern] | None) -> None:
        """The entries of blocklist file ``name`` (None: the file is no longer used)."""
        if entries is None:
            self.files.pop(name, None)
        else:
            s = _Set()
            for p in entries:
                s.add(p)
            self.files[name] = s
        self.changed()

    def verdict(self, domain: str) -> str | None:
        """None: ``domain`` may federate.  Else why not, for the log and the flag
        (``filter.deny: *.example.org``, ``not in filter.allow``, ``FILE: example.org``)."""
        if self.mode == "allow":
            return None if self.allow.match(domain) else "not in filter.allow"
        hit = self.deny.match(domain)
        if hit is not None:
            return f"filter.deny: {hit}"
        for name, s in self.files.items():
            hit = s.match(domain)
            if hit is not None:
                return f"{name}: {hit}"
        if (self.rtbl or self.rtbl_hashed) and domain not in self.rtbl_services:
            for name, s in self.rtbl.items():
                hit = s.match(domain)
                if hit is not None:
                    return f"{name}: {hit}"
            if self.rtbl_hashed:
                digest = hashlib.sha256(domain.encode("utf-8")).hexdigest()
                for name, hashes in self.rtbl_hashed.items():
                    if digest in hashes:
                        return f"{name}: sha256({domain})"
        return None
