"""The state diagrams in the docs are drawn from the transition tables (scripts/diagrams.py) and kept current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import diagrams  # noqa: E402


def edges(block: str) -> set[tuple[str, str]]:
    return set(re.findall(r"^\s+(\S+) --> (\S+)$", block, re.M))


@pytest.mark.parametrize("entry", diagrams.ENTRIES, ids=lambda e: e.marker)
def test_each_diagram_draws_exactly_its_table(entry):
    table = diagrams.table_of(entry)
    text = (ROOT / entry.doc).read_text()
    section = text.split(f"<!-- {entry.marker}:start -->")[1].split(f"<!-- {entry.marker}:end -->")[0]
    want = {(s, t) for s, targets in table.items() for t in targets}
    want |= {(s, "[*]") for s, targets in table.items() if not targets}
    if entry.initial:
        want.add(("[*]", entry.initial))
    assert edges(section) == want


def test_diagrams_are_current():
    out = subprocess.run([sys.executable, "scripts/diagrams.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_changed_table_makes_the_doc_stale_and_update_fixes_it(tmp_path, monkeypatch):
    doc = tmp_path / "docs" / "x.md"
    doc.parent.mkdir()
    doc.write_text("before\n<!-- x-diagram:start -->\n<!-- x-diagram:end -->\nafter\n")
    entry = diagrams.Entry("x-diagram", "docs/x.md", "unused", initial="a")
    table = {"a": frozenset({"b"}), "b": frozenset()}
    monkeypatch.setattr(diagrams, "table_of", lambda e: table)
    assert diagrams.update([entry], tmp_path, write=False) == ["docs/x.md (x-diagram)"]
    assert diagrams.update([entry], tmp_path) == ["docs/x.md (x-diagram)"]
    assert diagrams.update([entry], tmp_path, write=False) == []
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n")
    assert edges(text) == {("[*]", "a"), ("a", "b"), ("b", "[*]")}
    table["b"] = frozenset({"a"})  # a new transition: the drawing no longer matches
    assert diagrams.update([entry], tmp_path, write=False) == ["docs/x.md (x-diagram)"]


def test_missing_markers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="markers"):
        diagrams.splice("no markers here", "x-diagram", "block")
