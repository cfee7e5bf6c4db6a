"""Building blocks shared by every recipe model: bounds, bounded strings, the strict base, resources.

They live apart from `pipelines.recipe` so that a stage's spec in its own module (the prune stage's,
`pipelines.prune_spec`) and the recipe that lists every stage can both import them without a cycle.
`pipelines.recipe` re-exports all of them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# Bounds on what a recipe may ask for. They are far beyond any real job, and exist so that a recipe can
# neither make the store hold megabytes per job nor ask a stage for a count that overflows later.
MAX_SEED = 2**32 - 1  # numpy and torch seed generators take 32 bits
MAX_SEQ_LEN = 1 << 20  # tokens per sequence
MAX_SAMPLES = 1 << 20  # sequences, windows
MAX_STEPS = 10_000_000  # optimizer steps, repeats
MAX_BATCH = 1 << 16
MAX_LIST = 256  # items of any list but `stages`
MAX_STAGES = 64
MAX_REF = 4096  # a model or data reference: hub id, path, builtin:, dataset: or artifact: reference
MAX_PATTERN = 512  # a module-name pattern in `targets` / `ignore`
MAX_NUM_GPUS = 64  # one stage runs on one node
MAX_NUM_CPUS = 4096
MAX_MEMORY_GB = 16384
MAX_RECIPE_FILE_BYTES = 1 << 20  # like the API's default request limit
MAX_SLEEP_S = 3600.0  # the stand-in `sleep` stage: an hour is beyond any benchmark's need
NUL_FREE = r"^[^\x00]*$"


def _no_nul(value: str) -> str:
    # PostgreSQL's text types cannot store NUL, and no path, hub id or name contains one
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    return value


def bounded_str(max_length: int, min_length: int = 0) -> Any:
    """A str type of bounded length without NUL characters (the OpenAPI schema shows both)."""
    return Annotated[
        str,
        StringConstraints(min_length=min_length, max_length=max_length),
        AfterValidator(_no_nul),
        Field(json_schema_extra={"pattern": NUL_FREE}),
    ]


Ref = bounded_str(MAX_REF, 1)
ModulePattern = bounded_str(MAX_PATTERN, 1)


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the field and the reason."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class _Strict(BaseModel):
    # allow_inf_nan=False: NaN or Infinity in any number is an error naming the field, never a crash later
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Resources(_Strict):
    """What one stage asks of the cluster; passed to Ray's `.options()` at call time."""

    num_cpus: float | None = Field(
        None, gt=0, le=MAX_NUM_CPUS, description="CPUs for the stage; None takes a whole node's."
    )
    num_gpus: float = Field(0.0, ge=0, le=MAX_NUM_GPUS, description="GPUs for the stage, all on one node.")
    memory_gb: float | None = Field(None, gt=0, le=MAX_MEMORY_GB, description="Memory reserved for the stage.")


class _StageBase(_Strict):
    resources: Resources = Resources()
    store_inputs: ClassVar[tuple[str, ...]] = ()
    """Inputs the service's store serves to this stage (by kind) besides the outputs of earlier stages."""
    resumable: ClassVar[bool] = False
    """Writes checkpoints that a retried attempt resumes from (so the worker publishes and looks for them)."""
