"""The kernel plan cache: store upsert and lookup on both backends, and the flow's before/after hooks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from kernels.plan import Environment, KernelChoice, KernelPlan, ShapePlan, save_plan
from orchestrator.kernel_cache import CACHE_KIND, provide_kernel_cache, remember_kernel_plan
from orchestrator.store import queries
from orchestrator.store.models import KernelPlanRow
from pipelines.stages.kernel_tune import load_kernel_cache
from workers.storage import ArtifactStorage

H100 = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "cuda": "13.0", "driver": "580.159.04",
        "torch": "2.11.0+cu130", "cusparselt": 800, "sparse24_sm90": "78e78b6eae3902cf"}
SPARSE = {"backend": "cusparselt-planned", "config": {"layout": 1, "alg_id": 25, "split_k": 1, "split_k_mode": 0},
          "times_ms": {"dense": 0.3243, "cusparselt-planned": 0.2868}, "speedup": 1.1307, "reason": "fastest"}
DENSE = {"backend": "dense", "times_ms": {"dense": 0.0464, "cusparselt-planned": 0.0717}, "speedup": 1.0,
         "reason": "best sparse (cusparselt-planned) 0.65x, below 1.05x"}


def _runs(job):
    return [run.id for run in job.stage_runs]


def test_upsert_then_lookup_by_environment_and_dtype(session, job):
    first, _ = _runs(job)
    written = queries.upsert_kernel_choices(session, stage_run_id=first, environment=H100, dtype="float16",
                                            entries=[("4096x14336", 2048, SPARSE), ("4096x14336", 1, DENSE)])
    queries.upsert_kernel_choices(session, stage_run_id=first, environment={**H100, "driver": "570.1"},
                                  dtype="float16", entries=[("4096x14336", 1, SPARSE)])
    session.commit()
    assert written == 2
    rows = queries.cached_kernel_choices(session, environment=H100, dtype="float16")
    assert [(r.shape, r.tokens, r.choice["backend"]) for r in rows] == [
        ("4096x14336", 1, "dense"), ("4096x14336", 2048, "cusparselt-planned")]
    rebuilt = {**H100, "sparse24_sm90": "0123456789abcdef"}  # another build of our kernel library
    assert queries.cached_kernel_choices(session, environment=rebuilt, dtype="float16") == []
    assert rows[0].environment() == H100 and rows[0].stage_run_id == first
    assert rows[0].created_at.tzinfo is not None
    assert queries.cached_kernel_choices(session, environment=H100, dtype="bfloat16") == []
    assert len(queries.cached_kernel_choices(session)) == 3


def test_upsert_replaces_the_choice_and_the_measuring_run(session, job):
    first, second = _runs(job)
    queries.upsert_kernel_choices(session, stage_run_id=first, environment=H100, dtype="float16",
                                  entries=[("8192x8192", 16, SPARSE)])
    session.commit()
    queries.upsert_kernel_choices(session, stage_run_id=second, environment=H100, dtype="float16",
                                  entries=[("8192x8192", 16, DENSE)])
    session.commit()
    [row] = queries.cached_kernel_choices(session)
    assert row.choice == DENSE and row.stage_run_id == second


def test_unknown_environment_fields_stored_as_empty_and_read_back_as_none(session, job):
    env = {"gpu": "Some GPU", "torch": "2.11.0"}
    queries.upsert_kernel_choices(session, stage_run_id=_runs(job)[0], environment=env, dtype="float16",
                                  entries=[("64x64", 1, DENSE)])
    [row] = queries.cached_kernel_choices(session, environment=env)
    assert row.cusparselt == "" and row.environment() == {**dict.fromkeys(H100), **env}


def test_choices_without_a_gpu_are_refused(session, job):
    with pytest.raises(ValueError, match="without a GPU"):
        queries.upsert_kernel_choices(session, stage_run_id=_runs(job)[0], environment={**H100, "gpu": None},
                                      dtype="float16", entries=[("64x64", 1, DENSE)])


def test_unique_key_is_enforced_by_the_database(session, job):
    row = {**{k: str(v) for k, v in H100.items()}, "dtype": "float16", "shape": "64x64", "tokens": 1,
           "choice": DENSE, "stage_run_id": _runs(job)[0]}
    session.add(KernelPlanRow(**row))
    session.flush()
    session.add(KernelPlanRow(**row))
    with pytest.raises(IntegrityError):
        session.flush()


def test_deleting_the_job_drops_its_measurements(session, job):
    queries.upsert_kernel_choices(session, stage_run_id=_runs(job)[0], environment=H100, dtype="float16",
                                  entries=[("64x64", 1, DENSE)])
    session.commit()
    session.delete(queries.get_job(session, job.id))
    session.commit()
    assert queries.cached_kernel_choices(session) == []


@pytest.fixture
def storage(tmp_path: Path) -> ArtifactStorage:
    return ArtifactStorage((tmp_path / "store").as_uri(), tmp_path / "cache")


def _plan(path: Path, environment: dict, choices: dict[int, dict]) -> Path:
    plan = KernelPlan(environment=Environment(**environment), dtype="float16", tokens=sorted(choices),
                      shapes={"4096x14336": ShapePlan(out_features=4096, in_features=14336,
                                                      choices={t: KernelChoice(**c) for t, c in choices.items()})})
    return save_plan(plan, path)


def test_provide_writes_every_cached_row_as_a_source_artifact(session, job, storage):
    queries.upsert_kernel_choices(session, stage_run_id=_runs(job)[0], environment=H100, dtype="float16",
                                  entries=[("4096x14336", 2048, SPARSE), ("4096x14336", 1, DENSE)])
    artifact = provide_kernel_cache(session, storage, job_id=job.id, label="04-kernel_tune")
    session.commit()
    assert artifact.kind == CACHE_KIND and artifact.stage_run_id is None and artifact.sha256
    assert queries.list_artifacts(session, job.id, kind=CACHE_KIND) == [artifact]
    cache = load_kernel_cache(storage.local_path(artifact.uri))
    assert [(e.shape, e.tokens, e.choice.backend) for e in cache.entries] == [
        ("4096x14336", 1, "dense"), ("4096x14336", 2048, "cusparselt-planned")]
    assert cache.entries[0].environment == Environment(**H100)


def test_provide_with_an_empty_store_writes_an_empty_cache(session, job, storage):
    artifact = provide_kernel_cache(session, storage, job_id=job.id, label="04-kernel_tune")
    assert json.loads(storage.local_path(artifact.uri).read_text())["entries"] == []


def test_remember_stores_measured_choices_only(session, job, storage, tmp_path):
    untimed = {"backend": "dense", "reason": "no correct sparse backend"}
    path = _plan(tmp_path / "kernel_plan.json", H100, {1: DENSE, 2048: SPARSE, 16: untimed})
    assert remember_kernel_plan(session, storage, stage_run_id=_runs(job)[1], plan_uri=path.as_uri()) == 2
    rows = queries.cached_kernel_choices(session)
    assert [(r.tokens, r.stage_run_id) for r in rows] == [(1, _runs(job)[1]), (2048, _runs(job)[1])]
    assert KernelChoice(**rows[1].choice) == KernelChoice(**SPARSE)


def test_remember_keeps_the_measuring_run_of_reused_choices(session, job, storage, tmp_path):
    first, second = _runs(job)
    queries.upsert_kernel_choices(session, stage_run_id=first, environment=H100, dtype="float16",
                                  entries=[("4096x14336", 1, KernelChoice(**DENSE).model_dump(mode="json"))])
    path = _plan(tmp_path / "kernel_plan.json", H100, {1: DENSE, 2048: SPARSE})
    assert remember_kernel_plan(session, storage, stage_run_id=second, plan_uri=path.as_uri()) == 1
    assert {r.tokens: r.stage_run_id for r in queries.cached_kernel_choices(session)} == {1: first, 2048: second}


def test_remember_ignores_a_plan_made_without_a_gpu(session, job, storage, tmp_path):
    path = _plan(tmp_path / "kernel_plan.json", {"torch": "2.11.0"}, {1: DENSE})
    assert remember_kernel_plan(session, storage, stage_run_id=_runs(job)[0], plan_uri=path.as_uri()) == 0
    assert queries.cached_kernel_choices(session) == []
