"""One command from a model file to a deployment: ``deploy edge|web NAME --model FILE``.

Register the file(s) as the next version of a model, build a module from it, make sure the release
is signed (by the hub's release key, or here with ``--key`` when CI holds it), then the caller deploys.
Each step prints one line on stderr, so ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import call, err, parse_kv
from edgefleet.client import HubClient
from edgefleet.commands.registry import module_body


@dataclass
class ModelSource:
    """What ``--model`` and its companions ask for."""

    model: list[str]
    model_name: str | None = None
    module_name: str | None = None
    sample: Path | None = None
    entry: Path | None = None
    runtime: str | None = None
    baseline: Path | None = None
    tags: list[str] = field(default_factory=list)
    key: Path | None = None
    collect_rate: int | None = None


def check_choice(module: str | None, model: list[str]) -> None:
    if bool(module) == bool(model):
        raise typer.BadParameter("give --module MODULE:VERSION (or MODULE@ALIAS), or --model FILE / MODEL:VERSION "
                                 "(registered, built and signed on the way)")


def prepare(c: HubClient, default_name: str, src: ModelSource, total: int) -> tuple[str, list[dict[str, Any]]]:
    """Register (when given files), build and sign; return the module reference to deploy and the steps taken."""
    steps: list[dict[str, Any]] = []
    files = [Path(m) for m in src.model]
    name = src.model_name or default_name
    if all(f.is_file() for f in files):
        res = call(lambda: c.register_model(name, files, parse_kv(src.tags), baseline=src.baseline))
        ref = f"{res['name']}:{res['version']}"
        _step(steps, total, "register", f"model {ref} ({res['framework']}; {', '.join(f.name for f in files)})",
              model=ref)
    elif len(files) == 1 and (":" in src.model[0] or "@" in src.model[0]):
        ref = src.model[0]
        _step(steps, total, "register", f"model {ref} is registered already: skipped", model=ref)
    else:
        missing = [str(f) for f in files if not f.is_file()]
        raise typer.BadParameter(f"--model: no such file(s) {missing} (or give one MODEL:VERSION / MODEL@ALIAS)")
    module = src.module_name or ref.split(":")[0].split("@")[0]
    built = call(lambda: c.post("/api/v1/modules", module_body(module, [ref], src.sample, src.entry, src.runtime,
                                                               src.collect_rate)))
    mref = f"{built['name']}:{built['version']}"
    _step(steps, total, "build", f"module {mref} from {', '.join(built.get('models', [ref]))} "
                                 f"(bundle {built['digest'][:12]}…, {built['size']} bytes, {built['runtime']})",
          module=mref, digest=built["digest"])
    if built["signed"]:
        _step(steps, total, "sign", "release signed by the hub's release key", signed_by="hub")
    elif src.key is not None:
        from edgefleet.commands.keys import sign_and_attach

        sign_and_attach(c, built["name"], built["version"], src.key)
        _step(steps, total, "sign", f"release signed here with {src.key.name} and attached", signed_by=str(src.key))
    else:
        err.print(f"[red]error:[/] module {mref} is built but unsigned: the hub does not hold the release key; "
                  "pass --key RELEASE_KEY_FILE (or sign it: edgefleet module sign)")
        raise typer.Exit(1)
    return mref, steps


def deployed(steps: list[dict[str, Any]], total: int, text: str, **facts: Any) -> None:
    _step(steps, total, "deploy", text, **facts)


def _step(steps: list[dict[str, Any]], total: int, what: str, text: str, **facts: Any) -> None:
    steps.append({"step": what, "text": text, **facts})
    err.print(f"[{len(steps)}/{total}] {what:<8} {text}", highlight=False, markup=False)


# the options ``deploy edge`` and ``deploy web`` share for ``--model``
MODULE_OPT = typer.Option(None, "--module", help="MODULE:VERSION, or MODULE@ALIAS (resolved now)")
MODEL_OPT = typer.Option([], "--model", help="FILE (repeat for extra files): registered, built and signed on the way; "
                                             "or MODEL:VERSION / MODEL@ALIAS (built and signed).")
MODEL_NAME_OPT = typer.Option(None, "--model-name", help="With --model FILE: the model's name (default: NAME).")
SAMPLE_OPT = typer.Option(None, "--sample", exists=True, dir_okay=False, help="With --model: health-check input JSON.")
ENTRY_OPT = typer.Option(None, "--entry", exists=True, dir_okay=False, help="With --model: entry script.")
RUNTIME_OPT = typer.Option(None, "--runtime", help="With --model: onnx, tflite or python (default: the model's).")
BASELINE_OPT = typer.Option(None, "--baseline", exists=True, dir_okay=False,
                            help="With --model FILE: baseline statistics for drift monitoring.")
TAG_OPT = typer.Option([], "--tag", help="With --model FILE: key=value tag of the model version, repeatable.")
KEY_OPT = typer.Option(None, "--key", exists=True, dir_okay=False,
                       help="With --model: the release key, when the hub does not hold it (CI).")
