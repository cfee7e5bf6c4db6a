"""Engine, migrations and sessions for the lineage store; nothing here runs at import time.

Typical wiring (API lifespan or embedded runner)::

    engine = make_engine(get_settings().database)
    migrate(engine)
    Session = session_factory(engine)
    with Session.begin() as session:
        job = queries.create_job(session, ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from alembic.config import Config

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
ALEMBIC_INI = MIGRATIONS_DIR.parent / "alembic.ini"


def make_engine(url: str | URL) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, a busy timeout and cross-thread use.

    For a SQLite file, its parent directory is created if missing.
    """
    url = make_url(url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    finally:
        cursor.close()


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic config of the packaged migrations, optionally bound to an open connection.

    It reads `orchestrator/alembic.ini` beside the package (so the `alembic` CLI works too) and
    points `script_location` at the installed migrations, whatever the working directory. Alembic is
    imported here, not with the module: reading the store (the CLI's listings) needs no migration tool.
    """
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database behind `engine` to `revision` (default: the latest)."""
    from alembic import command

    _run_alembic(engine, lambda config: command.upgrade(config, revision))


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the database behind `engine` to `revision` (`"base"` drops everything)."""
    from alembic import command

    _run_alembic(engine, lambda config: command.downgrade(config, revision))


def _run_alembic(engine: Engine, action: Callable[[Config], None]) -> None:
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # Batch migrations copy and drop tables; with foreign keys on, the drop would cascade.
            # The pragma is a no-op inside a transaction, so switch it before beginning one.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                action(alembic_config(connection))
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    logger.info("database migrated on %s", engine.url.render_as_string(hide_password=True))


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions bound to `engine` that keep loaded attributes usable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)
