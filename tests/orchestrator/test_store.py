"""Lineage store queries, one behaviour per test, each on SQLite and PostgreSQL (see conftest)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, StatementError

from orchestrator.states import InvalidTransition, Status
from orchestrator.store import db, queries
from orchestrator.store.errors import NotFound
from orchestrator.store.models import Direction, Job, Metric, StageRun


def _new_job(session, name="job", owner="local", stages=(("prune", {}),)):
    return queries.create_job(
        session,
        name=name,
        recipe={"name": name},
        stages=list(stages),
        code_version="v1",
        package_versions={},
        owner=owner,
    )


def _succeed(session, stage_run_id, cache_key=None):
    queries.set_stage_status(session, stage_run_id, Status.running)
    return queries.set_stage_status(session, stage_run_id, Status.succeeded, cache_key=cache_key)


def _reread(engine, job_id):
    with db.session_factory(engine)() as fresh:
        return queries.get_job(fresh, job_id)


# jobs and stage runs


def test_create_job_makes_queued_stage_runs_in_order(session, job):
    runs = queries.stage_runs(session, job.id)
    assert [(r.index, r.kind, r.status, r.attempt) for r in runs] == [
        (0, "calibrate", Status.queued, 0),
        (1, "prune", Status.queued, 0),
    ]
    assert runs[1].params == {"method": "wanda", "sparsity": "2:4"}


def test_create_job_records_provenance_and_defaults(engine, job):
    stored = _reread(engine, job.id)
    assert len(stored.id) == 32
    assert (stored.status, stored.owner, stored.error) == (Status.queued, "local", None)
    assert stored.recipe["stages"][1] == {"stage": "prune"}
    assert (stored.code_version, stored.package_versions) == ("abc1234", {"torch": "2.6.0"})
    assert stored.started_at is None and stored.finished_at is None


def test_job_stage_runs_relationship_is_ordered_by_index(engine, job):
    assert [r.kind for r in _reread(engine, job.id).stage_runs] == ["calibrate", "prune"]


def test_stage_index_is_unique_within_a_job(session, job):
    session.add(StageRun(job_id=job.id, index=1, kind="finetune", params={}))
    with pytest.raises(IntegrityError):
        session.flush()


def test_list_jobs_is_newest_first(session):
    ids = [_new_job(session, name=f"j{i}").id for i in range(3)]
    assert [j.id for j in queries.list_jobs(session)] == ids[::-1]


def test_list_jobs_filters_by_status_and_owner(session):
    mine = _new_job(session, owner="ada")
    _new_job(session, owner="bob")
    started = _new_job(session, owner="ada")
    queries.set_job_status(session, started.id, Status.running)
    assert [j.id for j in queries.list_jobs(session, owner="ada", status=Status.queued)] == [mine.id]


def test_list_jobs_pages(session):
    ids = [_new_job(session, name=f"j{i}").id for i in range(5)][::-1]
    assert [j.id for j in queries.list_jobs(session, limit=2, offset=2)] == ids[2:4]


@pytest.mark.parametrize(
    ("lookup", "entity"),
    [
        (queries.get_job, "job"),
        (queries.get_stage_run, "stage_run"),
        (queries.get_artifact, "artifact"),
        (queries.stage_runs, "job"),
    ],
)
def test_unknown_id_raises_not_found_naming_it(session, lookup, entity):
    with pytest.raises(NotFound, match=f"^{entity} 'nope' not found$"):
        lookup(session, "nope")


# status transitions


def test_job_running_then_succeeded_sets_times(session, job):
    queries.set_job_status(session, job.id, Status.running)
    assert job.started_at is not None and job.finished_at is None
    queries.set_job_status(session, job.id, Status.succeeded)
    assert job.status == Status.succeeded and job.finished_at >= job.started_at


def test_job_failure_records_error(session, job):
    queries.set_job_status(session, job.id, Status.running)
    queries.set_job_status(session, job.id, Status.failed, error="CUDA OOM")
    assert (job.status, job.error) == (Status.failed, "CUDA OOM")


def test_invalid_job_transition_raises_and_keeps_status(session, job):
    with pytest.raises(InvalidTransition, match=f"job {job.id}: cannot move from 'queued' to 'succeeded'"):
        queries.set_job_status(session, job.id, Status.succeeded)
    assert queries.get_job(session, job.id).status == Status.queued


def test_succeeded_job_cannot_be_requeued(session, job):
    queries.set_job_status(session, job.id, Status.running)
    queries.set_job_status(session, job.id, Status.succeeded)
    with pytest.raises(InvalidTransition):
        queries.set_job_status(session, job.id, Status.queued)


def test_error_with_non_terminal_status_is_refused(session, job):
    with pytest.raises(ValueError, match="non-terminal"):
        queries.set_job_status(session, job.id, Status.running, error="boom")


def test_resume_failed_job_clears_error_and_keeps_first_start(session, job):
    first = queries.set_job_status(session, job.id, Status.running).started_at
    queries.set_job_status(session, job.id, Status.failed, error="boom")
    queries.set_job_status(session, job.id, Status.queued)
    assert (job.status, job.error, job.finished_at) == (Status.queued, None, None)
    queries.set_job_status(session, job.id, Status.running)
    assert job.started_at == first


def test_stage_attempt_counts_runs_across_resume(session, job):
    run_id = job.stage_runs[0].id
    queries.set_stage_status(session, run_id, Status.running)
    queries.set_stage_status(session, run_id, Status.failed, error="boom")
    queries.set_stage_status(session, run_id, Status.queued)
    run = queries.set_stage_status(session, run_id, Status.running)
    assert (run.attempt, run.error, run.finished_at) == (2, None, None)


def test_succeeded_stage_can_be_rerun(session, job):
    run_id = job.stage_runs[0].id
    _succeed(session, run_id)
    queries.set_stage_status(session, run_id, Status.queued)
    assert queries.set_stage_status(session, run_id, Status.running).attempt == 2


def test_running_stage_cannot_start_again(session, job):
    run_id = job.stage_runs[0].id
    queries.set_stage_status(session, run_id, Status.running)
    with pytest.raises(InvalidTransition, match="from 'running' to 'running'"):
        queries.set_stage_status(session, run_id, Status.running)


def test_status_accepts_plain_strings(session, job):
    assert queries.set_job_status(session, job.id, "running").status is Status.running


def test_record_progress_overwrites(session, job):
    run_id = job.stage_runs[1].id
    queries.record_progress(session, run_id, 1, 4, "layer 1/4")
    queries.record_progress(session, run_id, 3, 4, None)
    run = queries.get_stage_run(session, run_id)
    assert (run.progress_done, run.progress_total, run.progress_message) == (3, 4, None)


def test_record_progress_rejects_done_beyond_total(session, job):
    with pytest.raises(ValueError, match="0 <= done <= total"):
        queries.record_progress(session, job.stage_runs[0].id, 5, 4, None)


# artifacts and lineage


def test_source_artifact_has_no_edges(session, job):
    source = queries.add_artifact(session, job_id=job.id, kind="model", uri="hf://tiny")
    assert source.stage_run_id is None
    assert queries.lineage_edges(session, job.id) == []


def test_stage_artifact_gets_an_output_edge(session, job):
    run_id = job.stage_runs[0].id
    made = queries.add_artifact(
        session, job_id=job.id, stage_run_id=run_id, kind="calibration", uri="file:///c.pt", sha256="0" * 64
    )
    assert [a.id for a in queries.stage_outputs(session, run_id)] == [made.id]
    edge = queries.lineage_edges(session, job.id)[0]
    assert (edge.stage_run_id, edge.artifact_id, edge.direction) == (run_id, made.id, Direction.output)


def test_input_edge_is_idempotent(session, job):
    source = queries.add_artifact(session, job_id=job.id, kind="model", uri="hf://tiny")
    run_id = job.stage_runs[0].id
    queries.add_input_edge(session, run_id, source.id)
    queries.add_input_edge(session, run_id, source.id)
    assert [(e.artifact_id, e.direction) for e in queries.lineage_edges(session, job.id)] == [
        (source.id, Direction.input)
    ]


def test_lineage_edges_follow_stage_order_inputs_first(session, job):
    calibrate, prune = (r.id for r in job.stage_runs)
    source = queries.add_artifact(session, job_id=job.id, kind="model", uri="hf://tiny")
    calib = queries.add_artifact(session, job_id=job.id, stage_run_id=calibrate, kind="calibration", uri="c")
    pruned = queries.add_artifact(session, job_id=job.id, stage_run_id=prune, kind="model", uri="m")
    queries.add_input_edge(session, prune, calib.id)
    queries.add_input_edge(session, calibrate, source.id)
    edges = [(e.stage_run_id, e.artifact_id, e.direction.value) for e in queries.lineage_edges(session, job.id)]
    assert edges == [
        (calibrate, source.id, "input"),
        (calibrate, calib.id, "output"),
        (prune, calib.id, "input"),
        (prune, pruned.id, "output"),
    ]


def test_list_artifacts_filters_by_kind(session, job):
    model = queries.add_artifact(session, job_id=job.id, kind="model", uri="a", size_bytes=5 * 2**32)
    queries.add_artifact(session, job_id=job.id, kind="report", uri="b")
    assert [(a.id, a.size_bytes) for a in queries.list_artifacts(session, job.id, kind="model")] == [
        (model.id, 5 * 2**32)
    ]


def test_artifact_of_another_jobs_stage_is_refused(session, job):
    other = _new_job(session)
    with pytest.raises(ValueError, match="belongs to job"):
        queries.add_artifact(session, job_id=other.id, stage_run_id=job.stage_runs[0].id, kind="x", uri="u")


def test_foreign_keys_are_enforced(session):
    session.add(Metric(job_id="nope", stage_run_id="nope", name="loss", value=1.0, step=0))
    with pytest.raises(IntegrityError):
        session.flush()


# metrics and tags


def test_metrics_form_ordered_time_series(session, job):
    calibrate, prune = (r.id for r in job.stage_runs)
    added = queries.add_metrics(
        session, job_id=job.id, stage_run_id=prune, metrics=[("loss", 0.5, 1), ("loss", 0.9, 0), ("acc", 0.7, 0)]
    )
    queries.add_metrics(session, job_id=job.id, stage_run_id=calibrate, metrics=[("seconds", 3, 0)])
    series = [(m.name, m.value, m.step) for m in queries.job_metrics(session, job.id)]
    assert added == 3
    assert series == [("seconds", 3.0, 0), ("acc", 0.7, 0), ("loss", 0.9, 0), ("loss", 0.5, 1)]


def test_job_metrics_filters_by_name(session, job):
    run_id = job.stage_runs[1].id
    queries.add_metrics(session, job_id=job.id, stage_run_id=run_id, metrics=[("loss", 1.0, 0), ("acc", 0.1, 0)])
    assert [m.name for m in queries.job_metrics(session, job.id, name="loss")] == ["loss"]


def test_metrics_are_reachable_from_their_stage_run(engine, session, job):
    run_id = job.stage_runs[1].id
    queries.add_metrics(session, job_id=job.id, stage_run_id=run_id, metrics=[("loss", 1.0, 0)])
    session.commit()
    with db.session_factory(engine)() as fresh:
        assert [m.name for m in queries.get_stage_run(fresh, run_id).metrics] == ["loss"]


def test_non_finite_metric_is_refused(session, job):
    with pytest.raises(ValueError, match="'loss' at step 2 .* not finite"):
        queries.add_metrics(
            session, job_id=job.id, stage_run_id=job.stage_runs[0].id, metrics=[("loss", float("nan"), 2)]
        )


def test_tags_keep_repeated_keys_in_order(session, job):
    run_id = job.stage_runs[1].id
    queries.add_tag(session, job_id=job.id, stage_run_id=run_id, key="note", value="kernel tuning skipped: no CUDA GPU")
    queries.add_tag(session, job_id=job.id, stage_run_id=run_id, key="note", value="fp32 fallback")
    queries.add_tag(session, job_id=job.id, key="owner_note", value="x")
    assert [(t.key, t.value, t.stage_run_id) for t in queries.job_tags(session, job.id)] == [
        ("note", "kernel tuning skipped: no CUDA GPU", run_id),
        ("note", "fp32 fallback", run_id),
        ("owner_note", "x", None),
    ]


# caching


def test_find_cached_stage_returns_latest_success_from_any_job_of_the_owner(session):
    older, newer, failed = (_new_job(session, name=n).stage_runs[0] for n in ("a", "b", "c"))
    _succeed(session, older.id, cache_key="k1")
    _succeed(session, newer.id, cache_key="k1")
    queries.set_stage_status(session, failed.id, Status.running, cache_key="k1")
    queries.set_stage_status(session, failed.id, Status.failed, error="boom")
    assert queries.find_cached_stage(session, "k1", owner="local").id == newer.id


def test_find_cached_stage_never_crosses_owners(session):
    theirs = _new_job(session, name="a", owner="team-a").stage_runs[0]
    _succeed(session, theirs.id, cache_key="k3")
    assert queries.find_cached_stage(session, "k3", owner="team-b") is None
    assert queries.find_cached_stage(session, "k3", owner="team-a").id == theirs.id


def test_find_cached_stage_ignores_unfinished_runs(session, job):
    queries.set_stage_status(session, job.stage_runs[0].id, Status.running, cache_key="k2")
    assert queries.find_cached_stage(session, "k2", owner=job.owner) is None


# time zones


def test_datetimes_round_trip_as_aware_utc(engine, session, job):
    queries.set_job_status(session, job.id, Status.running)
    session.commit()
    stored = _reread(engine, job.id)
    assert stored.created_at.tzinfo is UTC and stored.started_at.tzinfo is UTC
    assert (stored.created_at, stored.started_at) == (job.created_at, job.started_at)


def test_other_zones_are_stored_as_utc(engine, session, job):
    local = datetime(2025, 3, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    queries.get_job(session, job.id).started_at = local
    session.commit()
    assert _reread(engine, job.id).started_at == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)


def test_naive_datetimes_are_refused(session, job):
    job.started_at = datetime(2025, 3, 1, 12, 0)
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def test_query_by_time_compares_in_utc(session, job):
    cutoff = job.created_at.astimezone(timezone(timedelta(hours=-5))) - timedelta(seconds=1)
    assert session.scalars(select(Job.id).where(Job.created_at > cutoff)).all() == [job.id]
