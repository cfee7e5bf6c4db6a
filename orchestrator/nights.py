"""One night of a model zoo: every (model, recipe) pair as its own job, all running at once, then
compared with the last successful night and announced.

A night records itself (`zoo_nights`), submits one job per pair through `submit_job` with the pair's
owner (the access policy is checked first, as for any job: a refused pair's job is recorded failed with
the reason), and hands every job to `Orchestrator.start` at once: in embedded mode the process's pool
runs `max_concurrent_jobs` of them at a time; in cluster mode each becomes a flow run that Prefect
workers and Ray's resources pace. It then waits for all of them, one failure stopping no other,
marks the jobs whose stages all came from the stage cache as `reused` (their model, data, recipe and code
were unchanged: `orchestrator.caching`), records regressions (`orchestrator.regressions`), writes a
plain-text summary and posts it to the zoo's webhook (`orchestrator.webhook`), and stores an HTML report
per owner of its jobs (`orchestrator.night_report`).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from orchestrator import access
from orchestrator.lifecycle import submit_job
from orchestrator.night_report import night_data, publish_reports
from orchestrator.regressions import record_regressions
from orchestrator.service import DispatchFailed, Orchestrator
from orchestrator.states import Status
from orchestrator.store import queries
from orchestrator.store import zoo as zoo_store
from orchestrator.store.errors import NotFound
from orchestrator.store.models import NightStatus
from orchestrator.webhook import Backoff, deliver, slack_message
from orchestrator.zoo_file import Zoo
from orchestrator.zoo_report import text_summary
from workers.storage import ArtifactStorage

log = logging.getLogger(__name__)

_RUNNERS_FINISH_S = 30.0


@dataclass
class NightOutcome:
    """How a night ended: its id and status, each job's final status, regressions, the webhook's answer."""

    night_id: str
    status: str
    jobs: dict[str, str] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    regressions: int = 0
    webhook: str | None = None
    summary: str = ""
    reports: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"night_id": self.night_id, "status": self.status, "jobs": dict(self.jobs), "reused": list(self.reused),
                "regressions": self.regressions, "webhook": self.webhook, "summary": self.summary,
                "reports": dict(self.reports)}


def run_night(zoo: Zoo, orchestrator: Orchestrator, *, poll_s: float = 1.0, timeout_s: float | None = None,
              backoff: Backoff = Backoff()) -> NightOutcome:
    """Run one night of `zoo` to the end and return its outcome (raises only if the store is unreachable)."""
    sessions = orchestrator.sessions
    with sessions.begin() as session:
        night_id = zoo_store.create_night(session, zoo.name).id
    log.info("zoo %s: night %s, %d pairs", zoo.name, night_id, len(zoo.pairs))
    job_ids = _submit_all(zoo, orchestrator, night_id)
    runners = {job_id: _dispatch(orchestrator, job_id) for job_id in job_ids}
    final = _wait_all(orchestrator, runners, poll_s=poll_s, timeout_s=timeout_s)
    with sessions.begin() as session:
        reused = _mark_reused(session, night_id)
        regressions = record_regressions(session, zoo=zoo.name, night_id=night_id, tolerances=zoo.tolerances)
        status = night_status(final)
        # one summary for the store and the webhook: zoo_report's, whose zoo strings are escaped for Slack
        night = replace(night_data(session, zoo_store.get_night(session, night_id), owner=None),
                        finished_at=datetime.now(UTC))
        summary = text_summary(night)
        zoo_store.finish_night(session, night_id, status, summary=summary)
    outcome = NightOutcome(night_id, status.value, final, reused, len(regressions), summary=summary,
                           reports=_publish_reports(orchestrator, night_id))
    if zoo.webhook:
        message = slack_message(summary, title=f"sparseflow zoo {zoo.name}: night {status.value}")
        outcome.webhook = deliver(sessions, night_id=night_id, url=zoo.webhook, message=message,
                                  backoff=backoff).value
    log.info("zoo %s: night %s %s (%d jobs, %d reused, %d regressions)", zoo.name, night_id, status.value,
             len(final), len(reused), len(regressions))
    return outcome


def _publish_reports(orchestrator: Orchestrator, night_id: str) -> dict[str, str]:
    """The night's HTML report per owner (owner -> artifact id); a report that cannot be made is logged, never
    a reason to fail the night."""
    settings = orchestrator.settings
    storage = ArtifactStorage(settings.artifacts_url, settings.cache_dir / "artifacts")
    try:
        with orchestrator.sessions.begin() as session:
            return publish_reports(session, storage, night_id)
    except Exception:
        log.exception("night %s: no report", night_id)
        return {}


def _submit_all(zoo: Zoo, orchestrator: Orchestrator, night_id: str) -> list[str]:
    """Record every pair's job (refused ones failed with the reason) and its night row; return the job ids."""
    day = datetime.now(UTC).strftime("%Y%m%d")
    job_ids = []
    with orchestrator.sessions.begin() as session:
        for pair in zoo.pairs:
            recipe = pair.job_recipe(zoo.name, day)
            refusal = None
            try:
                access.check_recipe(session, recipe, owner=pair.owner, settings=orchestrator.settings)
            except (access.AccessDenied, NotFound) as error:
                refusal = f"refused: {error}"
            job = submit_job(session, recipe, owner=pair.owner)
            if refusal is not None:
                queries.set_job_status(session, job.id, Status.running)
                queries.set_job_status(session, job.id, Status.failed, error=refusal)
                queries.skip_unreached(session, job.id)
                log.warning("zoo %s: %s: %s", zoo.name, pair.field, refusal)
            zoo_store.add_night_job(session, night_id=night_id, job_id=job.id, model=pair.model,
                                    recipe_name=pair.recipe_name, pair_key=pair.key)
            job_ids.append(job.id)
    return job_ids


def _dispatch(orchestrator: Orchestrator, job_id: str) -> Future | None:
    """Hand the job to a runner; the embedded runner's future, None in cluster mode or when not dispatched."""
    with orchestrator.sessions() as session:
        if queries.get_job(session, job_id).status != Status.queued:
            return None  # refused at submit
    try:
        handle = orchestrator.start(job_id)
    except DispatchFailed as error:  # recorded failed by start(); the other jobs go on
        log.warning("night job %s not dispatched: %s", job_id, error)
        return None
    return handle if isinstance(handle, Future) else None


def _wait_all(orchestrator: Orchestrator, runners: dict[str, Future | None], *, poll_s: float,
              timeout_s: float | None) -> dict[str, str]:
    """Poll the store until every job has ended (or `timeout_s` passed); return job id -> status.

    An embedded runner that ended while its job is still queued never started the flow (it raised first):
    the job is recorded failed with that error, so the night does not wait for it forever.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with orchestrator.sessions.begin() as session:
            statuses = {job_id: queries.get_job(session, job_id).status for job_id in runners}
            for job_id, future in runners.items():
                if future is not None and future.done() and statuses[job_id] == Status.queued:
                    error = future.exception() or RuntimeError("the runner ended without running the flow")
                    queries.set_job_status(session, job_id, Status.running)
                    queries.set_job_status(session, job_id, Status.failed, error=f"not started: {error}")
                    queries.skip_unreached(session, job_id)
                    statuses[job_id] = Status.failed
        if all(Status(s).is_terminal for s in statuses.values()):
            # the embedded runners record the job's end just before their flow run ends: let them finish
            futures.wait([f for f in runners.values() if f is not None], timeout=_RUNNERS_FINISH_S)
            return {job_id: Status(s).value for job_id, s in statuses.items()}
        if deadline is not None and time.monotonic() > deadline:
            log.warning("night timed out with %d jobs unfinished",
                        sum(not Status(s).is_terminal for s in statuses.values()))
            return {job_id: Status(s).value for job_id, s in statuses.items()}
        time.sleep(poll_s)


def _mark_reused(session: Any, night_id: str) -> list[str]:
    """Mark the succeeded jobs every stage of which was reused from the cache; return their ids."""
    reused = []
    for night_job in zoo_store.night_jobs(session, night_id):
        if night_job.job.status != Status.succeeded:
            continue
        cached = {t.stage_run_id for t in queries.job_tags(session, night_job.job_id) if t.key == "cached_from"}
        runs = {r.id for r in queries.stage_runs(session, night_job.job_id)}
        if runs and runs <= cached:
            zoo_store.mark_reused(session, night_job.id, True)
            reused.append(night_job.job_id)
    return reused


def night_status(final: dict[str, str]) -> NightStatus:
    """succeeded when every job did, failed when none did (or there were none), partial otherwise."""
    succeeded = sum(status == Status.succeeded.value for status in final.values())
    if final and succeeded == len(final):
        return NightStatus.succeeded
    return NightStatus.partial if succeeded else NightStatus.failed
