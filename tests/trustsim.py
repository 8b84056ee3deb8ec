"""A small repository simulator for trust tests, in the manner of python-tuf's ``RepositorySimulator``:
it holds a pool of keys, the current root's roles, and signs roots, desired states and release
policies with any chosen keys, so an attack test is a few lines."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.manifest import Manifest, describe_file, release_document
from protocol.messages import DesiredModule, DesiredState
from protocol.policy import ReleasePolicy
from protocol.signing import ROLES, root_body, sign

NOW = int(time.time())
POOL = [Ed25519PrivateKey.generate() for _ in range(12)]  # keys are picked by index


@dataclass
class Repo:
    """Role -> (key indexes, threshold); ``publish_root`` signs the next root version with chosen keys."""

    roles: dict[str, tuple[list[int], int]] = field(default_factory=lambda: {
        "root": ([0], 1), "release": ([1], 1), "director": ([2], 1)})
    version: int = 0
    roots: list[dict[str, Any]] = field(default_factory=list)  # every published envelope, version 1 first

    def set_role(self, role: str, keys: list[int], threshold: int = 1) -> None:
        self.roles[role] = (keys, threshold)

    def publish_root(self, sigs: list[int] | None = None, expires: int | None = None) -> dict[str, Any]:
        """Root version N+1 from the current roles, signed by ``sigs`` (default: its own root keys)."""
        self.version += 1
        body = root_body({r: [POOL[i] for i in self.roles[r][0]] for r in ROLES}, self.version,
                         NOW + 86400 if expires is None else expires, {r: self.roles[r][1] for r in ROLES})
        envelope = sign(body, [POOL[i] for i in (sigs if sigs is not None else self.roles["root"][0])])
        self.roots.append(envelope)
        return envelope


def desired(revision: int, sigs: list[int], device: str = "dev-1", expires: int | None = None,
            modules: list[tuple[str, int]] = (), policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """A desired state signed by the keys at ``sigs``; ``modules`` as (name, version)."""
    state = DesiredState(device=device, revision=revision, expires=NOW + 3600 if expires is None else expires,
                         modules=[DesiredModule(name=n, version=v, bundle="0" * 64, size=1) for n, v in modules],
                         policy=policy)
    return sign(state.to_dict(), [POOL[i] for i in sigs])


def policy(version: int, sigs: list[int], modules: dict[str, dict[str, Any]], expires: int | None = None
           ) -> dict[str, Any]:
    doc = ReleasePolicy(version=version, expires=NOW + 3600 if expires is None else expires, modules=modules)
    return sign(doc.to_dict(), [POOL[i] for i in sigs])


def release(name: str, version: int, sigs: list[int]) -> tuple[dict[str, Any], str]:
    """A release envelope for ``name:version`` signed by ``sigs``, and its bundle digest."""
    entry, _ = describe_file("model.onnx", [f"{name}{version}".encode()])
    manifest = Manifest(name=name, version=version, runtime="onnx", model="model.onnx", files=[entry])
    return sign(release_document(manifest, NOW + 3600), [POOL[i] for i in sigs]), manifest.digest()
