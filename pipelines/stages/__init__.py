"""The stages a recipe can name, each a module with `run(spec, ctx) -> StageResult`.

The table is explicit (no registry built by walking packages) and imports a stage only when it runs,
so that listing stages stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from pipelines.stage import StageContext, StageResult

STAGE_MODULES: dict[str, str] = {
    "calibrate": "pipelines.stages.calibrate",
    "prune": "pipelines.stages.prune",
    "finetune": "pipelines.stages.finetune",
    "quantize": "pipelines.stages.quantize",
    "evaluate": "pipelines.stages.evaluate",
    "kernel_tune": "pipelines.stages.kernel_tune",
    "activation_profile": "pipelines.stages.activation_profile",
    "sleep": "pipelines.stages.sleep",
}


def get_stage(kind: str) -> Callable[..., StageResult]:
    """The `run(spec, ctx)` function of stage `kind`."""
    if kind not in STAGE_MODULES:
        raise KeyError(f"unknown stage {kind!r}; known: {', '.join(STAGE_MODULES)}")
    return importlib.import_module(STAGE_MODULES[kind]).run


__all__ = ["STAGE_MODULES", "StageContext", "StageResult", "get_stage"]
