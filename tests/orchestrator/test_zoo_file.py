"""The zoo file: models with their recipes, owners and data overrides, tolerances, webhook; errors name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.zoo_file import DEFAULT_TOLERANCES, Tolerance, load_zoo, parse_zoo, tolerance_for
from pipelines.recipe import RecipeError

PRUNE = {"stages": [{"stage": "prune", "method": "magnitude", "sparsity": 0.5}]}


def _write(tmp_path: Path, zoo: dict[str, Any]) -> Path:
    (tmp_path / "recipes").mkdir(exist_ok=True)
    (tmp_path / "recipes" / "magnitude-50.yaml").write_text(yaml.safe_dump(PRUNE))
    (tmp_path / "recipes" / "named.yaml").write_text(yaml.safe_dump({**PRUNE, "name": "wanda-named"}))
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(zoo))
    return path


def test_full_zoo_gives_one_pair_per_model_and_recipe(tmp_path: Path) -> None:
    path = _write(tmp_path, {
        "name": "platform",
        "cron": "30 1 * * *",
        "webhook": "https://hooks.example.com/services/T0/B0/secret",
        "owner": "platform-team",
        "tolerances": {"perplexity": "+3%", "nonzero_params": {"worse": "higher", "relative": 0.001}},
        "recipes": ["recipes/magnitude-50.yaml"],
        "models": [
            "builtin:smollm2-135m",
            {"model": "./models/tiny", "owner": "alice", "calibration": "./data/cal.txt",
             "recipes": ["recipes/magnitude-50.yaml", "recipes/named.yaml", {"name": "inline-2of4", **PRUNE}]},
        ],
    })
    zoo = load_zoo(path)
    assert (zoo.name, zoo.cron, zoo.webhook) == ("platform", "30 1 * * *", "https://hooks.example.com/services/T0/B0/secret")
    pairs = [(p.model, p.recipe_name, p.owner, p.field) for p in zoo.pairs]
    tiny = str((tmp_path / "models" / "tiny").resolve())
    assert pairs == [
        ("builtin:smollm2-135m", "magnitude-50", "platform-team", "models[0] with recipes[0]"),
        (tiny, "magnitude-50", "alice", "models[1].recipes[0]"),
        (tiny, "wanda-named", "alice", "models[1].recipes[1]"),
        (tiny, "inline-2of4", "alice", "models[1].recipes[2]"),
    ]
    second = zoo.pairs[1].recipe
    assert second.model == tiny
    assert second.data.calibration == str((tmp_path / "data" / "cal.txt").resolve())
    assert second.data.evaluation == "builtin:enwiki", "only the overridden text changes"
    assert zoo.pairs[0].recipe.data.calibration == "builtin:enwiki"
    assert len({p.key for p in zoo.pairs}) == 4
    assert zoo.tolerances["perplexity"] == Tolerance(worse="higher", relative=0.03)
    assert zoo.tolerances["kernel_speedup"] == DEFAULT_TOLERANCES["kernel_speedup"]
    assert zoo.tolerances["nonzero_params"].relative == 0.001
    assert zoo.pairs[1].job_recipe("platform", "20261130").name == "platform-tiny-magnitude-50-20261130"


def test_older_shape_one_recipe_for_a_list_of_models_still_reads(tmp_path: Path) -> None:
    path = _write(tmp_path, {"name": "zoo", "recipe": "recipes/magnitude-50.yaml",
                             "models": ["builtin:smollm2-135m", "org/Other-1B"]})
    zoo = load_zoo(path)
    assert [(p.model, p.recipe_name, p.owner) for p in zoo.pairs] == [
        ("builtin:smollm2-135m", "magnitude-50", "local"), ("org/Other-1B", "magnitude-50", "local")]
    assert zoo.cron == "0 2 * * *" and zoo.webhook is None
    assert zoo.tolerances == DEFAULT_TOLERANCES
    inline = parse_zoo({"recipe": PRUNE, "models": ["a"]}, base_dir=tmp_path)
    assert [p.recipe_name for p in inline.pairs] == ["job"], "the older shape's inline recipe needs no name"


def test_the_same_pair_on_another_night_has_the_same_key(tmp_path: Path) -> None:
    first = parse_zoo({"recipes": [{"name": "r", **PRUNE}], "models": ["a", "b"]}, base_dir=tmp_path)
    second = parse_zoo({"recipes": [{"name": "r", "seed": 3, **PRUNE}], "models": ["b"]}, base_dir=tmp_path)
    assert first.pairs[1].key == second.pairs[0].key, "a pair is its model and recipe name, not the recipe's content"
    assert first.pairs[0].key != first.pairs[1].key


@pytest.mark.parametrize(("zoo", "message"), [
    ({"models": []}, "models: List should have at least 1 item"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a", {"model": "b", "recipez": []}]},
     "models[1].recipez: Extra inputs are not permitted"),
    ({"models": ["a", {"model": "b", "recipes": [{"name": "r", "stages": [{"stage": "prune", "sparsity": 2}]}]}],
      "recipes": [{"name": "r", **PRUNE}]},
     "models[1].recipes[0]: stages.0.prune.sparsity: Input should be less than 1"),
    ({"models": [{"model": "a", "recipes": [{"stages": PRUNE["stages"]}]}]},
     "models[0].recipes[0].name: an inline recipe needs a name"),
    ({"models": [{"model": "a", "recipes": ["missing.yaml"]}]}, "models[0].recipes[0]: recipe file not found"),
    ({"models": [{"model": "a", "recipes": [7]}]}, "models[0].recipes[0]: Value error, a recipe is a file path"),
    ({"models": ["a"]}, "models[0].recipes: no recipes"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a", "b", "a"]},
     "models[2]: model 'a' with recipe 'r' is already listed at models[0]"),
    ({"recipe": {"name": "r", **PRUNE}, "recipes": [{"name": "s", **PRUNE}], "models": ["a"]},
     "give either `recipe`"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": [{"model": "a", "evaluation": ""}]},
     "models[0].evaluation: String should have at least 1 character"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "tolerances": {"perplexity": "2%"}},
     "tolerances.perplexity: Value error, write a tolerance as '+2%'"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"],
      "tolerances": {"perplexity": {"worse": "up", "relative": 1}}},
     "tolerances.perplexity.worse: Input should be 'higher' or 'lower'"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"],
      "tolerances": {"perplexity": {"worse": "higher", "relative": 0}}},
     "tolerances.perplexity.relative: Input should be greater than 0"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "cron": "61 * * * *"}, "cron: Value error, not a cron"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "webhook": "ftp://example.com/x"}, "webhook: URL scheme"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "name": "a/b"}, "name: Value error, use letters"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "owner": "x" * 101}, "owner: String should have at most"),
    ({"recipes": [{"name": "r", **PRUNE}], "models": ["a"], "schedule": "daily"}, "schedule: Extra inputs"),
])
def test_bad_zoo_names_the_field(tmp_path: Path, zoo: dict[str, Any], message: str) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(zoo))
    with pytest.raises(RecipeError) as raised:
        load_zoo(path)
    assert message in str(raised.value)
    assert str(raised.value).startswith(f"{path}: ")


def test_unreadable_zoo_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="model zoo file not found"):
        load_zoo(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a\n")
    with pytest.raises(RecipeError, match="not a readable YAML zoo file"):
        load_zoo(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="a zoo file must be a mapping, got list"):
        load_zoo(bad)


@pytest.mark.parametrize(("text", "worse", "relative"), [("+2%", "higher", 0.02), ("-5%", "lower", 0.05),
                                                         (" + 0.5 % ", "higher", 0.005)])
def test_tolerance_shorthand(text: str, worse: str, relative: float) -> None:
    tolerance = Tolerance.model_validate(text)
    assert (tolerance.worse, tolerance.relative) == (worse, pytest.approx(relative))


def test_tolerance_says_which_direction_is_worse() -> None:
    perplexity, speedup = DEFAULT_TOLERANCES["perplexity"], DEFAULT_TOLERANCES["kernel_speedup"]
    assert perplexity.exceeded(10.0, 10.3) and not perplexity.exceeded(10.0, 10.19)
    assert not perplexity.exceeded(10.0, 5.0), "lower perplexity is better"
    assert speedup.exceeded(1.5, 1.4) and not speedup.exceeded(1.5, 1.43)
    assert not speedup.exceeded(1.5, 3.0), "a higher speedup is better"
    assert DEFAULT_TOLERANCES["model_size_bytes"].exceeded(1000, 1011)


def test_tolerance_for_matches_a_name_or_its_dotted_prefix() -> None:
    tolerances = {**DEFAULT_TOLERANCES, "kernel_speedup.576x192": Tolerance.model_validate("-1%")}
    assert tolerance_for("perplexity", tolerances) == ("perplexity", DEFAULT_TOLERANCES["perplexity"])
    assert tolerance_for("kernel_speedup.64x64.16", tolerances)[0] == "kernel_speedup"
    assert tolerance_for("kernel_speedup.576x192.16", tolerances)[0] == "kernel_speedup.576x192"
    assert tolerance_for("dense_perplexity", tolerances) is None
    assert tolerance_for("perplexity_x", tolerances) is None
