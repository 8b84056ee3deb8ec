"""The CLI's global options (``--hub``, ``--token``, logging, ``--version``): the callback every app shares."""

from __future__ import annotations

import logging

import typer

from edgefleet.cli_common import CTX, err


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
