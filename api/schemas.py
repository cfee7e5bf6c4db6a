"""Request and response bodies of the REST API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pipelines.recipe import Recipe


class JobCreate(BaseModel):
    """`POST /v1/jobs`: the recipe to run; `start: false` only records the job (`POST .../start` runs it).

    The recipe's own types bound every string, list and number; the body as a whole is bounded by
    `max_request_bytes` before it is parsed (api/limits.py).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    recipe: Recipe
    start: bool = True


class ErrorBody(BaseModel):
    """An error answer: what went wrong, naming the field or the resource."""

    detail: Any


class MetricPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    stage_run_id: str
    name: str
    value: float
    step: int
    timestamp: datetime


class MetricsPage(BaseModel):
    """One page of a job's metric points, ordered by stage index, name, step."""

    data: list[MetricPublic]
    total: int = Field(description="Points matching the filters, over all pages.")
    limit: int
    offset: int


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
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Last value of this stage's headline metrics (a fixed short list); every metric and its "
        "time series: `GET /v1/jobs/{job_id}/metrics`.",
    )
    notes: list[str] = Field(default_factory=list)
    reused_from_job: str | None = Field(
        None, description="A stage-cache hit: the job whose run of this stage computed what this one reused "
        "(its times and metrics are that run's); '' when that job is gone.")


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
    flow_run_id: str | None = Field(None, description="Cluster mode: the Prefect flow run now running the job.")
    resumes: int = Field(0, description="Times the service resumed the job by itself after its runner died.")


class JobDetail(JobPublic):
    recipe: dict[str, Any]
    package_versions: dict[str, str]
    stages: list[StageRunPublic]
    notes: list[str] = Field(default_factory=list, description="The job's own notes, e.g. why it was resumed.")


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


class ArtifactPublic(BaseModel):
    """An artifact as a tenant sees it: its name, never where the server keeps it."""

    id: str
    job_id: str
    stage_run_id: str | None
    kind: str
    name: str = Field(description="The file or directory name (a directory downloads as `<name>.tar`).")
    sha256: str | None = Field(description="sha256 of the file; of a directory, its checksums.json manifest's.")
    size_bytes: int | None
    created_at: datetime
    verified_at: datetime | None = Field(None, description="When the server last re-checked the bytes.")
    corrupt_reason: str | None = Field(None, description="Set when the stored bytes no longer match sha256.")
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
