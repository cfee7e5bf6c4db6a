"""The prune stage's recipe: one class per method, its own settings only, errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from pipelines.pruning.engine import METHODS, MethodConfig
from pipelines.recipe import (
    PRUNE_METHODS,
    MagnitudePrune,
    PruneStage,
    Recipe,
    RecipeError,
    SparseGPTPrune,
    StageSpec,
    WandaPrune,
    parse_recipe,
    prune_stage,
)


def _recipe(prune: dict) -> Recipe:
    return parse_recipe({"stages": [{"stage": "calibrate"}, {"stage": "prune", **prune}]})


@pytest.mark.parametrize(
    ("method", "cls"), [("sparsegpt", SparseGPTPrune), ("wanda", WandaPrune), ("magnitude", MagnitudePrune)]
)
def test_method_picks_its_class(method: str, cls: type) -> None:
    spec = _recipe({"method": method}).stages[1]
    assert type(spec) is cls and isinstance(spec, PruneStage) and spec.method == method


def test_method_defaults_to_wanda() -> None:
    assert type(_recipe({}).stages[1]) is WandaPrune


@pytest.mark.parametrize("field", ["block_size", "dampening", "act_order", "damping_retries"])
def test_sparsegpt_settings_are_errors_on_wanda_naming_the_field(field: str) -> None:
    value = {"block_size": 64, "dampening": 0.1, "act_order": True, "damping_retries": 2}[field]
    with pytest.raises(RecipeError) as caught:
        _recipe({"method": "wanda", field: value})
    assert str(caught.value) == f"stages.1.prune.{field}: not a setting of method 'wanda'; it is a setting of sparsegpt"


@pytest.mark.parametrize("field", ["within_layer", "sequential", "block_size"])
def test_magnitude_takes_no_calibration_settings(field: str) -> None:
    with pytest.raises(RecipeError, match=rf"stages\.1\.prune\.{field}: not a setting of method 'magnitude'"):
        _recipe({"method": "magnitude", field: 8 if field == "block_size" else True})


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(RecipeError, match=r"^stages\.1\.prune\.bogus: not a setting of method 'sparsegpt'$"):
        _recipe({"method": "sparsegpt", "bogus": 1})


def test_unknown_method_names_the_field_and_the_choices() -> None:
    with pytest.raises(RecipeError) as caught:
        _recipe({"method": "obs"})
    assert str(caught.value) == "stages.1.prune.method: method must be one of 'sparsegpt', 'wanda', 'magnitude'"


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_sparsity_beside_an_nm_pattern_is_an_error_naming_both(method: str, sparsity: float) -> None:
    with pytest.raises(RecipeError) as caught:
        _recipe({"method": method, "sparsity": sparsity, "pattern": "2:4"})
    message = str(caught.value)
    assert message.startswith("stages.1.prune: ") and "sparsity and pattern" in message, message


def test_pattern_is_parsed_once_into_ints_and_normalized() -> None:
    spec = _recipe({"method": "sparsegpt", "pattern": " 4 : 8 "}).stages[1]
    assert spec.pattern == "4:8" and spec.nm == (4, 8)
    assert spec.target_sparsity == 0.5 and spec.sparsity is None
    unstructured = _recipe({"method": "wanda", "sparsity": 0.6}).stages[1]
    assert unstructured.nm is None and unstructured.target_sparsity == 0.6
    assert _recipe({"method": "wanda"}).stages[1].target_sparsity == 0.5


@pytest.mark.parametrize(
    "prune",
    [{"method": "sparsegpt", "pattern": "2:4", "block_size": 64}, {"method": "wanda", "sparsity": 0.3},
     {"method": "magnitude", "pattern": "4:8"}, {"method": "wanda", "profile": "owl", "sparsity": 0.6}],
)
def test_a_dumped_spec_validates_back_to_the_same_spec(prune: dict) -> None:
    """The service stores `model_dump(mode='json')` and validates it again when the stage runs."""
    spec = _recipe(prune).stages[1]
    again = TypeAdapter(StageSpec).validate_python(spec.model_dump(mode="json"))
    assert again == spec and again.nm == spec.nm and type(again) is type(spec)


def test_error_locations_have_no_method_level() -> None:
    """API clients see `stages.<i>.prune.<field>` whatever the method, as before the split."""
    with pytest.raises(ValidationError) as caught:
        Recipe.model_validate({"stages": [{"stage": "calibrate"},
                                          {"stage": "prune", "method": "sparsegpt", "dampening": -1}]})
    assert [e["loc"] for e in caught.value.errors()] == [("stages", 1, "prune", "dampening")]


def test_magnitude_needs_no_calibrate_stage_unless_owl() -> None:
    assert parse_recipe({"stages": [{"stage": "prune", "method": "magnitude"}]}).stages[0].method == "magnitude"
    with pytest.raises(RecipeError, match=r"stages\.0: profile 'owl' needs a 'calibrate' stage"):
        parse_recipe({"stages": [{"stage": "prune", "method": "magnitude", "profile": "owl"}]})
    with pytest.raises(RecipeError, match=r"stages\.0: method 'sparsegpt' needs a 'calibrate' stage"):
        parse_recipe({"stages": [{"stage": "prune", "method": "sparsegpt"}]})


def test_prune_stage_builds_the_methods_class_and_the_base_is_not_built() -> None:
    assert type(prune_stage(method="magnitude", sparsity=0.3)) is MagnitudePrune
    assert prune_stage(method="sparsegpt", pattern="2:4").use_act_order
    with pytest.raises(ValidationError, match="not a setting of method 'wanda'"):
        prune_stage(method="wanda", dampening=0.1)
    with pytest.raises(TypeError, match="base of the per-method specs"):
        PruneStage(method="wanda")


def test_every_recipe_method_has_an_engine_entry() -> None:
    assert set(PRUNE_METHODS) == set(METHODS)
    assert {m: METHODS[m].statistics for m in METHODS} == {
        "magnitude": "none", "wanda": "column_norms", "sparsegpt": "hessian"}
    with pytest.raises(ValueError, match="method: unknown pruning method 'obs'"):
        MethodConfig("obs")  # type: ignore[arg-type]
