"""Registry commands: models, modules, bundles (keys and release signing: edgefleet/commands/keys.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer

from edgefleet.cli_common import call, client, emit, err, fail, get, parse_kv
from edgefleet.client import HubClient, HubError
from protocol.manifest import check_relative_path

model_app = typer.Typer(rich_markup_mode=None, help="The model registry.", no_args_is_help=True)
module_app = typer.Typer(rich_markup_mode=None, help="Modules: signed bundles built from model versions.", no_args_is_help=True)
bundle_app = typer.Typer(rich_markup_mode=None, help="Pull and verify signed bundles.", no_args_is_help=True)

# --- registry -----------------------------------------------------------------------------------


def parse_model_ref(ref: str, need_version: bool = True) -> tuple[str, int | None]:
    """``NAME:VERSION`` (or ``NAME`` when the version may be left out)."""
    name, sep, version = ref.rpartition(":")
    if sep and name and version.isdigit() and int(version) >= 1:
        return name, int(version)
    if need_version or ":" in ref:
        raise typer.BadParameter(f"{ref!r} is not NAME:VERSION")
    return ref, None


def upload_progress(paths: list[Path], quiet: bool) -> tuple[Any, Any]:
    """A rich progress bar over the bytes of ``paths`` (on stderr, so --json output stays clean)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    total = sum(p.stat().st_size for p in paths)
    bar = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   console=err, disable=quiet or total < 1024 * 1024, transient=True)
    task = bar.add_task("uploading", total=total)
    return bar, lambda n: bar.advance(task, n)


def model_files(paths: list[Path], entry: Path | None) -> tuple[list[Path], list[str]]:
    """The files to upload and their paths in the model: a directory keeps its layout under its own name;
    the entry script comes first (the hub takes the first .onnx/.tflite/.py file as the main one)."""
    files: list[Path] = [entry] if entry else []
    names: list[str] = [entry.name] if entry else []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file())
            if not inside:
                raise typer.BadParameter(f"directory {path} holds no files")
            files += inside
            names += [f"{path.resolve().name}/{p.relative_to(path).as_posix()}" for p in inside]
        else:
            files.append(path)
            names.append(path.name)
    return files, names


@model_app.command("register")
def model_register(
    name: str,
    paths: list[Path] = typer.Argument(..., exists=True, help="Model files or directories (pickle, joblib, ONNX, "
                                                              "TFLite, an MLflow model directory, ...)."),
    entry: Path | None = typer.Option(None, "--entry", exists=True, dir_okay=False,
                                      help="Entry script with init() and run(inputs): the model runs in the python "
                                           "runtime and finds its files in $EDGEFLEET_MODEL_DIR."),
    tag: list[str] = typer.Option([], "--tag", help="key=value, repeatable."),
    description: str = typer.Option("", "--description"),
    prop: list[str] = typer.Option([], "--property", help="key=value, repeatable."),
    parent: str = typer.Option("", "--parent", help="Lineage: NAME:VERSION this was derived from."),
    dataset: str = typer.Option("", "--dataset", help="Lineage: dataset reference."),
    training_run: str = typer.Option("", "--training-run", help="Lineage: training-run reference."),
    baseline: Path | None = typer.Option(None, "--baseline", exists=True, dir_okay=False,
                                         help="Baseline statistics / reference data for drift monitoring."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Register a model version: NAME and one or more files or directories.

    ONNX and TFLite models are load-checked by the hub; a Python model (any file, with an --entry script)
    is only recorded, its script parsed: it is loaded where it runs (device, endpoint, batch).
    """
    files, names = model_files(paths, entry)
    bar, progress = upload_progress(files, as_json)
    with client() as c, bar:
        res = call(lambda: c.register_model(name, files, parse_kv(tag), description, properties=parse_kv(prop),
                                            lineage={"parent": parent, "dataset": dataset, "training_run": training_run},
                                            baseline=baseline, progress=progress, names=names))
    emit(res, as_json, ["name", "version", "framework", "tags"])


@model_app.command("list")
def model_list(
    name: str | None = typer.Option(None, "--name"),
    tag: list[str] = typer.Option([], "--tag", help="key=value; repeat to require several."),
    framework: str | None = typer.Option(None, "--framework"),
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
    offset: int = typer.Option(0, "--offset", min=0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List model versions, newest first."""
    params = {"name": name, "tag": tag, "framework": framework, "limit": limit, "offset": offset}
    with client() as c:
        res = call(lambda: c.request("GET", "/api/v1/models", params={k: v for k, v in params.items() if v is not None}))
    items = res.get("items", res) if isinstance(res, dict) else res
    emit(items, as_json, ["name", "version", "aliases", "framework", "tags", "created_at"])


def _resolve(c: HubClient, ref: str) -> tuple[str, int]:
    name, version = parse_model_ref(ref, need_version=False)
    if version is None:  # the newest version
        latest = call(lambda: c.get("/api/v1/models", name=name, limit=1))
        if not latest:
            fail(f"model {name!r} has no versions")
        version = latest[0]["version"]
    return name, version


@model_app.command("show")
def model_show(ref: str = typer.Argument(..., help="NAME or NAME:VERSION"), as_json: bool = typer.Option(False, "--json")) -> None:
    """One model version with its files, signature, tags, lineage and properties."""
    with client() as c:
        name, version = _resolve(c, ref)
        res = call(lambda: c.get(f"/api/v1/models/{name}/versions/{version}"))
    if as_json:
        emit(res, True)
        return
    emit([{"field": k, "value": v} for k, v in res.items()], False, ["field", "value"], title=f"{name}:{version}")


@model_app.command("tag")
def model_tag(
    ref: str = typer.Argument(..., help="NAME:VERSION"),
    pairs: list[str] = typer.Argument(None, help="key=value to set"),
    remove: list[str] = typer.Option([], "--remove", help="Tag key to remove, repeatable."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Set and remove tags of a model version."""
    name, version = parse_model_ref(ref)
    body = {"tags": parse_kv(pairs or []), "remove_tags": remove}
    with client() as c:
        res = call(lambda: c.request("PATCH", f"/api/v1/models/{name}/versions/{version}", json=body))
    emit(res, as_json, ["name", "version", "tags"])


@model_app.command("delete")
def model_delete(ref: str = typer.Argument(..., help="NAME:VERSION"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Delete a model version (refused while a deployment uses a module built from it)."""
    name, version = parse_model_ref(ref)
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/models/{name}/versions/{version}"))
    emit(res, as_json, ["name", "version", "deleted"])


@model_app.command("download")
def model_download(
    ref: str = typer.Argument(..., help="NAME:VERSION (or NAME for the newest)"),
    out: Path = typer.Option(Path("."), "--out", help="Directory to write the files into."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Download a model version's files (each checked against its registered sha256)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with client() as c:
        name, version = _resolve(c, ref)
        model = call(lambda: c.get(f"/api/v1/models/{name}/versions/{version}"))
        for f in model["files"]:
            target = out / check_relative_path(f["path"])  # a model directory keeps its layout
            target.parent.mkdir(parents=True, exist_ok=True)
            call(lambda f=f, target=target: c.download(f"/api/v1/models/{name}/versions/{version}/files/{f['path']}",
                                                       target))
            got = sha256_file(target)
            if got != f["sha256"]:
                target.unlink()
                fail(f"{f['path']} arrived with sha256 {got[:12]}…, expected {f['sha256'][:12]}…")
            written.append({"path": str(target), "sha256": f["sha256"], "size": f["size"]})
    emit(written, as_json, ["path", "size", "sha256"])


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


# --- modules ------------------------------------------------------------------------------------


def load_spec(path: Path) -> dict[str, Any]:
    """A module spec: JSON, or TOML (``.toml``), with keys models, runtime, entry, sample, collect_rate_ppm."""
    import tomllib

    try:
        spec = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"{path}: {exc}") from None
    if not isinstance(spec, dict):
        raise typer.BadParameter(f"{path}: a module spec is an object")
    unknown = sorted(set(spec) - {"name", "models", "runtime", "entry", "sample", "collect_rate_ppm", "resources"})
    if unknown:
        raise typer.BadParameter(f"{path}: unknown spec key(s) {unknown}")
    return spec


def module_body(name: str, models: list[str], sample: Path | None = None, entry: Path | None = None,
                runtime: str | None = None, collect_rate: int | None = None,
                resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``POST /api/v1/modules`` body (models as ``M:V`` or ``M@ALIAS``; the hub resolves aliases)."""
    body: dict[str, Any] = {"name": name, "models": models}
    if sample:
        body["sample"] = json.loads(sample.read_text())
    if entry:
        body["entry"], body["entry_name"] = entry.read_text(), entry.name
    if runtime:
        body["runtime"] = runtime
    if collect_rate is not None:
        body["collect_rate_ppm"] = collect_rate
    if resources:
        body["resources"] = resources
    return body


@module_app.command("build")
def module_build(
    name: str,
    model: list[str] = typer.Option([], "--model", help="MODEL:VERSION or MODEL@ALIAS, repeatable (the first is the "
                                                         "main model)."),
    sample: Path | None = typer.Option(None, "--sample", exists=True, help="JSON {\"inputs\": {...}} for health checks."),
    entry: Path | None = typer.Option(None, "--entry", exists=True, dir_okay=False,
                                      help="Pre/post-processing script (preprocess/postprocess), or with --runtime "
                                           "python the init()/run() script that loads the model files."),
    runtime: str | None = typer.Option(None, "--runtime", help="onnx, tflite or python (default: the model's)."),
    collect_rate: int | None = typer.Option(None, "--collect-rate-ppm", help="Share of inferences to sample (ppm)."),
    spec: Path | None = typer.Option(None, "--spec", exists=True, dir_okay=False,
                                     help="JSON or TOML module spec; flags override it. Paths are relative to it."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build a signed bundle from model versions and record it as module NAME version N+1."""
    declared = load_spec(spec) if spec else {}
    base = spec.parent if spec else Path(".")
    models = model or list(declared.get("models", []))
    if not models:
        raise typer.BadParameter("give at least one --model MODEL:VERSION (or models in --spec)")
    sample_path = sample or (base / declared["sample"] if declared.get("sample") else None)
    entry_path = entry or (base / declared["entry"] if declared.get("entry") else None)
    rate = collect_rate if collect_rate is not None else declared.get("collect_rate_ppm")
    body = module_body(name, models, sample_path, entry_path, runtime or declared.get("runtime"), rate,
                       declared.get("resources"))
    with client() as c:
        res = call(lambda: c.post("/api/v1/modules", body))
    emit(res, as_json, ["name", "version", "digest", "size"])


@module_app.command("list")
def module_list(name: str | None = typer.Option(None, "--name"), as_json: bool = typer.Option(False, "--json")) -> None:
    """Built modules (signed bundles), newest first."""
    res = get("/api/v1/modules", name=name)
    emit(res, as_json, ["name", "version", "runtime", "signed", "size", "created_at"])


@module_app.command("show")
def module_show(ref: str = typer.Argument(..., help="MODULE:VERSION"), as_json: bool = typer.Option(False, "--json")
                ) -> None:
    """One module: its bundle digest, models, runtime, files, signatures and release expiry."""
    name, version = parse_model_ref(ref)
    res = get(f"/api/v1/modules/{name}/versions/{version}")
    if as_json:
        emit(res, True)
        return
    envelope = res.pop("envelope", None) or {}
    signed = envelope.get("signed", {})
    manifest = signed.get("manifest", {})
    res |= {"entry": manifest.get("entry"), "expires_at": signed.get("expires"),
            "signatures": [s.get("keyid", "")[:16] for s in envelope.get("signatures", [])],
            "files": [{"path": f["path"], "size": f["size"]} for f in manifest.get("files", [])]}
    emit(res, False, title=f"{name}:{version}")


# --- bundles ------------------------------------------------------------------------------------


def _fail(exc: Exception) -> NoReturn:
    fail(str(exc), "refused:")


@bundle_app.command("pull")
def bundle_pull(
    ref: str = typer.Argument(..., help="MODULE:VERSION"),
    dest: Path = typer.Argument(..., help="Directory to write the bundle into (replaced only if the new one verifies)."),
    root: Path | None = typer.Option(None, "--root", exists=True, dir_okay=False,
                                     help="Pinned root.json to trust (default: trust the hub's root on first use)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Download a signed release, its files and the hub's root; verify all of it; write DIR only if it is valid."""
    import httpx

    from protocol.encoding import ProtocolError

    name, version = parse_model_ref(ref)
    try:
        pinned = json.loads(root.read_text()) if root else None
        with client() as c:
            manifest = c.pull_bundle(name, version or 0, dest, pinned)
    except (HubError, ProtocolError, httpx.HTTPError, ValueError) as exc:
        _fail(exc)
    emit({"name": manifest.name, "version": manifest.version, "digest": manifest.digest(), "dir": str(dest),
          "files": len(manifest.files), "size": manifest.size}, as_json, ["name", "version", "digest", "dir"])


@bundle_app.command("verify")
def bundle_verify(
    bundle_dir: Path = typer.Argument(..., help="A bundle directory (release.json + files/)."),
    root: Path = typer.Option(..., "--root", exists=True, dir_okay=False, help="The root.json you trust."),
    min_version: int = typer.Option(0, "--min-version", help="Refuse versions older than this (rollback)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Exit 0 only if the bundle's signature, expiry and every file's length and hash check out."""
    from modules.bundle import verify_pulled
    from protocol.encoding import ProtocolError
    from protocol.signing import load_trusted_root

    try:
        manifest = verify_pulled(bundle_dir, load_trusted_root(json.loads(root.read_text())), min_version)
    except (ProtocolError, ValueError, OSError) as exc:
        _fail(exc)
    emit({"valid": True, "name": manifest.name, "version": manifest.version, "digest": manifest.digest(),
          "files": len(manifest.files)}, as_json, ["valid", "name", "version", "digest"])
