"""Store fixtures: a fresh, migrated database per test, on SQLite and on PostgreSQL.

SQLite gets a new file under `tmp_path`; PostgreSQL gets a new schema (selected through the
connection's `search_path`) that is dropped afterwards. Both run the Alembic migrations, never
`create_all`. PostgreSQL cases carry the `postgres` marker and are skipped, with the reason, only
when the server at `$SPARSEFLOW_TEST_POSTGRES_URL` (default: the CI one) cannot be reached.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from databases import POSTGRES_URL, postgres_unreachable
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from orchestrator.store import db, queries
from orchestrator.store.models import Job

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    reason = postgres_unreachable()
    if reason:
        pytest.skip(reason)
    engine = db.make_engine(POSTGRES_URL)
    yield engine
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def blank_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database (no tables) on each backend."""
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path / 'sparseflow.db'}")
        yield engine
        engine.dispose()
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    engine = db.make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def engine(blank_engine: Engine) -> Engine:
    db.migrate(blank_engine)
    return blank_engine


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with db.session_factory(engine)() as session:
        yield session


@pytest.fixture
def job(session: Session) -> Job:
    """A committed queued job with two stages: calibrate, then prune."""
    job = queries.create_job(
        session,
        name="llama-2of4",
        recipe={"model": "tiny", "stages": [{"stage": "calibrate"}, {"stage": "prune"}]},
        stages=[("calibrate", {"samples": 8}), ("prune", {"method": "wanda", "sparsity": "2:4"})],
        code_version="abc1234",
        package_versions={"torch": "2.6.0"},
    )
    session.commit()
    return job
