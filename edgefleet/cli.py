"""The ``edgefleet`` command line.

Global ``--hub`` / ``--token`` (env ``EDGEFLEET_HUB`` / ``EDGEFLEET_TOKEN``) say
which hub to talk to; every read command takes ``--json`` for scripts. The
commands live in ``edgefleet/commands/``, one module per area.
"""

from __future__ import annotations

import typer

from edgefleet.cli_root import main
from edgefleet.commands import (
    batch,
    devices,
    endpoint,
    fleet,
    keys,
    mlops,
    monitoring,
    offline,
    registry,
    run,
    score,
    tokens,
    webhooks,
)

app = typer.Typer(rich_markup_mode=None, help="edgefleet: ML models on fleets of devices and in the cloud.", no_args_is_help=True,
                  add_completion=False)
app.command()(run.demo)
app.command()(fleet.status)
app.command()(score.score)
for sub, name in ((run.hub_app, "hub"), (run.agent_app, "agent"), (run.sim_app, "sim"),
                  (registry.model_app, "model"), (registry.module_app, "module"), (registry.bundle_app, "bundle"),
                  (keys.keys_app, "keys"), (fleet.deploy_app, "deploy"), (devices.device_app, "device"),
                  (fleet.deployment_app, "deployment"), (fleet.rollout_app, "rollout"), (fleet.audit_app, "audit"),
                  (monitoring.metrics_app, "metrics"), (monitoring.drift_app, "drift"), (monitoring.alert_app, "alert"),
                  (monitoring.data_app, "data"), (monitoring.quality_app, "quality"), (webhooks.webhook_app, "webhook"),
                  (batch.batch_app, "batch"), (offline.offline_app, "offline")):
    app.add_typer(sub, name=name)
endpoint.register(app)  # endpoint …, serve, and deploy web
tokens.register(app)  # token …, device token list|revoke, audit verify
assert mlops.alias_app  # model alias …, model evaluate, model metrics attach themselves to ``model``
app.callback()(main)


if __name__ == "__main__":  # pragma: no cover
    app()
