"""ORM models of the lineage store: jobs, stage runs, artifacts, metrics, tags and lineage edges.

The schema itself is owned by Alembic (`orchestrator/migrations`); these classes describe it for the
ORM and must stay in step with the migrations (tests/orchestrator/test_migrations.py compares them).

A job is a recipe run; its stage runs are the recipe's stages in order. Artifacts are files a job
reads or writes (the input model reference has no producing stage run). A lineage edge says that a
stage run read ("input") or wrote ("output") an artifact. Metrics are append-only time series per
stage run; tags are free-form key/value notes, e.g. a recorded degradation. Kernel plan rows cache
the `kernel_tune` stage's measured choices per environment, dtype, weight shape and token count.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from orchestrator.states import Status

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Direction(StrEnum):
    input = "input"
    output = "output"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL keeps it as `timestamptz`; SQLite keeps UTC wall time and loses the zone, which is
    put back on read. Naive datetimes are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONDocument = JSON().with_variant(JSONB(), "postgresql")
# SQLite only auto-increments an INTEGER PRIMARY KEY.
AutoId = BigInteger().with_variant(Integer(), "sqlite")


def status_type() -> Enum:
    return Enum(
        Status,
        name="status",
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda enum: [member.value for member in enum],
    )


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONDocument,
        dict[str, str]: JSONDocument,
    }


def _job_fk() -> Mapped[str]:
    return mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"), index=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[Status] = mapped_column(status_type(), index=True, default=Status.queued)
    recipe: Mapped[dict[str, Any]]
    code_version: Mapped[str] = mapped_column(String(100))
    package_versions: Mapped[dict[str, str]]
    owner: Mapped[str] = mapped_column(String(100), index=True, default="local", server_default="local")
    created_at: Mapped[datetime] = mapped_column(index=True, default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    runner: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    resumes: Mapped[int] = mapped_column(default=0, server_default="0")

    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", order_by="StageRun.index", cascade="all, delete-orphan", passive_deletes=True
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    metrics: Mapped[list[Metric]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    tags: Mapped[list[Tag]] = relationship(back_populates="job", cascade="all, delete-orphan", passive_deletes=True)


class StageRun(Base):
    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("job_id", "index"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    index: Mapped[int]
    kind: Mapped[str] = mapped_column(String(50))
    status: Mapped[Status] = mapped_column(status_type(), default=Status.queued)
    params: Mapped[dict[str, Any]]
    attempt: Mapped[int] = mapped_column(default=0, server_default="0")
    cache_key: Mapped[str | None] = mapped_column(String(128), index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    progress_done: Mapped[int] = mapped_column(default=0, server_default="0")
    progress_total: Mapped[int] = mapped_column(default=0, server_default="0")
    progress_message: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="stage_runs")
    outputs: Mapped[list[Artifact]] = relationship(back_populates="stage_run", passive_deletes=True)
    edges: Mapped[list[LineageEdge]] = relationship(
        back_populates="stage_run", cascade="all, delete-orphan", passive_deletes=True
    )
    metrics: Mapped[list[Metric]] = relationship(
        back_populates="stage_run", cascade="all, delete-orphan", passive_deletes=True
    )
    tags: Mapped[list[Tag]] = relationship(back_populates="stage_run", passive_deletes=True)


class Artifact(Base):
    __tablename__ = "artifacts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = _job_fk()
    stage_run_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("stage_runs.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(50))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    verified_at: Mapped[datetime | None]
    fingerprint: Mapped[str | None] = mapped_column(String(200))
    corrupt_reason: Mapped[str | None] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="artifacts")
    stage_run: Mapped[StageRun | None] = relationship(back_populates="outputs")
    edges: Mapped[list[LineageEdge]] = relationship(
        back_populates="artifact", cascade="all, delete-orphan", passive_deletes=True
    )


class Dataset(Base):
    """Text a tenant uploaded (`POST /v1/datasets`); recipes name it `dataset:<id>` instead of a server path."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    uri: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Metric(Base):
    """One point of a time series; never updated (the primary key is a surrogate, not the value)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_stage_run_id_name_step", "stage_run_id", "name", "step"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = _job_fk()
    stage_run_id: Mapped[str] = mapped_column(String(32), ForeignKey("stage_runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Double)
    step: Mapped[int]
    timestamp: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="metrics")
    stage_run: Mapped[StageRun] = relationship(back_populates="metrics")


class Tag(Base):
    __tablename__ = "tags"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = _job_fk()
    stage_run_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("stage_runs.id", ondelete="CASCADE"), index=True
    )
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[str] = mapped_column(Text)

    job: Mapped[Job] = relationship(back_populates="tags")
    stage_run: Mapped[StageRun | None] = relationship(back_populates="tags")


class LineageEdge(Base):
    __tablename__ = "lineage_edges"
    __table_args__ = (UniqueConstraint("stage_run_id", "artifact_id", "direction"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    stage_run_id: Mapped[str] = mapped_column(String(32), ForeignKey("stage_runs.id", ondelete="CASCADE"))
    artifact_id: Mapped[str] = mapped_column(String(32), ForeignKey("artifacts.id", ondelete="CASCADE"), index=True)
    direction: Mapped[Direction] = mapped_column(
        Enum(
            Direction,
            name="direction",
            native_enum=False,
            create_constraint=True,
            length=8,
            values_callable=lambda enum: [member.value for member in enum],
        )
    )

    stage_run: Mapped[StageRun] = relationship(back_populates="edges")
    artifact: Mapped[Artifact] = relationship(back_populates="edges")


KERNEL_ENVIRONMENT_FIELDS = ("gpu", "capability", "cuda", "driver", "torch", "cusparselt", "sparse24_sm90")
"""What a kernel measurement depends on besides dtype and shape (`kernels.plan.Environment`'s fields)."""


class KernelPlanRow(Base):
    """One measured kernel choice, reused by later `kernel_tune` runs in the same environment.

    Environment fields are strings, "" where unknown (a NULL would make the unique key never match
    on PostgreSQL); `queries` converts them to and from `kernels.plan.Environment`'s values.
    """

    __tablename__ = "kernel_plans"
    __table_args__ = (
        UniqueConstraint(*KERNEL_ENVIRONMENT_FIELDS, "dtype", "shape", "tokens", name="uq_kernel_plans_key"),
    )

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    gpu: Mapped[str] = mapped_column(String(200))
    capability: Mapped[str] = mapped_column(String(16))
    cuda: Mapped[str] = mapped_column(String(32))
    driver: Mapped[str] = mapped_column(String(32))
    torch: Mapped[str] = mapped_column(String(64))
    cusparselt: Mapped[str] = mapped_column(String(32))
    sparse24_sm90: Mapped[str] = mapped_column(String(32), server_default="")
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[str] = mapped_column(String(32))
    tokens: Mapped[int]
    choice: Mapped[dict[str, Any]]
    stage_run_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("stage_runs.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    stage_run: Mapped[StageRun] = relationship()

    def environment(self) -> dict[str, str | int | None]:
        """The environment as `kernels.plan.Environment` spells it (None where unknown)."""
        values: dict[str, str | int | None] = {f: getattr(self, f) or None for f in KERNEL_ENVIRONMENT_FIELDS}
        if values["cusparselt"] is not None:
            values["cusparselt"] = int(values["cusparselt"])
        return values


# --- the nightly model zoo ------------------------------------------------------------------------------
# A night is one run of a zoo file: every (model, recipe) pair as its own job, compared afterwards with the
# last successful night of the same pair. These tables record the night, its jobs, the regressions found
# and each attempt to announce the night on the zoo's webhook.


class NightStatus(StrEnum):
    running = "running"
    succeeded = "succeeded"  # every job succeeded
    partial = "partial"  # some jobs failed
    failed = "failed"  # no job succeeded (or the night itself failed)


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"


def _small_enum(enum: type[StrEnum], name: str) -> Enum:
    return Enum(enum, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda members: [member.value for member in members])


class ZooNight(Base):
    """One run of a zoo: when, how it ended, its report and a plain-text summary."""

    __tablename__ = "zoo_nights"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    zoo: Mapped[str] = mapped_column(String(100), index=True)
    status: Mapped[NightStatus] = mapped_column(_small_enum(NightStatus, "night_status"), default=NightStatus.running)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    report_artifact_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("artifacts.id", ondelete="SET NULL")
    )
    summary: Mapped[str | None] = mapped_column(Text)

    jobs: Mapped[list[ZooNightJob]] = relationship(
        back_populates="night", order_by="ZooNightJob.id", cascade="all, delete-orphan", passive_deletes=True
    )


class ZooNightJob(Base):
    """A pair's job of one night; `reused` when every stage came from the stage cache (nothing changed)."""

    __tablename__ = "zoo_night_jobs"
    __table_args__ = (UniqueConstraint("night_id", "pair_key"),)

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    night_id: Mapped[str] = mapped_column(String(32), ForeignKey("zoo_nights.id", ondelete="CASCADE"))
    job_id: Mapped[str] = _job_fk()
    model: Mapped[str] = mapped_column(Text)
    recipe_name: Mapped[str] = mapped_column(String(200))
    pair_key: Mapped[str] = mapped_column(String(64), index=True)
    reused: Mapped[bool] = mapped_column(default=False, server_default=false())

    night: Mapped[ZooNight] = relationship(back_populates="jobs")
    job: Mapped[Job] = relationship()


class ZooRegression(Base):
    """A metric of a night's job past its tolerance against the same pair's last successful night."""

    __tablename__ = "zoo_regressions"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    night_id: Mapped[str] = mapped_column(String(32), ForeignKey("zoo_nights.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = _job_fk()
    previous_job_id: Mapped[str] = mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(200))
    old_value: Mapped[float] = mapped_column(Double)
    new_value: Mapped[float] = mapped_column(Double)
    tolerance: Mapped[float] = mapped_column(Double)
    worse: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One announcement of a night on a webhook; `failures` keeps every failed attempt's time and error."""

    __tablename__ = "zoo_webhook_deliveries"

    id: Mapped[int] = mapped_column(AutoId, primary_key=True, autoincrement=True)
    night_id: Mapped[str] = mapped_column(String(32), ForeignKey("zoo_nights.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    status: Mapped[DeliveryStatus] = mapped_column(
        _small_enum(DeliveryStatus, "delivery_status"), default=DeliveryStatus.pending
    )
    last_error: Mapped[str | None] = mapped_column(Text)
    failures: Mapped[list[dict[str, Any]]] = mapped_column(JSONDocument, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
