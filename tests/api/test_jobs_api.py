"""REST API behaviour that needs no job to run: validation, ownership, state transitions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_fixtures import tiny_recipe

from api.app import create_app


@pytest.fixture
def client(settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def recipe(tmp_path: Path) -> dict[str, Any]:
    return tiny_recipe(tmp_path / "model", tmp_path / "text.txt")


def test_create_job_answers_201_with_queued_stages(client: TestClient, recipe: dict[str, Any]) -> None:
    response = client.post("/v1/jobs", json={"recipe": recipe, "start": False})
    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "queued"
    assert [s["kind"] for s in body["stages"]] == ["calibrate", "prune", "finetune", "evaluate", "kernel_tune"]
    assert all(s["status"] == "queued" for s in body["stages"])
    assert body["package_versions"]["torch"]
    assert client.get(f"/v1/jobs/{body['id']}").json()["recipe"]["model"] == recipe["model"]


def test_invalid_recipe_is_422_naming_the_field(client: TestClient, recipe: dict[str, Any]) -> None:
    recipe["stages"][1]["sparsity"] = 1.5
    response = client.post("/v1/jobs", json={"recipe": recipe})
    assert response.status_code == 422
    locations = [error["loc"] for error in response.json()["detail"]]
    assert ["body", "recipe", "stages", 1, "prune", "sparsity"] in locations


def test_unknown_recipe_key_is_422(client: TestClient, recipe: dict[str, Any]) -> None:
    recipe["stages"][0]["sampels"] = 3
    response = client.post("/v1/jobs", json={"recipe": recipe})
    assert response.status_code == 422
    assert any(e["loc"][-1] == "sampels" and e["type"] == "extra_forbidden" for e in response.json()["detail"])


def test_bad_nm_pattern_is_422_with_reason(client: TestClient, recipe: dict[str, Any]) -> None:
    recipe["stages"][1]["pattern"] = "4:2"
    detail = client.post("/v1/jobs", json={"recipe": recipe}).json()["detail"]
    assert any("need 0 < N < M" in e["msg"] for e in detail)


def test_unknown_job_is_404(client: TestClient) -> None:
    response = client.get("/v1/jobs/doesnotexist")
    assert response.status_code == 404
    assert "doesnotexist" in response.json()["detail"]


def test_list_jobs_newest_first(client: TestClient, recipe: dict[str, Any]) -> None:
    ids = [client.post("/v1/jobs", json={"recipe": recipe, "start": False}).json()["id"] for _ in range(3)]
    listed = client.get("/v1/jobs").json()
    assert [j["id"] for j in listed["data"]] == ids[::-1]


def test_cancel_queued_job_then_cancel_again_is_409(client: TestClient, recipe: dict[str, Any]) -> None:
    job_id = client.post("/v1/jobs", json={"recipe": recipe, "start": False}).json()["id"]
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert all(s["status"] == "cancelled" for s in cancelled.json()["stages"])
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409


def test_tokens_scope_jobs_by_owner(settings: Any, recipe: dict[str, Any]) -> None:
    # with auth, recipes may name local paths only under configured roots (the recipe's are in tmp_path)
    roots = [str(Path(recipe["model"]).parent)]
    settings = settings.model_copy(update={"api_tokens": {"tok-a": "alice", "tok-b": "bob"}, "local_roots": roots})
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/jobs", json={"recipe": recipe, "start": False}).status_code == 401
        alice = {"Authorization": "Bearer tok-a"}
        job_id = client.post("/v1/jobs", json={"recipe": recipe, "start": False}, headers=alice).json()["id"]
        assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["owner"] == "alice"
        assert client.get(f"/v1/jobs/{job_id}", headers={"Authorization": "Bearer tok-b"}).status_code == 404
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer tok-b"}).json()["count"] == 0
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401


def test_unknown_artifact_download_is_404(client: TestClient) -> None:
    assert client.get("/v1/artifacts/nope/download").status_code == 404
