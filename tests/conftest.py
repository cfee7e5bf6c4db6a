"""Shared fixtures: a tiny random Llama with a tiny offline tokenizer.

`tiny_model_dir` is a model directory exactly like the ones stages pass on (config, safetensors,
tokenizer), built in well under a second and without touching a model hub or the shipped GGUF.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# A test's `sparseflow run` starts and stops its own Prefect server and Ray node: kept services would
# outlive the test (tests/api/test_kept_services.py turns them on for its own runs).
os.environ["SPARSEFLOW_KEEP_SERVICES_S"] = "0"

# Ray, Prefect and job fixtures shared by tests/api, tests/workers and tests/orchestrator (one Ray per run).
pytest_plugins = ["service_fixtures", "databases"]

from tiny_models import CORPUS, TINY_VOCAB, build_tiny_model, build_tiny_tokenizer  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    """Undo what a test's in-process CLI call set in os.environ (e.g. PREFECT_HOME under its own tmp home),
    so that no later test, nor a service it starts as a subprocess, inherits it."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random LlamaForCausalLM plus tokenizer; treat it as read-only (copy to modify)."""
    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local .txt source of 120 short paragraphs (~60k characters); its evaluation split is 12 of them."""
    import random

    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(CORPUS) for _ in range(12)) for _ in range(120)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path
