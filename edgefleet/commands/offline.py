"""``edgefleet offline export``: an offline package for an air-gapped device (docs/agent.md#offline-install)."""

from __future__ import annotations

from pathlib import Path

import typer

from edgefleet.cli_common import call, client, emit

offline_app = typer.Typer(rich_markup_mode=None, help="Offline packages for air-gapped devices.", no_args_is_help=True)


@offline_app.command("export")
def offline_export(deployment: str = typer.Option(..., "--deployment", help="The deployment the device must get."),
                   device: str = typer.Option(..., "--device", help="The device's id."),
                   out: Path = typer.Option(..., "--out", help="Write the package (a tar file) here."),
                   as_json: bool = typer.Option(False, "--json")) -> None:
    """Sign the device's desired state afresh and write it with every root, release and chunk it needs; install
    it on the device with ``python -m agent install-offline --data DATA FILE``."""
    with client() as c:
        size, headers = call(lambda: c.post_download("/api/v1/offline-packages",
                                                     {"deployment": deployment, "device": device}, out))
    res = {"device": device, "deployment": deployment, "revision": int(headers.get("x-edgefleet-revision", 0)),
           "file": str(out), "bytes": size}
    if as_json:
        emit(res, True)
    else:
        print(f"offline package for {device} (desired revision {res['revision']}, deployment {deployment})"
              f" written to {out} ({size} bytes)")
