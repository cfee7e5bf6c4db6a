"""Every manifest the chart renders, validated against the Kubernetes API schemas; the RayCluster too.

Kubernetes kinds: `kubernetes-validate` (PyPI) ships the OpenAPI-derived JSON schemas of every
Kubernetes minor release, so this runs offline. Strict mode rejects unknown fields, so a misspelt or
misplaced key fails here instead of being dropped by the API server. Each manifest is checked against
the oldest release the chart supports (Chart.yaml `kubeVersion`) and the newest the package knows.

RayCluster: no PyPI package ships KubeRay's CRD schema (codeflare-sdk, the closest, ships none), so
`RAYCLUSTER_V1` below is written from KubeRay's `ray.io/v1` types (raycluster_types.go): every field
the chart emits, typed, unknown fields rejected; each pod template is then validated as a core
`PodTemplate` with the Kubernetes schemas, which is the type the CRD embeds.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import jsonschema
import pytest
import yaml
from chart_helpers import BASE, BUNDLED_PG, CHART, CI_VALUES, needs_helm, one, render

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")

pytestmark = needs_helm

MIN_KUBE = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"].lstrip(">=").split("-")[0]
LATEST_KUBE = kubernetes_validate.latest_version()

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {"type": "object", "required": ["spec"]}  # the body is checked as a core PodTemplate
RAYCLUSTER_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            # KubeRay derives service names from it: 53 characters leave room for its suffixes
            "properties": {"name": {"type": "string", "maxLength": 53, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "suspend": {"type": "boolean"},
                "headServiceAnnotations": _STRING_MAP,
                "autoscalerOptions": {"type": "object"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "additionalProperties": False,
                    "properties": {
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": _STRING_MAP,
                        "template": _TEMPLATE,
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "rayStartParams", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": _INT32,
                            "minReplicas": _INT32,
                            "maxReplicas": _INT32,
                            "numOfHosts": _INT32,
                            "rayStartParams": _STRING_MAP,
                            "template": _TEMPLATE,
                            "scaleStrategy": {"type": "object"},
                        },
                    },
                },
            },
        },
    },
}

# default values, every CI values file (ci/cluster-values.yaml is the cluster-mode one), bundled PostgreSQL
VALUE_SETS = {"default": BASE, "bundled-postgresql": {**BASE, **BUNDLED_PG}}
VALUE_SETS.update({path.name: yaml.safe_load(path.read_text()) for path in CI_VALUES})


def validate_raycluster(doc: dict, version: str) -> None:
    """Structure against RAYCLUSTER_V1, then every pod template as a core/v1 PodTemplate."""
    jsonschema.Draft202012Validator(RAYCLUSTER_V1).validate(doc)
    spec = doc["spec"]
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    for template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, version, strict=True)


def validate_manifest(doc: dict, version: str) -> None:
    if doc["apiVersion"] == "ray.io/v1":
        validate_raycluster(doc, version)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Callable[[str], list[dict]]:
    """Render a value set once per module (helm takes ~0.5 s a render); tests get deep copies."""
    cache: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            values = VALUE_SETS[name]
            cache[name] = render(tmp_path_factory.mktemp(name), values,
                                 base=not ("database" in values and "api" in values))
        return copy.deepcopy(cache[name])

    return get


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_manifest_is_valid_for_the_oldest_and_newest_kubernetes(rendered, name):
    docs = rendered(name)
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "Job", "Service"} <= kinds
    for version in (MIN_KUBE, LATEST_KUBE):
        for doc in docs:
            try:
                validate_manifest(doc, version)
            except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
                where = "/".join(str(p) for p in error.absolute_path)
                name = f"{doc['kind']} {doc['metadata']['name']}"
                pytest.fail(f"{name} (Kubernetes {version}) at {where}: {error.message}")


def test_default_values_render_a_raycluster_that_validates(rendered):
    validate_raycluster(one(rendered("default"), "RayCluster"), LATEST_KUBE)


# The validators must be able to fail: a wrong type, an unknown field, a missing required field.


def test_kubernetes_schemas_reject_a_misplaced_field(rendered):
    worker = one(rendered("default"), "Deployment", "prefect-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    container["envFrom"] = container.pop("env")  # EnvVar items are not EnvFromSource items
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, LATEST_KUBE, strict=True)


def test_kubernetes_schemas_reject_a_wrong_type(rendered):
    job = one(rendered("default"), "Job", "deploy")
    job["spec"]["backoffLimit"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, MIN_KUBE, strict=True)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["workerGroupSpecs"][0].pop("groupName"),
        lambda s: s["workerGroupSpecs"][0].__setitem__("replicas", "1"),
        lambda s: s["headGroupSpec"]["rayStartParams"].__setitem__("num-gpus", 0),
        lambda s: s.__setitem__("workerGroups", []),
        lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("gpus", 1),
    ],
    ids=["no-groupName", "string-replicas", "int-start-param", "unknown-spec-field", "unknown-container-field"],
)
def test_raycluster_validation_rejects(rendered, mutate):
    ray = one(rendered("default"), "RayCluster")
    mutate(ray["spec"])
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate_raycluster(ray, LATEST_KUBE)


def test_value_sets_cover_cluster_mode_and_every_ci_file():
    assert {path.name for path in CI_VALUES} <= set(VALUE_SETS)
    assert "cluster-values.yaml" in VALUE_SETS
