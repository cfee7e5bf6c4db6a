"""Cluster runs and tenancy: who runs a job and when it last beat, skipped stages, corrupt artifacts, datasets.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

- jobs: `flow_run_id` (the Prefect flow run in cluster mode), `runner` (who runs it now), `heartbeat_at`
  (the runner's last sign of life; a stale one means the runner died), `resumes` (automatic resumes so far).
- stage_runs: status `skipped`, for the stages a failed job never reached.
- artifacts: `verified_at`, `fingerprint` (size and mtime of the bytes when last verified) and
  `corrupt_reason` (set when the bytes no longer match the recorded sha256).
- datasets: text a tenant uploaded, owner-scoped, so recipes need no server paths.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
NEW_STATUSES = (*OLD_STATUSES, "skipped")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)


def _stage_runs(statuses: tuple[str, ...]) -> sa.Table:
    """stage_runs as it stands, spelled out so SQLite's batch copy keeps its CHECK constraint right."""
    return sa.Table(
        "stage_runs",
        sa.MetaData(naming_convention={"ck": "ck_%(table_name)s_%(constraint_name)s"}),
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE",
                                                        name="fk_stage_runs_job_id_jobs"), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("status", sa.Enum(*statuses, name="status", native_enum=False, create_constraint=True, length=16),
                  nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cache_key", sa.String(128), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("progress_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("progress_message", sa.Text(), nullable=True),
        sa.UniqueConstraint("job_id", "index", name="uq_stage_runs_job_id_index"),
        sa.Index("ix_stage_runs_cache_key", "cache_key"),
    )


def _set_stage_statuses(new: tuple[str, ...]) -> None:
    if op.get_context().dialect.name == "sqlite":
        # SQLite cannot alter a CHECK: the table is rebuilt from its full definition with the new statuses
        with op.batch_alter_table("stage_runs", copy_from=_stage_runs(new), recreate="always"):
            pass
        return
    op.drop_constraint(op.f("ck_stage_runs_status"), "stage_runs", type_="check")
    op.create_check_constraint(op.f("ck_stage_runs_status"), "stage_runs", sa.column("status").in_(new))


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("flow_run_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("runner", sa.String(200), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("resumes", sa.Integer(), server_default="0", nullable=False))
    _set_stage_statuses(NEW_STATUSES)
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("verified_at", TIMESTAMP, nullable=True))
        batch.add_column(sa.Column("fingerprint", sa.String(200), nullable=True))
        batch.add_column(sa.Column("corrupt_reason", sa.Text(), nullable=True))
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_index(op.f("ix_datasets_owner"), "datasets", ["owner"])


def downgrade() -> None:
    op.drop_table("datasets")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("corrupt_reason")
        batch.drop_column("fingerprint")
        batch.drop_column("verified_at")
    op.execute("UPDATE stage_runs SET status = 'cancelled' WHERE status = 'skipped'")
    _set_stage_statuses(OLD_STATUSES)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resumes")
        batch.drop_column("heartbeat_at")
        batch.drop_column("runner")
        batch.drop_column("flow_run_id")
