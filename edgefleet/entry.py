"""The ``edgefleet`` command's entry point.

``edgefleet score`` builds only its own command: typer assembles every command of an app (and the
CLI imports every command module) before parsing, a fixed cost each batch job would pay
(``hub/batch/jobs.py`` starts one per job; bench/batch_bench.py measures it). Anything else gets the full app.
"""

from __future__ import annotations

import sys

GLOBAL_WITH_VALUE = frozenset({"--hub", "--token", "--hub-ca"})


def first_command(args: list[str]) -> str | None:
    """The command word after the global options, if any."""
    i = 0
    while i < len(args):
        if args[i] in GLOBAL_WITH_VALUE:
            i += 2
        elif args[i].startswith("-"):
            i += 1
        else:
            return args[i]
    return None


def entry() -> None:
    if first_command(sys.argv[1:]) == "score":
        import typer

        from edgefleet.cli_root import main
        from edgefleet.commands.score import score

        fast = typer.Typer(add_completion=False)
        fast.callback()(main)
        fast.command("score")(score)
        fast(prog_name="edgefleet")
        return
    from edgefleet.cli import app

    app(prog_name="edgefleet")
