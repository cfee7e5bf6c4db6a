"""Kernel plan cache: measured kernel choices keyed by environment, dtype, shape and token count.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25

Types are spelled out here (not imported from the models) so this revision never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TIMESTAMP = sa.DateTime(timezone=True)
KEY = ("gpu", "capability", "cuda", "driver", "torch", "cusparselt", "dtype", "shape", "tokens")


def upgrade() -> None:
    op.create_table(
        "kernel_plans",
        sa.Column("id", AUTO_ID, autoincrement=True, nullable=False),
        sa.Column("gpu", sa.String(200), nullable=False),
        sa.Column("capability", sa.String(16), nullable=False),
        sa.Column("cuda", sa.String(32), nullable=False),
        sa.Column("driver", sa.String(32), nullable=False),
        sa.Column("torch", sa.String(64), nullable=False),
        sa.Column("cusparselt", sa.String(32), nullable=False),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.String(32), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("choice", JSON, nullable=False),
        sa.Column("stage_run_id", sa.String(32), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["stage_run_id"],
            ["stage_runs.id"],
            name=op.f("fk_kernel_plans_stage_run_id_stage_runs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernel_plans")),
        sa.UniqueConstraint(*KEY, name=op.f("uq_kernel_plans_key")),
    )
    op.create_index(op.f("ix_kernel_plans_stage_run_id"), "kernel_plans", ["stage_run_id"])


def downgrade() -> None:
    op.drop_table("kernel_plans")
