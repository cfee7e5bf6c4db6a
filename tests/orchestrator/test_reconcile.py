"""Reconciling: jobs whose runner died are failed, their unreached stages skipped, and resumed as allowed.

Runs on SQLite and PostgreSQL. Runners here are real: a dead one is the pid of a process that ran and
exited; a live one is this test process.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy.orm import sessionmaker

from orchestrator import reconcile
from orchestrator.lifecycle import requeue_job
from orchestrator.runtime import embedded_runner
from orchestrator.settings import Settings
from orchestrator.states import Status
from orchestrator.store import db, queries
from orchestrator.store.models import utcnow

STAGES = [("calibrate", {}), ("prune", {}), ("evaluate", {})]


def _dead_runner() -> str:
    process = subprocess.Popen(["true"])
    process.wait()
    return f"embedded:{socket.gethostname()}:{process.pid}"


@pytest.fixture
def sessions(engine) -> sessionmaker:
    return db.session_factory(engine)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path, runner_lost_after_s=10)


def _running_job(sessions: sessionmaker, runner: str, *, max_resumes: int = 1, heartbeat_age_s: float = 0) -> str:
    """A job whose first stage succeeded and whose second is running under `runner`."""
    with sessions.begin() as session:
        job = queries.create_job(session, name="j", recipe={"max_resumes": max_resumes}, stages=STAGES,
                                 code_version="t", package_versions={})
        queries.claim_job(session, job.id, runner)
        job.heartbeat_at = utcnow() - timedelta(seconds=heartbeat_age_s)
        queries.set_job_status(session, job.id, Status.running)
        first, second, _ = queries.stage_runs(session, job.id)
        queries.set_stage_status(session, first.id, Status.running)
        queries.set_stage_status(session, first.id, Status.succeeded)
        queries.set_stage_status(session, second.id, Status.running)
        return job.id


def _reconcile(sessions, settings) -> tuple[list[str], list[str]]:
    dispatched: list[str] = []
    failed = reconcile.reconcile_once(sessions, settings, dispatched.append)
    return failed, dispatched


def test_a_dead_embedded_runner_is_failed_then_resumed_once(sessions, settings):
    job_id = _running_job(sessions, _dead_runner())
    failed, dispatched = _reconcile(sessions, settings)
    assert failed == [job_id] and dispatched == [job_id]
    with sessions() as session:
        job = queries.get_job(session, job_id)
        runs = queries.stage_runs(session, job_id)
        notes = [t.value for t in queries.job_tags(session, job_id) if t.key == "note"]
        assert job.status == Status.queued and job.resumes == 1 and job.runner is None
        # the finished stage stays finished (the flow skips it); the interrupted one runs again
        assert [r.status for r in runs] == [Status.succeeded, Status.queued, Status.queued]
        assert runs[1].attempt == 1
        assert any(n.startswith("interrupted: its runner process") for n in notes)
        assert any(n.startswith("resumed automatically (1 of 1)") for n in notes)
    # dispatched but its new runner died too before claiming: a second loss is final (max_resumes 1)
    with sessions.begin() as session:
        queries.claim_job(session, job_id, _dead_runner())
    failed, dispatched = _reconcile(sessions, settings)
    assert failed == [job_id] and dispatched == []
    with sessions() as session:
        job = queries.get_job(session, job_id)
        assert job.status == Status.failed and job.error.startswith("interrupted")
        assert [r.status for r in queries.stage_runs(session, job_id)] == \
            [Status.succeeded, Status.skipped, Status.skipped]


def test_without_resumes_the_job_fails_and_unreached_stages_are_skipped(sessions, settings):
    job_id = _running_job(sessions, _dead_runner(), max_resumes=0)
    failed, dispatched = _reconcile(sessions, settings)
    assert failed == [job_id] and dispatched == []
    with sessions() as session:
        runs = queries.stage_runs(session, job_id)
        assert queries.get_job(session, job_id).status == Status.failed
        assert [r.status for r in runs] == [Status.succeeded, Status.failed, Status.skipped]
        assert runs[1].error.startswith("interrupted")


def test_a_live_runner_is_left_alone_whatever_its_heartbeat(sessions, settings):
    job_id = _running_job(sessions, embedded_runner(), heartbeat_age_s=3600)
    assert _reconcile(sessions, settings) == ([], [])
    with sessions() as session:
        assert queries.get_job(session, job_id).status == Status.running


def test_a_remote_runner_is_judged_by_its_heartbeat(sessions, settings):
    fresh = _running_job(sessions, "embedded:another-host:123", heartbeat_age_s=1)
    stale = _running_job(sessions, "embedded:another-host:456", heartbeat_age_s=60)
    failed, dispatched = _reconcile(sessions, settings)
    assert failed == [stale] and dispatched == [stale]
    with sessions() as session:
        assert queries.get_job(session, fresh).status == Status.running
        notes = [t.value for t in queries.job_tags(session, stale) if t.key == "note"]
        assert any("no heartbeat from embedded:another-host:456" in n for n in notes)


def test_a_job_never_handed_to_a_runner_is_not_touched(sessions, settings):
    """`start: false` jobs have no runner: nothing to reconcile."""
    with sessions.begin() as session:
        job_id = queries.create_job(session, name="j", recipe={}, stages=STAGES, code_version="t",
                                    package_versions={}).id
    assert _reconcile(sessions, settings) == ([], [])
    with sessions() as session:
        assert queries.get_job(session, job_id).status == Status.queued


def test_a_replaced_runner_loses_its_heartbeat(sessions, settings):
    """Fencing: after a forced takeover the old runner's beat fails, so it stops instead of racing."""
    old = f"embedded:{socket.gethostname()}:{os.getpid()}"
    job_id = _running_job(sessions, old)
    with sessions.begin() as session:
        assert queries.beat(session, job_id, old)
        requeue_job(session, job_id, force=True)
        queries.claim_job(session, job_id, "embedded:elsewhere:1")
    with sessions.begin() as session:
        assert not queries.beat(session, job_id, old)
        assert queries.beat(session, job_id, "embedded:elsewhere:1")
        runs = queries.stage_runs(session, job_id)
        assert [r.status for r in runs] == [Status.succeeded, Status.queued, Status.queued]
