"""The model zoo file: which models the nightly compresses with which recipes, and what counts as worse.

Sample (paths are relative to the zoo file)::

    name: platform-zoo
    cron: "0 2 * * *"                 # every night at 02:00 UTC
    webhook: https://hooks.slack.com/services/T000/B000/XXXX   # optional, Slack-compatible
    owner: platform-team               # default owner of every job (default: local)
    tolerances:                        # defaults: perplexity "+2%", kernel_speedup "-5%", model_size_bytes "+1%"
      perplexity: "+2%"                # "+": higher is worse; "-": lower is worse
      kernel_speedup: {worse: lower, relative: 0.05}   # matches every kernel_speedup.<shape>.<tokens>
    recipes: [recipes/wanda-50.yaml]   # for models that list none of their own
    models:
      - builtin:smollm2-135m           # shorthand: the zoo's recipes, the zoo's owner
      - model: HuggingFaceTB/SmolLM2-360M-Instruct
        recipes:
          - recipes/wanda-50.yaml
          - {name: sparsegpt-24, stages: [{stage: calibrate}, {stage: prune, method: sparsegpt, pattern: "2:4"}]}
        owner: alice
        calibration: ./data/support-tickets.txt   # per-model overrides of the recipes' data
        evaluation: builtin:enwiki

Models are hub ids, local paths (`./` and `../` are relative to the zoo file), `builtin:` or
`artifact:` references. Today's older shape, one `recipe` applied to a list of model strings, is still
read. Every (model, recipe) pair becomes its own job each night; a pair is known across nights by its
model reference and recipe name. Errors raise `RecipeError` naming the field (`models[1].recipes[0]: ...`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.recipe import (
    MAX_RECIPE_FILE_BYTES,
    Recipe,
    RecipeError,
    Ref,
    bounded_str,
    load_recipe,
    parse_recipe,
)

MAX_MODELS = 1000
MAX_RECIPES = 64
DEFAULT_OWNER = "local"  # the owner of every job on a service without API tokens (api.deps), as `sparseflow run`
_PERCENT = re.compile(r"\s*([+-])\s*(\d+(?:\.\d+)?)\s*%\s*")
ZooName = bounded_str(100, 1)
Owner = bounded_str(100, 1)
MetricName = bounded_str(200, 1)


def _recipe_entry(value: Any) -> str | dict[str, Any]:
    if isinstance(value, str) and value and "\x00" not in value:
        return value
    if isinstance(value, dict):
        return value
    raise ValueError(f"a recipe is a file path (relative to the zoo file) or an inline recipe mapping, "
                     f"got {type(value).__name__}")


RecipeEntry = Annotated[Any, AfterValidator(_recipe_entry)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Tolerance(_Strict):
    """How far a metric may move the bad way from the last successful night before it is a regression.

    Written as `"+2%"` (higher is worse, by more than 2% of the old value) or `"-5%"` (lower is worse),
    or as `{worse: higher, relative: 0.02}`.
    """

    worse: Literal["higher", "lower"]
    relative: float = Field(gt=0, le=100, description="Allowed change in the bad direction, as a fraction.")

    @model_validator(mode="before")
    @classmethod
    def _from_percent(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        match = _PERCENT.fullmatch(value)
        if match is None:
            raise ValueError(f"write a tolerance as '+2%' (higher is worse) or '-5%' (lower is worse), got {value!r}")
        return {"worse": "higher" if match.group(1) == "+" else "lower", "relative": float(match.group(2)) / 100}

    def exceeded(self, old: float, new: float) -> bool:
        """True when `new` is worse than `old` by more than the tolerance (relative to |old|)."""
        allowed = self.relative * abs(old)
        return new - old > allowed if self.worse == "higher" else old - new > allowed

    def describe(self) -> str:
        return f"{'+' if self.worse == 'higher' else '-'}{self.relative * 100:g}%"


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "perplexity": Tolerance(worse="higher", relative=0.02),
    "kernel_speedup": Tolerance(worse="lower", relative=0.05),
    "model_size_bytes": Tolerance(worse="higher", relative=0.01),
}


def tolerance_for(metric: str, tolerances: dict[str, Tolerance]) -> tuple[str, Tolerance] | None:
    """The tolerance governing `metric`: its own entry, else the longest `<entry>.` prefix (so that
    `kernel_speedup` covers `kernel_speedup.576x192.16`); None when no entry applies."""
    if metric in tolerances:
        return metric, tolerances[metric]
    prefixes = [key for key in tolerances if metric.startswith(f"{key}.")]
    if not prefixes:
        return None
    key = max(prefixes, key=len)
    return key, tolerances[key]


class ZooModel(_Strict):
    """One model of the zoo and the recipes applied to it."""

    model: Ref
    recipes: list[RecipeEntry] | None = Field(
        None, min_length=1, max_length=MAX_RECIPES, description="Recipe files (relative to the zoo file) or "
        "inline recipe mappings; None: the zoo's `recipes`.",
    )
    owner: Owner | None = Field(None, description="Owner of this model's jobs (default: the zoo's owner).")
    calibration: Ref | None = Field(None, description="Calibration text for this model instead of the recipes'.")
    evaluation: Ref | None = Field(None, description="Evaluation text for this model instead of the recipes'.")


class ZooFile(_Strict):
    """The zoo file as written; `load_zoo` turns it into runnable (model, recipe) pairs."""

    name: ZooName = "nightly"
    cron: bounded_str(100, 1) = "0 2 * * *"
    webhook: AnyHttpUrl | None = Field(None, description="Slack-compatible incoming webhook for the night's summary.")
    owner: Owner | None = Field(None, description=(
        "Default owner of the jobs (default: local, the owner of every job on a service without API tokens)."))
    tolerances: dict[MetricName, Tolerance] = Field(default_factory=dict, max_length=256)
    recipe: RecipeEntry | None = Field(None, description="Older shape: one recipe for every model.")
    recipes: list[RecipeEntry] | None = Field(None, min_length=1, max_length=MAX_RECIPES)
    models: list[ZooModel] = Field(min_length=1, max_length=MAX_MODELS)

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """A bare string is a model with the zoo's recipes and owner."""
        if isinstance(value, list):
            return [{"model": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("name")
    @classmethod
    def _url_safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names the zoo in URLs), starting alphanumeric")
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule  # the deployment's own check

        try:
            CronSchedule(cron=value)
        except ValidationError as error:
            raise ValueError(f"not a cron schedule Prefect accepts: {value!r}") from error
        return value

    @field_validator("webhook")
    @classmethod
    def _http_only(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is not None and value.scheme not in ("http", "https"):
            raise ValueError("must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _one_recipe_list(self) -> ZooFile:
        if self.recipe is not None and self.recipes is not None:
            raise ValueError("give either `recipe` (one for every model) or `recipes`, not both")
        return self


@dataclass(frozen=True)
class Pair:
    """One (model, recipe) of the zoo: a job each night."""

    model: str
    recipe_name: str
    recipe: Recipe
    owner: str
    key: str
    field: str

    def job_recipe(self, zoo: str, day: str) -> Recipe:
        """The recipe of tonight's job, named `<zoo>-<model>-<recipe>-<day>`."""
        short = self.model.split(":")[-1].rstrip("/").split("/")[-1] or "model"
        name = f"{zoo}-{short}-{self.recipe_name}"[: 200 - len(day) - 1] + f"-{day}"
        return self.recipe.model_copy(update={"name": name})


@dataclass(frozen=True)
class Zoo:
    """A validated zoo: its settings, the tolerances in force (defaults merged) and every pair."""

    path: Path
    spec: ZooFile
    tolerances: dict[str, Tolerance]
    pairs: list[Pair]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def cron(self) -> str:
        return self.spec.cron

    @property
    def webhook(self) -> str | None:
        return None if self.spec.webhook is None else str(self.spec.webhook)


def pair_key(model: str, recipe_name: str) -> str:
    """What makes a pair the same pair on another night: its model reference and recipe name."""
    return hashlib.sha256(json.dumps([model, recipe_name]).encode()).hexdigest()[:40]


def load_zoo(path: str | Path) -> Zoo:
    """Read and validate a zoo file and every recipe it names; `RecipeError` names the bad field."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"model zoo file not found: {path}")
    if path.stat().st_size > MAX_RECIPE_FILE_BYTES:
        raise RecipeError(f"{path}: zoo file is larger than {MAX_RECIPE_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
        raise RecipeError(f"{path}: not a readable YAML zoo file: {error}") from error
    try:
        return parse_zoo(data, base_dir=path.resolve().parent, path=path)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}", error.errors) from error


def parse_zoo(data: Any, *, base_dir: Path, path: Path | None = None) -> Zoo:
    """Validate a zoo mapping whose relative paths are relative to `base_dir`."""
    if not isinstance(data, dict):
        raise RecipeError(f"a zoo file must be a mapping, got {type(data).__name__}")
    try:
        spec = ZooFile.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format(error), error.errors(include_url=False)) from error
    loader = _RecipeLoader(base_dir)
    default_entries, default_field = (
        ([spec.recipe], "recipe") if spec.recipe is not None else (spec.recipes, "recipes")
    )
    owner = spec.owner or DEFAULT_OWNER
    pairs: list[Pair] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(spec.models):
        entry = item
        field = f"models[{i}]"
        if entry.recipes is not None:
            entries, where = entry.recipes, f"{field}.recipes"
        elif default_entries is not None:
            entries, where = default_entries, default_field
        else:
            raise RecipeError(f"{field}.recipes: no recipes: list them here or in the zoo's `recipes`")
        model = _local(entry.model, base_dir)
        for j, raw in enumerate(entries):
            recipe_field = where if where == "recipe" else f"{where}[{j}]"
            name, recipe = loader.load(raw, recipe_field)
            applied = _apply(recipe, model, entry, base_dir, field)
            key = pair_key(model, name)
            if key in seen:
                raise RecipeError(f"{field}: model {model!r} with recipe {name!r} is already listed at {seen[key]}; "
                                  "a pair is known by its model and recipe name, give the recipe another name")
            seen[key] = field
            where_pair = recipe_field if recipe_field.startswith(field) else f"{field} with {recipe_field}"
            pairs.append(Pair(model=model, recipe_name=name, recipe=applied, owner=entry.owner or owner, key=key,
                              field=where_pair))
    tolerances = {**DEFAULT_TOLERANCES, **spec.tolerances}
    return Zoo(path=path or base_dir / "zoo.yaml", spec=spec, tolerances=tolerances, pairs=pairs)


class _RecipeLoader:
    """Loads each recipe file once; names a recipe by its own `name`, else its file name."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self._files: dict[Path, Recipe] = {}

    def load(self, raw: RecipeEntry, field: str) -> tuple[str, Recipe]:
        try:
            if isinstance(raw, str):
                file = (self.base_dir / raw).resolve()
                if file not in self._files:
                    self._files[file] = load_recipe(file)
                recipe = self._files[file]
                named = "name" in recipe.model_fields_set
                return (recipe.name if named else Path(raw).stem), recipe
            recipe = parse_recipe(raw)
        except RecipeError as error:
            raise RecipeError(f"{field}: {error}", error.errors) from error
        if "name" not in recipe.model_fields_set and field != "recipe":  # the older shape's one recipe may be unnamed
            raise RecipeError(f"{field}.name: an inline recipe needs a name (it tells the pair apart across nights)")
        return recipe.name, recipe


def _apply(recipe: Recipe, model: str, entry: ZooModel, base_dir: Path, field: str) -> Recipe:
    """The recipe with the zoo's model and the model's data overrides, validated again as a whole."""
    data = recipe.data.model_dump()
    for key in ("calibration", "evaluation"):
        value = getattr(entry, key)
        if value is not None:
            data[key] = _local(value, base_dir)
    try:
        return parse_recipe({**recipe.model_dump(mode="json"), "model": model, "data": data})
    except RecipeError as error:
        raise RecipeError(f"{field}: {error}", error.errors) from error


def _local(ref: str, base_dir: Path) -> str:
    """`./x` and `../x` are paths relative to the zoo file; every other reference is kept as written."""
    if ref.startswith(("./", "../")):
        return str((base_dir / ref).resolve())
    return ref


def _format(error: ValidationError) -> str:
    """Field paths as a reader writes them: `models[1].recipes[0]`, not `models.1.ZooModel.recipes.0`."""
    parts = []
    for item in error.errors():
        loc = ""
        for part in item["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc += f".{str(part)[:100]}" if loc else str(part)[:100]
        parts.append(f"{loc or 'zoo'}: {item['msg']}")
    return "; ".join(parts)


__all__ = ["DEFAULT_TOLERANCES", "Pair", "Tolerance", "Zoo", "ZooFile", "ZooModel", "load_zoo", "pair_key", "parse_zoo",
           "tolerance_for"]
