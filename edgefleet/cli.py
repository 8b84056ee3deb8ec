"""The ``edgefleet`` command line.

Global ``--hub`` / ``--token`` (env ``EDGEFLEET_HUB`` / ``EDGEFLEET_TOKEN``) say
which hub to talk to; every read command takes ``--json`` for scripts. The
commands live in ``edgefleet/commands/``, one module per area.
"""

from __future__ import annotations

import logging

import typer

from edgefleet.cli_common import CTX, err
from edgefleet.commands import endpoint, fleet, keys, mlops, monitoring, registry, run, score, tokens, webhooks

app = typer.Typer(help="edgefleet: ML models on fleets of devices and in the cloud.", no_args_is_help=True,
                  add_completion=False)
app.command()(run.demo)
app.command()(fleet.status)
app.command()(score.score)
for sub, name in ((run.hub_app, "hub"), (run.agent_app, "agent"), (run.sim_app, "sim"),
                  (registry.model_app, "model"), (registry.module_app, "module"), (registry.bundle_app, "bundle"),
                  (keys.keys_app, "keys"), (fleet.deploy_app, "deploy"), (fleet.device_app, "device"),
                  (fleet.deployment_app, "deployment"), (fleet.rollout_app, "rollout"), (fleet.audit_app, "audit"),
                  (monitoring.metrics_app, "metrics"), (monitoring.drift_app, "drift"), (monitoring.alert_app, "alert"),
                  (monitoring.data_app, "data"), (webhooks.webhook_app, "webhook")):
    app.add_typer(sub, name=name)
endpoint.register(app)  # endpoint …, serve, and deploy web
tokens.register(app)  # token …, device token list|revoke, audit verify
assert mlops.alias_app  # model alias …, model evaluate, model metrics attach themselves to ``model``


def version_text() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"edgefleet {version('edgefleet')}"
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "edgefleet (not installed)"


def _print_version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit()


@app.callback()
def main(
    hub: str = typer.Option("http://127.0.0.1:8080", "--hub", envvar="EDGEFLEET_HUB", help="Hub URL."),
    token: str | None = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API bearer token."),
    hub_ca: str | None = typer.Option(None, "--hub-ca", envvar="EDGEFLEET_HUB_CA",
                                      help="PEM CA to trust for an https:// hub (the hub's own: DATA/tls/ca.pem)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    from rich.logging import RichHandler

    # Logs go through the same stderr console as progress bars and the demo's live table, so they never tear it.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s",
                        handlers=[RichHandler(console=err, show_path=False, rich_tracebacks=False)])
    for noisy in ("httpx", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)
    CTX.hub, CTX.token, CTX.hub_ca = hub, token, hub_ca


if __name__ == "__main__":  # pragma: no cover
    app()
