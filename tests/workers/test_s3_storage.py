"""Artifacts on S3 behave as on a local disk: stored, checksummed, fetched and streamed for download.

The S3 endpoint is moto's server speaking the real S3 protocol on localhost; s3fs talks to it through
`AWS_ENDPOINT_URL`, exactly as it would talk to AWS or MinIO.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.streaming import tar_stream
from workers.storage import MANIFEST, ArtifactStorage, verify_manifest


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    import fsspec
    import s3fs

    # s3fs caches filesystems by their arguments, not by the endpoint the environment names: one made by an
    # earlier test (whose server is gone) would otherwise be handed back here
    s3fs.S3FileSystem.clear_instance_cache()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    name = f"artifacts-{request.node.name[5:30].replace('_', '-')}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return f"s3://{name}/sparseflow"


def _model(root: Path) -> Path:
    model = root / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    return model


def test_directory_artifact_round_trips_through_s3(bucket: str, tmp_path: Path) -> None:
    storage = ArtifactStorage(bucket, tmp_path / "cache")
    assert not storage.is_local
    stored = storage.put(_model(tmp_path), job_id="job1", label="01-prune", kind="model")
    assert stored.uri == f"{bucket}/job1/01-prune/model"
    assert stored.uri.startswith("s3://")
    local = storage.local_path(stored.uri)
    assert hashlib.sha256((local / MANIFEST).read_bytes()).hexdigest() == stored.sha256
    assert verify_manifest(local) == []
    assert (local / "model.safetensors").read_bytes() == bytes(range(256)) * 64


def test_download_stream_of_an_s3_directory_is_a_valid_tar(bucket: str, tmp_path: Path) -> None:
    import fsspec

    stored = ArtifactStorage(bucket, tmp_path / "cache").put(_model(tmp_path), job_id="j", label="x", kind="model")
    fs, path = fsspec.core.url_to_fs(stored.uri)
    with tarfile.open(fileobj=io.BytesIO(b"".join(tar_stream(fs, path)))) as archive:
        assert sorted(archive.getnames()) == ["model/checksums.json", "model/config.json", "model/model.safetensors"]
        assert archive.extractfile("model/config.json").read() == b'{"hidden_size": 8}'
