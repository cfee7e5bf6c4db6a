"""Recipes and stage parameters as an earlier version stored them, read by this one.

A job stores its recipe, and each stage run its parameters, as the full dump of the validated spec at
submission, defaults included. When a spec class is split or tightened, a stored dump can stop
validating although its user asked for nothing invalid: the prune stage's single class carried every
method's settings (a Wanda stage was stored with SparseGPT's `block_size` and `dampening`) and always a
`sparsity` (0.5 by default, beside a `"2:4"` pattern too), which the per-method classes refuse. The
code of that time ignored both, so dropping them reads the job exactly as it ran. A stored dump is only
upgraded when it fails to validate as it is, and must validate after: anything else is still an error.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from pipelines.recipe import PRUNE_METHODS, Recipe, StageSpec, parse_pattern


def upgrade_prune_params(params: dict[str, Any]) -> dict[str, Any]:
    """A stored prune stage's parameters without the settings its method's class does not take, and
    without `sparsity` beside an N:M pattern (which fixes the sparsity, as it did then)."""
    cls = PRUNE_METHODS.get(params.get("method", "wanda"))
    if cls is None:
        return params
    upgraded = {key: value for key, value in params.items() if key in cls.model_fields}
    try:
        nm = parse_pattern(upgraded.get("pattern", "unstructured"))
    except (TypeError, ValueError):
        return upgraded  # validation names the bad pattern
    if nm is not None:
        upgraded.pop("sparsity", None)
    return upgraded


def _upgrade_stage(params: Any) -> Any:
    if isinstance(params, dict) and params.get("stage") == "prune":
        return upgrade_prune_params(params)
    return params


def stored_recipe(data: dict[str, Any]) -> Recipe:
    """The `Recipe` of a stored job, upgraded from an earlier version's dump where it must be."""
    try:
        return Recipe.model_validate(data)
    except ValidationError:
        stages = data.get("stages")
        if not isinstance(stages, list):
            raise
        return Recipe.model_validate({**data, "stages": [_upgrade_stage(stage) for stage in stages]})


def stored_stage_spec(params: dict[str, Any]) -> Any:
    """The spec of a stored stage run, upgraded from an earlier version's dump where it must be."""
    adapter = TypeAdapter(StageSpec)
    try:
        return adapter.validate_python(params)
    except ValidationError:
        return adapter.validate_python(_upgrade_stage(params))
