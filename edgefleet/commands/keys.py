"""Keys, the root of trust and release signing (docs/security.md).

Commands that touch private keys (``keys init``, ``keys generate``, ``keys sign-root``, and
``module sign`` / ``module revoke`` with ``--key``) run where the keys are, with no hub needed
for the signing itself; the hub only ever receives signed documents, which it checks as a
device would before publishing them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from edgefleet.cli_common import call, client, emit, err, parse_kv
from edgefleet.commands.registry import module_app, parse_model_ref

keys_app = typer.Typer(help="The root of trust, the hub's keys, offline root signing.", no_args_is_help=True)


def root_summary(envelope: dict[str, Any]) -> dict[str, Any]:
    signed = envelope["signed"]
    return {"version": signed["version"], "expires": signed["expires"],
            "roles": {r: {"keyids": v["keyids"], "threshold": v["threshold"]} for r, v in signed["roles"].items()}}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: {exc}") from None


def read_private(path: Path) -> Any:
    from protocol.signing import load_private

    try:
        return load_private(path.read_text())
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"{path}: not an Ed25519 private key file ({exc})") from None


def read_public(path: Path) -> str:
    """``PATH.pub``: a public key (hex); any other file: a private key, of which the public half is used."""
    from protocol.signing import public_hex

    if path.suffix == ".pub":
        text = path.read_text().strip()
        if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
            raise typer.BadParameter(f"{path}: not a 32-byte lowercase-hex public key")
        return text
    return public_hex(read_private(path))


@keys_app.command("init")
def keys_init(
    data: Path = typer.Option(..., "--data", envvar="EDGEFLEET_DATA", help="Hub data directory."),
    offline_root: Path | None = typer.Option(None, "--offline-root", file_okay=False,
                                             help="Write the root keys here, outside the hub's data (offline root)."),
    root_keys: int = typer.Option(1, "--root-keys", min=1, max=16, help="With --offline-root: how many root keys."),
    root_threshold: int = typer.Option(1, "--root-threshold", min=1, help="With --offline-root: how many must sign."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create the keys and root.json before the hub's first start; with --offline-root the root keys go to DIR only."""
    from hub.trust.keys import KeySetupError, load_or_create_keys
    from hub.trust.root_admin import init_offline

    try:
        if offline_root is None:
            if root_keys != 1 or root_threshold != 1:
                raise KeySetupError("--root-keys and --root-threshold need --offline-root")
            ring = load_or_create_keys(data / "keys")
            emit(root_summary(ring.root_envelope) | {"keys_dir": str(data / "keys")}, as_json)
            return
        res = init_offline(data / "keys", offline_root, root_keys, root_threshold)
    except KeySetupError as exc:
        err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(1) from None
    emit(res, as_json)


@keys_app.command("show")
def keys_show(
    out: Path | None = typer.Option(None, "--out", help="Also write the root envelope here (to pin it)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The hub's root of trust: version, expiry, per role the key ids and threshold, which keys the hub holds."""
    with client() as c:
        envelope = call(lambda: c.get("/api/v1/root"))
        status = call(lambda: c.get("/api/v1/keys"))
    if out:
        out.write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    summary = root_summary(envelope) | {"status": status}
    if as_json:
        emit(summary, True)
        return
    left = status["expires_in_s"]
    emit([{"role": r, "threshold": v["threshold"], "held by hub": r in status["held"],
           "expires in (days)": f"{left[r] / 86400:.1f}" if r in left else "",
           "keyids": ", ".join(k[:16] for k in v["keyids"])} for r, v in summary["roles"].items()], False,
         ["role", "threshold", "held by hub", "expires in (days)", "keyids"],
         title=f"root version {summary['version']}, expires {summary['expires']}")
    for problem in status["problems"]:
        err.print(f"[yellow]warning:[/] {problem}")
    # what a device operator checks at enrolment: agent enroll --root-sha256 … [--ca-sha256 …]
    print(f"root sha256: {status.get('root_sha256', '')}")
    for fp in status.get("ca_sha256", []):
        print(f"TLS CA sha256: {fp}")


@keys_app.command("rotate")
def keys_rotate(
    role: str = typer.Argument(..., help="root, release or director"),
    prepare: bool = typer.Option(False, "--prepare", help="Root key offline: get root N+1 unsigned, to sign elsewhere."),
    out: Path | None = typer.Option(None, "--out", help="With --prepare: write the unsigned root here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """New key for ROLE: root N+1 (signed by old and new root keys) is published and the old key revoked.
    With --prepare nothing changes yet: sign the root written to --out with `keys sign-root`, then `keys publish-root`."""
    if prepare and out is None:
        raise typer.BadParameter("--prepare needs --out FILE for the unsigned root")
    with client() as c:
        res = call(lambda: c.post("/api/v1/keys/rotate", {"role": role, "prepare": prepare}))
    if prepare:
        assert out is not None
        out.write_text(json.dumps(res["root"], indent=2, sort_keys=True) + "\n")
        emit({"role": role, "root_version": res["root_version"], "unsigned_root": str(out)}, as_json)
        return
    emit(res, as_json, ["role", "root_version", "keyid", "revoked", "resigned_states", "resigned_releases"])


@keys_app.command("generate")
def keys_generate(
    path: Path = typer.Argument(..., help="Private key file to create (0600); the public key goes to PATH.pub."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A new Ed25519 key, e.g. a new root key made on the offline machine, or a CI release key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from hub.trust.keys import write_key
    from protocol.signing import key_id, public_hex

    if path.exists():
        raise typer.BadParameter(f"{path} exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    write_key(path, key)
    path.with_name(path.name + ".pub").write_text(public_hex(key) + "\n")
    emit({"key": str(path), "public": str(path) + ".pub", "keyid": key_id(key)}, as_json)


@keys_app.command("sign-root")
def keys_sign_root(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Root document (from keys rotate --prepare)."),
    key: list[Path] = typer.Option([], "--key", exists=True, dir_okay=False, help="Root key file, repeatable."),
    set_role: list[str] = typer.Option([], "--set", help="ROLE=KEYFILE[,KEYFILE…] replaces the role's keys (.pub files "
                                                         "hold public keys); drops signatures made so far."),
    threshold: list[str] = typer.Option([], "--threshold", help="ROLE=N, repeatable; drops signatures made so far."),
    expires_days: int | None = typer.Option(None, "--expires-days", min=1, help="New expiry; drops signatures."),
    current: Path | None = typer.Option(None, "--current", exists=True, dir_okay=False,
                                        help="The root it must follow (default: checks only its own threshold)."),
    out: Path | None = typer.Option(None, "--out", help="Write here instead of in place."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sign a new root version with root key files (on the machine that holds them; m-of-n may take several runs)."""
    from protocol.signing import add_signatures, root_body

    envelope = read_json(path)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signed"), dict):
        raise typer.BadParameter(f"{path}: not a root envelope")
    signed = envelope["signed"]
    if set_role or threshold or expires_days:
        roles = {r: [signed["keys"][k]["public"] for k in v["keyids"]] for r, v in signed["roles"].items()}
        for item in set_role:
            role, _, files = item.partition("=")
            if role not in roles or not files:
                raise typer.BadParameter(f"--set {item!r}: want ROLE=KEYFILE[,KEYFILE…] with ROLE one of {list(roles)}")
            roles[role] = [read_public(Path(f)) for f in files.split(",")]
        limits = {r: v["threshold"] for r, v in signed["roles"].items()} | {
            r: int(n) for r, n in parse_kv(threshold).items()}
        expires = int(time.time()) + expires_days * 86400 if expires_days else signed["expires"]
        signed = root_body(roles, signed["version"], expires, limits)
        if envelope.get("signatures"):
            err.print(f"[yellow]the root changed: {len(envelope['signatures'])} earlier signature(s) dropped[/]")
        envelope = {"signed": signed, "signatures": []}
    envelope = add_signatures(envelope, [read_private(k) for k in key])
    (out or path).write_text(json.dumps(envelope, indent=2, sort_keys=True) + "\n")
    emit(root_check(envelope, read_json(current) if current else None) | {"file": str(out or path)}, as_json)


def root_check(envelope: dict[str, Any], current: Any | None) -> dict[str, Any]:
    """How far a root is from publishable: its own root threshold, and (given) the current root's."""
    from protocol.encoding import ProtocolError
    from protocol.signing import load_trusted_root, update_root

    res: dict[str, Any] = {"version": envelope["signed"]["version"], "signatures": len(envelope["signatures"])}
    try:
        load_trusted_root(envelope)
        res["own_threshold_met"] = True
    except ProtocolError as exc:
        res["own_threshold_met"], res["own_problem"] = False, str(exc)
    if current is not None:
        try:
            update_root(load_trusted_root(current), envelope)
            res["follows_current"] = True
        except ProtocolError as exc:
            res["follows_current"], res["current_problem"] = False, str(exc)
    return res


@keys_app.command("publish-root")
def keys_publish_root(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="Signed root version N+1."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Publish a root signed elsewhere: the hub checks it as a device would, then every device gets it."""
    envelope = read_json(path)
    with client() as c:
        res = call(lambda: c.post("/api/v1/roots", envelope))
    emit(res, as_json, ["root_version", "expires", "committed", "retired", "resigned_states"])


# --- release signing (the Uptane split: the release role held apart from the hub) ----------------


@module_app.command("sign")
def module_sign(
    ref: str = typer.Argument(..., help="MODULE:VERSION built by the hub and awaiting its release signature"),
    key: Path = typer.Option(..., "--key", exists=True, dir_okay=False, help="Release key file (e.g. held by CI)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Sign a module version's release with a release key held outside the hub, and attach it."""
    name, version = parse_model_ref(ref)
    with client() as c:
        res = sign_and_attach(c, name, version or 0, key)
    emit(res, as_json, ["name", "version", "digest", "signed"])


def sign_and_attach(c: Any, name: str, version: int, key: Path) -> Any:
    """Sign ``name:version``'s manifest (checked against its digest first) with ``key`` and attach the release."""
    from modules.bundle import sign_release
    from protocol.manifest import Manifest
    from protocol.schema import validate

    info = call(lambda: c.get(f"/api/v1/modules/{name}/versions/{version}"))
    manifest = validate(Manifest, info["envelope"]["signed"]["manifest"])
    if manifest.digest() != info["digest"]:
        raise typer.BadParameter(f"the hub's manifest for {name}:{version} does not hash to its digest: refusing to sign")
    envelope = sign_release(manifest, [read_private(key)], info["envelope"]["signed"]["expires"])
    return call(lambda: c.post(f"/api/v1/modules/{name}/versions/{version}/release", envelope))


@module_app.command("revoke")
def module_revoke(
    ref: str = typer.Argument(..., help="MODULE:VERSION"),
    and_older: bool = typer.Option(False, "--and-older", help="Also every older version (the module's minimum)."),
    key: Path | None = typer.Option(None, "--key", exists=True, dir_okay=False,
                                    help="Sign here with this release key (when the hub does not hold it)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Revoke a module version: devices refuse to install it (or, with --and-older, anything up to it)."""
    from protocol.signing import sign

    name, version = parse_model_ref(ref)
    path = f"/api/v1/modules/{name}/versions/{version}"
    with client() as c:
        if key is None:
            res = call(lambda: c.post(path + "/revoke", {"and_older": and_older}))
        else:
            draft = call(lambda: c.get(path + "/revoke-draft", and_older=str(and_older).lower()))
            res = call(lambda: c.post("/api/v1/release-policy", sign(draft["signed"], [read_private(key)])))
    emit(res, as_json, ["version", "expires", "modules"])
