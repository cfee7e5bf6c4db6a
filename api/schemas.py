"""Request and response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.recipe import Recipe


class JobCreate(BaseModel):
    """`POST /v1/jobs`: the recipe to run; `start: false` only records the job."""

    model_config = ConfigDict(extra="forbid")
    recipe: Recipe
    start: bool = True


class MetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    stage_run_id: str
    name: str
    value: float
    step: int
    timestamp: datetime


class StageRunPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    index: int
    kind: str
    status: str
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    progress_done: int
    progress_total: int
    progress_message: str | None
    metrics: dict[str, float] = Field(default_factory=dict, description="Last value of each metric.")
    notes: list[str] = Field(default_factory=list)


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    status: str
    owner: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    code_version: str


class JobDetail(JobPublic):
    recipe: dict[str, Any]
    package_versions: dict[str, str]
    stages: list[StageRunPublic]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ArtifactPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    job_id: str
    stage_run_id: str | None
    kind: str
    uri: str
    sha256: str | None
    size_bytes: int | None
    created_at: datetime
    download_url: str | None = None


class LineageEdgePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    stage_run_id: str
    artifact_id: str
    direction: str


class LineagePublic(BaseModel):
    job_id: str
    artifacts: list[ArtifactPublic]
    edges: list[LineageEdgePublic]
