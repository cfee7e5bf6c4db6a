"""Unit tests of the Helm chart `helm/sparseflow`: lint it, render it with `helm template`, assert on the YAML.

One behaviour per test, as helm-unittest's one `it:` per value (kuberay `helm-chart/ray-cluster/tests/`).
helm comes from PATH or `.venv/bin/helm` (`bash scripts/get-helm.sh` installs it); without it every test skips.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "sparseflow"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "rel"
# Minimal valid settings: an external database and API tokens, both by Secret reference.
BASE = {
    "database": {"external": {"existingSecret": "lineage-db"}},
    "api": {"auth": {"existingSecret": "api-tokens"}},
}
BUNDLED_PG = {
    "database": {"external": {"existingSecret": ""}, "postgresql": {"enabled": True, "auth": {"existingSecret": "pg"}}},
}


def _helm() -> str | None:
    found = shutil.which("helm")
    local = ROOT / ".venv" / "bin" / "helm"
    return found or (str(local) if local.is_file() and os.access(local, os.X_OK) else None)


HELM = _helm()
pytestmark = pytest.mark.skipif(HELM is None, reason="helm not found on PATH or in .venv/bin (run scripts/get-helm.sh)")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60, check=False)


def render_raw(tmp_path: Path, values: dict | None = None, *, base: bool = True, release: str = RELEASE,
               sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(_merge(BASE if base else {}, values or {})))
    args = ["template", release, str(CHART), "--namespace", "ml", "-f", str(values_file)]
    for item in sets:
        args += ["--set", item]
    return helm(*args)


def render(tmp_path: Path, values: dict | None = None, **kwargs) -> list[dict]:
    result = render_raw(tmp_path, values, **kwargs)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def fail_message(tmp_path: Path, values: dict | None = None, **kwargs) -> str:
    result = render_raw(tmp_path, values, **kwargs)
    assert result.returncode != 0, "render was expected to fail"
    return result.stderr


def find(docs: list[dict], kind: str, component: str | None = None) -> list[dict]:
    return [
        d for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component)
    ]


def one(docs: list[dict], kind: str, component: str | None = None) -> dict:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def containers(doc: dict) -> list[dict]:
    spec = doc["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def ray_pod_specs(raycluster: dict) -> list[dict]:
    spec = raycluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


# --- lint -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_lint_strict_passes_with_ci_values(values_file):
    result = helm("lint", "--strict", str(CHART), "-f", str(values_file))
    assert result.returncode == 0, result.stdout + result.stderr


# --- required settings ------------------------------------------------------------------------------


def test_default_render_fails_without_database_naming_the_keys(tmp_path):
    message = fail_message(tmp_path, base=False)
    assert "No lineage database configured" in message
    assert "database.external.url" in message and "database.external.existingSecret" in message


def test_auth_without_tokens_fails(tmp_path):
    message = fail_message(tmp_path, {"database": {"external": {"url": "sqlite:///x.db"}}}, base=False)
    assert "api.auth.existingSecret" in message


def test_bundled_postgresql_has_no_default_password(tmp_path):
    values = {"database": {"external": {"existingSecret": ""}, "postgresql": {"enabled": True}}}
    assert "database.postgresql.auth.existingSecret" in fail_message(tmp_path, values)


def test_s3_artifacts_without_bucket_fail(tmp_path):
    assert "artifacts.s3.bucket" in fail_message(tmp_path, {"artifacts": {"type": "s3"}})


# --- names ------------------------------------------------------------------------------------------


def test_names_are_truncated_to_63_characters_and_stay_distinct(tmp_path):
    release = "a-very-long-release-name-for-a-compression-team-" + "x" * 5  # helm allows 53
    docs = render(tmp_path, release=release)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert all(len(name) <= 63 and not name.endswith("-") for _, name in names), names
    assert len(set(names)) == len(names)
    assert one(docs, "Deployment", "api")["metadata"]["name"].endswith("-api")


def test_raycluster_name_fits_kuberay_limit_of_53(tmp_path):
    docs = render(tmp_path, release="r" * 53)
    assert len(one(docs, "RayCluster")["metadata"]["name"]) <= 53


def test_ray_address_points_at_the_kuberay_head_service(tmp_path):
    docs = render(tmp_path)
    api = containers(one(docs, "Deployment", "api"))[0]
    assert env_of(api)["SPARSEFLOW_RAY_ADDRESS"]["value"] == "ray://rel-sparseflow-ray-head-svc:10001"


# --- database ---------------------------------------------------------------------------------------


def test_external_database_url_reaches_api_and_migrations_through_a_secret(tmp_path):
    url = "postgresql+psycopg://sf:s3cret@db.example:5432/sparseflow"
    docs = render(tmp_path, {"database": {"external": {"url": url, "existingSecret": ""}}})
    secret = one(docs, "Secret", "database")
    assert base64.b64decode(secret["data"]["url"]).decode() == url
    for workload in (one(docs, "Deployment", "api"), one(docs, "Job", "migrations")):
        ref = env_of(containers(workload)[-1])["SPARSEFLOW_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": "url"}
    assert "s3cret" not in yaml.safe_dump([d for d in docs if d["kind"] != "Secret"])


def test_database_secret_exists_before_the_pre_install_migration(tmp_path):
    docs = render(tmp_path, {"database": {"external": {"url": "postgresql+psycopg://h/db", "existingSecret": ""}}})
    annotations = one(docs, "Secret", "database")["metadata"]["annotations"]
    assert "pre-install" in annotations["helm.sh/hook"]
    job_weight = one(docs, "Job")["metadata"]["annotations"]["helm.sh/hook-weight"]
    assert int(annotations["helm.sh/hook-weight"]) < int(job_weight)


def test_existing_database_secret_is_referenced_not_created(tmp_path):
    docs = render(tmp_path, {"database": {"external": {"existingSecretKey": "dsn"}}})
    assert not find(docs, "Secret", "database")
    ref = env_of(containers(one(docs, "Job", "migrations"))[-1])["SPARSEFLOW_DATABASE_URL"]["valueFrom"]
    assert ref["secretKeyRef"] == {"name": "lineage-db", "key": "dsn"}


def test_bundled_postgresql_is_off_by_default(tmp_path):
    assert not find(render(tmp_path), "StatefulSet")


def test_bundled_postgresql_migrates_after_install(tmp_path):
    docs = render(tmp_path, BUNDLED_PG)
    assert one(docs, "StatefulSet", "postgresql")
    job = one(docs, "Job", "migrations")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["initContainers"][0]["name"] == "wait-for-postgresql"


# --- migrations -------------------------------------------------------------------------------------


def test_migrations_job_is_a_pre_install_pre_upgrade_hook(tmp_path):
    job = one(render(tmp_path), "Job", "migrations")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    command = " ".join(job["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "db.migrate(db.make_engine(" in command


# --- artifacts --------------------------------------------------------------------------------------


def test_pvc_artifacts_create_a_claim_mounted_everywhere(tmp_path):
    docs = render(tmp_path)
    claim = one(docs, "PersistentVolumeClaim", "artifacts")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    pods = [one(docs, "Deployment", c)["spec"]["template"]["spec"] for c in ("api", "prefect-worker")]
    pods += ray_pod_specs(one(docs, "RayCluster"))
    assert len(pods) == 4
    for pod in pods:
        volume = {"name": "artifacts", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
        assert volume in pod["volumes"]
        assert env_of(pod["containers"][0])["SPARSEFLOW_ARTIFACT_ROOT"]["value"] == "/data/artifacts"


def test_s3_artifacts_set_the_root_and_load_credentials_from_the_secret(tmp_path):
    values = {"artifacts": {"type": "s3", "s3": {"bucket": "models", "prefix": "/team/", "credentialsSecret": "aws"}}}
    docs = render(tmp_path, values)
    assert not find(docs, "PersistentVolumeClaim")
    api = containers(one(docs, "Deployment", "api"))[0]
    assert env_of(api)["SPARSEFLOW_ARTIFACT_ROOT"]["value"] == "s3://models/team"
    assert api["envFrom"] == [{"secretRef": {"name": "aws"}}]
    for pod in ray_pod_specs(one(docs, "RayCluster")):
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "aws"}}]


# --- Ray --------------------------------------------------------------------------------------------


def test_worker_groups_render_one_entry_per_list_item_with_gpu_limits(tmp_path):
    groups = [
        {"groupName": "a100", "replicas": 1, "minReplicas": 0, "maxReplicas": 2,
         "resources": {"limits": {"nvidia.com/gpu": 1}}},
        {"groupName": "h100x4", "replicas": 2, "minReplicas": 1, "maxReplicas": 3,
         "resources": {"limits": {"nvidia.com/gpu": 4}}},
    ]
    specs = one(render(tmp_path, {"rayCluster": {"workerGroups": groups}}), "RayCluster")["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in specs] == ["a100", "h100x4"]
    assert [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in specs] == [(1, 0, 2), (2, 1, 3)]
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] for g in specs]
    assert gpus == [1, 4]


def test_default_worker_group_is_one_gpu_group(tmp_path):
    (group,) = one(render(tmp_path), "RayCluster")["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_duplicate_worker_group_names_fail(tmp_path):
    groups = [{"groupName": "gpu", "replicas": 1}, {"groupName": "gpu", "replicas": 1}]
    assert "used twice" in fail_message(tmp_path, {"rayCluster": {"workerGroups": groups}})


def test_raycluster_can_be_replaced_by_an_external_address(tmp_path):
    docs = render(tmp_path, {"rayCluster": {"enabled": False, "externalAddress": "ray://ray:10001"}})
    assert not find(docs, "RayCluster")
    assert env_of(containers(one(docs, "Deployment", "prefect-worker"))[0])["SPARSEFLOW_RAY_ADDRESS"]["value"] == "ray://ray:10001"


# --- API --------------------------------------------------------------------------------------------


def test_api_service_port(tmp_path):
    docs = render(tmp_path, {"api": {"service": {"port": 9000}}})
    (port,) = one(docs, "Service", "api")["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (9000, "http")
    api = containers(one(docs, "Deployment", "api"))[0]
    assert api["ports"][0]["containerPort"] == 9000
    assert api["args"][-2:] == ["--port", "9000"]


def test_api_probes_hit_healthz(tmp_path):
    api = containers(one(render(tmp_path), "Deployment", "api"))[0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_api_runs_as_non_root(tmp_path):
    pod = one(render(tmp_path), "Deployment", "api")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_api_tokens_come_from_the_referenced_secret(tmp_path):
    api = containers(one(render(tmp_path), "Deployment", "api"))[0]
    assert env_of(api)["SPARSEFLOW_API_TOKENS"]["valueFrom"]["secretKeyRef"] == {"name": "api-tokens", "key": "tokens"}


def test_inline_api_tokens_go_into_a_chart_secret(tmp_path):
    docs = render(tmp_path, {"api": {"auth": {"existingSecret": "", "tokens": {"tok-1": "alice"}}}})
    secret = one(docs, "Secret", "api")
    assert yaml.safe_load(base64.b64decode(secret["data"]["tokens"])) == {"tok-1": "alice"}
    ref = env_of(containers(one(docs, "Deployment", "api"))[0])["SPARSEFLOW_API_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "tokens"}


def test_ingress_is_off_by_default(tmp_path):
    assert not find(render(tmp_path), "Ingress")


def test_ingress_routes_to_the_api_service(tmp_path):
    docs = render(tmp_path, {"api": {"ingress": {"enabled": True, "className": "nginx"}}})
    backend = one(docs, "Ingress")["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": one(docs, "Service", "api")["metadata"]["name"], "port": {"name": "http"}}


def test_notes_show_how_to_reach_the_api(tmp_path):
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(BASE))
    result = helm("install", RELEASE, str(CHART), "-n", "ml", "--dry-run=client", "-f", str(values_file))
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "kubectl port-forward -n ml svc/rel-sparseflow-api 8000:8000" in notes
    assert "$SPARSEFLOW_URL/healthz" in notes


# --- Prefect ----------------------------------------------------------------------------------------


def test_worker_polls_the_work_pool_with_the_api_image(tmp_path):
    docs = render(tmp_path, {"prefectWorker": {"workPool": "gpu-pool"}})
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["command"][worker["command"].index("--pool") + 1] == "gpu-pool"
    assert worker["image"] == containers(one(docs, "Deployment", "api"))[0]["image"]
    assert env_of(worker)["PREFECT_API_URL"]["value"] == "http://rel-sparseflow-prefect-server:4200/api"


# --- images -----------------------------------------------------------------------------------------


def test_images_are_pinned_and_default_to_app_version(tmp_path):
    docs = render(tmp_path, BUNDLED_PG)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    images = [c["image"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job") for c in containers(d)]
    images += [pod["containers"][0]["image"] for pod in ray_pod_specs(one(docs, "RayCluster"))]
    assert len(images) >= 7
    for image in images:
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and "latest" not in tag, image
    assert containers(one(docs, "Deployment", "api"))[0]["image"].endswith(f":{app_version}")


def test_floating_tag_is_rejected(tmp_path):
    message = fail_message(tmp_path, sets=("prefectServer.image.tag=3-latest",))
    assert "`prefectServer.image.tag`" in message and "floating tag" in message


# --- schema and removed settings --------------------------------------------------------------------


def test_schema_rejects_an_unknown_top_level_key(tmp_path):
    message = fail_message(tmp_path, {"replicas": 3})
    assert "schema" in message and "replicas" in message


def test_schema_rejects_an_unknown_nested_key(tmp_path):
    assert "prot" in fail_message(tmp_path, {"api": {"service": {"prot": 80}}})


@pytest.mark.parametrize(
    ("values", "replacement"),
    [
        ({"databaseUrl": "postgresql://h/db"}, "database.external.url"),
        ({"postgresql": {"enabled": True}}, "database.postgresql"),
        ({"api": {"tokens": {"t": "alice"}}}, "api.auth.existingSecret"),
        ({"rayCluster": {"worker": {"replicas": 2}}}, "rayCluster.workerGroups"),
        ({"rayCluster": {"additionalWorkerGroups": {}}}, "rayCluster.workerGroups"),
        ({"artifacts": {"bucket": "b"}}, "artifacts.s3.bucket"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else v,
)
def test_removed_setting_fails_naming_its_replacement(tmp_path, values, replacement):
    message = fail_message(tmp_path, values)
    assert "has been removed" in message and f"`{replacement}`" in message


# --- docs -------------------------------------------------------------------------------------------


def test_deploy_doc_values_render_with_the_documented_names(tmp_path):
    (block,) = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    docs = render(tmp_path, yaml.safe_load(block), base=False, release="sparseflow")
    assert one(docs, "Service", "api")["metadata"]["name"] == "sparseflow-api"
    assert one(docs, "Ingress")["spec"]["tls"][0]["secretName"] == "sparseflow-tls"
    assert len(one(docs, "RayCluster")["spec"]["workerGroupSpecs"]) == 2
