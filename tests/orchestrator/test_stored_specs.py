"""Jobs stored by the version before per-method prune classes still read: their recipe and stage params
validate after dropping exactly what that version ignored, and nothing invalid is let through."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from orchestrator.stored_specs import stored_recipe, stored_stage_spec
from pipelines.recipe import MagnitudePrune, Recipe, WandaPrune, parse_recipe

_COMMON = {"resources": {"num_cpus": None, "num_gpus": 0.0, "memory_gb": None}, "stage": "prune",
           "profile": "uniform", "owl_lambda": 0.08, "owl_threshold": 5.0,
           "targets": ["re:.*\\.(self_attn|mlp)\\.\\w+_proj$"], "ignore": ["lm_head", "re:.*embed_tokens$"],
           "block_size": 128, "dampening": 0.01, "act_order": None, "damping_retries": 4, "batch_size": 4,
           "sequential": True, "within_layer": None, "dtype": "float32", "export": "auto"}
# verbatim dumps of that version's single PruneStage: every method's settings, and always a sparsity
LEGACY_WANDA_24 = {**_COMMON, "method": "wanda", "sparsity": 0.5, "pattern": "2:4"}
LEGACY_MAGNITUDE = {**_COMMON, "method": "magnitude", "sparsity": 0.3, "pattern": "unstructured"}


def _legacy_recipe() -> dict:
    recipe = parse_recipe({"name": "legacy", "model": "m", "stages": [{"stage": "calibrate"}]}).model_dump(mode="json")
    recipe["stages"] += [copy.deepcopy(LEGACY_WANDA_24), copy.deepcopy(LEGACY_MAGNITUDE)]
    return recipe


def test_a_legacy_dump_does_not_validate_as_it_is():
    with pytest.raises(ValidationError):
        Recipe.model_validate(_legacy_recipe())


def test_a_legacy_recipe_reads_as_it_ran():
    recipe = stored_recipe(_legacy_recipe())
    wanda, magnitude = recipe.stages[1], recipe.stages[2]
    assert isinstance(wanda, WandaPrune) and wanda.nm == (2, 4) and wanda.target_sparsity == 0.5
    assert wanda.sparsity is None and "block_size" not in wanda.model_dump()
    assert isinstance(magnitude, MagnitudePrune) and magnitude.target_sparsity == 0.3
    assert magnitude.batch_size == 4 and magnitude.targets == _COMMON["targets"]


def test_legacy_stage_params_read_as_they_ran():
    spec = stored_stage_spec(copy.deepcopy(LEGACY_WANDA_24))
    assert isinstance(spec, WandaPrune) and spec.nm == (2, 4)


def test_a_current_recipe_is_read_unchanged():
    current = parse_recipe({"name": "now", "model": "m", "stages": [
        {"stage": "calibrate"}, {"stage": "prune", "method": "sparsegpt", "pattern": "2:4", "block_size": 64}]})
    data = current.model_dump(mode="json")
    assert stored_recipe(data).model_dump(mode="json") == data


@pytest.mark.parametrize("change", [{"method": "obs"}, {"pattern": "5:4"},
                                    {"sparsity": 1.5, "pattern": "unstructured"}])
def test_what_was_invalid_then_is_still_an_error(change):
    params = {**copy.deepcopy(LEGACY_WANDA_24), **change}
    with pytest.raises(ValidationError):
        stored_stage_spec(params)
    recipe = _legacy_recipe()
    recipe["stages"][1] = params
    with pytest.raises(ValidationError):
        stored_recipe(recipe)
