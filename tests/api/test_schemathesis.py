"""schemathesis over the served OpenAPI: no 5xx, and every answer matches the schema it declares.

The app is served by a real uvicorn on 127.0.0.1 (an ephemeral port), its schema read from
/openapi.json, and every operation gets a bounded number of generated requests, valid and invalid.
Each answer is checked with `not_a_server_error` and `response_schema_conformance`.

No real job runs: `POST /v1/jobs` with `start: true` (and `/start`, `/resume`) would hand the job to
the orchestrator, which would start a real compression run. In this test the served orchestrator's
`start` is replaced by a recorder that only notes the job id; jobs are still recorded in the store
(so the other endpoints see them), only the expensive run is skipped. The run path is covered by
tests/api/test_end_to_end.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import response_schema_conformance

from api.app import create_app
from orchestrator.settings import Settings

MAX_EXAMPLES = 6  # per operation and generation mode; the whole file runs in well under a minute


class Served:
    """create_app() under uvicorn in a thread; `started_jobs` records what the orchestrator was asked to run."""

    def __init__(self, home: Path) -> None:
        self.app = create_app(Settings(home=home))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.started_jobs: list[str] = []

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.app.state.orchestrator.start = self.started_jobs.append  # record, never run
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(tmp_path_factory.mktemp("home")) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(served: Served) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{served.url}/openapi.json")


# Findings in endpoints owned elsewhere, kept visible: strict, so the test fails once they are fixed
KNOWN = {
    ("/v1/datasets", "POST"): "a 422 whose detail is a string ('body: dataset is empty'), not the declared "
    "HTTPValidationError list (api/routers/datasets.py)",
}


def _cases() -> list[Any]:
    """(path, method, mode) for every served operation; negative mode only where there is input to break."""
    spec = create_app(Settings(home=Path("unused"))).openapi()  # the served app's schema; nothing is started
    cases = []
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            modes = [GenerationMode.POSITIVE]
            if operation.get("parameters") or operation.get("requestBody"):
                modes.append(GenerationMode.NEGATIVE)
            for mode in modes:
                known = KNOWN.get((path, method.upper()))
                marks = [pytest.mark.xfail(reason=known, strict=True)] if known else []
                label = f"{method.upper()} {path} {mode}"
                cases.append(pytest.param(path, method.upper(), mode, marks=marks, id=label))
    return cases


@pytest.mark.parametrize(("path", "method", "mode"), _cases())
def test_no_server_errors_and_answers_match_the_schema(
    served: Served, api_schema: schemathesis.schemas.BaseSchema, path: str, method: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=served.url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    check()


def test_no_job_was_run_only_recorded(served: Served) -> None:
    """A job submitted with start=true reaches the recorder and stays queued; no recorded job ever ran."""
    import httpx

    from orchestrator.store.models import Job

    recipe = {"model": "builtin:smollm2-135m", "stages": [{"stage": "prune", "method": "magnitude"}]}
    response = httpx.post(f"{served.url}/v1/jobs", json={"recipe": recipe, "start": True}, timeout=30)
    assert response.status_code == 201, response.text
    assert response.json()["id"] in served.started_jobs
    with served.app.state.orchestrator.sessions() as session:
        for job_id in served.started_jobs:
            job = session.get(Job, job_id)
            assert job is not None and job.status == "queued" and job.started_at is None
