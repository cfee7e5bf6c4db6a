"""Unit tests of the Helm chart `helm/sparseflow`: lint it, render it with `helm template`, assert on the YAML.

One behaviour per test, as helm-unittest's one `it:` per value (kuberay `helm-chart/ray-cluster/tests/`).
helm comes from PATH or `.venv/bin/helm` (`bash scripts/get-helm.sh` installs it); without it every test skips.
"""

from __future__ import annotations

import base64
import http.server
import os
import re
import subprocess
import sys
import threading

import pytest
import yaml
from chart_helpers import (
    BASE,
    BUNDLED_PG,
    CHART,
    CI_VALUES,
    RELEASE,
    ROOT,
    containers,
    env_of,
    fail_message,
    find,
    helm,
    needs_helm,
    one,
    ray_pod_specs,
    render,
)

pytestmark = needs_helm


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


def test_workers_get_the_kuberay_head_gcs_address_and_join_as_resource_less_nodes(tmp_path):
    docs = render(tmp_path)
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    assert env_of(worker)["SPARSEFLOW_RAY_ADDRESS"]["value"] == "rel-sparseflow-ray-head-svc:6379"
    head = one(docs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "gcs", "containerPort": 6379} in head["ports"]
    script = worker["args"][0]
    assert 'ray start --address="$SPARSEFLOW_RAY_ADDRESS"' in script
    assert "--num-cpus='0'" in script and "--num-gpus='0'" in script
    # the raylet is started first (retried while the head starts), then the worker replaces the shell
    assert script.index("until ray start") < script.index("exec sparseflow worker")
    assert '[ "$tries" -lt 60 ] || exit 1' in script
    # a worker pod whose raylet died, or whose worker stopped polling, is restarted, and rejoins
    probe = worker["livenessProbe"]["exec"]["command"][-1]
    assert "'raylet'" in probe and "http://127.0.0.1:8080/health" in probe
    assert "exec sparseflow worker" in script and "--health-port 8080 --health-host 0.0.0.0" in script
    assert {"name": "health", "containerPort": 8080} in worker["ports"]


def test_api_gets_no_ray_address_it_runs_no_stage(tmp_path):
    api = containers(one(render(tmp_path), "Deployment", "api"))[0]
    assert "SPARSEFLOW_RAY_ADDRESS" not in env_of(api)


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
    job_weight = one(docs, "Job", "migrations")["metadata"]["annotations"]["helm.sh/hook-weight"]
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


def test_raycluster_can_be_replaced_by_a_ray_client_address(tmp_path):
    docs = render(tmp_path, {"rayCluster": {"enabled": False, "externalAddress": "ray://ray:10001"}})
    assert not find(docs, "RayCluster")
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    assert env_of(worker)["SPARSEFLOW_RAY_ADDRESS"]["value"] == "ray://ray:10001"
    # Ray Client needs no local raylet: the worker runs `sparseflow worker` directly
    assert worker["command"][:2] == ["sparseflow", "worker"] and "args" not in worker
    # no raylet to watch: the probe asks the worker's own healthcheck
    assert worker["command"][-4:] == ["--health-port", "8080", "--health-host", "0.0.0.0"]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": "health"}


def test_external_gcs_address_is_joined(tmp_path):
    docs = render(tmp_path, {"rayCluster": {"enabled": False, "externalAddress": "ray-head.ray:6379"}})
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    assert env_of(worker)["SPARSEFLOW_RAY_ADDRESS"]["value"] == "ray-head.ray:6379"
    assert "ray start" in worker["args"][0]


def test_without_any_ray_cluster_each_flow_starts_its_own(tmp_path):
    docs = render(tmp_path, {"rayCluster": {"enabled": False}})
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    assert "SPARSEFLOW_RAY_ADDRESS" not in env_of(worker)
    assert worker["command"][:2] == ["sparseflow", "worker"]


def test_malformed_external_ray_address_fails(tmp_path):
    message = fail_message(tmp_path, {"rayCluster": {"enabled": False, "externalAddress": "http://ray:8265/x"}})
    assert "`rayCluster.externalAddress`" in message and "host:6379" in message


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


# --- Prefect: the API submits, the workers run ----------------------------------------------------

PREFECT_URL = "http://rel-sparseflow-prefect-server:4200/api"


def test_worker_runs_sparseflow_worker_on_the_pool_with_the_concurrency_limit(tmp_path):
    docs = render(tmp_path, {"prefectWorker": {"workPool": "gpu-pool", "concurrencyLimit": 3, "replicaCount": 2}})
    deployment = one(docs, "Deployment", "prefect-worker")
    assert deployment["spec"]["replicas"] == 2
    worker = containers(deployment)[0]
    env = env_of(worker)
    assert 'exec sparseflow worker --pool "$SPARSEFLOW_WORK_POOL" --limit 3 --name "$POD_NAME"' in worker["args"][0]
    assert env["SPARSEFLOW_WORK_POOL"]["value"] == "gpu-pool"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["PREFECT_API_URL"]["value"] == PREFECT_URL


def test_worker_gets_database_artifacts_ray_and_prefect_settings(tmp_path):
    values = {"artifacts": {"type": "s3", "s3": {"bucket": "models", "endpointUrl": "http://minio:9000",
                                                 "credentialsSecret": "s3"}}}
    worker = containers(one(render(tmp_path, values), "Deployment", "prefect-worker"))[0]
    env = env_of(worker)
    assert env["SPARSEFLOW_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "lineage-db", "key": "url"}
    assert env["SPARSEFLOW_ARTIFACT_ROOT"]["value"] == "s3://models/sparseflow"
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):  # boto and s3fs
        assert env[name]["value"] == "http://minio:9000"
    assert worker["envFrom"] == [{"secretRef": {"name": "s3"}}]
    assert env["SPARSEFLOW_RAY_ADDRESS"]["value"].endswith("-head-svc:6379")
    assert env["SPARSEFLOW_PREFECT_API_URL"]["value"] == env["PREFECT_API_URL"]["value"] == PREFECT_URL
    assert env["SPARSEFLOW_DEPLOYMENT"]["value"] == "compression-job"


def test_api_is_in_cluster_mode_and_runs_no_jobs(tmp_path):
    api = containers(one(render(tmp_path), "Deployment", "api"))[0]
    env = env_of(api)
    assert api["command"] == ["sparseflow", "serve"]
    # SPARSEFLOW_PREFECT_API_URL selects cluster mode: the API creates flow runs, runs none
    assert env["SPARSEFLOW_PREFECT_API_URL"]["value"] == PREFECT_URL
    assert (env["SPARSEFLOW_WORK_POOL"]["value"], env["SPARSEFLOW_DEPLOYMENT"]["value"]) == (
        "sparseflow", "compression-job")
    # no in-process runner settings
    assert "SPARSEFLOW_MAX_CONCURRENT_JOBS" not in env


def test_external_prefect_server_is_used_by_api_worker_and_deploy_hook(tmp_path):
    url = "https://prefect.example/api"
    docs = render(tmp_path, {"prefectServer": {"enabled": False, "externalApiUrl": url}})
    assert not find(docs, "Deployment", "prefect-server")
    for workload in (one(docs, "Deployment", "api"), one(docs, "Deployment", "prefect-worker"),
                     one(docs, "Job", "deploy")):
        env = env_of(containers(workload)[-1])
        assert env["SPARSEFLOW_PREFECT_API_URL"]["value"] == url, workload["metadata"]["name"]


def test_without_a_prefect_server_the_render_fails(tmp_path):
    message = fail_message(tmp_path, {"prefectServer": {"enabled": False}, "prefectWorker": {"enabled": False}})
    assert "`prefectServer.externalApiUrl`" in message


def test_deploy_hook_runs_sparseflow_deploy_after_migrations(tmp_path):
    for values in ({}, BUNDLED_PG):
        docs = render(tmp_path, values)
        job, migrations = one(docs, "Job", "deploy"), one(docs, "Job", "migrations")
        annotations = job["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
        hook_weight = int(migrations["metadata"]["annotations"]["helm.sh/hook-weight"])
        assert int(annotations["helm.sh/hook-weight"]) > hook_weight
        (wait,) = job["spec"]["template"]["spec"]["initContainers"]
        assert "/health" in wait["command"][-1]
        deploy = job["spec"]["template"]["spec"]["containers"][0]
        assert deploy["command"] == ["sparseflow", "deploy"]
        env = env_of(deploy)
        assert env["PREFECT_API_URL"]["value"] == env_of(wait)["PREFECT_API_URL"]["value"] == PREFECT_URL
        worker_env = env_of(containers(one(docs, "Deployment", "prefect-worker"))[0])
        for name in ("SPARSEFLOW_WORK_POOL", "SPARSEFLOW_DEPLOYMENT"):
            assert env[name] == worker_env[name]


def test_inline_scripts_of_worker_and_deploy_hook_parse(tmp_path):
    docs = render(tmp_path)
    worker = containers(one(docs, "Deployment", "prefect-worker"))[0]
    script = tmp_path / "worker.sh"
    script.write_text(worker["args"][0])
    done = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    compile(worker["livenessProbe"]["exec"]["command"][-1], "liveness", "exec")
    (wait,) = one(docs, "Job", "deploy")["spec"]["template"]["spec"]["initContainers"]
    compile(wait["command"][-1], "wait-for-prefect", "exec")


def test_deploy_hook_wait_returns_once_prefect_answers(tmp_path):
    """The init container's script, run for real against a server that answers /api/health."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    (wait,) = one(render(tmp_path), "Job", "deploy")["spec"]["template"]["spec"]["initContainers"]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{server.server_address[1]}/api/"}
        done = subprocess.run([sys.executable, "-c", wait["command"][-1]], env=env, capture_output=True,
                              text=True, timeout=30)
        server.shutdown()
    assert done.returncode == 0, done.stderr


def test_deploy_hook_sets_a_pool_wide_limit_only_when_asked(tmp_path):
    assert "args" not in one(render(tmp_path), "Job", "deploy")["spec"]["template"]["spec"]["containers"][0]
    job = one(render(tmp_path, {"deploy": {"poolConcurrencyLimit": 6}}), "Job", "deploy")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["--pool-limit", "6"]


def test_deploy_hook_can_be_turned_off(tmp_path):
    assert not find(render(tmp_path, {"deploy": {"enabled": False}}), "Job", "deploy")


def test_settings_reach_api_and_workers_only_when_set(tmp_path):
    docs = render(tmp_path)
    for component in ("api", "prefect-worker"):
        env = env_of(containers(one(docs, "Deployment", component))[0])
        assert not {"SPARSEFLOW_HEARTBEAT_S", "SPARSEFLOW_RUNNER_LOST_AFTER_S", "SPARSEFLOW_LOCAL_ROOTS"} & set(env)
    settings = {"heartbeatSeconds": 1.5, "runnerLostAfterSeconds": 20, "reconcileEverySeconds": 3,
                "verifyEverySeconds": 600, "localRoots": ["/data/models", "/data/text"], "maxRequestBytes": 4194304,
                "maxDatasetBytes": 1 << 30}
    docs = render(tmp_path, {"settings": settings})
    for component in ("api", "prefect-worker"):
        env = {k: v["value"] for k, v in env_of(containers(one(docs, "Deployment", component))[0]).items()
               if "value" in v}
        assert env["SPARSEFLOW_HEARTBEAT_S"] == "1.5"
        assert env["SPARSEFLOW_RUNNER_LOST_AFTER_S"] == "20"
        assert env["SPARSEFLOW_RECONCILE_EVERY_S"] == "3"
        assert env["SPARSEFLOW_VERIFY_EVERY_S"] == "600"
        assert yaml.safe_load(env["SPARSEFLOW_LOCAL_ROOTS"]) == ["/data/models", "/data/text"]
        assert env["SPARSEFLOW_MAX_REQUEST_BYTES"] == "4194304"
        assert env["SPARSEFLOW_MAX_DATASET_BYTES"] == str(1 << 30)


def test_settings_schema_rejects_a_non_positive_heartbeat(tmp_path):
    assert "heartbeatSeconds" in fail_message(tmp_path, {"settings": {"heartbeatSeconds": 0}})


# --- images and GPUs --------------------------------------------------------------------------------


def test_worker_and_ray_use_the_worker_image_and_the_api_the_api_image(tmp_path):
    docs = render(tmp_path)
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    worker_image = f"ghcr.io/sparseflow/sparseflow-worker:{app_version}"
    assert containers(one(docs, "Deployment", "prefect-worker"))[0]["image"] == worker_image
    assert {pod["containers"][0]["image"] for pod in ray_pod_specs(one(docs, "RayCluster"))} == {worker_image}
    api_image = f"ghcr.io/sparseflow/sparseflow:{app_version}"
    for workload in (one(docs, "Deployment", "api"), one(docs, "Job", "migrations"), one(docs, "Job", "deploy")):
        assert {c["image"] for c in containers(workload)} == {api_image}


def test_only_ray_worker_groups_request_gpus_by_default(tmp_path):
    docs = render(tmp_path, BUNDLED_PG)
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            for c in containers(doc):
                assert "nvidia.com/gpu" not in yaml.safe_dump(c.get("resources", {})), doc["metadata"]["name"]
    ray = one(docs, "RayCluster")["spec"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(ray["headGroupSpec"]["template"])
    assert ray["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    assert all(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
               for g in ray["workerGroupSpecs"])


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
        ({"api": {"maxConcurrentJobs": 4}}, "prefectWorker.concurrencyLimit"),
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
