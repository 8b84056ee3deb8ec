"""State diagrams drawn from the transition tables in the code, into the docs between marker comments.

    python scripts/diagrams.py            rewrite every diagram from its table
    python scripts/diagrams.py --check    exit 1 naming each diagram that differs from its table (tests/test_diagrams.py)

A table maps a state to the states it may move to; the key None is "nothing yet" (drawn from the
start, ``[*]``), and a state with nowhere to go is drawn to the end. A doc holds each diagram as a
Mermaid ``stateDiagram-v2`` block between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Diagram:
    """Where one table is drawn: ``module.attribute`` into ``doc`` (relative to the repo) at ``marker``."""

    module: str
    attribute: str
    doc: str
    marker: str
    start: str | None = None  # the initial state, for a table with no None key

    def table(self) -> Mapping[str | None, Iterable[str]]:
        return getattr(importlib.import_module(self.module), self.attribute)


# Every diagram in the docs.
DIAGRAMS = [
    Diagram("agent.journal", "TRANSITIONS", "docs/agent.md", "install-diagram"),
    Diagram("hub.rollout.rollout_states", "TRANSITIONS", "docs/fleet.md", "rollout-diagram", start="pending"),
]


def mermaid(transitions: Mapping[str | None, Iterable[str]], start: str | None = None, source: str = "") -> str:
    """The table as a fenced Mermaid ``stateDiagram-v2`` block (states in table order, targets sorted)."""
    lines = ["```mermaid", "stateDiagram-v2"]
    if source:
        lines.append(f"    %% generated from {source} by scripts/diagrams.py: edit the table, then run it")
    if start is not None:
        lines.append(f"    [*] --> {start}")
    for state, targets in transitions.items():
        ends = sorted(targets)
        if state is None:
            lines += [f"    [*] --> {t}" for t in ends]
        elif not ends:
            lines.append(f"    {state} --> [*]")
        else:
            lines += [f"    {state} --> {t}" for t in ends]
    lines.append("```")
    return "\n".join(lines)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_block(text: str, marker: str, block: str) -> str:
    """``text`` with the part between ``marker``'s comments replaced by ``block``; ValueError without them."""
    begin, end = markers(marker)
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"no {begin} ... {end} in the doc")
    return text[:i + len(begin)] + "\n" + block + "\n" + text[j:]


def sync(diagram: Diagram, root: Path = ROOT, check: bool = False) -> bool:
    """Draw ``diagram`` into its doc (or with ``check`` only compare); True if the doc was (or would be) changed."""
    path = root / diagram.doc
    text = path.read_text()
    block = mermaid(diagram.table(), diagram.start, f"{diagram.module}.{diagram.attribute}")
    new = replace_block(text, diagram.marker, block)
    if new == text:
        return False
    if not check:
        path.write_text(new)
    return True


def main(argv: list[str] | None = None, diagrams: list[Diagram] | None = None, root: Path = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a diagram is stale")
    args = parser.parse_args(argv)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    stale = []
    for d in diagrams if diagrams is not None else DIAGRAMS:
        try:
            changed = sync(d, root, check=args.check)
        except (OSError, ValueError) as exc:
            print(f"{d.doc} ({d.marker}): {exc}", file=sys.stderr)
            return 2
        if changed:
            stale.append(d)
            print(f"{d.doc}: {d.marker} {'differs from' if args.check else 'redrawn from'} {d.module}.{d.attribute}")
    if args.check and stale:
        print("run: python scripts/diagrams.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
