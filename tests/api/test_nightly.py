"""`sparseflow nightly`: the older zoo shape (one recipe for a list of models) still runs, one job per model;
a bad zoo file stops the command naming the field."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_fixtures import tiny_recipe
from typer.testing import CliRunner

from api.cli import app as cli_app
from orchestrator.schedules import load_zoo, nightly
from orchestrator.service import Orchestrator
from orchestrator.store import queries
from orchestrator.store import zoo as zoo_store


def _zoo(tmp_path: Path, models: list[str], text: Path) -> Path:
    recipe = tiny_recipe(Path("unused"), text)
    recipe["stages"] = [{"stage": "calibrate", "samples": 2, "seq_len": 16}]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    zoo = tmp_path / "zoo.yaml"
    zoo.write_text(yaml.safe_dump({"name": "zoo", "cron": "0 3 * * *", "recipe": "recipe.yaml", "models": models}))
    return zoo


def test_older_zoo_applies_the_recipe_to_every_model(tmp_path: Path, text_file: Path) -> None:
    zoo = load_zoo(_zoo(tmp_path, ["builtin:smollm2-135m", "org/Other-1B"], text_file))
    assert [p.model for p in zoo.pairs] == ["builtin:smollm2-135m", "org/Other-1B"]
    assert [p.job_recipe(zoo.name, "20261125").name for p in zoo.pairs] == [
        "zoo-smollm2-135m-tiny-e2e-20261125", "zoo-Other-1B-tiny-e2e-20261125"]
    assert zoo.cron == "0 3 * * *"
    assert all(p.recipe.data.calibration == str(text_file) for p in zoo.pairs)


def test_cli_bad_zoo_exits_2_naming_the_field(tmp_path: Path, cli_home: Path) -> None:
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"recipe": {"name": "r", "stages": [{"stage": "calibrate"}]},
                                    "models": ["a", {"model": "b", "owner": ""}]}))
    result = CliRunner().invoke(cli_app, ["nightly", str(path), "--now"])
    assert result.exit_code == 2, result.output
    assert "models[1].owner" in result.output and "Traceback" not in result.output


@pytest.mark.usefixtures("ray_cluster", "prefect_harness")
def test_nightly_runs_one_job_per_model(tmp_path: Path, tiny_model_dir: Path, text_file: Path,
                                        settings: Any) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    zoo = _zoo(tmp_path, [str(tiny_model_dir), str(copy)], text_file)
    outcome = nightly(str(zoo), settings=settings)
    assert outcome["status"] == "succeeded"
    assert list(outcome["jobs"].values()) == ["succeeded", "succeeded"]
    orchestrator = Orchestrator(settings)
    with orchestrator.sessions() as session:
        jobs = queries.list_jobs(session, owner="local")
        assert {j.id for j in jobs} == set(outcome["jobs"])
        night = zoo_store.last_night(session, "zoo")
        assert night.id == outcome["night_id"] and [j.model for j in night.jobs] == [str(tiny_model_dir), str(copy)]
    orchestrator.close()
