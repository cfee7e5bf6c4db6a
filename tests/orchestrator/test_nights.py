"""Nights of the model zoo: the store, regressions, the webhook against a real local receiver, content
identities for the stage cache, and the CI run the issue asks for: two nights on tiny models where night 2
reuses the unchanged pair, catches a regression injected into the other and announces it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli_app
from orchestrator.caching import content_identity, stage_cache_key
from orchestrator.regressions import compare, record_regressions
from orchestrator.settings import get_settings
from orchestrator.states import Status
from orchestrator.store import db, queries
from orchestrator.store import zoo as zoo_store
from orchestrator.store.models import Artifact, DeliveryStatus, NightStatus
from orchestrator.webhook import Backoff, deliver, slack_message
from orchestrator.zoo_file import DEFAULT_TOLERANCES, Tolerance

# --------------------------------------------------------------------------------- a real HTTP receiver


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST body and fails the first `fail_first` of them."""

    def __init__(self, fail_first: int = 0, fail_status: int = 500, headers: dict[str, str] | None = None) -> None:
        self.fail_first, self.fail_status, self.headers = fail_first, fail_status, headers or {}
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.lock:
                    receiver.bodies.append(body)
                    receiver.paths.append(self.path)
                    failing = len(receiver.bodies) <= receiver.fail_first
                self.send_response(receiver.fail_status if failing else 200)
                for key, value in (receiver.headers if failing else {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(b"boom" if failing else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/services/T0/B0/secret"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.close()


# --------------------------------------------------------------------------------- store and regressions


def _job(session: Session, status: Status, metrics: dict[str, float], owner: str = "schedule:z") -> str:
    job = queries.create_job(session, name="j", recipe={}, stages=[("evaluate", {})], code_version="v",
                             package_versions={}, owner=owner)
    queries.set_job_status(session, job.id, Status.running)
    queries.set_job_status(session, job.id, status, error=None if status == Status.succeeded else "boom")
    queries.add_metrics(session, job_id=job.id, stage_run_id=job.stage_runs[0].id,
                        metrics=[(name, value, 0) for name, value in metrics.items()])
    return job.id


def _night(session: Session, zoo: str, hours_ago: float, jobs: dict[str, str]) -> str:
    night = zoo_store.create_night(session, zoo, started_at=datetime.now(UTC) - timedelta(hours=hours_ago))
    for pair, job_id in jobs.items():
        zoo_store.add_night_job(session, night_id=night.id, job_id=job_id, model=f"m-{pair}", recipe_name="r",
                                pair_key=pair)
    return night.id


def test_nights_are_listed_newest_first_per_zoo(session: Session) -> None:
    old = _night(session, "z", 48, {})
    new = _night(session, "z", 24, {})
    _night(session, "other", 1, {})
    zoo_store.finish_night(session, old, NightStatus.partial, summary="s")
    assert [n.id for n in zoo_store.list_nights(session, "z")] == [new, old]
    assert [n.id for n in zoo_store.list_nights(session, "z", limit=1, offset=1)] == [old]
    assert zoo_store.last_night(session, "z").id == new
    assert zoo_store.last_night(session, "nobody") is None
    assert [(z, n) for z, n, _ in zoo_store.list_zoos(session)] == [("other", 1), ("z", 2)]
    assert zoo_store.get_night(session, old).status == NightStatus.partial
    with pytest.raises(ValueError, match="not running"):
        zoo_store.finish_night(session, new, NightStatus.running)


def test_an_owners_nights_and_regressions_are_filtered_before_paging(session: Session) -> None:
    """A tenant whose jobs ran only on older nights still gets a full first page, not an empty one."""
    theirs = [_job(session, Status.succeeded, {"perplexity": 10.0 + i}, owner="team-a") for i in range(2)]
    first = _night(session, "z", 96, {"p": theirs[0]})
    second = _night(session, "z", 72, {"p": theirs[1]})
    others = [_night(session, "z", 48 - i, {"p": _job(session, Status.succeeded, {"perplexity": 20.0})})
              for i in range(3)]
    zoo_store.add_regression(session, night_id=second, job_id=theirs[1], previous_job_id=theirs[0],
                             metric="perplexity", old_value=10, new_value=11, tolerance=0.02, worse="higher")
    [other_job] = [row.job_id for row in zoo_store.night_jobs(session, others[0])]
    zoo_store.add_regression(session, night_id=others[0], job_id=other_job, previous_job_id=theirs[1],
                             metric="perplexity", old_value=11, new_value=20, tolerance=0.02, worse="higher")

    assert [n.id for n in zoo_store.list_nights(session, "z", owner="team-a", limit=1)] == [second]
    assert [n.id for n in zoo_store.list_nights(session, "z", owner="team-a", limit=1, offset=1)] == [first]
    assert [n.id for n in zoo_store.list_nights(session, "z", limit=1)] == [others[-1]]
    [mine] = zoo_store.list_regressions(session, "z", owner="team-a", limit=1)
    assert (mine.job_id, mine.night_id) == (theirs[1], second)
    assert len(zoo_store.list_regressions(session, "z")) == 2


def test_regression_against_the_last_successful_night_is_recorded_and_tagged(session: Session) -> None:
    first = _job(session, Status.succeeded, {"perplexity": 10.0, "model_size_bytes": 1000,
                                             "kernel_speedup.64x64.16": 1.5})
    _night(session, "z", 72, {"p": first})
    failed = _job(session, Status.failed, {})
    _night(session, "z", 48, {"p": failed})
    later = _job(session, Status.succeeded, {"perplexity": 10.5, "model_size_bytes": 1005,
                                             "kernel_speedup.64x64.16": 1.2, "stage_seconds": 99.0})
    fresh = _job(session, Status.succeeded, {"perplexity": 50.0})
    tonight = _night(session, "z", 0, {"p": later, "q": fresh})

    found = record_regressions(session, zoo="z", night_id=tonight, tolerances=DEFAULT_TOLERANCES)

    assert sorted((r.metric, r.old_value, r.new_value, r.worse) for r in found) == [
        ("kernel_speedup.64x64.16", 1.5, 1.2, "lower"), ("perplexity", 10.0, 10.5, "higher")]
    assert {(r.job_id, r.previous_job_id) for r in found} == {(later, first)}, "the failed night is skipped"
    assert [r.id for r in zoo_store.list_regressions(session, "z")] == [r.id for r in
                                                                      zoo_store.night_regressions(session, tonight)]
    tags = [t.value for t in queries.job_tags(session, later) if t.key == "regressed"]
    assert len(tags) == 2
    assert any(t.startswith("perplexity 10 -> 10.5 (+5.0%, tolerance +2%)") for t in tags)
    assert all(later in t and first in t for t in tags)
    assert not [t for t in queries.job_tags(session, fresh) if t.key == "regressed"], "a first night has no past"


def test_compare_takes_only_metrics_with_a_tolerance_and_both_values() -> None:
    tolerances = {"perplexity": Tolerance.model_validate("+2%")}
    findings = compare({"perplexity": 10.0, "sparsity": 0.5}, {"perplexity": 11.0, "sparsity": 0.1, "x": 1.0},
                       tolerances)
    assert [(f.metric, f.change) for f in findings] == [("perplexity", pytest.approx(0.1))]
    assert compare({"perplexity": 10.0}, {"perplexity": 9.0}, tolerances) == []


# --------------------------------------------------------------------------------- webhook


@pytest.fixture
def night_id(engine: Any) -> str:
    with db.session_factory(engine).begin() as session:
        return zoo_store.create_night(session, "z").id


def _deliveries(engine: Any, night_id: str) -> list[Any]:
    with db.session_factory(engine)() as session:
        return zoo_store.deliveries(session, night_id)


def test_webhook_posts_a_slack_message_once(engine: Any, night_id: str, receiver: Receiver) -> None:
    message = slack_message("Zoo z: 2 jobs\nREGRESSED a/r: perplexity 1 -> 2", title="zoo z: night partial")
    status = deliver(db.session_factory(engine), night_id=night_id, url=receiver.url, message=message)
    assert status == DeliveryStatus.delivered
    assert receiver.bodies == [message] and receiver.paths == ["/services/T0/B0/secret"]
    assert message["text"].startswith("Zoo z") and message["blocks"][0]["type"] == "header"
    [row] = _deliveries(engine, night_id)
    assert (row.attempts, row.status, row.failures, row.last_error) == (1, DeliveryStatus.delivered, [], None)
    assert row.url == f"http://127.0.0.1:{receiver.server.server_address[1]}/...", "the secret path is not stored"


def test_webhook_retries_with_backoff_and_records_each_failure(engine: Any, night_id: str) -> None:
    server = Receiver(fail_first=2)
    delays: list[float] = []
    try:
        status = deliver(db.session_factory(engine), night_id=night_id, url=server.url, message={"text": "t"},
                         backoff=Backoff(attempts=4, first_s=0.05, factor=2.0),
                         sleep=lambda s: (delays.append(s), time.sleep(s)))
    finally:
        server.close()
    assert status == DeliveryStatus.delivered
    assert len(server.bodies) == 3 and delays == [0.05, 0.1]
    [row] = _deliveries(engine, night_id)
    assert row.attempts == 3 and row.status == DeliveryStatus.delivered
    assert [(f["attempt"], f["error"]) for f in row.failures] == [(1, "HTTP 500: boom"), (2, "HTTP 500: boom")]


def test_webhook_gives_up_after_the_last_attempt(engine: Any, night_id: str) -> None:
    server = Receiver(fail_first=100, fail_status=503)
    try:
        status = deliver(db.session_factory(engine), night_id=night_id, url=server.url, message={"text": "t"},
                         backoff=Backoff(attempts=3, first_s=0.01, max_s=0.02))
    finally:
        server.close()
    assert status == DeliveryStatus.failed and len(server.bodies) == 3
    [row] = _deliveries(engine, night_id)
    assert (row.attempts, row.status, row.last_error, len(row.failures)) == (3, DeliveryStatus.failed,
                                                                              "HTTP 503: boom", 3)


def test_webhook_does_not_retry_a_client_error(engine: Any, night_id: str) -> None:
    server = Receiver(fail_first=100, fail_status=404)
    try:
        status = deliver(db.session_factory(engine), night_id=night_id, url=server.url, message={"text": "t"},
                         backoff=Backoff(attempts=3, first_s=0.01))
    finally:
        server.close()
    assert status == DeliveryStatus.failed and len(server.bodies) == 1
    assert _deliveries(engine, night_id)[0].attempts == 1


def test_webhook_honours_retry_after_up_to_the_cap(engine: Any, night_id: str) -> None:
    server = Receiver(fail_first=1, fail_status=429, headers={"Retry-After": "0.2"})
    delays: list[float] = []
    try:
        status = deliver(db.session_factory(engine), night_id=night_id, url=server.url, message={"text": "t"},
                         backoff=Backoff(attempts=2, first_s=0.01, max_s=0.1), sleep=delays.append)
    finally:
        server.close()
    assert status == DeliveryStatus.delivered and delays == [0.1]


def test_webhook_unreachable_receiver_is_retried_and_recorded(engine: Any, night_id: str) -> None:
    closed = Receiver()
    url = closed.url
    closed.close()  # nothing listens there any more: connection refused
    status = deliver(db.session_factory(engine), night_id=night_id, url=url, message={"text": "t"},
                     backoff=Backoff(attempts=2, first_s=0.01))
    assert status == DeliveryStatus.failed
    [row] = _deliveries(engine, night_id)
    assert row.attempts == 2 and row.last_error.startswith("ConnectError")
    assert "secret" not in row.last_error


# --------------------------------------------------------------------------------- content identities


def test_content_identity_follows_the_bytes_not_the_path(tmp_path: Path, tiny_model_dir: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    memo = tmp_path / "memo"
    original = content_identity(str(tiny_model_dir), memo)
    assert original.value.startswith("sha256:") and original.note is None
    assert content_identity(str(copy)).value == original.value, "same bytes elsewhere: same identity"
    assert any(memo.iterdir()), "digests are memoized for later processes"
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")
    assert content_identity(str(copy)).value != original.value, "changed in place: a new identity"


def test_content_identity_of_references(tmp_path: Path) -> None:
    assert content_identity("dataset:abc").value == "dataset:abc"
    assert content_identity("builtin:enwiki").value.startswith("sha256:")
    gone = content_identity(str(tmp_path / "gone.txt"))
    assert gone.value == f"ref:{tmp_path / 'gone.txt'}" and "does not exist" in gone.note
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert content_identity(text.as_uri()).value == content_identity(str(text)).value


def test_stage_cache_key_changes_when_a_text_changes_in_place(tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("one\n\ntwo")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    model = Artifact(uri=f"source:{tmp_path / 'model'}", sha256=None)

    def key() -> str:
        return stage_cache_key(kind="calibrate", params={}, data={"calibration": str(text), "evaluation": str(text)},
                               seed=0, inputs={"model": model}, code_version="v")

    before = key()
    assert key() == before
    text.write_text("one\n\nthree")
    assert key() != before


@pytest.mark.usefixtures("ray_cluster")
def test_a_kernel_plan_input_is_keyed_by_the_gpu_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The served kernel-plan cache changes whenever any job tunes, so its bytes would defeat the stage cache;
    its part of the key is the GPUs the stage may land on instead, read from the connected Ray cluster."""
    from orchestrator import caching

    assert caching.gpu_environment() == "gpu:untyped"  # the test cluster: 2 logical GPUs of no type
    model = Artifact(uri="s3://bucket/model", sha256="a" * 64)

    def key(plans_sha256: str) -> str:
        plans = Artifact(uri="s3://bucket/plans.json", sha256=plans_sha256)
        return stage_cache_key(kind="kernel_tune", params={}, data={}, seed=0,
                               inputs={"model": model, "kernel_cache": plans}, code_version="v")

    untyped = key("b" * 64)
    assert key("c" * 64) == untyped, "new plans from other jobs keep the key"
    monkeypatch.setattr(caching, "gpu_environment", lambda: "gpu:H200")
    assert key("b" * 64) != untyped, "another GPU type is another key"


# --------------------------------------------------------------------------------- two nights, end to end


def _recipe() -> dict[str, Any]:
    return {"name": "wanda-50", "seed": 0, "stages": [
        {"stage": "calibrate", "samples": 4, "seq_len": 32, "batch_size": 2},
        {"stage": "prune", "method": "wanda", "sparsity": 0.5},
        {"stage": "evaluate", "seq_len": 32, "max_windows": 4, "compare_dense": False},
    ]}


def _drift(model_dir: Path, factor: float) -> None:
    """Change the model in place (same path): its final norm scaled, so its predictions sharpen and
    held-out perplexity rises; pruning leaves the norm alone, so the pruned model keeps the change."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * factor
    save_file(tensors, weights, metadata={"format": "pt"})


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_two_nights_skip_the_unchanged_pair_and_catch_a_regression(
        tmp_path: Path, tiny_model_dir: Path, text_file: Path, settings: Any) -> None:
    from tiny_models import build_tiny_model, build_tiny_tokenizer

    from orchestrator.schedules import nightly
    from orchestrator.service import Orchestrator

    drifting = tmp_path / "drifting"
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(len(tokenizer), seed=1).save_pretrained(drifting, safe_serialization=True)
    tokenizer.save_pretrained(drifting)
    (tmp_path / "wanda-50.yaml").write_text(yaml.safe_dump(_recipe()))
    server = Receiver()
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({
        "name": "ci-zoo", "webhook": server.url, "recipes": ["wanda-50.yaml"],
        "models": [{"model": str(tiny_model_dir), "calibration": str(text_file), "evaluation": str(text_file)},
                   {"model": "./drifting", "calibration": str(text_file), "evaluation": str(text_file),
                    "owner": "alice"}],
    }))
    settings = settings.model_copy(update={"max_concurrent_jobs": 2})
    try:
        first = nightly(str(zoo), settings=settings)
        _drift(drifting, 8.0)
        started = time.monotonic()
        second = nightly(str(zoo), settings=settings)
        night_2_wall = time.monotonic() - started
    finally:
        server.close()

    assert first["status"] == second["status"] == "succeeded", (first["summary"], second["summary"])
    orchestrator = Orchestrator(settings)
    with orchestrator.sessions() as session:
        night_1 = zoo_store.night_jobs(session, first["night_id"])
        night_2 = zoo_store.night_jobs(session, second["night_id"])
        stable_1, drift_1 = night_1
        stable_2, drift_2 = night_2
        assert [j.job.owner for j in night_2] == ["local", "alice"]
        assert stable_2.pair_key == stable_1.pair_key and stable_2.job_id != stable_1.job_id

        # the unchanged pair: recorded as its own job, every stage reused from night 1, done in seconds
        assert second["reused"] == [stable_2.job_id] and stable_2.reused and not drift_2.reused
        runs_1 = queries.stage_runs(session, stable_1.job_id)
        runs_2 = queries.stage_runs(session, stable_2.job_id)
        cached = {t.stage_run_id: t.value for t in queries.job_tags(session, stable_2.job_id) if t.key == "cached_from"}
        assert cached == {new.id: old.id for new, old in zip(runs_2, runs_1, strict=True)}
        def outputs(job_id: str) -> set[tuple[str, str, str | None]]:
            return {(a.kind, a.uri, a.sha256) for a in queries.list_artifacts(session, job_id) if a.stage_run_id}

        assert outputs(stable_2.job_id) == outputs(stable_1.job_id), "lineage points at night 1's artifacts"
        reused_s = (stable_2.job.finished_at - stable_2.job.started_at).total_seconds()
        computed_s = (stable_1.job.finished_at - stable_1.job.started_at).total_seconds()
        print(f"pair job: night 1 computed in {computed_s:.1f} s, night 2 reused in {reused_s:.1f} s; "
              f"night 2 wall {night_2_wall:.1f} s")
        assert reused_s < 15, f"a reused pair completes in seconds, took {reused_s:.1f} s"

        # the changed pair: recomputed (same path, new bytes), its perplexity worse: a regression
        assert not [t for t in queries.job_tags(session, drift_2.job_id) if t.key == "cached_from"]
        [regression] = zoo_store.list_regressions(session, "ci-zoo")
        assert (regression.night_id, regression.metric) == (second["night_id"], "perplexity")
        assert (regression.job_id, regression.previous_job_id) == (drift_2.job_id, drift_1.job_id)
        assert regression.new_value > regression.old_value * 1.02
        [tag] = [t.value for t in queries.job_tags(session, drift_2.job_id) if t.key == "regressed"]
        assert tag.startswith("perplexity ") and drift_1.job_id in tag and drift_2.job_id in tag

        nights = zoo_store.list_nights(session, "ci-zoo")
        assert [n.id for n in nights] == [second["night_id"], first["night_id"]]
        assert all(n.status == NightStatus.succeeded and n.finished_at for n in nights)
        assert "1 regression;" in nights[0].summary and drift_2.job_id in nights[0].summary
        assert "0 regressions;" in nights[1].summary
        assert [d.status for d in zoo_store.deliveries(session, second["night_id"])] == [DeliveryStatus.delivered]

        # one HTML report per owner, an artifact of each of that owner's jobs, holding only that owner's jobs
        assert set(second["reports"]) == {"local", "alice"}
        assert nights[0].report_artifact_id == second["reports"]["local"]
        pages = {}
        for owner, night_job in (("local", stable_2), ("alice", drift_2)):
            [report] = queries.list_artifacts(session, night_job.job_id, kind="zoo_report")
            assert report.id == second["reports"][owner]
            pages[owner] = fsspec.open(report.uri, "rt", encoding="utf-8").open().read()
            assert hashlib.sha256(pages[owner].encode()).hexdigest() == report.sha256
            assert "data:image/png;base64," in pages[owner] and "https://" not in pages[owner]
        assert drift_2.job_id in pages["alice"] and drift_2.job_id not in pages["local"]
        assert stable_2.job_id in pages["local"] and stable_2.job_id not in pages["alice"]
        assert "perplexity" in pages["alice"] and drift_1.job_id in pages["alice"], "the regression, both jobs"
    orchestrator.close()

    # the owner downloads the report like any of its artifacts
    tokens = {"tok-alice": "alice", "tok-platform": "local", "tok-carol": "carol"}
    alice, platform, carol = ({"Authorization": f"Bearer {token}"} for token in tokens)
    with TestClient(create_app(settings.model_copy(update={"api_tokens": tokens}))) as client:
        answer = client.get(f"/v1/artifacts/{second['reports']['alice']}/download", headers=alice)
        assert answer.status_code == 200 and answer.text == pages["alice"]
        refused = client.get(f"/v1/artifacts/{second['reports']['local']}/download", headers=alice)
        assert refused.status_code == 404

        # ... and opens it in a browser: each owner its own page, sandboxed, loading nothing from anywhere
        report = f"/v1/zoo/ci-zoo/nights/{second['night_id']}/report"
        page = client.get(report, headers=alice)
        assert page.status_code == 200 and page.text == pages["alice"]
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"].startswith("default-src 'none';")
        assert "sandbox" in page.headers["content-security-policy"]
        assert client.get(report, headers=platform).text == pages["local"]
        assert client.get(report, headers=carol).status_code == 404
        assert client.get(report.replace("ci-zoo", "other-zoo"), headers=alice).status_code == 404
        assert client.get("/v1/zoo/ci-zoo/nights/not-a-night/report", headers=alice).status_code == 422

        # the zoo's nights and regressions over the API: each owner sees its own jobs only
        seen = client.get("/v1/zoo/ci-zoo/nights", headers=alice).json()
        assert [n["id"] for n in seen["data"]] == [second["night_id"], first["night_id"]]
        assert [[j["job_id"] for j in n["jobs"]] for n in seen["data"]] == [[drift_2.job_id], [drift_1.job_id]]
        assert [n["regressions"] for n in seen["data"]] == [1, 0]
        assert seen["data"][0]["report_artifact_id"] == second["reports"]["alice"]
        assert seen["data"][0]["summary"] is None, "the summary covers another owner's job too"
        regressions = client.get("/v1/zoo/ci-zoo/regressions", headers=alice).json()["data"]
        assert [(r["metric"], r["job_id"], r["previous_job_id"], r["worse"]) for r in regressions] == [
            ("perplexity", drift_2.job_id, drift_1.job_id, "higher")]
        theirs = client.get("/v1/zoo/ci-zoo/nights", headers=platform).json()["data"]
        assert [[j["job_id"] for j in n["jobs"]] for n in theirs] == [[stable_2.job_id], [stable_1.job_id]]
        assert theirs[0]["jobs"][0]["reused"] and theirs[0]["regressions"] == 0
        assert client.get("/v1/zoo/ci-zoo/regressions", headers=platform).json() == {"data": [], "count": 0}
        assert client.get("/v1/zoo/ci-zoo/nights", headers=carol).json() == {"data": [], "count": 0}
        assert client.get("/v1/zoo/ci-zoo/nights?limit=0", headers=alice).status_code == 422
        assert client.get("/v1/zoo/a%00b/nights", headers=alice).status_code == 422
        assert client.get("/v1/zoo/ci-zoo/nights").status_code == 401

    # `sparseflow zoo status` on the embedded store: the caller (local, no tokens) sees its own pair
    os.environ["SPARSEFLOW_HOME"] = str(settings.home)
    get_settings.cache_clear()
    try:
        shown = CliRunner().invoke(cli_app, ["zoo", "status", "ci-zoo"], catch_exceptions=False)
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0, shown.output
    assert second["night_id"] in shown.output and stable_2.job_id in shown.output
    assert drift_2.job_id not in shown.output and "no regressions" in shown.output
    assert second["reports"]["local"] in shown.output

    # the webhook got one Slack-compatible message per night, the second naming the regression
    assert [set(b) for b in server.bodies] == [{"text", "blocks"}] * 2
    assert "1 regression;" in server.bodies[1]["text"] and ": perplexity " in server.bodies[1]["text"]
    assert "perplexity" in server.bodies[1]["text"] and "0 regressions" in server.bodies[0]["text"]


def test_a_pair_the_access_policy_refuses_is_a_failed_job_of_the_night(tmp_path: Path, settings: Any,
                                                                        receiver: Receiver) -> None:
    """The policy applies to every night job as to any job: a model outside the allowed roots is refused for
    its owner; the refusal is recorded on the job, the night ends failed and is still announced."""
    from orchestrator.nights import run_night
    from orchestrator.service import Orchestrator
    from orchestrator.zoo_file import parse_zoo

    (tmp_path / "allowed").mkdir()
    settings = settings.model_copy(update={"local_roots": [str(tmp_path / "allowed")]})
    zoo = parse_zoo({"name": "locked", "webhook": receiver.url, "owner": "bob",
                     "recipes": [{"name": "mag", "stages": [{"stage": "prune", "method": "magnitude"}]}],
                     "models": [str(tmp_path / "elsewhere")]}, base_dir=tmp_path)
    orchestrator = Orchestrator(settings)
    try:
        outcome = run_night(zoo, orchestrator, poll_s=0.1)
        with orchestrator.sessions() as session:
            [night_job] = zoo_store.night_jobs(session, outcome.night_id)
            job = night_job.job
            assert (job.owner, job.status) == ("bob", Status.failed)
            assert job.error.startswith("refused: recipe.model: ") and str(tmp_path) not in job.error
            assert [r.status for r in queries.stage_runs(session, job.id)] == [Status.skipped]
            assert zoo_store.get_night(session, outcome.night_id).status == NightStatus.failed
    finally:
        orchestrator.close()
    assert outcome.status == "failed" and outcome.webhook == "delivered"
    assert f"- failed: {tmp_path / 'elsewhere'}/mag job " in receiver.bodies[0]["text"]


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_one_failing_pair_stops_no_other(tmp_path: Path, tiny_model_dir: Path, settings: Any,
                                         receiver: Receiver) -> None:
    """Two pairs run side by side; one model's weights are unreadable, so its prune stage fails mid-night.
    The other pair still finishes with its model stored, the night ends partial and the message says so."""
    from orchestrator.nights import run_night
    from orchestrator.service import Orchestrator
    from orchestrator.zoo_file import parse_zoo

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    zoo = parse_zoo({"name": "isolated", "webhook": receiver.url,
                     "recipes": [{"name": "mag", "stages": [{"stage": "prune", "method": "magnitude"}]}],
                     "models": [str(broken), str(tiny_model_dir)]}, base_dir=tmp_path)
    orchestrator = Orchestrator(settings.model_copy(update={"max_concurrent_jobs": 2}))
    try:
        outcome = run_night(zoo, orchestrator, poll_s=0.1)
        with orchestrator.sessions() as session:
            failed, survived = (night_job.job for night_job in zoo_store.night_jobs(session, outcome.night_id))
            assert (failed.status, survived.status) == (Status.failed, Status.succeeded)
            assert "prune" in failed.error and "model.safetensors is not a safetensors file" in failed.error
            assert [a.kind for a in queries.list_artifacts(session, failed.id) if a.stage_run_id] == []
            assert "model" in {a.kind for a in queries.list_artifacts(session, survived.id)}
            assert zoo_store.get_night(session, outcome.night_id).status == NightStatus.partial
    finally:
        orchestrator.close()
    assert outcome.status == "partial" and outcome.webhook == "delivered"
    text = receiver.bodies[0]["text"]
    assert "2 jobs, 1 succeeded (0 reused), 1 failed" in text and f"- failed: {broken}/mag job {failed.id}" in text
