"""The state diagrams in the docs are drawn from the transition tables in the code (scripts/diagrams.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts import diagrams

ROOT = Path(__file__).resolve().parents[1]


def test_every_diagram_in_the_docs_matches_its_table():
    out = subprocess.run([sys.executable, "scripts/diagrams.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"stale diagram (run python scripts/diagrams.py):\n{out.stdout}{out.stderr}"


def test_every_state_and_transition_of_the_install_table_is_drawn():
    from agent.journal import TRANSITIONS

    doc = (ROOT / "docs/agent.md").read_text()
    begin, end = diagrams.markers("install-diagram")
    block = doc[doc.index(begin) + len(begin):doc.index(end)]
    edges = {(a.strip(), b.strip()) for a, _, b in
             (line.partition("-->") for line in block.splitlines()) if _}
    assert edges == {("[*]" if s is None else s, t) for s, ts in TRANSITIONS.items() for t in ts}


def _doc_with(tmp_path: Path, table: dict, marker: str = "m") -> tuple[diagrams.Diagram, Path]:
    """A throwaway repo: a module holding ``table`` and a doc with ``marker``'s comments around stale text."""
    pkg = tmp_path / "fake_states_pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(f"TRANSITIONS = {table!r}\n")
    doc = tmp_path / "doc.md"
    begin, end = diagrams.markers(marker)
    doc.write_text(f"# Doc\n\nbefore\n\n{begin}\nold drawing\n{end}\n\nafter\n")
    sys.modules.pop("fake_states_pkg", None)
    return diagrams.Diagram("fake_states_pkg", "TRANSITIONS", "doc.md", marker, start="a"), doc


def test_a_stale_diagram_fails_the_check_and_is_redrawn(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    d, doc = _doc_with(tmp_path, {"a": {"b", "c"}, "b": {"a"}, "c": set()})
    assert diagrams.main(["--check"], [d], tmp_path) == 1
    assert "old drawing" in doc.read_text() and "m differs" in capsys.readouterr().out
    assert diagrams.main([], [d], tmp_path) == 0
    text = doc.read_text()
    assert text.startswith("# Doc\n\nbefore\n") and text.endswith("after\n")
    assert "    [*] --> a\n    a --> b\n    a --> c\n    b --> a\n    c --> [*]\n" in text  # a start, an end
    assert diagrams.main(["--check"], [d], tmp_path) == 0

    d, doc = _doc_with(tmp_path, {"a": {"b"}, "b": {"a"}, "c": set()})  # a transition dropped from the table
    doc.write_text(text)
    assert diagrams.main(["--check"], [d], tmp_path) == 1


def test_a_doc_without_its_markers_is_an_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    d, doc = _doc_with(tmp_path, {None: {"a"}})
    doc.write_text("# no markers here\n")
    assert diagrams.main(["--check"], [d], tmp_path) == 2
    with pytest.raises(ValueError, match="no <!-- m:start -->"):
        diagrams.replace_block(doc.read_text(), "m", "x")
