"""Reading the embedded store directly, for the CLI's `jobs`, `status` and `download` without a URL.

`ApiClient` without a URL mounts the whole API in-process, and the API brings the service with it:
FastAPI, Prefect and Ray, seconds of imports before a listing of a few rows. These three commands only
read, so `StoreClient` answers them from the store itself (SQLAlchemy and the same views and
integrity checks the API uses), with the API's owner rule and its error statuses (`StoreRefused`, which
carries `status` and `detail` as `ApiError` does): a listing imports no Prefect, Ray, torch or HTTP client.

A store that does not exist yet holds no jobs and is not created by a read. One whose schema is older
than this code is migrated, as any start of the service would, when a read finds a table or column
missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.settings import Settings
from orchestrator.store.db import make_engine
from orchestrator.store.errors import NotFound

T = TypeVar("T")
REPORT_KIND = "zoo_report"  # orchestrator.night_report.REPORT_KIND, which imports the report's plotting


class StoreRefused(RuntimeError):
    """What the API would have answered with an error status: `status` (404, 401, 409, 410) and `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class StoreClient:
    """`ApiClient`'s reading half (`jobs`, `job`, `artifacts`, `download`) on the configured store."""

    def __init__(self, settings: Settings, token: str | None = None) -> None:
        self.settings = settings
        self.owner = _owner(settings, token)
        url = make_url(settings.database)
        self._absent = url.get_backend_name() == "sqlite" and bool(url.database) \
            and url.database != ":memory:" and not Path(url.database).exists()
        self._engine = None if self._absent else make_engine(settings.database)
        self._sessions = sessionmaker(bind=self._engine, expire_on_commit=False) if self._engine else None
        self._migrated = False

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._engine is not None:
            self._engine.dispose()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        assert self._sessions is not None
        with self._sessions.begin() as session:
            yield session

    def _read(self, read: Callable[[Session], T]) -> T:
        """Run `read` in a transaction; a schema older than the code is migrated once, then read again."""
        try:
            with self._session() as session:
                return read(session)
        except (OperationalError, ProgrammingError):
            if self._migrated:
                raise
            from orchestrator.store import db

            db.migrate(self._engine)
            self._migrated = True
            with self._session() as session:
                return read(session)

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The owner's newest `limit` jobs, as `GET /v1/jobs` lists them."""
        if self._absent:
            return []
        from sqlalchemy import select

        from api.schemas import JobPublic
        from orchestrator.store.models import Job

        # the columns of the answer from the table itself, in `queries.list_jobs`' order: no ORM objects,
        # whose first use (mapper configuration, each job's stage runs loaded) costs more than the query
        table = Job.__table__
        query = (select(*(table.c[name] for name in JobPublic.model_fields))
                 .where(table.c.owner == self.owner)
                 .order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit))

        def read(session: Session) -> list[dict[str, Any]]:
            return [JobPublic.model_validate(dict(row._mapping)).model_dump(mode="json")
                    for row in session.execute(query)]

        return self._read(read)

    def job(self, job_id: str) -> dict[str, Any]:
        """The job with its stages, as `GET /v1/jobs/{id}` answers it (404 for another owner's job)."""
        from api.views import job_status

        self._require_store("job", job_id)
        return _answer(lambda: self._read(lambda s: job_status(s, job_id, self.owner).model_dump(mode="json")))

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        """The job's artifacts, as `GET /v1/jobs/{id}/artifacts` lists them."""
        from api.views import artifact_public
        from orchestrator.store import queries

        self._require_store("job", job_id)

        def read(session: Session) -> list[dict[str, Any]]:
            if queries.get_job(session, job_id).owner != self.owner:
                raise NotFound("job", job_id)
            return [artifact_public(a).model_dump(mode="json") for a in queries.list_artifacts(session, job_id)]

        return _answer(lambda: self._read(read))

    def reused_from(self, job_id: str) -> dict[str, str]:
        """Stage run id -> the job whose stage run it reused (a stage-cache hit), for the job's stages."""
        if self._absent:
            return {}
        from api.reuse import reused_from

        return self._read(lambda session: reused_from(session, job_id))

    def download(self, artifact_id: str, output: Path, *, force: bool = False) -> Path:
        """The artifact into `output/<name>`, re-verified in storage first and checked again once copied,
        through the same `Download` (temp file, sha256 or manifest check, rename) as over HTTP."""
        from api.download import Download
        from api.local_download import LocalBody
        from api.views import artifact_public
        from orchestrator.integrity import ArtifactCorrupt, ArtifactMissing

        self._require_store("artifact", artifact_id)
        refused: StoreRefused | None = None
        with self._session() as session:  # committed even when refused: a corrupt mark is kept
            artifact = self._owned_artifact(session, artifact_id)
            meta = artifact_public(artifact).model_dump(mode="json")
            try:
                body = LocalBody.open(session, artifact)
            except ArtifactCorrupt as error:
                refused = StoreRefused(409, f"{error}; it is not served")
            except ArtifactMissing:
                refused = StoreRefused(410, f"artifact {artifact_id}: its content is gone from storage")
        if refused is not None:
            raise refused
        download = Download(body, meta, output, force=force)
        path = download.run()
        self.resumed_from = download.resumed_from
        return path

    def _owned_artifact(self, session: Session, artifact_id: str) -> Any:
        from orchestrator.store.models import Artifact

        artifact = session.get(Artifact, artifact_id)
        if artifact is None or artifact.job.owner != self.owner \
                or (artifact.stage_run_id is None and artifact.kind != REPORT_KIND):
            raise StoreRefused(404, str(NotFound("artifact", artifact_id)))
        return artifact

    def _require_store(self, entity: str, ident: str) -> None:
        if self._absent:
            raise StoreRefused(404, str(NotFound(entity, ident)))


def _answer(read: Callable[[], T]) -> T:
    try:
        return read()
    except NotFound as error:
        raise StoreRefused(404, str(error)) from None


def _owner(settings: Settings, token: str | None) -> str:
    """The API's rule: 'local' without tokens, else the owner of a known bearer token."""
    if not settings.api_tokens:
        return "local"
    if token is None or token not in settings.api_tokens:
        raise StoreRefused(401, "missing or unknown bearer token")
    return settings.api_tokens[token]
