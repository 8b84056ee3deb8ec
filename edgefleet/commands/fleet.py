"""Fleet commands: deployments and their rollouts, the audit log, status (devices: devices.py)."""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from edgefleet.cli_common import call, client, emit, err, get, human_time, parse_duration, parse_kv, parse_time
from edgefleet.commands import oneshot

deploy_app = typer.Typer(rich_markup_mode=None, help="Deploy modules to devices and to the cloud.", no_args_is_help=True)
deployment_app = typer.Typer(rich_markup_mode=None, help="Edge deployments: update, list, revisions.", no_args_is_help=True)
rollout_app = typer.Typer(rich_markup_mode=None, help="Rollouts: status, pause, resume, abort, rollback, retry, approve.",
                          no_args_is_help=True)
audit_app = typer.Typer(rich_markup_mode=None, help="Who did what, when.", no_args_is_help=True)

STRATEGY_HELP = "all | canary:N | canary:P% | waves:1,10,50,100"
APPROVE_HELP = "Each wave after the first waits (awaiting_approval) until 'edgefleet rollout approve NAME'."
WINDOW_HELP = ("Maintenance windows (UTC) waves begin in: 'Sat 02:00-04:00', 'Mon-Fri 22:00-02:00', 'daily 01:00-05:00';"
               " several separated by ';'.")
START_HELP = "No wave begins before this time: ISO 8601 (2026-12-05T02:00+00:00; local time without an offset) or unix seconds."
GATE_HELP = ("Gate k=v, repeatable: max_install_failure_rate (default 0), max_error_rate, max_p95_increase,"
             " min_reporting, and the quality gates max_disagreement, max_prediction_drift, max_input_drift,"
             " min_accuracy; v 'none' turns one off.")
SHADOW_HELP = ("First run the new version beside the live one on the first wave's devices for this long (30s, 10m),"
               " on the same inputs, never serving it; the gates judge it before the waves begin.")
SHADOW_SAMPLE_HELP = "Share of live inputs mirrored to the shadow candidate (0..1, default 1: all)."


def _gates(pairs: list[str]) -> dict[str, float | None] | None:
    if not pairs:
        return None
    out: dict[str, float | None] = {}
    for k, v in parse_kv(pairs).items():
        try:
            out[k] = None if v.lower() in ("none", "off", "") else float(v)
        except ValueError:
            raise typer.BadParameter(f"gate {k}={v!r}: want a number or none") from None
    return out


DEVICE_BAKE_HELP = ("Each device keeps the new version on probation this long (30s, 10m) after its health check,"
                    " rolling back by itself if its error rate exceeds --device-max-error-rate.")


def _rollout_options(strategy: str | None, bake: str | None, gate: list[str], on_failure: str | None,
                     collect_rate: int | None, approve: bool = False, window: str | None = None,
                     start_at: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"strategy": strategy or "all", "bake_s": parse_duration(bake) if bake else 0.0,
                            "gates": _gates(gate), "collect_rate_ppm": collect_rate, "approve": approve,
                            "window": window, "start_at": parse_time(start_at)}
    if on_failure:
        opts["on_failure"] = on_failure
    return opts


def _device_bake(bake: str | None, max_error_rate: float, min_inferences: int) -> dict[str, Any]:
    if bake is None:
        return {}
    return {"device_bake_s": round(parse_duration(bake)), "device_max_error_rate": max_error_rate,
            "device_min_inferences": min_inferences}


def _summary(res: dict[str, Any], as_json: bool) -> None:
    if as_json:
        emit(res, True)
        return
    ro = res.get("rollout")
    state = ro.get("state") if isinstance(ro, dict) else None
    err.print(f"deployment {res['name']} revision {res.get('revision')}: {res['module']} on {res['target']!r}"
              f" (priority {res['priority']}); {res.get('published', 0)} device(s) updated"
              + (f"; rollout {state}" if state else ""), markup=False, highlight=False, soft_wrap=True)
    if res.get("plan"):
        err.print(_plan_line(res["plan"]), markup=False, highlight=False, soft_wrap=True)


def _plan_line(plan: dict[str, Any]) -> str:
    """The effective rollout plan in one line, saying what was inherited from the last rollout."""
    gates = ", ".join(f"{k}={v:g}" for k, v in (plan.get("gates") or {}).items() if v is not None) or "none"
    inherited = plan.get("inherited") or []
    shadow = f"shadow {plan['shadow_s']:g}s first; " if plan.get("shadow_s") else ""
    return (f"rollout plan: {shadow}{plan['strategy']} (waves {', '.join(plan['waves'])}); bake {plan['bake_s']:g}s;"
            f" gates {gates}; on failure {plan['on_failure']}; wave timeout {plan['wave_timeout_s']:g}s"
            + ("; each wave after the first waits for rollout approve" if plan.get("approve") else "")
            + (f"; waves begin in {plan['window']} (UTC)" if plan.get("window") else "")
            + (f"; not before {human_time(plan['start_at'])}" if plan.get("start_at") else "")
            + (f" (from the last rollout: {', '.join(inherited)})" if inherited else ""))


@deploy_app.command("edge")
def deploy_edge(
    name: str,
    module: str | None = oneshot.MODULE_OPT,
    model: list[str] = oneshot.MODEL_OPT,
    model_name: str | None = oneshot.MODEL_NAME_OPT,
    sample: Path | None = oneshot.SAMPLE_OPT,
    entry: Path | None = oneshot.ENTRY_OPT,
    runtime: str | None = oneshot.RUNTIME_OPT,
    baseline: Path | None = oneshot.BASELINE_OPT,
    tag: list[str] = oneshot.TAG_OPT,
    key: Path | None = oneshot.KEY_OPT,
    target: str = typer.Option("*", "--target", help="'*', device ids, or labels like site=berlin,tier!=dev"),
    priority: int = typer.Option(0, "--priority", help="Per module, the highest-priority deployment wins."),
    strategy: str = typer.Option("all", "--strategy", help=STRATEGY_HELP),
    bake: str | None = typer.Option(None, "--bake", help="How long each wave runs before its gates: 30s, 10m."),
    gate: list[str] = typer.Option([], "--gate", help=GATE_HELP),
    on_failure: str | None = typer.Option(None, "--on-failure", help="rollback (default) or halt"),
    collect_rate: int | None = typer.Option(None, "--collect-rate", help="Override data collection (ppm)."),
    device_bake: str | None = typer.Option(None, "--device-bake", help=DEVICE_BAKE_HELP),
    device_max_error_rate: float = typer.Option(0.05, "--device-max-error-rate", min=0, max=1),
    device_min_inferences: int = typer.Option(20, "--device-min-inferences", min=1,
                                              help="Inferences a device needs before the error rate decides."),
    approve: bool = typer.Option(False, "--approve", help=APPROVE_HELP),
    window: str | None = typer.Option(None, "--window", help=WINDOW_HELP),
    start_at: str | None = typer.Option(None, "--start-at", help=START_HELP),
    shadow: str | None = typer.Option(None, "--shadow", help=SHADOW_HELP + " Needs a live version already."),
    shadow_sample: float | None = typer.Option(None, "--shadow-sample", min=0, max=1, help=SHADOW_SAMPLE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Deploy a module to the devices a selector matches (a new revision of NAME, rolled out by --strategy).
    With --model FILE: register, build, sign and deploy in one step."""
    oneshot.check_choice(module, model)
    steps: list[dict[str, Any]] = []
    with client() as c:
        if model:
            src = oneshot.ModelSource(model, model_name, None, sample, entry, runtime, baseline, tag, key)
            module, steps = oneshot.prepare(c, name, src, 4)
        body = {"name": name, "module": module, "target": target, "priority": priority,
                **_rollout_options(strategy, bake, gate, on_failure, collect_rate, approve, window, start_at),
                **_device_bake(device_bake, device_max_error_rate, device_min_inferences),
                **({"shadow_s": parse_duration(shadow)} if shadow else {}),
                **({"shadow_sample": shadow_sample} if shadow_sample is not None else {})}
        res = call(lambda: c.post("/api/v1/deployments", body))
    if model:
        ro = res.get("rollout")
        oneshot.deployed(steps, 4, f"deployment {name} revision {res.get('revision')} on {target!r}: rollout {ro} "
                                   f"started ({strategy})", deployment=name, revision=res.get("revision"), rollout=ro)
        res = res | {"steps": steps}
    _summary(res, as_json)


def _config(pairs: list[str], unset: list[str], path: Path | None) -> dict[str, Any]:
    """The PATCH fields for ``--config``/``--config-unset``/``--config-file``."""
    out: dict[str, Any] = {}
    if path is not None:
        text = path.read_text()
        try:
            doc = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except ValueError as exc:
            raise typer.BadParameter(f"{path}: {exc}", param_hint="--config-file") from None
        if not isinstance(doc, dict):
            raise typer.BadParameter(f"{path} must hold an object of key -> value", param_hint="--config-file")
        out["config"] = doc
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--config")
        changes[key] = value
    changes.update({key: None for key in unset})
    if changes:
        out["config_set"] = changes
    return out


@deployment_app.command("update")
def deployment_update(
    name: str,
    module: str | None = oneshot.MODULE_OPT,
    target: str | None = typer.Option(None, "--target"),
    priority: int | None = typer.Option(None, "--priority"),
    strategy: str | None = typer.Option(None, "--strategy", help=STRATEGY_HELP + " (default: the last rollout's)"),
    bake: str | None = typer.Option(None, "--bake", help="Default: the last rollout's."),
    gate: list[str] = typer.Option([], "--gate", help=GATE_HELP + " Merged into the last rollout's gates."),
    on_failure: str | None = typer.Option(None, "--on-failure", help="Default: the last rollout's."),
    collect_rate: int | None = typer.Option(None, "--collect-rate"),
    device_bake: str | None = typer.Option(None, "--device-bake", help=DEVICE_BAKE_HELP + " 0 turns it off."),
    device_max_error_rate: float = typer.Option(0.05, "--device-max-error-rate", min=0, max=1),
    device_min_inferences: int = typer.Option(20, "--device-min-inferences", min=1),
    approve: bool | None = typer.Option(None, "--approve/--no-approve", help=APPROVE_HELP + " Default: the last "
                                                                                           "rollout's."),
    window: str | None = typer.Option(None, "--window", help=WINDOW_HELP + " Default: the last rollout's; '' clears."),
    start_at: str | None = typer.Option(None, "--start-at", help=START_HELP),
    config: list[str] = typer.Option([], "--config", help="KEY=VALUE (a string) set in the module's configuration; "
                                     "repeatable, merged into the latest revision's."),
    config_unset: list[str] = typer.Option([], "--config-unset", help="KEY removed from the module's configuration."),
    config_file: Path | None = typer.Option(None, "--config-file", exists=True, dir_okay=False,
                                            help="JSON or TOML (.toml) object: the whole configuration (str/int/bool "
                                                 "values), replacing the latest revision's; --config applies on top."),
    shadow: str | None = typer.Option(None, "--shadow", help=SHADOW_HELP),
    shadow_sample: float | None = typer.Option(None, "--shadow-sample", min=0, max=1, help=SHADOW_SAMPLE_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start a rollout of a new revision; earlier revisions stay for rollback.

    Only what is given changes: the strategy, bake, gates and failure policy are the last rollout's unless given.
    A configuration change alone rolls out like a version change: devices health-check the module with it and
    roll back to the previous configuration if it fails.
    """
    given = {"strategy": strategy, "bake_s": parse_duration(bake) if bake else None, "gates": _gates(gate),
             "on_failure": on_failure, "collect_rate_ppm": collect_rate, "approve": approve, "window": window,
             "start_at": parse_time(start_at), "shadow_s": parse_duration(shadow) if shadow else None,
             "shadow_sample": shadow_sample}
    body = {"module": module, "target": target, "priority": priority,
            **{k: v for k, v in given.items() if v is not None},
            **_device_bake(device_bake, device_max_error_rate, device_min_inferences), **_config(config, config_unset,
                                                                                               config_file)}
    with client() as c:
        res = call(lambda: c.request("PATCH", f"/api/v1/deployments/{name}", json=body))
    _summary(res, as_json)


@deployment_app.command("list")
def deployment_list(as_json: bool = typer.Option(False, "--json")) -> None:
    res = get("/api/v1/deployments")
    emit(res, as_json, ["name", "module", "target", "priority", "revision", "stable_revision", "active"])


@deployment_app.command("show")
def deployment_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    res = get(f"/api/v1/deployments/{name}")
    emit(res, as_json)


@deployment_app.command("delete")
def deployment_delete(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Deactivate a deployment: its devices drop the module unless another deployment provides it."""
    with client() as c:
        res = call(lambda: c.request("DELETE", f"/api/v1/deployments/{name}"))
    emit(res, as_json)


@deployment_app.command("revisions")
def deployment_revisions(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    res = get(f"/api/v1/deployments/{name}/revisions")
    emit(res, as_json, ["revision", "module", "target", "priority", "created_at", "created_by"])


# --- rollouts ---------------------------------------------------------------------------------

BUCKETS = ("waiting", "pending", "downloading", "installing", "running", "failed", "rolled_back", "new", "not_moved")
SHADOW_BUCKETS = ("shadow_pending", "shadow_downloading", "shadow_installing", "shadow_running", "shadow_failed")


def _render(st: dict[str, Any]) -> Any:
    from rich.console import Group
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.text import Text

    total = max(1, sum(st["counts"].values()))
    bars = Progress(TextColumn("{task.description:>12}"), BarColumn(), TextColumn("{task.completed:>5}"))
    for b in SHADOW_BUCKETS if st["phase"] == "shadowing" else BUCKETS:
        bars.add_task(b, total=total, completed=st["counts"].get(b, 0))
    head = Text.assemble((st["deployment"], "bold"), f" revision {st['revision']} ({st['module']}"
                         f"{' from ' + st['from_module'] if st['from_module'] else ''}): ", (st["state"], "bold"),
                         f"  waves {', '.join(st['strategy'])}")
    parts = [head, bars]
    if st["reason"]:
        parts.append(Text(f"reason: {st['reason']}", style="red" if "fail" in st["reason"] else ""))
    if st.get("shadow") or (st.get("last_gate") or {}).get("shadow"):
        from edgefleet.commands.rollout_follow import shadow_line

        parts.append(Text(shadow_line(st.get("shadow") or st["last_gate"]["shadow"], st.get("shadow_ends_in_s"))))
    if st.get("holding"):  # who the wave waits for, and until when
        names = ", ".join(d["id"] + ("" if d["online"] else " (offline)")
                          + (f" ({d['hold']['text']})" if d.get("hold") else "") for d in st["holding"][:10])
        more = st["holding_count"] - min(10, len(st["holding"]))
        parts.append(Text(f"wave {st['wave']} waits for {st['holding_count']} device(s): {names}"
                          + (f" and {more} more" if more > 0 else "")
                          + f"; wave timeout in {st['wave_timeout_in_s']:.0f}s", style="yellow"))
    if st.get("phase") == "awaiting_approval":
        parts.append(Text(f"wave {st['wave'] + 1} waits for approval: edgefleet rollout approve {st['deployment']}",
                          style="yellow"))
    if st.get("retried"):
        parts.append(Text(f"asked {len(st['retried'])} device(s) to install again: {', '.join(st['retried'][:10])}"
                          + (" …" if len(st["retried"]) > 10 else "")))
    return Group(*parts)


@rollout_app.command("status")
def rollout_status(
    name: str,
    wait: bool = typer.Option(False, "--wait", help="Follow the rollout to its end; the exit code says how it ended "
                                                    "(0 succeeded, 3 rolled back, 4 halted/aborted, 5 timeout)."),
    watch: bool = typer.Option(False, "--watch", help="The same as --wait (a live view on a terminal)."),
    timeout: float | None = typer.Option(None, "--timeout", min=0, help="Seconds to wait at most (exit 5 after)."),
    rollout_id: int | None = typer.Option(None, "--id", help="This rollout (default: the deployment's latest)."),
    interval: float = typer.Option(1.0, "--interval", min=0.05),
    as_json: bool = typer.Option(False, "--json", help="JSON; with --wait one object per line (NDJSON)."),
) -> None:
    """The latest rollout of deployment NAME: state (e.g. wave[2].baking), counts by device state, reason."""
    from edgefleet.commands.rollout_follow import follow

    with client() as c:
        if wait or watch:
            mode = "json" if as_json else ("live" if sys.stdout.isatty() else "plain")
            code = call(lambda: follow(c, name, rollout_id, interval=interval, timeout=timeout, mode=mode,
                                       live=_render))
            raise typer.Exit(code)
        st = call(lambda: c.get(f"/api/v1/rollouts/{name}", id=rollout_id))
    if as_json:
        emit(st, True)
    else:
        Console().print(_render(st))


def _action(action: str, name: str, as_json: bool, body: dict[str, Any] | None = None) -> None:
    with client() as c:
        st = call(lambda: c.post(f"/api/v1/rollouts/{name}/{action}", body))
    if as_json:
        emit(st, True)
    else:
        Console().print(_render(st))


@rollout_app.command("pause")
def rollout_pause(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop advancing; devices keep what they have."""
    _action("pause", name, as_json)


@rollout_app.command("resume")
def rollout_resume(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Continue a paused rollout, or re-install and re-gate the wave of a halted one."""
    _action("resume", name, as_json)


@rollout_app.command("abort")
def rollout_abort(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Stop for good; moved devices return to the stable revision."""
    _action("abort", name, as_json)


@rollout_app.command("rollback")
def rollout_rollback(name: str, to: int | None = typer.Option(None, "--to", help="Revision to go back to."),
                     as_json: bool = typer.Option(False, "--json")) -> None:
    """Roll back the live rollout; with none live, roll out the previous revision (or --to) again."""
    _action("rollback", name, as_json, {"to_revision": to})


@rollout_app.command("retry")
def rollout_retry(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Ask the devices that failed or rolled back the latest rollout's version to install it again
    (a halted rollout installs and gates that wave again)."""
    _action("retry", name, as_json)


@rollout_app.command("approve")
def rollout_approve(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Begin the next wave of a rollout awaiting approval (deployed with --approve)."""
    _action("approve", name, as_json)


@rollout_app.command("list")
def rollout_list(deployment: str | None = typer.Option(None, "--deployment"),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    res = get("/api/v1/rollouts", **({"deployment": deployment} if deployment else {}))
    emit(res, as_json, ["id", "deployment", "revision", "from_revision", "state", "reason", "created_by"])


@audit_app.command("list")
def audit_list(subject: str | None = typer.Option(None, "--subject"), action: str | None = typer.Option(None, "--action"),
               limit: int = typer.Option(50, "--limit"), as_json: bool = typer.Option(False, "--json")) -> None:
    params: dict[str, Any] = {"limit": limit} | ({"subject": subject} if subject else {}) | (
        {"action": action} if action else {})
    res = get("/api/v1/audit", **params)
    emit(res, as_json, ["id", "ts", "actor", "action", "subject", "detail"])


def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Fleet summary from the hub."""
    res = get("/api/v1/fleet/summary")
    emit(res, as_json)
