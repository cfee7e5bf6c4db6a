"""What crosses from the orchestrator to a Ray worker and back: plain, serializable, and light to import.

Kept apart from `workers.runner` (which imports torch, transformers and every stage) so that the flow's
process, which only builds requests and reads outcomes, starts without loading the model stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SOURCE_PREFIX = "source:"
"""Input URIs starting with this name a model reference (builtin id, hub id, local path), not a stored file."""


@dataclass
class StageRequest:
    job_id: str
    stage_run_id: str
    label: str
    spec: dict[str, Any]
    data: dict[str, Any]
    seed: int
    inputs: dict[str, str]
    artifact_root: str
    cache_dir: str


@dataclass
class StageOutcome:
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[tuple[str, float, int]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    gpu_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
