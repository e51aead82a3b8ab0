"""The peer server versions the integration tests can run.

The installed packages (ejabberd 24.12 from bookworm-backports, Prosody 0.12 from
bookworm) run from /usr.  ejabberd 23.01 (bookworm) and Prosody 13.0.1
(bookworm-backports) cannot be installed beside them: ``scripts/unpack-peers`` (run by
``scripts/install-peers``) unpacks their .debs into ``$S2SPROXY_PEERS_DIR``
(/var/cache/s2sproxy-tests/peers by default) and writes the commands run here:

    ejabberd-23.01/bin/ejabberdctl     the packaged ejabberdctl, ERL_LIBS naming the tree's
                                       ejabberd and Erlang libraries (before OTP's)
    prosody-13.0.1/bin/prosody         the packaged scripts, CFG_SOURCEDIR/CFG_PLUGINDIR/
    prosody-13.0.1/bin/prosodyctl      CFG_CONFIGDIR pointing into the tree

Use: ``Ejabberd(run, ..., version=EJABBERD_2301)``, ``Prosody(run, ...,
version=PROSODY_13)``; ``version.missing()`` says what to run when it is not there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PEERS_DIR = Path(os.environ.get("S2SPROXY_PEERS_DIR", "/var/cache/s2sproxy-tests/peers"))
STAMP = ".s2sproxy-peer-stamp"  # written last by scripts/unpack-peers


@dataclass(frozen=True)
class PeerVersion:
    """One ejabberd or Prosody version and the commands that run it.

    ``tree``: the unpacked root (None: the installed package).  ``debian_version``:
    the exact package version when it is fixed (unpacked trees), else None.
    ``env``: extra environment for every command of this version.
    ``has_mod_s2s_bidi``: the server has a mod_s2s_bidi (ejabberd 23.01 has none)."""

    kind: str
    version: str
    debian_version: str | None = None
    tree: Path | None = None
    ejabberdctl: str | None = None
    prosody: str | None = None
    prosodyctl: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    has_mod_s2s_bidi: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("ejabberd", "prosody"):
            raise ValueError(f"kind={self.kind!r}")

    @property
    def name(self) -> str:
        """``ejabberd-23.01``: for test ids and messages."""
        return f"{self.kind}-{self.version}"

    def __str__(self) -> str:
        return self.name

    def commands(self) -> list[str]:
        """The executables this version needs."""
        names = ["ejabberdctl"] if self.kind == "ejabberd" else ["prosody", "prosodyctl"]
        return [getattr(self, n) for n in names]

    def environ(self) -> dict[str, str]:
        """os.environ with this version's ``env`` on top."""
        out = dict(os.environ)
        out.update(self.env)
        return out

    def missing(self) -> str | None:
        """None if this version can run here, else what is missing and what to run."""
        absent = [c for c in self.commands() if not (c and os.access(c, os.X_OK))]
        if self.tree is not None and not (self.tree / STAMP).is_file():
            return (f"{self.kind} {self.debian_version} is not unpacked in {self.tree} "
                    f"(S2SPROXY_PEERS_DIR={PEERS_DIR}): run scripts/install-peers "
                    f"(or scripts/unpack-peers) as root")
        if absent:
            how = ("scripts/unpack-peers" if self.tree is not None else
                   "scripts/install-peers")
            return f"{self.name}: missing {', '.join(absent)}: run {how} as root"
        return None

    def available(self) -> bool:
        return self.missing() is None


def _unpacked_ejabberd(version: str, debian_version: str) -> PeerVersion:
    tree = PEERS_DIR / f"ejabberd-{version}"
    # bin/ejabberdctl sets the same ERL_LIBS itself; given here too so any erl
    # run for this version sees the tree's libraries first.
    libs = f"{tree}/usr/lib/x86_64-linux-gnu:{tree}/usr/lib/erlang/lib"
    return PeerVersion("ejabberd", version, debian_version, tree,
                       ejabberdctl=str(tree / "bin" / "ejabberdctl"),
                       env=(("ERL_LIBS", libs),), has_mod_s2s_bidi=False)


def _unpacked_prosody(version: str, debian_version: str) -> PeerVersion:
    tree = PEERS_DIR / f"prosody-{version}"
    return PeerVersion("prosody", version, debian_version, tree,
                       prosody=str(tree / "bin" / "prosody"),
                       prosodyctl=str(tree / "bin" / "prosodyctl"))


EJABBERD_2412 = PeerVersion("ejabberd", "24.12", ejabberdctl="/usr/sbin/ejabberdctl")
EJABBERD_2301 = _unpacked_ejabberd("23.01", "23.01-1")
PROSODY_012 = PeerVersion("prosody", "0.12", prosody="/usr/bin/prosody",
                          prosodyctl="/usr/bin/prosodyctl")
PROSODY_13 = _unpacked_prosody("13.0.1", "13.0.1-1~bpo12+1")

ALL = (EJABBERD_2412, EJABBERD_2301, PROSODY_012, PROSODY_13)
