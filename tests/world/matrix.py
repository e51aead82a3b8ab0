"""The interop matrix: backend x remote server x authentication, filled in by
test_world.py and printed at the end of the run (conftest.pytest_terminal_summary)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Cell:
    ok: bool
    summary: str          # e.g. "4/4 msgs, 4/4 pings, bidi <->, 5.1 s"
    problems: list[str] = field(default_factory=list)


@dataclass
class Matrix:
    cells: dict[tuple[str, str, str], Cell] = field(default_factory=dict)

    def put(self, backend: str, remote: str, auth: str, cell: Cell) -> None:
        self.cells[(backend, remote, auth)] = cell


MATRIX = Matrix()
AUTHS = ("dialback", "EXTERNAL")


def render() -> str:
    """A markdown table: one row per backend x remote, one column per auth method."""
    rows = sorted({(b, r) for b, r, _ in MATRIX.cells})
    out = ["| backend (behind s2sproxy) | remote server | " + " | ".join(AUTHS) + " |",
           "|---|---|" + "---|" * len(AUTHS)]
    for b, r in rows:
        cols = []
        for a in AUTHS:
            c = MATRIX.cells.get((b, r, a))
            cols.append("—" if c is None else ("✅ " if c.ok else "❌ ") + c.summary)
        out.append(f"| {b} | {r} | " + " | ".join(cols) + " |")
    problems = [f"  {b} / {r} / {a}: {p}" for (b, r, a), c in sorted(MATRIX.cells.items())
                for p in c.problems]
    if problems:
        out += ["", "problems:"] + problems
    return "\n".join(out)
