"""The nightly schedule submits and runs one job per zoo model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from service_fixtures import tiny_recipe

from orchestrator.schedules import load_zoo, nightly, recipes_for
from orchestrator.service import Orchestrator
from orchestrator.store import queries
from pipelines.recipe import RecipeError


def _zoo(tmp_path: Path, models: list[str], text: Path) -> Path:
    recipe = tiny_recipe(Path("unused"), text)
    recipe["stages"] = [{"stage": "calibrate", "samples": 2, "seq_len": 16}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"name": "zoo", "cron": "0 3 * * *", "recipe": "recipe.yaml", "models": models}))
    return zoo


def test_zoo_applies_the_template_to_every_model(tmp_path: Path, text_file: Path) -> None:
    zoo, template = load_zoo(_zoo(tmp_path, ["builtin:smollm2-135m", "org/Other-1B"], text_file))
    recipes = recipes_for(zoo, template, "20261125")
    assert [r.model for r in recipes] == ["builtin:smollm2-135m", "org/Other-1B"]
    assert [r.name for r in recipes] == ["zoo-smollm2-135m-20261125", "zoo-Other-1B-20261125"]
    assert zoo.cron == "0 3 * * *"


def test_bad_zoo_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text("recipe: r.yaml\nmodels: []\n")
    with pytest.raises(RecipeError, match="models"):
        load_zoo(path)


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_nightly_runs_one_job_per_model(tmp_path: Path, tiny_model_dir: Path, text_file: Path,
                                        settings: Any) -> None:
    zoo = _zoo(tmp_path, [str(tiny_model_dir), str(tiny_model_dir)], text_file)
    outcomes = nightly(str(zoo), settings=settings)
    assert list(outcomes.values()) == ["succeeded", "succeeded"]
    orchestrator = Orchestrator(settings)
    with orchestrator.sessions() as session:
        jobs = queries.list_jobs(session, owner="schedule:zoo")
        assert {j.id for j in jobs} == set(outcomes)
    orchestrator.close()
