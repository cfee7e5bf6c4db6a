"""Kernel plan cache: key measured choices by the version of our own kernel library too.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

A choice measured with one build of the sm90 2:4 library (`kernels.cutlass24`: sources, CUTLASS
version, nvcc release, kernel table) says nothing about another build, so the library's key joins
the cache key. Rows from before this revision get "" (no library), which a tuning run that has the
library never matches: they are re-measured, not reused.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_KEY = ("gpu", "capability", "cuda", "driver", "torch", "cusparselt", "dtype", "shape", "tokens")
NEW_KEY = ("gpu", "capability", "cuda", "driver", "torch", "cusparselt", "sparse24_sm90", "dtype", "shape", "tokens")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _table(with_library: bool) -> sa.Table:
    """The table as it stands before the change, spelled out so SQLite's batch copy also renders offline."""
    library = [sa.Column("sparse24_sm90", sa.String(32), nullable=False, server_default="")] if with_library else []
    return sa.Table(
        "kernel_plans",
        sa.MetaData(),
        sa.Column("id", AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("gpu", sa.String(200), nullable=False),
        sa.Column("capability", sa.String(16), nullable=False),
        sa.Column("cuda", sa.String(32), nullable=False),
        sa.Column("driver", sa.String(32), nullable=False),
        sa.Column("torch", sa.String(64), nullable=False),
        sa.Column("cusparselt", sa.String(32), nullable=False),
        *library,
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.String(32), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("choice", JSON, nullable=False),
        sa.Column("stage_run_id", sa.String(32), sa.ForeignKey("stage_runs.id", ondelete="CASCADE",
                                                               name="fk_kernel_plans_stage_run_id_stage_runs"),
                  nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint(*(NEW_KEY if with_library else OLD_KEY), name="uq_kernel_plans_key"),
        sa.Index("ix_kernel_plans_stage_run_id", "stage_run_id"),
    )


def upgrade() -> None:
    # SQLite rebuilds the table from `copy_from`; PostgreSQL alters it in place
    with op.batch_alter_table("kernel_plans", copy_from=_table(with_library=False)) as batch:
        batch.add_column(sa.Column("sparse24_sm90", sa.String(32), nullable=False, server_default=""))
        batch.drop_constraint("uq_kernel_plans_key", type_="unique")
        batch.create_unique_constraint("uq_kernel_plans_key", list(NEW_KEY))


def downgrade() -> None:
    with op.batch_alter_table("kernel_plans", copy_from=_table(with_library=True)) as batch:
        batch.drop_constraint("uq_kernel_plans_key", type_="unique")
        batch.drop_column("sparse24_sm90")
        batch.create_unique_constraint("uq_kernel_plans_key", list(OLD_KEY))
