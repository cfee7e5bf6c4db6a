"""A real job through Prefect and Ray on the tiny model, then inspected and downloaded over the API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from service_fixtures import tiny_recipe
from transformers import AutoModelForCausalLM

from api.app import create_app
from api.client import ApiClient
from orchestrator.service import Orchestrator, requeue_job, submit_job
from orchestrator.store import queries
from pipelines.export import load_compressed_model
from pipelines.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("ray_cluster", "prefect_harness")


def _run(settings: Any, recipe: dict[str, Any]) -> tuple[Orchestrator, str, str, list[dict]]:
    orchestrator = Orchestrator(settings)
    with orchestrator.sessions.begin() as session:
        job_id = submit_job(session, parse_recipe(recipe)).id
    events: list[dict] = []
    try:
        status = orchestrator.run(job_id, on_event=events.append)
    except Exception:
        status = "failed"
    return orchestrator, job_id, status, events


def test_full_job_runs_records_lineage_and_downloads(settings: Any, tiny_model_dir: Path, text_file: Path,
                                                     tmp_path: Path) -> None:
    orchestrator, job_id, status, events = _run(settings, tiny_recipe(tiny_model_dir, text_file))
    assert status == "succeeded"
    assert any(e["type"] == "progress" for e in events), "workers should report progress"
    with orchestrator.sessions() as session:
        runs = queries.stage_runs(session, job_id)
        assert [r.status for r in runs] == ["succeeded"] * 5
        prune = runs[1]
        consumed = {e.artifact_id for e in queries.lineage_edges(session, job_id)
                    if e.stage_run_id == prune.id and e.direction == "input"}
        kinds_in = {queries.get_artifact(session, a).kind for a in consumed}
        assert {"model", "calibration"} <= kinds_in
        produced = {a.kind for a in queries.stage_outputs(session, prune.id)}
        assert {"model", "masks"} <= produced
        metrics = {m.name: m.value for m in queries.job_metrics(session, job_id)}
        gpu_tags = [t.value for t in queries.job_tags(session, job_id) if t.key == "gpu_ids"]
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["perplexity"] > 1 and metrics["dense_perplexity"] > 1
    assert gpu_tags == ["0"] or gpu_tags == ["1"], "the prune stage asked for one (logical) GPU"
    orchestrator.close()

    with TestClient(create_app(settings)) as client:
        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts").json()
        final_model = [a for a in artifacts if a["kind"] == "model" and a["stage_run_id"]][-1]
        compressed = [a for a in artifacts if a["kind"] == "compressed_model"]
        finetune_run = client.get(f"/v1/jobs/{job_id}").json()["stages"][2]
        assert client.get(f"/v1/jobs/{job_id}/lineage").json()["edges"]
        assert client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "loss"}).json()
    local = _download(settings, final_model["id"], tmp_path / "dl")
    model = AutoModelForCausalLM.from_pretrained(local)
    weight = model.model.layers[0].mlp.up_proj.weight
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    assert torch.all(groups <= 2), "the downloaded model keeps the 2:4 pattern"

    # the job's last compressed export is the final (finetuned) model's, and loads back to it exactly
    assert [a["stage_run_id"] for a in compressed][-1] == final_model["stage_run_id"] == finetune_run["id"]
    exported = load_compressed_model(_download(settings, compressed[-1]["id"], tmp_path / "dl-compressed"))
    final_state = model.state_dict()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, final_state[name]), name


def _download(settings: Any, artifact_id: str, out: Path) -> Path:
    with ApiClient(None, settings=settings) as api:
        return api.download(artifact_id, out)


def test_failed_stage_leaves_job_resumable(settings: Any, tiny_model_dir: Path, text_file: Path,
                                           tmp_path: Path) -> None:
    missing = tmp_path / "later.txt"
    recipe = tiny_recipe(tiny_model_dir, text_file)
    recipe["data"]["evaluation"] = str(missing)
    recipe["stages"] = recipe["stages"][:2] + [{"stage": "evaluate", "seq_len": 32, "max_windows": 2}]
    orchestrator, job_id, status, _ = _run(settings, recipe)
    assert status == "failed"
    with orchestrator.sessions() as session:
        runs = queries.stage_runs(session, job_id)
        assert [r.status for r in runs] == ["succeeded", "succeeded", "failed"]
        assert "later.txt" in runs[2].error
        assert queries.get_job(session, job_id).status == "failed"
    missing.write_text(text_file.read_text())
    with orchestrator.sessions.begin() as session:
        requeue_job(session, job_id)
    assert orchestrator.run(job_id) == "succeeded"
    with orchestrator.sessions() as session:
        runs = queries.stage_runs(session, job_id)
        assert [r.attempt for r in runs] == [1, 1, 2], "finished stages are not re-run"
        assert all(r.status == "succeeded" for r in runs)
    orchestrator.close()


def test_identical_stage_is_reused_from_the_cache(settings: Any, tiny_model_dir: Path, text_file: Path) -> None:
    recipe = tiny_recipe(tiny_model_dir, text_file)
    recipe["stages"] = recipe["stages"][:2]
    first, first_id, status, _ = _run(settings, recipe)
    assert status == "succeeded"
    first.close()
    second, second_id, status, events = _run(settings, recipe)
    assert status == "succeeded"
    with second.sessions() as session:
        cached = {t.stage_run_id: t.value for t in queries.job_tags(session, second_id) if t.key == "cached_from"}
        runs = queries.stage_runs(session, second_id)
        assert set(cached) == {r.id for r in runs}
        assert {a.sha256 for a in queries.list_artifacts(session, second_id) if a.stage_run_id} == {
            a.sha256 for a in queries.list_artifacts(session, first_id) if a.stage_run_id}
    assert not any(e["type"] == "progress" for e in events), "nothing ran on Ray"
    second.close()
    third, third_id, status, _ = _run(settings, {**recipe, "reuse_cached": False})
    with third.sessions() as session:
        assert not [t for t in queries.job_tags(session, third_id) if t.key == "cached_from"]
    third.close()
