"""Deployments (revisioned) and their rollouts."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hub.api.deps import Principal, get_hub, require
from hub.bounds import MAX_TEXT, Finite, Int63, Name, NamePath
from hub.context import Hub
from hub.rollout.deployments import device_bake

router = APIRouter(prefix="/deployments", tags=["deployments"])
rollouts = APIRouter(prefix="/rollouts", tags=["rollouts"])


class RolloutOptions(BaseModel):
    strategy: str = Field(default="all", max_length=256,
                          description='"all", "canary:N", "canary:P%" or "waves:1,10,50,100"')
    bake_s: Finite = Field(default=0.0, ge=0, description="seconds each wave runs before its gates are checked")
    gates: dict[Annotated[str, Field(max_length=64)], Finite | None] | None = Field(
        default=None, max_length=16,
        description="max_install_failure_rate (default 0), max_error_rate, max_p95_increase, min_reporting,"
                    " max_disagreement, max_prediction_drift, max_input_drift, min_accuracy")
    on_failure: Literal["rollback", "halt"] = "rollback"
    wave_timeout_s: Finite = Field(default=600.0, gt=0, description="longest a wave waits for its devices to install")
    collect_rate_ppm: int | None = Field(default=None, ge=0, le=1_000_000, description="override the module's sampling")
    shadow_s: Finite = Field(default=0.0, ge=0, le=7 * 86_400,
                             description="run the new version beside the live one on the first wave's devices this long"
                                         " (never served) and gate on it before the waves; 0: no shadow")
    shadow_sample: Finite = Field(default=1.0, gt=0, le=1, description="share of live inputs mirrored to the candidate")

    def kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class DeviceBake(BaseModel):
    """On-device probation after the health check (protocol BakePolicy): each device rolls back by itself."""

    device_bake_s: int | None = Field(default=None, ge=0, le=7 * 86_400,
                                      description="seconds each device watches the new version; 0 or absent: none")
    device_max_error_rate: Finite = Field(default=0.05, ge=0, le=1, description="roll back above this error rate")
    device_min_inferences: int = Field(default=20, ge=1, le=1_000_000,
                                       description="inferences needed before the rate decides")

    def device_bake(self) -> dict[str, int] | None:
        return device_bake(self.device_bake_s, self.device_max_error_rate, self.device_min_inferences)


BAKE_FIELDS = {"device_bake_s", "device_max_error_rate", "device_min_inferences"}


Target = Annotated[str, Field(max_length=MAX_TEXT, description='"*", "id1,id2" or "key=value,key2!=value2"')]
ModuleRef = Annotated[str, Field(max_length=200, description='"module:version", or "module@alias" (resolved now)')]


ConfigValue = Annotated[str, Field(max_length=4096)] | Int63 | bool
CONFIG_HELP = ("the module's configuration (protocol DesiredModule.config: keys [a-z][a-z0-9_.-]*, str/int/bool values, "
               "at most 64 keys and 8 KiB), delivered to the module without a new bundle")


class DeploymentRequest(RolloutOptions, DeviceBake):
    name: Name
    module: ModuleRef
    target: Target = "*"
    priority: Int63 = 0
    config: dict[Annotated[str, Field(max_length=64)], ConfigValue] | None = Field(default=None, max_length=64,
                                                                                  description=CONFIG_HELP)


class DeploymentUpdate(DeviceBake):
    """Only what is given changes; the rollout plan not given is the deployment's last rollout's."""

    module: ModuleRef | None = None
    target: Target | None = None
    priority: Int63 | None = None
    strategy: str | None = Field(default=None, max_length=256, description="default: the last rollout's")
    bake_s: Finite | None = Field(default=None, ge=0, description="default: the last rollout's")
    gates: dict[Annotated[str, Field(max_length=64)], Finite | None] | None = Field(
        default=None, max_length=16, description="merged into the last rollout's gates (null turns one off)")
    on_failure: Literal["rollback", "halt"] | None = Field(default=None, description="default: the last rollout's")
    wave_timeout_s: Finite | None = Field(default=None, gt=0, description="default: the last rollout's")
    collect_rate_ppm: int | None = Field(default=None, ge=0, le=1_000_000,
                                         description="default: the latest revision's; null (given) clears it")
    config: dict[Annotated[str, Field(max_length=64)], ConfigValue] | None = Field(
        default=None, max_length=64, description=CONFIG_HELP + "; replaces the latest revision's ({} clears it)")
    config_set: dict[Annotated[str, Field(max_length=64)], ConfigValue | None] | None = Field(
        default=None, max_length=64, description="merged into the configuration (null removes a key)")
    shadow_s: Finite = Field(default=0.0, ge=0, le=7 * 86_400,
                             description="a shadow phase of this many seconds before the waves (not inherited)")
    shadow_sample: Finite = Field(default=1.0, gt=0, le=1, description="share of live inputs mirrored to the candidate")


@router.post("")
def put_deployment(body: DeploymentRequest, hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Create or change: a new revision, rolled out by ``strategy``; matching devices get new signed desired states."""
    opts = body.model_dump(exclude={"name", "module", "target", "priority", *BAKE_FIELDS})
    module, note = hub.aliases.module_ref(body.module)  # MODULE@ALIAS: resolved now, the revision records the version
    out = hub.deployments.put(body.name, module, body.target, body.priority, actor=who.name,
                              device_bake=body.device_bake(), note=note or "", **opts)
    return out | ({"requested": body.module, "resolved": note} if note else {})


@router.patch("/{name}")
def update_deployment(name: NamePath, body: DeploymentUpdate, hub: Hub = Depends(get_hub),
                      who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """A new revision changing only the fields given (e.g. the module version); starts a rollout with the last
    rollout's strategy, bake, gates and failure policy unless given. ``plan`` in the answer is the effective one."""
    opts = body.model_dump(exclude_unset=True, exclude={"module", "target", "priority", *BAKE_FIELDS})
    if body.device_bake_s is not None:  # absent: the latest revision's bake stays
        opts["device_bake"] = body.device_bake()
    module, note = hub.aliases.module_ref(body.module) if body.module else (None, None)
    out = hub.deployments.update(name, module, body.target, body.priority, actor=who.name, note=note or "", **opts)
    return out | ({"requested": body.module, "resolved": note} if note else {})


@router.get("", dependencies=[Depends(require("viewer"))])
def list_deployments(hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.deployments.list()


@router.get("/{name}", dependencies=[Depends(require("viewer"))])
def get_deployment(name: NamePath, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    return hub.deployments.get(name)


@router.get("/{name}/revisions", dependencies=[Depends(require("viewer"))])
def deployment_revisions(name: NamePath, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.deployments.revisions(name)


@router.delete("/{name}")
def delete_deployment(name: NamePath, hub: Hub = Depends(get_hub),
                      who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Deactivate; devices drop the module unless another deployment provides it."""
    return hub.deployments.delete(name, actor=who.name)


@rollouts.get("", dependencies=[Depends(require("viewer"))])
def list_rollouts(deployment: str | None = None, hub: Hub = Depends(get_hub)) -> list[dict[str, Any]]:
    return hub.rollouts.list(deployment)


@rollouts.get("/{deployment}", dependencies=[Depends(require("viewer"))])
def rollout_status(deployment: NamePath, id: int | None = None,
                   state: str = Query(default="", max_length=32, description="only devices in this bucket"),
                   q: str = Query(default="", max_length=200, description="only devices whose id holds this"),
                   limit: int | None = Query(default=None, ge=1, le=1000, description="list one page of devices"),
                   cursor: str = Query(default="", max_length=256, description="next_cursor of the previous page"),
                   hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The latest rollout of a deployment (or rollout ``id``): state, counts by device state and per wave
    (``by_wave``), the devices (all, or one page of those matching ``state``/``q``: ``devices_total``,
    ``next_cursor``), who holds the wave and until when, last gate."""
    page = {"state": state, "q": q, "limit": limit, "cursor": cursor}
    return hub.rollouts.status(deployment, id, page)


class RollbackRequest(BaseModel):
    to_revision: int | None = Field(default=None, ge=1, le=2**63 - 1, description="default: the live rollout, else the previous one")


@rollouts.post("/{deployment}/{action}")
def rollout_action(deployment: NamePath, action: Literal["pause", "resume", "abort", "rollback"],
                   body: RollbackRequest | None = None, hub: Hub = Depends(get_hub),
                   who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    if action == "rollback":
        return hub.deployments.rollback(deployment, body.to_revision if body else None, who.name)
    return getattr(hub.rollouts, action)(deployment, who.name)
