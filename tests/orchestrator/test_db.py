"""Engine and URL helpers of the store."""

from __future__ import annotations

import threading

from orchestrator.settings import Settings
from orchestrator.store import db, queries


def test_database_url_defaults_to_sqlite_in_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEFLOW_DATABASE_URL", raising=False)
    assert Settings(home=tmp_path).database == f"sqlite:///{tmp_path}/sparseflow.db"


def test_database_url_prefers_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFLOW_DATABASE_URL", "postgresql+psycopg://db/sparseflow")
    assert Settings(home=tmp_path).database == "postgresql+psycopg://db/sparseflow"


def test_sqlite_engine_creates_its_directory_and_sets_pragmas(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'new' / 'sparseflow.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == db.SQLITE_BUSY_TIMEOUT_S * 1000
    assert (tmp_path / "new" / "sparseflow.db").exists()
    engine.dispose()


def test_sqlite_connection_can_move_between_threads(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        results: list[int] = []
        worker = threading.Thread(target=lambda: results.append(connection.exec_driver_sql("SELECT 1").scalar()))
        worker.start()
        worker.join()
    assert results == [1]
    engine.dispose()


def test_sessions_keep_attributes_after_commit(engine):
    with db.session_factory(engine)() as session:
        job = queries.create_job(session, name="n", recipe={}, stages=[], code_version="v", package_versions={})
        session.commit()
    assert job.name == "n"
