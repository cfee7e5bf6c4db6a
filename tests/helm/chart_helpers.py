"""Shared helpers of the chart tests: find helm, render `helm/sparseflow` with values, pick manifests.

helm comes from PATH or `.venv/bin/helm` (`bash scripts/get-helm.sh` installs it); test modules skip
without it (`needs_helm`).
"""

from __future__ import annotations

import os
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
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found on PATH or in .venv/bin (run scripts/get-helm.sh)")


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
