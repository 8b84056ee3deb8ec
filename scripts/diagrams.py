"""State diagrams in the docs, drawn from the transition tables in the code.

Each entry names a ``TRANSITIONS`` dict (state -> the states it may go to) and the doc section, between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->``, that shows it as a Mermaid ``stateDiagram-v2``.

    python scripts/diagrams.py           # rewrite the sections
    python scripts/diagrams.py --check   # exit 1 and name the stale ones (tests/test_diagrams.py runs this)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Set
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Entry:
    marker: str  # <!-- marker:start --> … <!-- marker:end -->
    doc: str  # relative to the repository root
    module: str  # holds the table
    table: str = "TRANSITIONS"
    initial: str | None = None  # drawn from [*]; states with no way out are drawn to [*]


ENTRIES = [
    Entry("rollout-diagram", "docs/fleet.md", "hub.rollout.rollout_states", initial="pending"),
]


def render(transitions: Mapping[str, Set[str]], initial: str | None = None) -> str:
    """The Mermaid block for a transition table: sources in the table's order, targets in the same order."""
    order = {s: i for i, s in enumerate(transitions)}
    lines = ["```mermaid", "stateDiagram-v2"]
    if initial is not None:
        lines.append(f"    [*] --> {initial}")
    for source, targets in transitions.items():
        lines += [f"    {source} --> {t}" for t in sorted(targets, key=lambda t: (order.get(t, len(order)), t))]
        if not targets:
            lines.append(f"    {source} --> [*]")
    lines.append("```")
    return "\n".join(lines)


def table_of(entry: Entry) -> Mapping[str, Set[str]]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return getattr(importlib.import_module(entry.module), entry.table)


def splice(text: str, marker: str, block: str) -> str:
    """``text`` with the section between the markers replaced by ``block`` (ValueError if a marker is missing)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} … {end} not found in order")
    return text[:i + len(start)] + "\n" + block + "\n" + text[j:]


def update(entries: list[Entry] = ENTRIES, root: Path = ROOT, write: bool = True) -> list[str]:
    """Bring every entry's section up to date (or only compare, with ``write=False``); the stale ones."""
    stale = []
    for entry in entries:
        path = root / entry.doc
        text = path.read_text()
        new = splice(text, entry.marker, render(table_of(entry), entry.initial))
        if new != text:
            stale.append(f"{entry.doc} ({entry.marker})")
            if write:
                path.write_text(new)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a diagram is stale")
    args = parser.parse_args()
    stale = update(write=not args.check)
    for name in stale:
        print(("stale: " if args.check else "updated: ") + name)
    if stale and args.check:
        print("run: python scripts/diagrams.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
