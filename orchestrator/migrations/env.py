"""Alembic environment for the lineage store.

Code passes an open connection through `config.attributes["connection"]` (see
`orchestrator.store.db.migrate`), as MLflow's env.py does. The `alembic` CLI instead gets the URL
from `sqlalchemy.url` or `$SPARSEFLOW_DATABASE_URL`. SQLite runs in batch mode, so later
revisions can alter tables there.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from orchestrator.settings import Settings
from orchestrator.store.db import make_engine
from orchestrator.store.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """alembic.ini's `sqlalchemy.url` when given, else the service's (`SPARSEFLOW_DATABASE_URL` or its default)."""
    return config.get_main_option("sqlalchemy.url") or Settings().database


def _cli_logging() -> None:
    """Configure logging from alembic.ini only under the `alembic` command, never inside a service."""
    if config.cmd_opts is not None and config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    _cli_logging()
    url = _url()
    context.configure(
        url=url,
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    _cli_logging()
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            if connection.dialect.name == "sqlite":
                # As in db.migrate: batch table copies must not cascade deletes.
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            _configure(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
