"""Initial schema: jobs, stage_runs, artifacts, metrics, tags, lineage_edges.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Types are spelled out here (not imported from the models) so this revision never changes.
Timestamps are `timestamptz` on PostgreSQL; on SQLite the models' UTCDateTime keeps UTC.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)


def _status() -> sa.Enum:
    return sa.Enum(*STATUSES, name="status", native_enum=False, create_constraint=True, length=16)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("status", _status(), nullable=False),
        sa.Column("recipe", JSON, nullable=False),
        sa.Column("code_version", sa.String(100), nullable=False),
        sa.Column("package_versions", JSON, nullable=False),
        sa.Column("owner", sa.String(100), server_default="local", nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_created_at"), "jobs", ["created_at"])
    op.create_index(op.f("ix_jobs_owner"), "jobs", ["owner"])
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"])

    op.create_table(
        "stage_runs",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("status", _status(), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("cache_key", sa.String(128), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("progress_done", sa.Integer(), server_default="0", nullable=False),
        sa.Column("progress_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("progress_message", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_stage_runs_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stage_runs")),
        sa.UniqueConstraint("job_id", "index", name=op.f("uq_stage_runs_job_id_index")),
    )
    op.create_index(op.f("ix_stage_runs_cache_key"), "stage_runs", ["cache_key"])

    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("stage_run_id", sa.String(32), nullable=True),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_artifacts_stage_run_id_stage_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
    )
    op.create_index(op.f("ix_artifacts_job_id"), "artifacts", ["job_id"])
    op.create_index(op.f("ix_artifacts_stage_run_id"), "artifacts", ["stage_run_id"])

    op.create_table(
        "metrics",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("stage_run_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("timestamp", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_metrics_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_metrics_stage_run_id_stage_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    op.create_index(op.f("ix_metrics_job_id"), "metrics", ["job_id"])
    op.create_index("ix_metrics_stage_run_id_name_step", "metrics", ["stage_run_id", "name", "step"])

    op.create_table(
        "tags",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("stage_run_id", sa.String(32), nullable=True),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_tags_job_id_jobs"), ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_tags_stage_run_id_stage_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
    )
    op.create_index(op.f("ix_tags_job_id"), "tags", ["job_id"])
    op.create_index(op.f("ix_tags_stage_run_id"), "tags", ["stage_run_id"])

    op.create_table(
        "lineage_edges",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("stage_run_id", sa.String(32), nullable=False),
        sa.Column("artifact_id", sa.String(32), nullable=False),
        sa.Column(
            "direction",
            sa.Enum("input", "output", name="direction", native_enum=False, create_constraint=True, length=8),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["artifact_id"],
            ["artifacts.id"],
            name=op.f("fk_lineage_edges_artifact_id_artifacts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_lineage_edges_stage_run_id_stage_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lineage_edges")),
        sa.UniqueConstraint(
            "stage_run_id",
            "artifact_id",
            "direction",
            name=op.f("uq_lineage_edges_stage_run_id_artifact_id_direction"),
        ),
    )
    op.create_index(op.f("ix_lineage_edges_artifact_id"), "lineage_edges", ["artifact_id"])


def downgrade() -> None:
    # Dropping a table drops its indexes; children go before parents.
    for table in ("lineage_edges", "tags", "metrics", "artifacts", "stage_runs", "jobs"):
        op.drop_table(table)
