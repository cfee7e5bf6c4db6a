"""Two owners on one service: nobody reads the server's files or another owner's models and text.

Alice and Bob each have a token. Every path-based attempt to read what is not theirs (/etc/passwd as a
path or a file:// URL, `..` escapes, a symlink inside an allowed root, the artifact root, Bob's artifact
folder on disk, Bob's `artifact:` and `dataset:` ids) is refused with a 4xx naming the recipe field,
without echoing server paths, and leaves no job row. What is theirs (an uploaded dataset, their own
model artifact, a file under an allowed root) is accepted, and the references turn into what the
worker reads. Runs on SQLite, and on PostgreSQL when the server is up (`postgres` marker).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from api.app import create_app
from orchestrator import access, dataset_files
from orchestrator.service import Orchestrator
from orchestrator.settings import Settings
from orchestrator.store import queries
from orchestrator.store.models import Artifact, Dataset, Job
from pipelines.recipe import parse_recipe
from pipelines.sources import SourceError, load_text, resolve_model
from workers.runner import SOURCE_PREFIX
from workers.storage import write_manifest

TOKENS = {"token-alice": "alice", "token-bob": "bob", "token-odd": "../../odd/owner"}
ALICE = {"Authorization": "Bearer token-alice"}
BOB = {"Authorization": "Bearer token-bob"}
TEXT = "\n\n".join(f"Paragraph {i} of Alice's own corpus, about rivers and mountains." for i in range(40))


@dataclass
class Server:
    """Two apps on one database: `strict` (auth, default roots: no paths) and `rooted` (roots=[base])."""

    strict: TestClient
    rooted: TestClient
    base: Path  # the one allowed root of `rooted`; it holds the service's home (artifacts included)
    allowed: Path  # a directory of ordinary text under base
    artifacts: Path
    orchestrator: Orchestrator

    @property
    def settings(self) -> Settings:
        return self.orchestrator.settings

    def job_count(self) -> int:
        with self.orchestrator.sessions() as session:
            return session.scalar(select(func.count()).select_from(Job))

    def dataset_count(self) -> int:
        with self.orchestrator.sessions() as session:
            return session.scalar(select(func.count()).select_from(Dataset))

    def dataset_files(self) -> list[Path]:
        return sorted(p for p in (self.artifacts / "datasets").rglob("*") if p.is_file())

    def model_artifact(self, owner: str, kind: str = "model") -> tuple[str, Path]:
        """A model a stage of `owner`'s job produced, stored like the worker stores one."""
        with self.orchestrator.sessions.begin() as session:
            job = queries.create_job(session, name="seed", recipe={"model": "builtin:smollm2-135m"},
                                     stages=[("prune", {})], code_version="test", package_versions={}, owner=owner)
            folder = self.artifacts / job.id / "prune" / "model"
            folder.mkdir(parents=True)
            (folder / "config.json").write_text('{"model_type": "llama"}')
            artifact = queries.add_artifact(session, job_id=job.id, kind=kind, uri=folder.as_uri(),
                                            stage_run_id=job.stage_runs[0].id)
            return artifact.id, folder


@pytest.fixture(scope="module")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("srv")
    home = base / "home"
    allowed = base / "shared-text"
    allowed.mkdir()
    (allowed / "corpus.txt").write_text(TEXT)
    (allowed / "passwd.txt").symlink_to("/etc/passwd")  # an operator's mistake a tenant must not exploit
    common = dict(home=home, database_url=database_url, api_tokens=TOKENS, max_dataset_bytes=4096)
    strict_settings = Settings(**common)
    rooted_settings = Settings(**common, local_roots=[str(base)])
    assert strict_settings.allowed_local_roots == [] and rooted_settings.allowed_local_roots == [base.resolve()]
    with TestClient(create_app(strict_settings)) as strict, TestClient(create_app(rooted_settings)) as rooted:
        orchestrator = rooted.app.state.orchestrator
        artifacts = Path(fsspec.core.url_to_fs(rooted_settings.artifacts_url)[1])
        artifacts.mkdir(parents=True, exist_ok=True)
        yield Server(strict, rooted, base, allowed, artifacts, orchestrator)


def recipe(**overrides: Any) -> dict[str, Any]:
    data = {"calibration": "builtin:enwiki", "evaluation": "builtin:enwiki"}
    data.update(overrides.pop("data", {}))
    return {"name": "tenant", "model": "builtin:smollm2-135m", "data": data,
            "stages": [{"stage": "calibrate", "samples": 2, "seq_len": 16}], **overrides}


def submit(client: TestClient, body: dict[str, Any], headers: dict[str, str] = ALICE) -> Any:
    return client.post("/v1/jobs", json={"recipe": body, "start": False}, headers=headers)


def upload(client: TestClient, content: bytes, name: str = "notes", headers: dict[str, str] = ALICE,
           content_type: str = "text/plain; charset=utf-8") -> Any:
    return client.post("/v1/datasets", params={"name": name}, content=content,
                       headers={**headers, "Content-Type": content_type})


def assert_refused(server: Server, response: Any, field: str, *, sent: str, jobs_before: int,
                   status: int = 422) -> None:
    """A 4xx naming `field`, no server path the caller did not send, and no job recorded."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    if isinstance(detail, list):  # refused by recipe validation already (e.g. a NUL byte): loc names it
        assert any(".".join(map(str, e["loc"][1:])) == field for e in detail), detail
    else:
        assert detail.startswith(f"{field}: "), detail
    for secret in (str(server.base), str(server.artifacts), "/etc/passwd", "root:x:0:0"):
        if secret not in sent:
            assert secret not in response.text
    assert server.job_count() == jobs_before


# ------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("field", ["calibration", "evaluation"])
@pytest.mark.parametrize("ref", ["/etc/passwd", "file:///etc/passwd", "file://localhost/etc/passwd",
                                 "s3://bucket/passwd", "etc/passwd", "~/.ssh/id_rsa"])
def test_server_paths_are_refused_when_auth_is_on(server: Server, field: str, ref: str) -> None:
    before = server.job_count()
    response = submit(server.strict, recipe(data={field: ref}))
    assert_refused(server, response, f"recipe.data.{field}", sent=ref, jobs_before=before)


@pytest.mark.parametrize("ref", ["/etc", "file:///etc", "../../etc", "gs://bucket/model"])
def test_model_paths_are_refused_when_auth_is_on(server: Server, ref: str) -> None:
    before = server.job_count()
    assert_refused(server, submit(server.strict, recipe(model=ref)), "recipe.model", sent=ref, jobs_before=before)


def test_paths_outside_the_roots_are_refused(server: Server) -> None:
    """Under a configured root: `..` escapes, a symlink out of it, and paths beyond it are all refused."""
    attempts = {
        "recipe.data.calibration": [
            "/etc/passwd",
            f"{server.allowed}/../../../../../../etc/passwd",
            f"file://{server.allowed}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            str(server.allowed / "passwd.txt"),  # a symlink inside the root, pointing out of it
            str(server.allowed),  # a directory whose .txt files include that symlink
            str(server.allowed.relative_to(server.base.parent)),  # relative: depends on the worker's cwd
        ],
        "recipe.model": ["/etc", f"{server.base}/../"],
    }
    for field, refs in attempts.items():
        for ref in refs:
            before = server.job_count()
            body = recipe(model=ref) if field == "recipe.model" else recipe(data={"calibration": ref})
            assert_refused(server, submit(server.rooted, body), field, sent=ref, jobs_before=before)


def test_the_artifact_root_is_never_a_readable_path(server: Server) -> None:
    """Bob's pruned model folder and the artifact root stay out of reach even though a root contains them."""
    _, bob_folder = server.model_artifact("bob")
    secret = bob_folder / "notes.txt"
    secret.write_text(TEXT)
    for ref, field in [(str(bob_folder), "recipe.model"), (bob_folder.as_uri(), "recipe.model"),
                       (str(server.artifacts), "recipe.model"), (str(secret), "recipe.data.evaluation"),
                       (str(server.settings.home / "sparseflow.db"), "recipe.data.calibration"),
                       (f"{server.allowed}/../home/artifacts", "recipe.model")]:
        before = server.job_count()
        body = recipe(model=ref) if field == "recipe.model" else recipe(data={field.rsplit(".", 1)[1]: ref})
        assert_refused(server, submit(server.rooted, body), field, sent=ref, jobs_before=before)


def test_a_file_under_an_allowed_root_is_accepted(server: Server) -> None:
    path = str(server.allowed / "corpus.txt")
    response = submit(server.rooted, recipe(data={"calibration": path, "evaluation": Path(path).as_uri()}))
    assert response.status_code == 201, response.text
    assert response.json()["recipe"]["data"]["calibration"] == path


def test_without_auth_paths_stay_unrestricted(tmp_path: Path) -> None:
    """The embedded default (no tokens, no roots) keeps taking local paths, as the quick start and tests do."""
    settings = Settings(home=tmp_path / "home")
    assert settings.allowed_local_roots is None
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/jobs", json={"recipe": recipe(model=str(tmp_path / "model"),
                                                                  data={"calibration": str(tmp_path / "t.txt")}),
                                                 "start": False})
    assert response.status_code == 201, response.text


# ------------------------------------------------------------------------------------ references


def test_another_owners_artifact_reads_as_not_found(server: Server) -> None:
    bob_artifact, _ = server.model_artifact("bob")
    before = server.job_count()
    theirs = submit(server.strict, recipe(model=f"artifact:{bob_artifact}"))
    assert_refused(server, theirs, "recipe.model", sent="", jobs_before=before, status=404)
    missing = submit(server.strict, recipe(model=f"artifact:{'0' * 32}"))
    assert theirs.json()["detail"].replace(bob_artifact, "0" * 32) == missing.json()["detail"]
    assert "bob" not in theirs.text
    # Bob himself may use it
    assert submit(server.strict, recipe(model=f"artifact:{bob_artifact}"), headers=BOB).status_code == 201


def test_own_artifact_is_the_model_the_worker_loads(server: Server) -> None:
    own, folder = server.model_artifact("alice")
    response = submit(server.strict, recipe(model=f"artifact:{own}"))
    assert response.status_code == 201, response.text
    with server.orchestrator.sessions() as session:
        assert access.model_input(session, f"artifact:{own}", owner="alice") == (folder.as_uri(), own)
        assert access.model_input(session, "builtin:smollm2-135m", owner="alice") == (
            SOURCE_PREFIX + "builtin:smollm2-135m", None)
        with pytest.raises(access.ReferenceNotFound):  # checked again when the job runs
            access.model_input(session, f"artifact:{own}", owner="bob")


@pytest.mark.parametrize("ref", ["artifact:", "artifact:../../x", "artifact:a\x00b", "artifact:" + "a" * 65])
def test_malformed_artifact_ids_are_422(server: Server, ref: str) -> None:
    before = server.job_count()
    assert_refused(server, submit(server.strict, recipe(model=ref)), "recipe.model", sent=ref, jobs_before=before)


def test_an_artifact_that_is_not_a_model_is_refused(server: Server) -> None:
    calibration, _ = server.model_artifact("alice", kind="calibration")
    before = server.job_count()
    response = submit(server.strict, recipe(model=f"artifact:{calibration}"))
    assert_refused(server, response, "recipe.model", sent="", jobs_before=before)
    assert "not a model" in response.json()["detail"]


def test_an_artifact_marked_corrupt_is_refused(server: Server) -> None:
    own, _ = server.model_artifact("alice")
    with server.orchestrator.sessions.begin() as session:
        session.get(Artifact, own).corrupt_reason = "checksums.json does not match config.json"
    before = server.job_count()
    response = submit(server.strict, recipe(model=f"artifact:{own}"))
    assert_refused(server, response, "recipe.model", sent="", jobs_before=before, status=409)
    assert "corrupt" in response.json()["detail"]


def test_references_of_the_wrong_kind_are_refused(server: Server) -> None:
    own, _ = server.model_artifact("alice")
    before = server.job_count()
    for body, field in [(recipe(model="dataset:abc"), "recipe.model"),
                        (recipe(data={"evaluation": f"artifact:{own}"}), "recipe.data.evaluation")]:
        assert_refused(server, submit(server.strict, body), field, sent="", jobs_before=before)


# ------------------------------------------------------------------------------------ datasets


def test_own_dataset_is_accepted_and_read_by_the_pipeline(server: Server, tmp_path: Path) -> None:
    created = upload(server.strict, TEXT.encode(), name="alice corpus")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["ref"] == f"dataset:{body['id']}" and body["size_bytes"] == len(TEXT.encode())
    assert "uri" not in body and str(server.base) not in created.text
    ref = body["ref"]
    response = submit(server.strict, recipe(data={"calibration": ref, "evaluation": ref}))
    assert response.status_code == 201, response.text
    with server.orchestrator.sessions() as session:
        data = access.data_spec(session, response.json()["recipe"]["data"], owner="alice")
    assert data["calibration"] == data["evaluation"] != ref
    assert data["calibration"].startswith(server.settings.artifacts_url)
    calibration = load_text(data["calibration"], "calibration", tmp_path)
    assert "Paragraph 0 of Alice" in calibration and "Paragraph 9 of Alice" not in calibration
    assert load_text(data["evaluation"], "evaluation", tmp_path).startswith("Paragraph 9 of Alice")


def test_another_owners_dataset_reads_as_not_found(server: Server) -> None:
    bobs = upload(server.strict, TEXT.encode(), headers=BOB).json()
    before = server.job_count()
    response = submit(server.strict, recipe(data={"evaluation": bobs["ref"]}))
    assert_refused(server, response, "recipe.data.evaluation", sent="", jobs_before=before, status=404)
    assert server.strict.get(f"/v1/datasets/{bobs['id']}", headers=ALICE).status_code == 404
    assert server.strict.delete(f"/v1/datasets/{bobs['id']}", headers=ALICE).status_code == 404
    assert bobs["id"] not in [d["id"] for d in server.strict.get("/v1/datasets", headers=ALICE).json()["data"]]
    assert server.strict.get(f"/v1/datasets/{bobs['id']}", headers=BOB).status_code == 200
    with server.orchestrator.sessions() as session, pytest.raises(access.ReferenceNotFound):
        access.data_spec(session, {"calibration": bobs["ref"]}, owner="alice")


def test_dataset_list_get_delete(server: Server) -> None:
    created = upload(server.strict, b"one\n\ntwo\n", name="small").json()
    listed = server.strict.get("/v1/datasets", headers=ALICE).json()
    assert created["id"] in [d["id"] for d in listed["data"]] and listed["count"] == len(listed["data"])
    assert all("uri" not in d for d in listed["data"])
    got = server.strict.get(f"/v1/datasets/{created['id']}", headers=ALICE).json()
    assert got == created
    files_before = server.dataset_files()
    assert server.strict.delete(f"/v1/datasets/{created['id']}", headers=ALICE).status_code == 204
    assert server.strict.get(f"/v1/datasets/{created['id']}", headers=ALICE).status_code == 404
    assert len(server.dataset_files()) == len(files_before) - 1
    assert server.strict.get("/v1/datasets/a%00b", headers=ALICE).status_code in (404, 422)  # never a 500
    assert server.strict.get(f"/v1/datasets/{'x' * 5000}", headers=ALICE).status_code == 404
    assert server.strict.get("/v1/datasets", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_a_dataset_a_queued_job_reads_is_not_deleted(server: Server) -> None:
    ref = upload(server.strict, TEXT.encode(), name="in use").json()["ref"]
    dataset_id = ref.removeprefix("dataset:")
    job = submit(server.strict, recipe(data={"evaluation": ref}))
    assert job.status_code == 201, job.text
    refused = server.strict.delete(f"/v1/datasets/{dataset_id}", headers=ALICE)
    assert refused.status_code == 409 and job.json()["id"] in refused.json()["detail"], refused.text
    assert server.strict.get(f"/v1/datasets/{dataset_id}", headers=ALICE).status_code == 200
    assert server.strict.post(f"/v1/jobs/{job.json()['id']}/cancel", headers=ALICE).status_code == 200
    assert server.strict.delete(f"/v1/datasets/{dataset_id}", headers=ALICE).status_code == 204


def test_owner_names_never_become_path_components(server: Server) -> None:
    created = upload(server.strict, b"text", headers={"Authorization": "Bearer token-odd"})
    assert created.status_code == 201, created.text
    with server.orchestrator.sessions() as session:
        uri = session.get(Dataset, created.json()["id"]).uri
    assert uri == dataset_files.dataset_uri(server.settings, owner="../../odd/owner", dataset_id=created.json()["id"])
    relative = Path(fsspec.core.url_to_fs(uri)[1]).relative_to(server.artifacts)
    assert relative.parts[0] == "datasets" and len(relative.parts) == 3 and ".." not in relative.parts
    assert "odd" not in uri


@pytest.mark.parametrize(("content", "status", "reason"), [
    (b"x" * 4097, 413, "larger than the limit"),
    (b"abc\x00def", 422, "NUL byte"),
    (b"caf\xe9 latin-1", 422, "not UTF-8"),
    (b"ends mid character \xc3", 422, "not UTF-8"),
    (b"", 422, "empty"),
])
def test_bad_uploads_are_refused_and_leave_nothing(server: Server, content: bytes, status: int, reason: str) -> None:
    rows, files = server.dataset_count(), server.dataset_files()
    response = upload(server.strict, content)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert reason in detail and (status == 413 or detail.startswith("body: ")), detail
    assert server.dataset_count() == rows and server.dataset_files() == files


def test_upload_limit_holds_without_a_content_length(server: Server) -> None:
    """A chunked body declares no size: the limit is enforced while streaming, and the partial file removed."""
    rows, files = server.dataset_count(), server.dataset_files()

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    response = server.strict.post("/v1/datasets", params={"name": "big"}, content=chunks(),
                                  headers={**ALICE, "Content-Type": "application/octet-stream"})
    assert response.status_code == 413
    assert server.dataset_count() == rows and server.dataset_files() == files


def test_upload_refuses_other_content_types_and_bad_names(server: Server) -> None:
    assert upload(server.strict, b"{}", content_type="application/json").status_code == 415
    assert upload(server.strict, b"text", name="").status_code == 422
    assert upload(server.strict, b"text", name="a\x00b").status_code == 422


# ------------------------------------------------------------------------------------ pipelines, CLI


def test_pipelines_read_models_and_text_from_fsspec_urls(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What the orchestrator hands a worker: file:// and remote (here memory://) URLs of text and models."""
    fs = fsspec.filesystem("memory")
    root = f"/tenancy-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"{root}/text.txt", TEXT.encode())
    fs.put(f"{tiny_model_dir}/", f"{root}/model/", recursive=True)
    try:
        assert "Paragraph 0" in load_text(f"memory://{root}/text.txt", "calibration", tmp_path)
        local = resolve_model(f"memory://{root}/model", tmp_path)
        assert (local / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
        assert resolve_model(tiny_model_dir.as_uri(), tmp_path) == tiny_model_dir
    finally:
        fs.rm(root, recursive=True)


def test_datasets_live_in_any_fsspec_artifact_root(tmp_path: Path) -> None:
    """A remote artifact root (here fsspec's in-memory one) stores, serves and deletes uploads the same way."""
    root = f"memory://tenancy-{uuid.uuid4().hex[:8]}"
    settings = Settings(home=tmp_path / "home", api_tokens=TOKENS, artifact_root=root)
    fs = fsspec.filesystem("memory")
    try:
        with TestClient(create_app(settings)) as client:
            created = upload(client, TEXT.encode()).json()
            with client.app.state.orchestrator.sessions() as session:
                uri = access.data_spec(session, {"evaluation": created["ref"]}, owner="alice")["evaluation"]
            assert uri.startswith(root + "/datasets/") and fs.cat_file(uri) == TEXT.encode()
            assert load_text(uri, "evaluation", tmp_path).startswith("Paragraph 9 of Alice")
            assert client.delete(f"/v1/datasets/{created['id']}", headers=ALICE).status_code == 204
            assert not fs.exists(uri)
            assert upload(client, b"bad \xff").status_code == 422
            assert not fs.find(root)  # the refused upload left nothing either
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_pipeline_errors_name_urls_only_by_their_last_component(tmp_path: Path) -> None:
    """A dataset URL is the server's: when it is gone, the stage's error must not hand its path back."""
    uri = (tmp_path / "datasets" / "0123abcd" / "gone.txt").as_uri()
    for call in (lambda: load_text(uri, "calibration", tmp_path), lambda: resolve_model(uri, tmp_path)):
        with pytest.raises(SourceError) as error:
            call()
        assert "gone.txt" in str(error.value) and str(tmp_path) not in str(error.value)


def test_cli_run_applies_the_same_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.cli import app
    from orchestrator.settings import get_settings

    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(recipe(data={"calibration": "/etc/passwd"})))
    monkeypatch.setenv("SPARSEFLOW_HOME", str(tmp_path / "home"))
    # `run` sets these with setdefault; pinning them here lets monkeypatch restore them afterwards
    for key, value in {"PREFECT_HOME": str(tmp_path / "home" / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
                       "RAY_DEDUP_LOGS": "0", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, os.environ.get(key, value))
    monkeypatch.setenv("SPARSEFLOW_API_TOKENS", '{"t": "alice"}')
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["run", str(recipe_file)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, result.output
    assert "recipe.data.calibration" in result.output and "root:x:0:0" not in result.output


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_a_job_runs_on_an_uploaded_dataset_and_an_own_artifact(tiny_model_dir: Path, tmp_path: Path) -> None:
    """End to end with auth on and no local roots: Alice's job loads her model by `artifact:` reference and
    calibrates and evaluates on her uploaded text; Bob can name neither."""
    settings = Settings(home=tmp_path / "home", api_tokens=TOKENS)
    text = "\n\n".join(f"Paragraph {i}. Alice writes about rivers, mountains and the sea, day {i}." for i in range(120))
    with TestClient(create_app(settings)) as client:
        orchestrator = client.app.state.orchestrator
        with orchestrator.sessions.begin() as session:  # a model an earlier job of Alice's produced
            seed = queries.create_job(session, name="seed", recipe={}, stages=[("prune", {})], code_version="test",
                                      package_versions={}, owner="alice")
            folder = Path(fsspec.core.url_to_fs(settings.artifacts_url)[1]) / seed.id / "1-prune" / "model"
            shutil.copytree(tiny_model_dir, folder)
            sha, size = write_manifest(folder)  # as ArtifactStorage.put stores a folder
            model = queries.add_artifact(session, job_id=seed.id, kind="model", uri=folder.as_uri(), sha256=sha,
                                         size_bytes=size, stage_run_id=seed.stage_runs[0].id).id
        ref = upload(client, text.encode(), name="rivers").json()["ref"]
        body = recipe(model=f"artifact:{model}", data={"calibration": ref, "evaluation": ref}, stages=[
            {"stage": "calibrate", "samples": 2, "seq_len": 16, "batch_size": 2},
            {"stage": "evaluate", "seq_len": 32, "max_windows": 2},
        ])
        assert submit(client, body, headers=BOB).status_code == 404
        job = submit(client, body).json()
        assert orchestrator.run(job["id"]) == "succeeded"
        with orchestrator.sessions() as session:
            metrics = {m.name: m.value for m in queries.job_metrics(session, job["id"])}
            read = {e.artifact_id for e in queries.lineage_edges(session, job["id"]) if e.direction == "input"}
        assert metrics["perplexity"] > 1 and metrics["calibration_tokens"] == 2 * 16
        assert model in read  # the stages read Alice's artifact itself, not a copy registered as a source


def test_check_recipe_directly_matches_the_api(server: Server) -> None:
    with server.orchestrator.sessions() as session:
        with pytest.raises(access.AccessDenied) as denied:
            access.check_recipe(session, parse_recipe(recipe(data={"calibration": "/etc/passwd"})),
                                owner="alice", settings=server.settings)
        assert denied.value.field == "recipe.data.calibration"
        access.check_recipe(session, parse_recipe(recipe()), owner="alice", settings=server.settings)
