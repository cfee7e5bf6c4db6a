"""Fixtures for tests that run real jobs: one local Ray with logical GPUs, one Prefect test harness.

Registered for the whole suite by `pytest_plugins` in tests/conftest.py.
Ray gets `num_gpus=2` logical GPUs so GPU placement is exercised on machines without a GPU; a stage
placed on one sees `CUDA_VISIBLE_DEVICES` set but, without a real GPU, computes on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox jumps over the lazy dog number {i}. Aristotle was a Greek "
    f"philosopher and polymath; Alabama is a state in the United States of America. Achilles was a hero "
    f"of the Trojan War in year {1000 + i}. An American in Paris is an orchestral piece by George Gershwin."
    for i in range(120)
)


@pytest.fixture(scope="session")
def ray_cluster() -> Any:
    import ray

    # address="local": a new Ray of our own, never one that another process started on this machine
    ray.init(address="local", num_cpus=2, num_gpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray.cluster_resources()
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """SPARSEFLOW_HOME for in-process CLI calls, with the cached settings dropped before and after."""
    from orchestrator.settings import get_settings

    home = tmp_path / "cli-home"
    monkeypatch.setenv("SPARSEFLOW_HOME", str(home))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    from orchestrator.settings import Settings

    return Settings(home=tmp_path / "home", database_url=None, artifact_root=None, ray_address=None)


def tiny_recipe(model_dir: Path, text: Path, **overrides: Any) -> dict[str, Any]:
    """A full five-stage job on the tiny model that runs in seconds."""
    recipe: dict[str, Any] = {
        "name": "tiny-e2e",
        "model": str(model_dir),
        "data": {"calibration": str(text), "evaluation": str(text)},
        "seed": 0,
        "stages": [
            {"stage": "calibrate", "samples": 4, "seq_len": 32, "batch_size": 2},
            {"stage": "prune", "method": "wanda", "pattern": "2:4",
             "resources": {"num_gpus": 1}},
            {"stage": "finetune", "steps": 2, "batch_size": 2, "seq_len": 32},
            {"stage": "evaluate", "seq_len": 32, "max_windows": 4},
            {"stage": "kernel_tune", "tokens": [1, 16], "repeats": 2},
        ],
    }
    recipe.update(overrides)
    return recipe
