"""Artifact storage: local moves, checksums, manifests, and a non-local fsspec filesystem."""

from __future__ import annotations

import hashlib
from pathlib import Path

import fsspec
import pytest

from workers.storage import MANIFEST, ArtifactStorage, sha256_file, verify_manifest


def _model_dir(root: Path) -> Path:
    model = root / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "sub" / "weights.bin").write_bytes(b"\x01\x02" * 1000)
    return model


def test_put_file_moves_it_and_returns_its_sha256(tmp_path: Path) -> None:
    storage = ArtifactStorage((tmp_path / "store").as_uri(), tmp_path / "cache")
    report = tmp_path / "work" / "report.json"
    report.parent.mkdir()
    report.write_text('{"ppl": 21.7}')
    stored = storage.put(report, job_id="j1", label="03-evaluate", kind="report")
    assert stored.sha256 == hashlib.sha256(b'{"ppl": 21.7}').hexdigest()
    assert stored.size_bytes == len('{"ppl": 21.7}')
    assert not report.exists()
    assert storage.local_path(stored.uri).read_text() == '{"ppl": 21.7}'
    assert stored.uri.startswith("file://") and "j1/03-evaluate/report.json" in stored.uri


def test_directory_gets_a_manifest_whose_digest_is_the_artifact_sha(tmp_path: Path) -> None:
    storage = ArtifactStorage((tmp_path / "store").as_uri(), tmp_path / "cache")
    stored = storage.put(_model_dir(tmp_path), job_id="j1", label="01-prune", kind="model")
    local = storage.local_path(stored.uri)
    assert hashlib.sha256((local / MANIFEST).read_bytes()).hexdigest() == stored.sha256
    assert verify_manifest(local) == []
    (local / "sub" / "weights.bin").write_bytes(b"tampered")
    assert verify_manifest(local) == ["sub/weights.bin"]


def test_remote_filesystem_round_trips_through_the_local_cache(tmp_path: Path) -> None:
    fsspec.filesystem("memory").store.clear()
    storage = ArtifactStorage("memory://bucket/artifacts", tmp_path / "cache")
    assert not storage.is_local
    stored = storage.put(_model_dir(tmp_path), job_id="j2", label="00-calibrate", kind="model")
    assert stored.uri.startswith("memory://")
    local = storage.local_path(stored.uri)
    assert local.is_dir() and local.is_relative_to(tmp_path / "cache")
    assert sha256_file(local / "sub" / "weights.bin") == sha256_file(tmp_path / "model" / "sub" / "weights.bin")
    assert verify_manifest(local) == []


def test_missing_local_artifact_is_a_clear_error(tmp_path: Path) -> None:
    storage = ArtifactStorage(tmp_path.as_uri(), tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="artifact missing"):
        storage.local_path((tmp_path / "nope").as_uri())
