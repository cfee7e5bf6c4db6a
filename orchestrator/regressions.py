"""Regressions: each night's job metrics against the same (model, recipe) pair's last successful night.

A metric is compared when the zoo has a tolerance for it (`orchestrator.zoo_file.tolerance_for`: its own
name, or a prefix such as `kernel_speedup` for every `kernel_speedup.<shape>.<tokens>`) and both jobs
reported it. Past the tolerance in the bad direction, the night records a `zoo_regressions` row and tags
the job `regressed` with the metric, old and new values and both job ids, so the job's own page says so.
A job whose stages were all reused from the cache reports the cached metrics and so never regresses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.orm import Session

from orchestrator.states import Status
from orchestrator.store import queries
from orchestrator.store import zoo as zoo_store
from orchestrator.store.models import ZooRegression
from orchestrator.zoo_file import Tolerance, tolerance_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One metric past its tolerance (pure data, before it is recorded)."""

    metric: str
    old: float
    new: float
    tolerance: Tolerance

    @property
    def change(self) -> float:
        """Relative change from old to new (0 when old is 0 and new too)."""
        if self.old == 0:
            return 0.0 if self.new == 0 else float("inf") if self.new > 0 else float("-inf")
        return (self.new - self.old) / abs(self.old)

    def describe(self) -> str:
        return (f"{self.metric} {self.old:.6g} -> {self.new:.6g} ({self.change * 100:+.1f}%, "
                f"tolerance {self.tolerance.describe()})")


def final_metrics(session: Session, job_id: str) -> dict[str, float]:
    """Each metric's final value in a job: from the last stage that reported it, at its last step."""
    values: dict[str, float] = {}
    for metric in queries.job_metrics(session, job_id):  # ordered by stage index, name, step
        values[metric.name] = metric.value
    return values


def compare(old: dict[str, float], new: dict[str, float], tolerances: dict[str, Tolerance]) -> list[Finding]:
    """The metrics of `new` that moved past their tolerance from `old`, by name."""
    findings = []
    for metric in sorted(set(old) & set(new)):
        governed = tolerance_for(metric, tolerances)
        if governed is not None and governed[1].exceeded(old[metric], new[metric]):
            findings.append(Finding(metric, old[metric], new[metric], governed[1]))
    return findings


def record_regressions(session: Session, *, zoo: str, night_id: str,
                       tolerances: dict[str, Tolerance]) -> list[ZooRegression]:
    """Compare every succeeded job of the night with its pair's last successful night; record what regressed."""
    night = zoo_store.get_night(session, night_id)
    recorded: list[ZooRegression] = []
    for night_job in zoo_store.night_jobs(session, night_id):
        if night_job.job.status != Status.succeeded:
            continue
        previous = zoo_store.previous_success(session, zoo=zoo, pair_key=night_job.pair_key, before=night.started_at)
        if previous is None:
            continue  # the pair's first successful night: nothing to compare with
        findings = compare(final_metrics(session, previous.job_id), final_metrics(session, night_job.job_id),
                           tolerances)
        for finding in findings:
            recorded.append(zoo_store.add_regression(
                session, night_id=night_id, job_id=night_job.job_id, previous_job_id=previous.job_id,
                metric=finding.metric, old_value=finding.old, new_value=finding.new,
                tolerance=finding.tolerance.relative, worse=finding.tolerance.worse,
            ))
            queries.add_tag(session, job_id=night_job.job_id, key="regressed",
                            value=f"{finding.describe()}; job {night_job.job_id} vs job {previous.job_id}")
            log.warning("zoo %s: %s/%s regressed: %s", zoo, night_job.model, night_job.recipe_name,
                        finding.describe())
    return recorded
