"""Shared storage across nodes: artifacts and fine-tune checkpoints through an S3 artifact root.

The S3 endpoint is a real `moto_server` process on a loopback port; s3fs reaches it through fsspec's
configuration (`client_kwargs.endpoint_url`), as a deployment would point it at MinIO. A "node" is a
cache directory: two stages with different cache directories share nothing but the artifact root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from orchestrator.integrity import full_check, snapshot
from workers.checkpoints import POINTER, CheckpointFetchError, RemoteCheckpoints
from workers.runner import SOURCE_PREFIX, StageRequest, attempt_checkpoint_dir, execute_stage, remote_checkpoints
from workers.shared_cache import CACHE_PREFIX as SHARED_PREFIX
from workers.storage import MANIFEST, ArtifactStorage, IncompleteArtifactError, sha256_file, upload_dir

pytest.importorskip("s3fs")

_START_TIMEOUT_S = 30.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`s3://<bucket>/sparseflow` on a moto server started for this module and always stopped."""
    server_bin = Path(sys.executable).with_name("moto_server")
    if not server_bin.exists():
        pytest.skip("moto_server is not installed (the test extra)")
    port = _free_port()
    log = (tmp_path_factory.mktemp("moto") / "server.log").open("wb")
    server = subprocess.Popen([str(server_bin), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto_server did not start within {_START_TIMEOUT_S}s (exit {server.poll()})")
                time.sleep(0.2)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(fsspec.config.conf, "s3", {
                "key": "test", "secret": "test",
                "client_kwargs": {"endpoint_url": endpoint},
            })
            fsspec.filesystem("s3").mkdir("shared")
            yield "s3://shared/sparseflow"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def _model(root: Path) -> Path:
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "sub" / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return model


def test_file_and_model_directory_round_trip_between_nodes(s3_root: str, tmp_path: Path) -> None:
    writer = ArtifactStorage(s3_root, tmp_path / "node-a" / "artifacts")
    report = tmp_path / "work" / "report.json"
    report.parent.mkdir()
    report.write_text('{"ppl": 21.7}')
    stored_file = writer.put(report, job_id="j1", label="03-evaluate", kind="report")
    stored_dir = writer.put(_model(tmp_path / "work"), job_id="j1", label="01-prune", kind="model")
    assert stored_dir.uri == f"{s3_root}/j1/01-prune/model"

    reader = ArtifactStorage(s3_root, tmp_path / "node-b" / "artifacts")  # another node: its own cache
    local_file, local_dir = reader.local_path(stored_file.uri), reader.local_path(stored_dir.uri)
    assert local_file.read_text() == '{"ppl": 21.7}' and sha256_file(local_file) == stored_file.sha256
    assert local_dir.is_relative_to(tmp_path / "node-b")
    assert (local_dir / "sub" / "model.safetensors").read_bytes() == bytes(range(256)) * 64
    assert sha256_file(local_dir / MANIFEST) == stored_dir.sha256
    assert reader.local_path(stored_dir.uri) == local_dir  # cached: the same copy again
    assert not [p for p in local_dir.parent.parent.rglob(".*")]  # no staging names left behind
    assert full_check(snapshot(stored_file.uri), stored_file.sha256) is None  # the server's integrity check
    assert full_check(snapshot(stored_dir.uri), stored_dir.sha256) is None


def test_changed_remote_bytes_are_caught_and_never_served_from_a_stale_cache(s3_root: str, tmp_path: Path) -> None:
    storage = ArtifactStorage(s3_root, tmp_path / "cache")
    stored = storage.put(_model(tmp_path / "work"), job_id="j2", label="01-prune", kind="model")
    first = storage.local_path(stored.uri)
    fs, path = fsspec.core.url_to_fs(stored.uri)
    fs.pipe_file(f"{path}/sub/model.safetensors", b"bit rot")
    assert full_check(snapshot(stored.uri), stored.sha256) == "changed: sub/model.safetensors"

    report = tmp_path / "report.json"
    report.write_text("v1")
    file_artifact = storage.put(report, job_id="j2", label="03-evaluate", kind="report")
    assert storage.local_path(file_artifact.uri).read_text() == "v1"
    report.write_text("v2, a retried stage storing again")
    storage.put(report, job_id="j2", label="03-evaluate", kind="report")
    assert storage.local_path(file_artifact.uri).read_text() == "v2, a retried stage storing again"
    assert full_check(snapshot(file_artifact.uri), file_artifact.sha256).startswith("sha256 of the file is")
    assert (first / "sub" / "model.safetensors").read_bytes() == bytes(range(256)) * 64  # cached copy untouched


def test_a_half_uploaded_directory_is_absent_until_its_manifest_lands(s3_root: str, tmp_path: Path) -> None:
    storage = ArtifactStorage(s3_root, tmp_path / "cache")
    model = _model(tmp_path / "work")
    fs, root = fsspec.core.url_to_fs(s3_root)
    uri = f"{s3_root}/j3/01-prune/model"
    upload_dir(fs, model, f"{root}/j3/01-prune/model")  # a worker that died before writing the manifest
    with pytest.raises(IncompleteArtifactError, match="incomplete"):
        storage.local_path(uri)
    assert full_check(snapshot(uri), "0" * 64) == f"{MANIFEST} is missing"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))

    stored = storage.put(model, job_id="j3", label="01-prune", kind="model")  # the retry stores it whole
    assert stored.uri == uri
    assert full_check(snapshot(uri), stored.sha256) is None
    assert json.loads(storage.local_path(uri).joinpath(MANIFEST).read_text())["files"].keys() == {
        "config.json", "sub/model.safetensors"}


def test_local_put_that_dies_mid_copy_leaves_nothing_at_the_target(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to force a copy instead of a rename")
    scratch = shm / f"sparseflow-test-{os.getpid()}"
    try:
        model = _model(scratch)
        storage = ArtifactStorage((tmp_path / "store").as_uri(), tmp_path / "cache")
        copied: list[str] = []
        real_copytree = shutil.copytree

        def copy_then_die(src: str, dst: str, **kwargs) -> str:  # the kill lands after the first file
            if copied:
                raise KeyboardInterrupt("worker killed mid-copy")
            copied.append(src)
            return shutil.copy2(src, dst)

        def copytree_that_dies(src, dst, **kwargs):
            return real_copytree(src, dst, **{**kwargs, "copy_function": copy_then_die})

        monkeypatch.setattr(shutil, "copytree", copytree_that_dies)
        with pytest.raises(KeyboardInterrupt):
            storage.put(model, job_id="j4", label="01-prune", kind="model")
        monkeypatch.undo()
        assert copied, "the put really was copying across filesystems when it died"
        label_dir = tmp_path / "store" / "j4" / "01-prune"
        assert not (label_dir / "model").exists()
        with pytest.raises(FileNotFoundError):
            storage.local_path((label_dir / "model").as_uri())

        stored = storage.put(model, job_id="j4", label="01-prune", kind="model")  # the retry
        assert sorted(p.name for p in label_dir.iterdir()) == ["model"]
        assert full_check(snapshot(stored.uri), stored.sha256) is None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_fetch_follows_the_pointer_and_refuses_a_corrupt_checkpoint(s3_root: str, tmp_path: Path) -> None:
    remote = RemoteCheckpoints(s3_root, "j5", "run-1")
    assert remote.latest() is None and not remote.fetch(tmp_path / "none")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "trainer.json").write_text('{"step": 1}')
    first = remote.publish(checkpoint)
    (checkpoint / "trainer.json").write_text('{"step": 2}')
    second = remote.publish(checkpoint)
    upload_dir(remote.fs, checkpoint, f"{remote.prefix}/v99999999999999999999-deadbeef")  # a dead attempt's
    (checkpoint / "trainer.json").write_text('{"step": 3}')
    third = remote.publish(checkpoint)
    versions = {p.rsplit("/", 1)[-1] for p in remote.fs.ls(remote.prefix, detail=False)}
    assert versions == {POINTER, second, third}, "older and half-uploaded versions are pruned"
    assert first not in versions

    node_b = tmp_path / "node-b" / "run-1"
    assert remote.fetch(node_b)
    assert json.loads((node_b / "trainer.json").read_text()) == {"step": 3}

    remote.fs.pipe_file(f"{remote.prefix}/{third}/trainer.json", b'{"step": 4}')
    with pytest.raises(CheckpointFetchError, match="arrived corrupt: trainer.json"):
        remote.fetch(tmp_path / "node-c" / "run-1")
    assert not (tmp_path / "node-c" / "run-1").exists()
    remote.discard()
    assert remote.latest() is None


class DiesAfterStep:
    """A progress sink that records training steps and kills the attempt once step `limit` is reported."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit, self.steps = limit, []

    def emit(self, done: int, total: int, message: str) -> None:
        if message.startswith("step "):
            self.steps.append(done)
            if self.limit is not None and done >= self.limit:
                raise KeyboardInterrupt(f"worker killed after step {done}")

    def flush(self) -> None:
        pass


def _finetune_request(model_dir: Path, text: Path, root: str, cache_dir: Path, job_id: str) -> StageRequest:
    return StageRequest(
        job_id=job_id, stage_run_id="ft-run", label="02-finetune",
        spec={"stage": "finetune", "steps": 4, "lr": 3e-3, "warmup_steps": 1, "batch_size": 1, "seq_len": 16,
              "beta_kd": 0.0, "checkpoint_every": 1},
        data={"calibration": str(text), "evaluation": str(text)}, seed=0,
        inputs={"model": SOURCE_PREFIX + str(model_dir), "base_model": SOURCE_PREFIX + str(model_dir)},
        artifact_root=root, cache_dir=str(cache_dir),
    )


def _losses(outcome) -> list[tuple[int, float]]:
    return [(step, value) for name, value, step in outcome.metrics if name == "loss"]


def test_finetune_killed_on_one_node_resumes_on_another_from_its_published_checkpoint(
        s3_root: str, tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    node_a = _finetune_request(tiny_model_dir, tiny_text_file, s3_root, tmp_path / "node-a", "job-x")
    with pytest.raises(KeyboardInterrupt):
        execute_stage(node_a, DiesAfterStep(2))
    remote = remote_checkpoints(node_a)
    pointer = remote.latest()
    assert pointer is not None, "the dead attempt's checkpoint was published"
    trainer = json.loads(remote.fs.cat_file(f"{remote.prefix}/{pointer['version']}/trainer.json"))
    assert trainer["step"] == 2

    node_b = _finetune_request(tiny_model_dir, tiny_text_file, s3_root, tmp_path / "node-b", "job-x")
    assert not attempt_checkpoint_dir(node_b).exists()
    sink = DiesAfterStep()
    resumed = execute_stage(node_b, sink)
    assert "resumed from a checkpoint after step 2" in resumed.notes
    assert sink.steps == [3, 4], "the finished steps were not trained again"
    assert [step for step, _ in _losses(resumed)] == [0, 1, 2, 3]

    whole = execute_stage(_finetune_request(tiny_model_dir, tiny_text_file, (tmp_path / "local").as_uri(),
                                            tmp_path / "node-c", "job-y"))
    assert [v for _, v in _losses(resumed)] == pytest.approx([v for _, v in _losses(whole)], rel=1e-5)

    kinds = {a["kind"]: a["uri"] for a in resumed.artifacts}
    assert kinds["model"] == f"{s3_root}/job-x/02-finetune/model" and "checkpoint" in kinds
    assert remote.latest() is None and not remote.fs.exists(remote.prefix), "done: published checkpoints deleted"
    assert not attempt_checkpoint_dir(node_b).exists(), "done: the working copy is deleted"


def test_dense_perplexity_measured_on_one_node_is_reused_on_another(s3_root: str, tiny_model_dir: Path,
                                                                    tiny_text_file: Path, tmp_path: Path) -> None:
    def evaluate_on(node: str) -> dict[str, float]:
        outcome = execute_stage(StageRequest(
            job_id=f"job-{node}", stage_run_id=f"eval-{node}", label="03-evaluate",
            spec={"stage": "evaluate", "seq_len": 32, "max_windows": 2, "batch_size": 2, "compare_dense": True},
            data={"calibration": str(tiny_text_file), "evaluation": str(tiny_text_file)}, seed=0,
            inputs={"model": SOURCE_PREFIX + str(tiny_model_dir), "base_model": SOURCE_PREFIX + str(tiny_model_dir)},
            artifact_root=s3_root, cache_dir=str(tmp_path / node)))
        return {name: value for name, value, _ in outcome.metrics} | {"cached": float(
            "dense perplexity taken from the cache" in outcome.notes)}

    first = evaluate_on("node-a")
    fs, root = fsspec.core.url_to_fs(s3_root)
    shared = fs.find(f"{root}/{SHARED_PREFIX}/dense_ppl")
    assert len(shared) == 1 and shared[0].endswith(".json")
    assert first["cached"] == 0.0
    second = evaluate_on("node-b")
    assert second["cached"] == 1.0, "node b took the dense figure node a measured"
    assert second["dense_perplexity"] == first["dense_perplexity"]
    assert list((tmp_path / "node-b" / "dense_ppl").iterdir())[0].name == shared[0].rsplit("/", 1)[-1]


def test_a_local_root_publishes_and_fetches_checkpoints_by_hard_links(tmp_path: Path) -> None:
    remote = RemoteCheckpoints((tmp_path / "root").as_uri(), "j6", "run-1")
    checkpoint = tmp_path / "node-a" / "run-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainable.safetensors").write_bytes(b"\x00" * 4096)
    version = remote.publish(checkpoint)
    published = tmp_path / "root" / "_checkpoints" / "j6" / "run-1" / version / "trainable.safetensors"
    assert published.stat().st_ino == (checkpoint / "trainable.safetensors").stat().st_ino
    assert remote.fetch(tmp_path / "node-b" / "run-1")
    assert (tmp_path / "node-b" / "run-1" / "trainable.safetensors").read_bytes() == b"\x00" * 4096
    assert sorted(p.name for p in published.parent.parent.iterdir()) == [POINTER, version]
