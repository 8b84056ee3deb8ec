"""Batch scoring on the hub: jobs (``hub/batch/jobs.py``) and monitoring samples with their drift (``hub/batch/data.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from hub.api.deps import Principal, get_batch_jobs, get_hub, require
from hub.batch import data
from hub.batch.jobs import BatchJobRequest, BatchJobs
from hub.context import Hub

router = APIRouter(tags=["batch"])


@router.post("/batch-jobs", status_code=201)
def submit_job(body: BatchJobRequest, jobs: BatchJobs = Depends(get_batch_jobs),
               who: Principal = Depends(require("operator"))) -> dict[str, Any]:
    """Score a table on the hub's machine with a module's signed bundle, in a sandboxed subprocess."""
    return jobs.submit(body, who.name)


@router.get("/batch-jobs", dependencies=[Depends(require("viewer"))])
def list_jobs(limit: int = Query(default=100, ge=1, le=10_000), jobs: BatchJobs = Depends(get_batch_jobs)) -> list[dict[str, Any]]:
    return jobs.list(limit)


@router.get("/batch-jobs/{job}", dependencies=[Depends(require("viewer"))])
def get_job(job: int, jobs: BatchJobs = Depends(get_batch_jobs)) -> dict[str, Any]:
    """State, progress (rows done of the total), output location, and the result's summary once done."""
    return jobs.get(job)


@router.post("/batch-jobs/{job}/cancel", dependencies=[Depends(require("operator"))])
def cancel_job(job: int, jobs: BatchJobs = Depends(get_batch_jobs)) -> dict[str, Any]:
    return jobs.cancel(job)


class BatchSample(BaseModel):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    module: str = Field(min_length=1, max_length=128)
    version: int = Field(ge=1)
    records: list[dict[str, Any]] = Field(max_length=data.MAX_RECORDS)


@router.post("/batch-data", dependencies=[Depends(require("operator"))])
def add_sample(body: BatchSample, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """A piece of a batch job's monitoring sample (``edgefleet score --monitor``)."""
    return {"stored": data.store_sample(hub.db, body.name, body.module, body.version, body.records)}


@router.get("/batch-data/{name}/drift", dependencies=[Depends(require("viewer"))])
def sample_drift(name: str, threshold: float = 0.2, hub: Hub = Depends(get_hub)) -> dict[str, Any]:
    """The sample's input and prediction drift against its model's baseline, as for a deployment."""
    return data.drift(hub.db, hub.monitor.reports, name, threshold)
