"""The nightly model zoo: nights, their jobs, regressions found and webhook deliveries.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

- zoo_nights: one run of a zoo file (status, times, report artifact, plain-text summary).
- zoo_night_jobs: the job of each (model, recipe) pair that night, its pair key and whether every stage
  was reused from the stage cache.
- zoo_regressions: a metric past its tolerance against the pair's last successful night (both job ids).
- zoo_webhook_deliveries: each announcement of a night, its attempts and every failure.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
NIGHT_STATUSES = ("running", "succeeded", "partial", "failed")
DELIVERY_STATUSES = ("pending", "delivered", "failed")


def _enum(values: tuple[str, ...], name: str) -> sa.Enum:
    return sa.Enum(*values, name=name, native_enum=False, create_constraint=True, length=16)


def _night_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(["night_id"], ["zoo_nights.id"], name=op.f(f"fk_{table}_night_id_zoo_nights"),
                                   ondelete="CASCADE")


def _job_fk(table: str, column: str = "job_id") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], ["jobs.id"], name=op.f(f"fk_{table}_{column}_jobs"), ondelete="CASCADE")


def upgrade() -> None:
    op.create_table(
        "zoo_nights",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("zoo", sa.String(100), nullable=False),
        sa.Column("status", _enum(NIGHT_STATUSES, "night_status"), nullable=False),
        sa.Column("started_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("report_artifact_id", sa.String(32), nullable=True),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["report_artifact_id"], ["artifacts.id"],
                                name=op.f("fk_zoo_nights_report_artifact_id_artifacts"), ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_zoo_nights")),
    )
    op.create_index(op.f("ix_zoo_nights_zoo"), "zoo_nights", ["zoo"])

    op.create_table(
        "zoo_night_jobs",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("night_id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("recipe_name", sa.String(200), nullable=False),
        sa.Column("pair_key", sa.String(64), nullable=False),
        sa.Column("reused", sa.Boolean(), server_default=sa.false(), nullable=False),
        _night_fk("zoo_night_jobs"),
        _job_fk("zoo_night_jobs"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_zoo_night_jobs")),
        sa.UniqueConstraint("night_id", "pair_key", name=op.f("uq_zoo_night_jobs_night_id_pair_key")),
    )
    op.create_index(op.f("ix_zoo_night_jobs_job_id"), "zoo_night_jobs", ["job_id"])
    op.create_index(op.f("ix_zoo_night_jobs_pair_key"), "zoo_night_jobs", ["pair_key"])

    op.create_table(
        "zoo_regressions",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("night_id", sa.String(32), nullable=False),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("previous_job_id", sa.String(32), nullable=False),
        sa.Column("metric", sa.String(200), nullable=False),
        sa.Column("old_value", sa.Double(), nullable=False),
        sa.Column("new_value", sa.Double(), nullable=False),
        sa.Column("tolerance", sa.Double(), nullable=False),
        sa.Column("worse", sa.String(8), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        _night_fk("zoo_regressions"),
        _job_fk("zoo_regressions"),
        _job_fk("zoo_regressions", "previous_job_id"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_zoo_regressions")),
    )
    op.create_index(op.f("ix_zoo_regressions_night_id"), "zoo_regressions", ["night_id"])
    op.create_index(op.f("ix_zoo_regressions_job_id"), "zoo_regressions", ["job_id"])

    op.create_table(
        "zoo_webhook_deliveries",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("night_id", sa.String(32), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("status", _enum(DELIVERY_STATUSES, "delivery_status"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("failures", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        _night_fk("zoo_webhook_deliveries"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_zoo_webhook_deliveries")),
    )
    op.create_index(op.f("ix_zoo_webhook_deliveries_night_id"), "zoo_webhook_deliveries", ["night_id"])


def downgrade() -> None:
    op.drop_table("zoo_webhook_deliveries")
    op.drop_table("zoo_regressions")
    op.drop_table("zoo_night_jobs")
    op.drop_table("zoo_nights")
