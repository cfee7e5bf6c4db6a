"""The job status stays small and cheap however many metrics a job has; the full metrics are paged."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from api.app import create_app
from api.views import HEADLINE_METRICS
from orchestrator.store import queries

ALICE = {"Authorization": "Bearer tok-a"}
BOB = {"Authorization": "Bearer tok-b"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    from orchestrator.settings import Settings

    settings = Settings(home=tmp_path_factory.mktemp("status") / "home", database_url=None, artifact_root=None,
                        ray_address=None, api_tokens={"tok-a": "alice", "tok-b": "bob"})
    with TestClient(create_app(settings), headers=ALICE) as test_client:
        yield test_client


def seed_job(sessions: Any, *, layers: int = 32, steps: int = 100, owner: str = "alice") -> tuple[str, list[str]]:
    """A job shaped like a real one: per-layer prune metrics, a fine-tuning time series, an evaluation."""
    with sessions.begin() as session:
        job = queries.create_job(session, name="seeded", recipe={"name": "seeded"}, code_version="t",
                                 package_versions={}, owner=owner,
                                 stages=[("calibrate", {}), ("prune", {}), ("finetune", {}), ("evaluate", {})])
        calibrate, prune, finetune, evaluate = (run.id for run in job.stage_runs)
        add = lambda run, points: queries.add_metrics(session, job_id=job.id, stage_run_id=run, metrics=points)  # noqa: E731
        add(calibrate, [("calibration_tokens", 4096.0, 0), ("stage_seconds", 1.5, 0)])
        per_layer = [(f"{kind}.model.layers.{i}.mlp.{proj}", 0.5 + i / 1000, 0)
                     for i in range(layers) for proj in ("up_proj", "down_proj", "gate_proj")
                     for kind in ("sparsity", "time_s", "recon_error", "damping")]
        add(prune, [("sparsity", 0.5, 0), ("prune_time_s", 12.0, 0), ("peak_gpu_mem_bytes", 1e9, 0), *per_layer,
                    ("stage_seconds", 14.0, 0)])
        series = [(name, value + step, step) for step in range(steps)
                  for name, value in (("loss", 3.0), ("loss_ce", 3.0), ("lr", 1e-4), ("tokens_per_s", 900.0))]
        add(finetune, [*series, ("stage_seconds", 30.0, 0)])
        add(evaluate, [("perplexity", 21.5, 0), ("dense_perplexity", 20.1, 0), ("sparsity", 0.49, 0),
                       ("param_count", 1.1e9, 0), ("nonzero_params", 5.6e8, 0), ("model_size_bytes", 2.2e9, 0),
                       *[(f"sparsity.layer.{i}", 0.5, 0) for i in range(layers)], ("stage_seconds", 5.0, 0)])
        queries.add_tag(session, job_id=job.id, stage_run_id=prune, key="note", value="2:4 on every linear")
        return job.id, [calibrate, prune, finetune, evaluate]


@contextmanager
def _count_queries(client: TestClient) -> Iterator[list[str]]:
    engine = client.app.state.orchestrator.engine
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_status_carries_only_headline_metrics(client: TestClient) -> None:
    sessions = client.app.state.orchestrator.sessions
    job_id, (calibrate, prune, finetune, evaluate) = seed_job(sessions)
    with sessions() as session:
        assert len(queries.job_metrics(session, job_id)) > 800
    answer = client.get(f"/v1/jobs/{job_id}")
    assert answer.status_code == 200
    assert len(answer.content) < 6000, "the status must not grow with the number of metrics"
    stages = {s["id"]: s for s in answer.json()["stages"]}
    for stage in stages.values():
        assert set(stage["metrics"]) <= set(HEADLINE_METRICS) and len(stage["metrics"]) <= 16
    assert stages[finetune]["metrics"] == {"loss": 3.0 + 99, "tokens_per_s": 900.0 + 99, "stage_seconds": 30.0}
    assert stages[evaluate]["metrics"]["perplexity"] == 21.5 and stages[evaluate]["metrics"]["sparsity"] == 0.49
    assert stages[prune]["metrics"] == {"sparsity": 0.5, "prune_time_s": 12.0, "peak_gpu_mem_bytes": 1e9,
                                        "stage_seconds": 14.0}
    assert stages[prune]["notes"] == ["2:4 on every linear"]


def test_status_costs_a_fixed_number_of_queries(client: TestClient) -> None:
    sessions = client.app.state.orchestrator.sessions
    small, _ = seed_job(sessions, layers=1, steps=2)
    large, _ = seed_job(sessions, layers=64, steps=200)
    counts = []
    for job_id in (small, large):
        with _count_queries(client) as statements:
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        counts.append(len(statements))
    assert counts[0] == counts[1] <= 5, counts


def test_another_owner_gets_404(client: TestClient) -> None:
    job_id, _ = seed_job(client.app.state.orchestrator.sessions, layers=1, steps=1)
    assert client.get(f"/v1/jobs/{job_id}", headers=BOB).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/metrics", headers=BOB).status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 404


def test_metrics_are_paged_and_filtered(client: TestClient) -> None:
    job_id, (_, prune, finetune, _) = seed_job(client.app.state.orchestrator.sessions, layers=8, steps=30)
    url = f"/v1/jobs/{job_id}/metrics"
    first = client.get(url, params={"limit": 50}).json()
    total = first["total"]
    assert total == 2 + (3 + 8 * 12 + 1) + (30 * 4 + 1) + (6 + 8 + 1)
    assert len(first["data"]) == 50 and first["limit"] == 50 and first["offset"] == 0
    seen = []
    for offset in range(0, total, 97):
        seen += client.get(url, params={"limit": 97, "offset": offset}).json()["data"]
    assert len(seen) == total
    assert len({(m["stage_run_id"], m["name"], m["step"]) for m in seen}) == total, "pages do not overlap"
    loss = client.get(url, params={"name": "loss", "limit": 1000}).json()
    assert loss["total"] == 30 and [m["step"] for m in loss["data"]] == list(range(30))
    assert {m["stage_run_id"] for m in loss["data"]} == {finetune}
    pruned = client.get(url, params={"stage_run_id": prune, "limit": 1000}).json()
    assert pruned["total"] == 3 + 8 * 12 + 1
    assert client.get(url, params={"offset": total}).json()["data"] == []


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"offset": -1}, {"limit": "x"},
                                    {"offset": 2**70}, {"name": "n" * 201}])
def test_bad_paging_is_422_naming_the_field(client: TestClient, params: dict[str, Any]) -> None:
    job_id, _ = seed_job(client.app.state.orchestrator.sessions, layers=1, steps=1)
    answer = client.get(f"/v1/jobs/{job_id}/metrics", params=params)
    assert answer.status_code == 422
    assert next(iter(params)) in answer.text


def test_a_cache_hit_names_the_job_that_computed_it(client: TestClient) -> None:
    sessions = client.app.state.orchestrator.sessions
    first, first_runs = seed_job(sessions, layers=1, steps=1)
    second, second_runs = seed_job(sessions, layers=1, steps=1)
    with sessions.begin() as session:  # as orchestrator.caching.reuse_cached tags a hit
        queries.add_tag(session, job_id=second, stage_run_id=second_runs[1], key="cached_from", value=first_runs[1])
    stages = client.get(f"/v1/jobs/{second}").json()["stages"]
    assert [s["reused_from_job"] for s in stages] == [None, first, None, None]
