"""The nightly schedule: one job per model of a model zoo, from one recipe template.

A zoo file names the models and the recipe to apply to each::

    name: nightly
    cron: "0 2 * * *"            # every night at 02:00 (the schedule's time zone: UTC)
    recipe: recipes/wanda-50.yaml # path relative to this file, or an inline recipe mapping
    models:
      - builtin:smollm2-135m
      - HuggingFaceTB/SmolLM2-360M-Instruct

`sparseflow nightly ZOO --now` runs it once; `sparseflow nightly ZOO` serves it as a Prefect
deployment on its cron schedule.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.settings import Settings
from pipelines.recipe import Recipe, RecipeError, format_validation_error, load_recipe, parse_recipe

log = logging.getLogger(__name__)


class ModelZoo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "nightly"
    cron: str = "0 2 * * *"
    recipe: str | dict[str, Any]
    models: list[str] = Field(min_length=1)


def load_zoo(path: str | Path) -> tuple[ModelZoo, Recipe]:
    """Read a zoo file and its recipe template; errors name the field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"model zoo file not found: {path}")
    try:
        zoo = ModelZoo.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as error:
        raise RecipeError(f"{path}: {format_validation_error(error)}") from error
    template = load_recipe(path.parent / zoo.recipe) if isinstance(zoo.recipe, str) else parse_recipe(zoo.recipe)
    return zoo, template


def recipes_for(zoo: ModelZoo, template: Recipe, day: str) -> list[Recipe]:
    """The template applied to every model of the zoo, each named `<zoo>-<model>-<day>`."""
    recipes = []
    for model in zoo.models:
        short = model.split(":")[-1].rstrip("/").split("/")[-1]
        recipes.append(template.model_copy(update={"model": model, "name": f"{zoo.name}-{short}-{day}"}))
    return recipes


@flow(name="nightly-model-zoo", validate_parameters=False)
def nightly(zoo_path: str, settings: Settings | None = None) -> dict[str, str]:
    """Submit and run one job per zoo model; returns job id -> final status. One failure stops no other."""
    from orchestrator.service import Orchestrator, submit_job
    from orchestrator.settings import get_settings

    zoo, template = load_zoo(zoo_path)
    orchestrator = Orchestrator(settings or get_settings())
    day = datetime.now(UTC).strftime("%Y%m%d")
    outcomes: dict[str, str] = {}
    try:
        for recipe in recipes_for(zoo, template, day):
            with orchestrator.sessions.begin() as session:
                job_id = submit_job(session, recipe, owner=f"schedule:{zoo.name}").id
            try:
                outcomes[job_id] = orchestrator.run(job_id)
            except Exception as error:  # recorded on the job by the flow; go on with the next model
                log.warning("nightly job %s (%s) failed: %s", job_id, recipe.model, error)
                outcomes[job_id] = "failed"
    finally:
        orchestrator.close()
    return outcomes


def serve_nightly(zoo_path: str) -> None:
    """Serve the nightly flow as a Prefect deployment on the zoo's cron schedule (blocks)."""
    zoo, _ = load_zoo(zoo_path)
    nightly.serve(name=zoo.name, cron=zoo.cron, parameters={"zoo_path": str(Path(zoo_path).resolve())})
