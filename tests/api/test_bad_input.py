"""Bad input over REST and the CLI: a 4xx (or exit 2) naming the field, a short body, nothing left behind.

Every case of the "size and shape of input" findings is here: an 84 MB recipe and a 50 MB name (413,
and no echo), `limit`/`offset` negative or huge, NUL in any string (PostgreSQL cannot store it),
NaN and Infinity, a seed of 2**70, `memory_gb: 1e6`, stages in an order that would measure the
unpruned model, and a job recorded with `start: false` that must still be startable. Each REST case
asserts the status, that the answer names the field, that the answer is short, and that no job row,
no file under the artifact root and no queued or running job was left. The REST matrix runs on SQLite,
and on PostgreSQL when the server is up (`postgres` marker), where NUL and huge offsets used to be 500s.
"""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli_app
from api.limits import RequestLimits
from orchestrator.settings import Settings
from orchestrator.store.models import Job

SHORT = 4096  # no error body may be longer: it carries excerpts of the input, never the input
MiB = 1 << 20

BASE: dict[str, Any] = {
    "name": "bad-input-base",
    "model": "builtin:smollm2-135m",
    "data": {"calibration": "builtin:enwiki", "evaluation": "builtin:enwiki"},
    "seed": 0,
    "stages": [
        {"stage": "calibrate", "samples": 4, "seq_len": 32},
        {"stage": "prune", "method": "wanda", "sparsity": 0.5, "targets": ["re:.*mlp.*"], "ignore": ["lm_head"]},
        {"stage": "finetune", "steps": 2, "lr": 1e-4, "resources": {"num_cpus": 1, "memory_gb": 2}},
        {"stage": "evaluate", "seq_len": 32},
        {"stage": "kernel_tune", "tokens": [1, 16]},
    ],
}


def recipe_with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """BASE with the value at `path` replaced (a missing last key is added)."""
    recipe = copy.deepcopy(BASE)
    target: Any = recipe
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return recipe


def job_body(recipe: Any, **extra: Any) -> bytes:
    # json.dumps writes NaN and Infinity as JS literals, which is what an attacker sends
    return json.dumps({"recipe": recipe, "start": False, **extra}, allow_nan=True).encode()


@dataclass
class Case:
    id: str
    status: int
    names: str  # what the answer must name: a dotted field path (part of the error's loc) or a word of it
    method: str = "POST"
    path: str = "/v1/jobs"
    body: bytes | Callable[[], bytes] | None = None  # a callable for the big ones, built when the case runs
    params: dict[str, str] = field(default_factory=dict)


def recipe_case(id: str, path: tuple[Any, ...], value: Any, names: str | None = None, status: int = 422) -> Case:
    return Case(id, status, names or ".".join(str(p) for p in path), body=job_body(recipe_with(path, value)))


NAN, INF = float("nan"), float("inf")
STAGE_LIMIT_CASES = [
    recipe_case("samples-huge", ("stages", 0, "samples"), 10**12, "stages.0.calibrate.samples"),
    recipe_case("seq-len-huge", ("stages", 0, "seq_len"), 10**9, "stages.0.calibrate.seq_len"),
    recipe_case("batch-huge", ("stages", 0, "batch_size"), 10**9, "stages.0.calibrate.batch_size"),
    recipe_case("samples-zero", ("stages", 0, "samples"), 0, "stages.0.calibrate.samples"),
    recipe_case("steps-huge", ("stages", 2, "steps"), 10**12, "stages.2.finetune.steps"),
    recipe_case("lr-huge", ("stages", 2, "lr"), 1e30, "stages.2.finetune.lr"),
    recipe_case("max-windows-huge", ("stages", 3, "max_windows"), 10**12, "stages.3.evaluate.max_windows"),
    recipe_case("tokens-huge", ("stages", 4, "tokens"), [1, 10**9], "stages.4.kernel_tune.tokens.1"),
    recipe_case("tokens-many", ("stages", 4, "tokens"), list(range(1, 2000)), "stages.4.kernel_tune.tokens"),
    recipe_case("repeats-huge", ("stages", 4, "repeats"), 10**12, "stages.4.kernel_tune.repeats"),
    recipe_case("targets-many", ("stages", 1, "targets"), ["re:.*mlp.*"] * 1000, "stages.1.prune.targets"),
    recipe_case("target-long", ("stages", 1, "targets"), ["x" * 5000], "stages.1.prune.targets.0"),
    recipe_case("pattern-long", ("stages", 1, "pattern"), "2:4" + " " * 100, "stages.1.prune.pattern"),
    recipe_case("stages-many", ("stages",), [{"stage": "evaluate"}] * 100, "recipe.stages"),
    recipe_case("stages-empty", ("stages",), [], "recipe.stages"),
    recipe_case("model-long", ("model",), "org/" + "m" * 10_000, "recipe.model"),
    recipe_case("model-empty", ("model",), "", "recipe.model"),
    recipe_case("name-long-under-body-limit", ("name",), "n" * 300_000, "recipe.name"),
    recipe_case("calibration-long", ("data", "calibration"), "/" + "d" * 10_000, "data.calibration"),
]
NUMBER_CASES = [
    recipe_case("seed-2**70", ("seed",), 2**70, "recipe.seed"),
    recipe_case("seed-negative", ("seed",), -1, "recipe.seed"),
    recipe_case("seed-nan", ("seed",), NAN, "recipe.seed"),
    recipe_case("sparsity-nan", ("stages", 1, "sparsity"), NAN, "stages.1.prune.sparsity"),
    recipe_case("sparsity-inf", ("stages", 1, "sparsity"), INF, "stages.1.prune.sparsity"),
    recipe_case("lr-inf", ("stages", 2, "lr"), INF, "stages.2.finetune.lr"),
    recipe_case("lr-minus-inf", ("stages", 2, "lr"), -INF, "stages.2.finetune.lr"),
    recipe_case("dampening-nan", ("stages", 1, "dampening"), NAN, "stages.1.prune.dampening"),
    recipe_case("owl-threshold-inf", ("stages", 1, "owl_threshold"), INF, "stages.1.prune.owl_threshold"),
    recipe_case("activation-sparsity-nan", ("stages",), [{"stage": "activation_profile", "sparsities": [0.5, NAN]}],
                "activation_profile.sparsities.1"),
    recipe_case("tolerance-inf", ("stages",), [{"stage": "activation_profile", "tolerances": [INF]}],
                "activation_profile.tolerances.0"),
    recipe_case("memory-gb-1e6", ("stages", 2, "resources", "memory_gb"), 1e6, "finetune.resources.memory_gb"),
    recipe_case("memory-gb-nan", ("stages", 2, "resources", "memory_gb"), NAN, "finetune.resources.memory_gb"),
    recipe_case("num-gpus-1000", ("stages", 1, "resources"), {"num_gpus": 1000}, "prune.resources.num_gpus"),
    recipe_case("num-gpus-inf", ("stages", 1, "resources"), {"num_gpus": INF}, "prune.resources.num_gpus"),
    recipe_case("num-cpus-1e9", ("stages", 2, "resources", "num_cpus"), 1e9, "finetune.resources.num_cpus"),
    recipe_case("num-cpus-negative", ("stages", 2, "resources", "num_cpus"), -1, "finetune.resources.num_cpus"),
    Case("number-1e400-is-inf", 422, "stages.1.prune.sparsity",
         body=job_body(BASE).replace(b'"sparsity": 0.5', b'"sparsity": 1e400')),
]
NUL_CASES = [
    recipe_case("nul-name", ("name",), "job\x00name", "recipe.name"),
    recipe_case("nul-model", ("model",), "builtin:smollm2-135m\x00", "recipe.model"),
    recipe_case("nul-calibration", ("data", "calibration"), "\x00/etc/passwd", "data.calibration"),
    recipe_case("nul-evaluation", ("data", "evaluation"), "builtin:en\x00wiki", "data.evaluation"),
    recipe_case("nul-pattern", ("stages", 1, "pattern"), "2:4\x00", "stages.1.prune.pattern"),
    recipe_case("nul-target", ("stages", 1, "targets"), ["re:.*\x00"], "stages.1.prune.targets.0"),
    recipe_case("nul-ignore", ("stages", 1, "ignore"), ["lm_head", "\x00"], "stages.1.prune.ignore.1"),
    recipe_case("nul-unknown-key", ("na\x00me",), "x", "recipe.na\x00me"),
    Case("nul-query-status", 422, "query.status", method="GET", params={"status": "queued\x00"}),
    Case("nul-query-name", 422, "query", method="GET", params={"lim\x00it": "1"}),
    Case("nul-path-job-id", 422, "path", method="GET", path="/v1/jobs/abc%00def"),
    Case("nul-path-start", 422, "path", path="/v1/jobs/%00/start"),
]
ORDER_CASES = [
    recipe_case("order-evaluate-finetune-prune", ("stages",), [
        {"stage": "calibrate"}, {"stage": "evaluate"}, {"stage": "finetune"}, {"stage": "prune"}], "stages.2"),
    recipe_case("order-kernel-tune-before-prune", ("stages",), [
        {"stage": "kernel_tune"}, {"stage": "prune", "method": "magnitude"}], "stages.1"),
    recipe_case("order-finetune-before-prune", ("stages",), [
        {"stage": "finetune"}, {"stage": "prune", "method": "magnitude"}, {"stage": "evaluate"}], "stages.0"),
    recipe_case("order-evaluate-before-finetune", ("stages",), [
        {"stage": "prune", "method": "magnitude"}, {"stage": "evaluate"}, {"stage": "finetune"}], "stages.2"),
]
SHAPE_CASES = [
    Case("body-not-json", 422, "body", body=b'{"recipe": '),
    Case("body-array", 422, "body", body=b"[1, 2, 3]"),
    Case("recipe-is-a-string", 422, "body.recipe", body=b'{"recipe": "stages: []"}'),
    Case("recipe-missing", 422, "body.recipe", body=b'{"start": false}'),
    Case("start-not-bool", 422, "body.start", body=job_body(BASE, start=[1])),
    Case("unknown-top-level-key", 422, "body.priority", body=job_body(BASE, priority=9)),
    recipe_case("unknown-stage-kind", ("stages", 3), {"stage": "distill"}, "recipe.stages.3"),
    recipe_case("huge-unknown-key", ("x" * 300_000,), 1, "recipe." + "x" * 100),
    recipe_case("list-where-str", ("model",), ["a", "b"], "recipe.model"),
]
LIST_CASES = [
    Case("limit-negative", 422, "query.limit", method="GET", params={"limit": "-1"}),
    Case("limit-zero", 422, "query.limit", method="GET", params={"limit": "0"}),
    Case("limit-huge", 422, "query.limit", method="GET", params={"limit": str(10**30)}),
    Case("limit-over-page", 422, "query.limit", method="GET", params={"limit": "501"}),
    Case("limit-not-int", 422, "query.limit", method="GET", params={"limit": "ten"}),
    Case("offset-negative", 422, "query.offset", method="GET", params={"offset": "-5"}),
    Case("offset-huge", 422, "query.offset", method="GET", params={"offset": str(2**63)}),
    Case("offset-nan", 422, "query.offset", method="GET", params={"offset": "NaN"}),
    Case("status-unknown", 422, "query.status", method="GET", params={"status": "stuck"}),
]
SIZE_CASES = [
    Case("name-50MB", 413, "body", body=lambda: job_body(recipe_with(("name",), "n" * (50 * MiB)))),
    Case("recipe-84MB", 413, "body",
         body=lambda: job_body(recipe_with(("stages", 1, "targets"), ["t" * 1000] * 84_000))),
    Case("body-just-over-1MiB", 413, "body", body=lambda: job_body(recipe_with(("name",), "n" * MiB))),
]
CASES = [*STAGE_LIMIT_CASES, *NUMBER_CASES, *NUL_CASES, *ORDER_CASES, *SHAPE_CASES, *LIST_CASES]


@pytest.fixture(scope="module")
def client(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path_factory.mktemp("home"), database_url=database_url)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """For the cases the database never sees (bodies refused unread): one backend is enough."""
    with TestClient(create_app(Settings(home=tmp_path_factory.mktemp("home")))) as test_client:
        yield test_client


def artifact_root(client: TestClient) -> Path:
    return client.app.state.orchestrator.settings.home / "artifacts"


def job_count(client: TestClient, *statuses: str) -> int:
    query = select(func.count()).select_from(Job)
    if statuses:
        query = query.where(Job.status.in_(statuses))
    with client.app.state.orchestrator.sessions() as session:
        return session.scalar(query)


def names_field(detail: Any, expected: str) -> bool:
    """Whether an error body names `expected`: in an error's dotted loc (`body.recipe.seed`) or its message."""
    if isinstance(detail, str):
        return expected in detail
    return any(expected in ".".join(str(p) for p in e["loc"]) or expected in e["msg"] for e in detail)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_request_is_4xx_naming_the_field_and_leaves_nothing(client: TestClient, case: Case) -> None:
    check_case(client, case)


@pytest.mark.parametrize("case", SIZE_CASES, ids=lambda c: c.id)
def test_oversized_body_is_413_unread_and_leaves_nothing(sqlite_client: TestClient, case: Case) -> None:
    check_case(sqlite_client, case)


def check_case(client: TestClient, case: Case) -> None:
    """Send the case; the answer has its status, names its field, is short; no job, file or run is left."""
    body = case.body() if callable(case.body) else case.body
    headers = {"content-type": "application/json"} if body is not None else {}
    response = client.request(case.method, case.path, content=body, params=case.params, headers=headers)
    assert response.status_code == case.status, response.text[:2000]
    assert len(response.content) < SHORT, f"{len(response.content)} bytes of error body"
    detail = response.json()["detail"]
    assert names_field(detail, case.names), detail
    assert job_count(client) == 0  # no row, so none stuck queued or running either
    assert not [p for p in artifact_root(client).rglob("*") if p.is_file()]


def test_valid_base_recipe_is_accepted(client: TestClient) -> None:
    """The matrix mutates one field of BASE at a time; BASE itself is accepted (then the job is removed)."""
    response = client.post("/v1/jobs", content=job_body(BASE), headers={"content-type": "application/json"})
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert client.get("/v1/jobs", params={"limit": 500, "offset": 0}).json()["count"] == 1
    assert client.get("/v1/jobs", params={"offset": 1_000_000_000}).json()["count"] == 0
    with client.app.state.orchestrator.sessions.begin() as session:
        session.delete(session.get(Job, job_id))


def test_validation_error_echoes_only_an_excerpt(client: TestClient) -> None:
    name = "n" * 300_000
    response = client.post("/v1/jobs", content=job_body(recipe_with(("name",), name)),
                           headers={"content-type": "application/json"})
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "recipe", "name"]
    assert error["type"] == "string_too_long" and error["ctx"] == {"max_length": 200}
    assert error["input"].startswith("n" * 200) and "300000 characters" in error["input"]
    assert len(error["input"]) < 300


def test_excerpts_are_short_and_json_safe() -> None:
    from api.excerpts import excerpt, short_errors

    assert excerpt("short") == "short" and excerpt(3) == 3 and excerpt(None) is None and excerpt(True) is True
    assert excerpt(NAN) == "nan" and excerpt(-INF) == "-inf"
    assert excerpt(2**70) == 2**70 and excerpt(2**1000) == "an integer of 1001 bits"
    assert excerpt({"a": [1, NAN]}) == {"a": [1, "nan"]}
    big = excerpt({"k": "v" * 10_000})
    assert isinstance(big, str) and big.startswith('{"k": "vvv') and len(big) < 300
    (error,) = short_errors([{"type": "x", "loc": ("body", "k" * 1000, 3), "msg": "m" * 5000, "input": b"\xff" * 999,
                              "ctx": {"error": ValueError("e" * 1000), "limit": 5}}])
    json.dumps(error, allow_nan=False)
    assert error["loc"][0] == "body" and error["loc"][2] == 3 and len(error["loc"][1]) < 300
    assert len(error["msg"]) < 1100 and len(error["input"]) < 300
    assert error["ctx"]["limit"] == 5 and len(error["ctx"]["error"]) < 300


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    yield b'{"recipe": {"name": "'
    sent = 0
    while sent < total:
        yield b"n" * size
        sent += size
    yield b'"}}'


def test_chunked_body_without_length_is_cut_off_at_the_limit(client: TestClient) -> None:
    """No Content-Length: the middleware counts the stream and refuses it at the limit, before parsing."""
    response = client.post("/v1/jobs", content=chunks(8 * MiB), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "body" in response.json()["detail"]
    assert job_count(client) == 0


def _echo_app(limit: int, path_limits: dict[str, int]) -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"received": len(await request.body())})

    routes = [Route("/small", echo, methods=["POST"]), Route("/upload", echo, methods=["POST"])]
    app = Starlette(routes=routes)
    app.add_middleware(RequestLimits, max_body_bytes=limit, path_limits=path_limits)
    return app


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_per_path_limit_overrides_the_default(chunked: bool) -> None:
    with TestClient(_echo_app(1000, {"/upload": 5000})) as raw:
        def body(n: int) -> Any:
            return iter([b"x" * (n // 2), b"x" * (n - n // 2)]) if chunked else b"x" * n

        assert raw.post("/small", content=body(1000)).json() == {"received": 1000}
        assert raw.post("/small", content=body(1001)).status_code == 413
        assert raw.post("/upload", content=body(4000)).json() == {"received": 4000}
        assert raw.post("/upload/", content=body(5000)).status_code in (200, 307)
        too_big = raw.post("/upload", content=body(5001))
        assert too_big.status_code == 413 and "5000 bytes" in too_big.text


def test_dataset_uploads_get_their_own_limit(tmp_path: Path) -> None:
    """The app's default limit does not apply to POST /v1/datasets, which has `max_dataset_bytes`."""
    settings = Settings(home=tmp_path / "home", max_request_bytes=2048, max_dataset_bytes=64 * 1024)
    with TestClient(create_app(settings)) as small:
        big = b"x" * 8192
        assert small.post("/v1/jobs", content=big, headers={"content-type": "application/json"}).status_code == 413
        assert small.post("/v1/datasets", content=big).status_code != 413
        assert small.post("/v1/datasets", content=b"x" * (65 * 1024)).status_code == 413


# -- start: false, then POST /v1/jobs/{id}/start


@pytest.fixture
def recorded_starts(tmp_path: Path) -> Iterator[tuple[TestClient, list[str]]]:
    """An app whose orchestrator notes the jobs it is asked to start instead of running them.

    A real run (compression on Ray under Prefect) is covered by tests/api/test_end_to_end.py; here only
    the handler's decision is under test: which jobs are handed to `Orchestrator.start`, and how often.
    """
    with TestClient(create_app(Settings(home=tmp_path / "home"))) as test_client:
        started: list[str] = []
        test_client.app.state.orchestrator.start = started.append
        yield test_client, started


def test_job_recorded_with_start_false_can_be_started_once(recorded_starts: tuple[TestClient, list[str]]) -> None:
    client, started = recorded_starts
    created = client.post("/v1/jobs", content=job_body(BASE), headers={"content-type": "application/json"})
    job_id = created.json()["id"]
    assert started == []
    response = client.post(f"/v1/jobs/{job_id}/start")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == job_id and response.json()["status"] == "queued"
    assert started == [job_id]


def test_racing_starts_hand_the_job_on_once(recorded_starts: tuple[TestClient, list[str]]) -> None:
    """Two clients start the same recorded job at the same moment: one 200, one 409, one run."""
    client, started = recorded_starts
    created = client.post("/v1/jobs", content=job_body(BASE), headers={"content-type": "application/json"})
    job_id = created.json()["id"]
    ready = threading.Barrier(2)

    def start() -> int:
        ready.wait(timeout=10)
        return client.post(f"/v1/jobs/{job_id}/start").status_code

    with ThreadPoolExecutor(2) as pool:
        codes = sorted(pool.map(lambda _: start(), range(2)))
    assert codes == [200, 409], codes
    assert started == [job_id]
    assert client.post(f"/v1/jobs/{job_id}/start").status_code == 409


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_job_recorded_with_start_false_runs_to_the_end_after_start(settings: Settings, tiny_model_dir: Path) -> None:
    """The real path: the handler hands the job to the orchestrator, which runs it (a one-stage stand-in job)."""
    import time

    recipe = {"name": "started-later", "model": str(tiny_model_dir), "stages": [{"stage": "sleep", "seconds": 0}]}
    with TestClient(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json={"recipe": recipe, "start": False}).json()["id"]
        time.sleep(0.5)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # recorded, not run
        assert client.post(f"/v1/jobs/{job_id}/start").status_code == 200
        deadline = time.monotonic() + 240
        while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        assert client.post(f"/v1/jobs/{job_id}/start").status_code == 409


def test_start_is_409_for_a_job_that_already_ran_or_ended(recorded_starts: tuple[TestClient, list[str]]) -> None:
    client, started = recorded_starts
    headers = {"content-type": "application/json"}
    cancelled = client.post("/v1/jobs", content=job_body(BASE), headers=headers).json()["id"]
    assert client.post(f"/v1/jobs/{cancelled}/cancel").status_code == 200
    response = client.post(f"/v1/jobs/{cancelled}/start")
    assert response.status_code == 409 and "cancelled" in response.json()["detail"]

    ran = client.post("/v1/jobs", content=job_body(BASE), headers=headers).json()["id"]
    from orchestrator.states import Status
    from orchestrator.store import queries

    with client.app.state.orchestrator.sessions.begin() as session:  # as the flow does when it begins
        queries.set_job_status(session, ran, Status.running)
    response = client.post(f"/v1/jobs/{ran}/start")
    assert response.status_code == 409 and "running" in response.json()["detail"]
    assert client.post("/v1/jobs/nosuchjob/start").status_code == 404
    assert started == []


def test_start_of_another_owners_job_is_404(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", api_tokens={"tok-a": "alice", "tok-b": "bob"})
    with TestClient(create_app(settings)) as client:
        started: list[str] = []
        client.app.state.orchestrator.start = started.append
        alice = {"Authorization": "Bearer tok-a", "content-type": "application/json"}
        job_id = client.post("/v1/jobs", content=job_body(BASE), headers=alice).json()["id"]
        assert client.post(f"/v1/jobs/{job_id}/start", headers={"Authorization": "Bearer tok-b"}).status_code == 404
        assert client.post(f"/v1/jobs/{job_id}/start").status_code == 401
        assert started == []


# -- the CLI: a bad recipe file is one line naming the field, exit 2, no traceback, no store touched


def _yaml(recipe: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


CLI_CASES: list[tuple[str, str, str, str]] = [  # id, file name, content, what the message names
    ("seed-2**70", "r.json", json.dumps(recipe_with(("seed",), 2**70)), "seed"),
    ("nan-json", "r.json", json.dumps(recipe_with(("stages", 1, "sparsity"), NAN)), "stages.1.prune.sparsity"),
    ("inf-yaml", "r.yaml", _yaml(BASE).replace("lr: 0.0001", "lr: .inf"), "stages.2.finetune.lr"),
    ("memory-gb-1e6", "r.yaml", _yaml(recipe_with(("stages", 2, "resources", "memory_gb"), 1e6)), "memory_gb"),
    ("nul-json-escape", "r.json", json.dumps(recipe_with(("name",), "a\x00b")), "name"),
    ("order", "r.yaml", _yaml(recipe_with(("stages",), [{"stage": "evaluate"}, {"stage": "prune",
                                                                              "method": "magnitude"}])), "stages.1"),
    ("name-long", "r.json", json.dumps(recipe_with(("name",), "n" * 5000)), "name"),
    ("too-big-file", "r.json", json.dumps(recipe_with(("name",), "n" * (2 * MiB))), "limit"),
    ("not-a-mapping", "r.yaml", "- stage: evaluate\n", "mapping"),
    ("bad-yaml", "r.yaml", "stages: [\n", "YAML"),
    ("markup-in-message", "[bold]r.yaml", _yaml(recipe_with(("stages", 1, "targets"), ["[/x]" * 200])), "targets"),
]


@pytest.mark.parametrize("command", ["run", "submit"])
@pytest.mark.parametrize(("name", "content", "names"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_recipe_exits_2_naming_the_field(
    command: str, name: str, content: str, names: str, tmp_path: Path, cli_home: Path
) -> None:
    path = tmp_path / name
    path.write_text(content)
    result = CliRunner().invoke(cli_app, [command, str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert names in result.output
    assert len(result.output) < SHORT
    assert not cli_home.exists()  # no store, no job, no artifact


def test_cli_recipe_not_utf8(tmp_path: Path, cli_home: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    result = CliRunner().invoke(cli_app, ["run", str(path)])
    assert result.exit_code == 2 and "UTF-8" in result.output
    assert not cli_home.exists()


def test_cli_entry_point_bad_recipe_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """The installed entry point (not only the Typer app): stderr names the field, no traceback."""
    import subprocess
    import sys

    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe_with(("seed",), 2**70)))
    env = {**os.environ, "SPARSEFLOW_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-m", "api.cli", "submit", str(path)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    assert "seed: Input should be less than or equal to 4294967295" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr) < SHORT
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("limit", ["0", "-3", "501", "many"])
def test_cli_jobs_limit_out_of_range_exits_2_naming_the_option(limit: str, cli_home: Path) -> None:
    result = CliRunner().invoke(cli_app, ["jobs", "--limit", limit])
    assert result.exit_code == 2, result.output
    assert "--limit" in result.output and "Traceback" not in result.output
    assert not cli_home.exists()
