"""The nightly model zoo: its nights and regressions, each caller seeing only its own jobs.

A zoo may run jobs for several owners (`orchestrator.zoo_file`), so a night is shown to the owner of any
of its jobs with only that owner's jobs, regressions and report; the night's summary, which covers every
job, only to a caller who owns them all. A zoo with no job of the caller reads as an empty list.

The report opens in a browser from `.../nights/{night_id}/report`. It is self-contained (images inline),
and is served with a Content-Security-Policy that loads nothing from anywhere and sandboxes the page (no
scripts, an origin of its own), so a model or recipe name that got past escaping still runs nothing on
the API's origin.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from api.deps import CurrentUser, SessionDep
from api.routers.artifacts import intact
from orchestrator.night_report import REPORT_KIND
from orchestrator.store import queries
from orchestrator.store import zoo as zoo_store
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Artifact, ZooNight, ZooNightJob

router = APIRouter(prefix="/v1/zoo", tags=["zoo"])

MAX_PAGE = 200
MAX_OFFSET = 1_000_000
ZooName = Annotated[str, Path(min_length=1, max_length=100, pattern=r"^[^\x00/]+$", description="The zoo's name.")]
NightId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$", description="The night's id.")]
REPORT_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox"


class NightJobPublic(BaseModel):
    job_id: str
    model: str
    recipe: str
    status: str
    reused: bool = Field(description="Every stage came from the stage cache: nothing about the pair changed.")


class NightPublic(BaseModel):
    id: str
    zoo: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    jobs: list[NightJobPublic] = Field(description="The caller's jobs of the night.")
    regressions: int = Field(description="Regressions among the caller's jobs.")
    report_artifact_id: str | None = Field(
        None, description="The caller's HTML report of the night, an artifact: GET "
        "/v1/zoo/{name}/nights/{night_id}/report opens it in a browser, /v1/artifacts/{id}/download saves it.")
    summary: str | None = Field(None, description="The night's plain-text summary, when the caller owns every job.")


class NightsPublic(BaseModel):
    data: list[NightPublic]
    count: int


class RegressionPublic(BaseModel):
    night_id: str
    job_id: str
    previous_job_id: str = Field(description="The pair's job on the last successful night compared with.")
    model: str
    recipe: str
    metric: str
    old_value: float
    new_value: float
    tolerance: float = Field(description="The relative change allowed, e.g. 0.02 for 2%.")
    worse: str = Field(description="`higher` or `lower`: the direction that counts as worse.")


class RegressionsPublic(BaseModel):
    data: list[RegressionPublic]
    count: int


def _visible(session: Session, night: ZooNight, user: str) -> NightPublic | None:
    mine = [row for row in night.jobs if row.job.owner == user]
    if not mine:
        return None
    reports = queries.list_artifacts(session, mine[0].job_id, kind=REPORT_KIND)
    owned = {row.job_id for row in mine}
    regressions = [r for r in zoo_store.night_regressions(session, night.id) if r.job_id in owned]
    return NightPublic(
        id=night.id, zoo=night.zoo, status=night.status.value, started_at=night.started_at,
        finished_at=night.finished_at, regressions=len(regressions),
        jobs=[NightJobPublic(job_id=r.job_id, model=r.model, recipe=r.recipe_name, status=r.job.status.value,
                             reused=r.reused) for r in mine],
        report_artifact_id=reports[-1].id if reports else None,
        summary=night.summary if len(mine) == len(night.jobs) else None,
    )


@router.get("/{name}/nights", response_model=NightsPublic)
def list_nights(
    name: ZooName,
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Nights per page.")] = 30,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Nights to skip, newest first.")] = 0,
) -> NightsPublic:
    """The zoo's nights with a job of the caller's, newest first."""
    shown = [n for n in (_visible(session, night, user) for night in
                         zoo_store.list_nights(session, name, owner=user, limit=limit, offset=offset))
             if n is not None]
    return NightsPublic(data=shown, count=len(shown))


@router.get("/{name}/regressions", response_model=RegressionsPublic)
def list_regressions(
    name: ZooName,
    session: SessionDep,
    user: CurrentUser,
    night_id: Annotated[str | None, Query(max_length=64, description="Only this night's.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="Regressions per page.")] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Regressions to skip.")] = 0,
) -> RegressionsPublic:
    """Regressions among the caller's jobs of the zoo, newest night first."""
    found = []
    pairs: dict[str, dict[str, ZooNightJob]] = {}  # night id -> job id -> its pair, loaded once per night
    for row in zoo_store.list_regressions(session, name, owner=user, night_id=night_id, limit=limit,
                                          offset=offset):
        if row.night_id not in pairs:
            pairs[row.night_id] = {j.job_id: j for j in zoo_store.night_jobs(session, row.night_id)}
        pair = pairs[row.night_id].get(row.job_id)
        if pair is None or pair.job.owner != user:
            continue
        found.append(RegressionPublic(
            night_id=row.night_id, job_id=row.job_id, previous_job_id=row.previous_job_id,
            model=pair.model, recipe=pair.recipe_name, metric=row.metric,
            old_value=row.old_value, new_value=row.new_value, tolerance=row.tolerance, worse=row.worse))
    return RegressionsPublic(data=found, count=len(found))


@router.get("/{name}/nights/{night_id}/report", response_class=Response,
            responses={200: {"content": {"text/html": {}}, "description": "The caller's report of the night."}})
def night_report(name: ZooName, night_id: NightId, session: SessionDep, user: CurrentUser) -> Response:
    """The caller's HTML report of the night, to open in a browser (404 when the caller has no job in it)."""
    night = zoo_store.get_night(session, night_id)
    shown = _visible(session, night, user) if night.zoo == name else None
    if shown is None or shown.report_artifact_id is None:
        raise NotFound("report of night", night_id)
    artifact = session.get(Artifact, shown.report_artifact_id)
    snap = intact(session, artifact)
    return Response(snap.fs.cat_file(snap.path), media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": REPORT_POLICY, "X-Content-Type-Options": "nosniff",
                             "ETag": f'"{artifact.sha256}"', "Cache-Control": "private, no-cache"})
