"""Downloads: HEAD, single ranges (also into a folder's tar), ETag, re-verification, and the CLI's safe writes.

Artifacts are stored through the real `ArtifactStorage` and recorded through `queries`, no job is run.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.app import create_app
from api.client import ApiClient
from api.download import ChecksumMismatch, DownloadError
from orchestrator import integrity
from orchestrator.store import queries
from orchestrator.store.models import Artifact
from workers.storage import ArtifactStorage

PAYLOAD = bytes(range(256)) * 40 + b"tail"  # 10244 bytes: not a multiple of the tar block


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One store for the module (migrating a fresh database per test would dominate the runtime)."""
    from orchestrator.settings import Settings

    home = tmp_path_factory.mktemp("downloads") / "home"
    return Settings(home=home, database_url=None, artifact_root=None, ray_address=None)


@pytest.fixture(scope="module")
def client(settings: Any) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _store(client: TestClient, settings: Any, tmp_path: Path, local: Path, kind: str) -> Artifact:
    sessions = client.app.state.orchestrator.sessions
    storage = ArtifactStorage(settings.artifacts_url, settings.cache_dir / "artifacts")
    with sessions.begin() as session:
        job = queries.create_job(session, name="t", recipe={}, stages=[("prune", {})], code_version="t",
                                 package_versions={})
        stored = storage.put(local, job_id=job.id, label="00-prune", kind=kind)
        return queries.add_artifact(session, job_id=job.id, kind=kind, uri=stored.uri, sha256=stored.sha256,
                                    size_bytes=stored.size_bytes, stage_run_id=job.stage_runs[0].id)


@pytest.fixture
def file_artifact(client: TestClient, settings: Any, tmp_path: Path) -> Artifact:
    local = tmp_path / "scratch" / "masks.bin"
    local.parent.mkdir()
    local.write_bytes(PAYLOAD)
    return _store(client, settings, tmp_path, local, "masks")


@pytest.fixture
def dir_artifact(client: TestClient, settings: Any, tmp_path: Path) -> Artifact:
    model = tmp_path / "scratch2" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(PAYLOAD * 3)
    (model / "sub" / "empty.txt").write_bytes(b"")
    (model / "sub" / ("long-name-" * 12 + ".txt")).write_bytes(b"x" * 700)  # > 100 chars: a PAX header
    return _store(client, settings, tmp_path, model, "model")


def _url(artifact: Artifact) -> str:
    return f"/v1/artifacts/{artifact.id}/download"


def _path(artifact: Artifact) -> Path:
    return Path(artifact.uri.removeprefix("file://"))


def test_head_and_get_of_a_file(client: TestClient, file_artifact: Artifact) -> None:
    head = client.head(_url(file_artifact))
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(PAYLOAD))
    assert head.headers["etag"] == f'"{hashlib.sha256(PAYLOAD).hexdigest()}"'
    assert head.headers["accept-ranges"] == "bytes"
    assert head.headers["content-type"] == "application/octet-stream"
    full = client.get(_url(file_artifact))
    assert full.status_code == 200 and full.content == PAYLOAD
    assert full.headers["etag"] == head.headers["etag"]


@pytest.mark.parametrize(("header", "start", "stop"), [
    ("bytes=10-19", 10, 20), ("bytes=10000-", 10000, len(PAYLOAD)), ("bytes=-7", len(PAYLOAD) - 7, len(PAYLOAD)),
    ("bytes=5000-999999", 5000, len(PAYLOAD)),
])
def test_a_single_range_is_206(client: TestClient, file_artifact: Artifact, header: str, start: int, stop: int) -> None:
    answer = client.get(_url(file_artifact), headers={"Range": header})
    assert answer.status_code == 206
    assert answer.content == PAYLOAD[start:stop]
    assert answer.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(PAYLOAD)}"
    assert answer.headers["content-length"] == str(stop - start)


def test_unsatisfiable_range_is_416_and_odd_ones_are_ignored(client: TestClient, file_artifact: Artifact) -> None:
    answer = client.get(_url(file_artifact), headers={"Range": f"bytes={len(PAYLOAD)}-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{len(PAYLOAD)}"
    for ignored in ("bytes=0-1,5-6", "items=0-3", "bytes=x-y"):
        answer = client.get(_url(file_artifact), headers={"Range": ignored})
        assert answer.status_code == 200 and answer.content == PAYLOAD, ignored


def test_conditional_requests_follow_the_etag(client: TestClient, file_artifact: Artifact) -> None:
    etag = f'"{file_artifact.sha256}"'
    assert client.get(_url(file_artifact), headers={"If-None-Match": etag}).status_code == 304
    assert client.get(_url(file_artifact), headers={"If-Match": '"other"'}).status_code == 412
    same = client.get(_url(file_artifact), headers={"Range": "bytes=100-", "If-Range": etag})
    assert same.status_code == 206 and same.content == PAYLOAD[100:]
    other = client.get(_url(file_artifact), headers={"Range": "bytes=100-", "If-Range": '"stale"'})
    assert other.status_code == 200 and other.content == PAYLOAD


def test_folder_tar_has_its_length_up_front_and_ranges_slice_it(client: TestClient, dir_artifact: Artifact) -> None:
    head = client.head(_url(dir_artifact))
    full = client.get(_url(dir_artifact))
    assert full.status_code == 200 and full.headers["content-type"] == "application/x-tar"
    assert int(head.headers["content-length"]) == len(full.content) == int(full.headers["content-length"])
    assert head.headers["etag"] == f'"{dir_artifact.sha256}"'
    with tarfile.open(fileobj=io.BytesIO(full.content)) as tar:
        names = tar.getnames()
        assert names == sorted(names) and names[0] == "model/checksums.json"
        assert tar.extractfile("model/model.safetensors").read() == PAYLOAD * 3
        assert any(len(n) > 100 for n in names)
    assert client.get(_url(dir_artifact)).content == full.content, "the tar is deterministic"
    total = len(full.content)
    for start, stop in [(0, 512), (511, 1500), (1000, 20000), (total // 2, total), (total - 1030, total - 3)]:
        part = client.get(_url(dir_artifact), headers={"Range": f"bytes={start}-{stop - 1}"})
        assert part.status_code == 206
        assert part.content == full.content[start:stop], (start, stop)
        assert part.headers["content-range"] == f"bytes {start}-{stop - 1}/{total}"


def test_responses_name_no_server_paths(client: TestClient, file_artifact: Artifact, settings: Any) -> None:
    listed = client.get(f"/v1/jobs/{file_artifact.job_id}/artifacts").json()
    assert listed[0]["name"] == "masks.bin" and "uri" not in listed[0]
    assert listed[0]["download_url"] == _url(file_artifact)
    one = client.get(f"/v1/artifacts/{file_artifact.id}")
    lineage = client.get(f"/v1/jobs/{file_artifact.job_id}/lineage")
    for text in (str(listed), one.text, lineage.text):
        assert str(settings.home) not in text and "file://" not in text


def test_tampered_file_is_refused_and_marked_corrupt(client: TestClient, file_artifact: Artifact) -> None:
    assert client.get(_url(file_artifact)).status_code == 200  # verified once, fingerprint recorded
    stored = _path(file_artifact)
    stored.write_bytes(b"X" + PAYLOAD[1:])  # same size, new bytes, new mtime
    answer = client.get(_url(file_artifact))
    assert answer.status_code == 409
    assert "corrupt" in answer.json()["detail"] and file_artifact.sha256 in answer.json()["detail"]
    assert "etag" not in answer.headers
    assert client.head(_url(file_artifact)).status_code == 409
    assert client.get(f"/v1/artifacts/{file_artifact.id}").json()["corrupt_reason"]
    stored.write_bytes(PAYLOAD)  # restoring the bytes does not silently clear the mark
    assert client.get(_url(file_artifact)).status_code == 409


def test_tampered_folder_member_is_refused(client: TestClient, dir_artifact: Artifact) -> None:
    (_path(dir_artifact) / "config.json").write_text('{"hidden_size": 9}')
    answer = client.get(_url(dir_artifact), headers={"Range": "bytes=0-99"})
    assert answer.status_code == 409
    assert "changed: config.json" in answer.json()["detail"]
    assert str(_path(dir_artifact)) not in answer.text


def test_extra_file_in_a_folder_is_refused(client: TestClient, dir_artifact: Artifact) -> None:
    (_path(dir_artifact) / "injected.py").write_text("print('hi')")
    answer = client.get(_url(dir_artifact))
    assert answer.status_code == 409 and "not in the manifest: injected.py" in answer.json()["detail"]


def test_background_check_catches_a_tamper_that_kept_size_and_mtime(client: TestClient,
                                                                   file_artifact: Artifact) -> None:
    assert client.get(_url(file_artifact)).status_code == 200
    stored = _path(file_artifact)
    before = stored.stat()
    stored.write_bytes(b"Y" + PAYLOAD[1:])
    os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert client.head(_url(file_artifact)).status_code == 200, "the fingerprint alone cannot see it"
    with client.app.state.orchestrator.sessions.begin() as session:
        outcome = integrity.verify_some(session, limit=1000)
    assert outcome[file_artifact.id] and "sha256" in outcome[file_artifact.id]
    assert client.get(_url(file_artifact)).status_code == 409


def test_verify_some_records_intact_artifacts(client: TestClient, file_artifact: Artifact,
                                              dir_artifact: Artifact) -> None:
    with client.app.state.orchestrator.sessions.begin() as session:
        outcome = integrity.verify_some(session, limit=1000)
    assert outcome[file_artifact.id] is None and outcome[dir_artifact.id] is None
    body = client.get(f"/v1/artifacts/{dir_artifact.id}").json()
    assert body["verified_at"] and body["corrupt_reason"] is None


def test_missing_content_is_410_without_a_path(client: TestClient, file_artifact: Artifact) -> None:
    _path(file_artifact).unlink()
    answer = client.get(_url(file_artifact))
    assert answer.status_code == 410 and str(_path(file_artifact)) not in answer.text


def test_openapi_declares_binary_download_bodies(client: TestClient) -> None:
    operations = client.get("/openapi.json").json()["paths"]["/v1/artifacts/{artifact_id}/download"]
    assert set(operations) == {"get", "head"}
    for operation in operations.values():
        for code in ("200", "206"):
            content = operation["responses"][code]["content"]
            assert set(content) == {"application/octet-stream", "application/x-tar"}
            assert all(c["schema"] == {"type": "string", "format": "binary"} for c in content.values())
        assert {"404", "409", "410", "416"} <= set(operation["responses"])
        assert "application/json" in operation["responses"]["409"]["content"]


# --- the client and the CLI -------------------------------------------------------------------------------


def _api(settings: Any) -> ApiClient:
    return ApiClient(None, settings=settings)


def test_client_downloads_a_file_and_a_folder_leaving_no_temp_files(settings: Any, file_artifact: Artifact,
                                                                    dir_artifact: Artifact, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with _api(settings) as api:
        assert api.download(file_artifact.id, out).read_bytes() == PAYLOAD
        model = api.download(dir_artifact.id, out)
    assert (model / "model.safetensors").read_bytes() == PAYLOAD * 3
    assert (model / "sub" / "empty.txt").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["masks.bin", "model"]


def test_client_resumes_a_partial_download_with_range(settings: Any, file_artifact: Artifact,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    part = out / f".masks.bin.{file_artifact.sha256[:16]}.part"
    part.write_bytes(PAYLOAD[:4000])
    with _api(settings) as api:
        path = api.download(file_artifact.id, out)
        assert api.resumed_from == 4000
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_client_restarts_a_part_that_is_not_a_prefix(settings: Any, file_artifact: Artifact, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    part = out / f".masks.bin.{file_artifact.sha256[:16]}.part"
    part.write_bytes(b"garbage" * 3000)  # longer than the file: the range is unsatisfiable
    with _api(settings) as api:
        assert api.download(file_artifact.id, out).read_bytes() == PAYLOAD
    assert sorted(p.name for p in out.iterdir()) == ["masks.bin"]


def test_client_rejects_bytes_that_do_not_match_and_keeps_nothing(client: TestClient, settings: Any,
                                                                  file_artifact: Artifact, dir_artifact: Artifact,
                                                                  tmp_path: Path) -> None:
    for artifact, member in ((file_artifact, None), (dir_artifact, "model.safetensors")):
        assert client.head(_url(artifact)).status_code == 200
        stored = _path(artifact) / member if member else _path(artifact)
        before = stored.stat()
        stored.write_bytes(b"Z" + stored.read_bytes()[1:])  # a tamper the fingerprint cannot see
        os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))
        out = tmp_path / f"out-{artifact.kind}"
        with _api(settings) as api, pytest.raises(ChecksumMismatch):
            api.download(artifact.id, out)
        assert not out.exists(), "no file, no temp file, no empty folder"


def _cli(settings: Any, monkeypatch: pytest.MonkeyPatch, *args: str) -> Any:
    from api.cli import app
    from orchestrator.settings import get_settings

    monkeypatch.setenv("SPARSEFLOW_HOME", str(settings.home))
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, ["download", *args])
    finally:
        get_settings.cache_clear()


def test_cli_404_is_a_clear_message_and_leaves_nothing(settings: Any, client: TestClient, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "never"
    result = _cli(settings, monkeypatch, "nope", "-o", str(out))
    assert result.exit_code == 1
    assert "artifact nope not found" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_refuses_an_existing_target_unless_forced(settings: Any, file_artifact: Artifact, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "masks.bin").write_bytes(b"mine")
    result = _cli(settings, monkeypatch, file_artifact.id, "-o", str(out))
    assert result.exit_code == 1 and "already exists" in result.output and "--force" in result.output
    assert (out / "masks.bin").read_bytes() == b"mine"
    result = _cli(settings, monkeypatch, file_artifact.id, "-o", str(out / "masks.bin"))
    assert result.exit_code == 1 and "not a directory" in result.output
    result = _cli(settings, monkeypatch, file_artifact.id, "-o", str(out), "--force")
    assert result.exit_code == 0, result.output
    assert (out / "masks.bin").read_bytes() == PAYLOAD


def test_cli_reports_a_server_side_corrupt_artifact(settings: Any, client: TestClient, file_artifact: Artifact,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _path(file_artifact).write_bytes(b"X" * 10)
    out = tmp_path / "out"
    result = _cli(settings, monkeypatch, file_artifact.id, "-o", str(out))
    assert result.exit_code == 1
    assert "corrupt" in result.output and "502" not in result.output
    assert not out.exists()


def test_input_references_are_not_downloadable(settings: Any, client: TestClient, file_artifact: Artifact,
                                               tmp_path: Path) -> None:
    with client.app.state.orchestrator.sessions.begin() as session:
        ref = queries.add_artifact(session, job_id=file_artifact.job_id, kind="model", uri="hf:org/model")
    assert client.get(f"/v1/artifacts/{ref.id}/download").status_code == 404
    with _api(settings) as api, pytest.raises(DownloadError):
        api.download(ref.id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_integrity_works_on_a_remote_root(tmp_path: Path) -> None:
    """The fingerprint and the re-hash go through fsspec, so a non-local root (memory://) behaves the same."""
    import fsspec

    storage = ArtifactStorage("memory://integrity-test/artifacts", tmp_path / "cache")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"a": 1}')
    (model / "weights.bin").write_bytes(PAYLOAD)
    stored = storage.put(model, job_id="j", label="00-prune", kind="model")
    snap = integrity.snapshot(stored.uri)
    assert snap.is_dir and integrity.full_check(snap, stored.sha256) is None
    before = integrity.fingerprint(snap)
    fs, path = fsspec.core.url_to_fs(stored.uri)
    fs.pipe(f"{path}/weights.bin", b"W" + PAYLOAD[1:])
    after = integrity.snapshot(stored.uri)
    assert "changed: weights.bin" in (integrity.full_check(after, stored.sha256) or "")
    fs.pipe(f"{path}/weights.bin", PAYLOAD + b"more")
    assert integrity.fingerprint(integrity.snapshot(stored.uri)) != before, "a size change shows in the fingerprint"
    with pytest.raises(integrity.ArtifactMissing):
        integrity.snapshot(stored.uri + "-gone")
