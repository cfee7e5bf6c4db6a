"""Alembic owns the schema: upgrade, downgrade and agreement with the ORM models, on both backends."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from orchestrator.store import db
from orchestrator.store.models import Base

TABLES = {"jobs", "stage_runs", "artifacts", "metrics", "tags", "lineage_edges", "kernel_plans", "datasets",
          "zoo_nights", "zoo_night_jobs", "zoo_regressions", "zoo_webhook_deliveries"}


def _tables(engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_head_creates_every_table(blank_engine):
    db.migrate(blank_engine)
    assert _tables(blank_engine) == TABLES


def test_upgrade_head_matches_the_models(engine):
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_downgrade_base_drops_everything(engine):
    db.downgrade(engine, "base")
    assert _tables(engine) == set()


def test_upgrade_after_downgrade_is_clean(engine):
    db.downgrade(engine, "base")
    db.migrate(engine)
    assert _tables(engine) == TABLES


def test_migrate_twice_is_a_no_op(engine):
    db.migrate(engine)
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == ScriptDirectory.from_config(db.alembic_config()).get_current_head()


def test_single_head():
    assert len(ScriptDirectory.from_config(db.alembic_config()).get_heads()) == 1


def test_foreign_keys_are_on_after_sqlite_migration(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    db.migrate(engine)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_cli_config_works_from_any_directory(tmp_path, monkeypatch):
    """`alembic -c orchestrator/alembic.ini upgrade head` with the URL from the environment."""
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'cli' / 'sparseflow.db'}"
    monkeypatch.setenv("SPARSEFLOW_DATABASE_URL", url)
    config = db.alembic_config()
    command.upgrade(config, "head")
    engine = db.make_engine(url)
    assert _tables(engine) == TABLES
    engine.dispose()


def test_offline_sql_renders(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'offline.db'}")
    command.upgrade(db.alembic_config(), "head", sql=True)
    assert "CREATE TABLE lineage_edges" in capsys.readouterr().out


def test_skipped_stage_status_survives_the_status_check(engine):
    """0004 widens the stage-run status CHECK with `skipped` (SQLite rebuilds the table for it)."""
    from orchestrator.states import Status
    from orchestrator.store import queries

    sessions = db.session_factory(engine)
    with sessions.begin() as session:
        job = queries.create_job(session, name="j", recipe={}, stages=[("evaluate", {})], code_version="t",
                                 package_versions={})
        run = queries.stage_runs(session, job.id)[0]
        queries.set_stage_status(session, run.id, Status.skipped)
    with sessions() as session:
        assert queries.get_stage_run(session, run.id).status == Status.skipped
