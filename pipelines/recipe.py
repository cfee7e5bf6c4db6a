"""The recipe: what a compression job does, as validated data.

A recipe names the model, the text used for calibration and evaluation, and an ordered list of
stages. Every model forbids unknown keys, so a typo is an error that names the field rather than a
setting silently ignored. Sample::

    name: smollm2-wanda-50
    model: builtin:smollm2-135m        # or an HF hub id, or a local directory
    data:
      calibration: builtin:enwiki      # or a local .txt file / directory of .txt files
      evaluation: builtin:enwiki
    seed: 0
    stages:
      - stage: calibrate
        samples: 32
        seq_len: 256
      - stage: prune                   # one class per method: pipelines/prune_spec.py
        method: wanda                  # or sparsegpt, magnitude
        sparsity: 0.5                  # or, instead of sparsity, pattern: "2:4" (any "N:M")
      - stage: finetune
        steps: 20
      - stage: quantize                # FP8: pipelines/quantize_spec.py
        scheme: fp8_dynamic
      - stage: evaluate
      - stage: kernel_tune
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipelines.prune_spec import (
    DEFAULT_SPARSITY,
    PRUNE_METHODS,
    MagnitudePrune,
    PruneSpec,
    PruneStage,
    SparseGPTPrune,
    WandaPrune,
    parse_pattern,
    prune_stage,
)
from pipelines.quantize_spec import QUANTIZE_SCHEMES, QuantizeStage, check_quantize_order
from pipelines.recipe_base import (
    MAX_BATCH,
    MAX_LIST,
    MAX_MEMORY_GB,
    MAX_NUM_CPUS,
    MAX_NUM_GPUS,
    MAX_PATTERN,
    MAX_RECIPE_FILE_BYTES,
    MAX_REF,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_SLEEP_S,
    MAX_STAGES,
    MAX_STEPS,
    NUL_FREE,
    ModulePattern,
    RecipeError,
    Ref,
    Resources,
    _StageBase,
    _Strict,
    bounded_str,
)

__all__ = [
    "DEFAULT_SPARSITY", "MAX_BATCH", "MAX_LIST", "MAX_MEMORY_GB", "MAX_NUM_CPUS", "MAX_NUM_GPUS", "MAX_PATTERN",
    "MAX_RECIPE_FILE_BYTES", "MAX_REF", "MAX_SAMPLES", "MAX_SEED", "MAX_SEQ_LEN", "MAX_SLEEP_S", "MAX_STAGES",
    "MAX_STEPS", "NUL_FREE", "PRUNE_METHODS", "ActivationProfileStage", "CalibrateStage", "DataSpec",
    "EvaluateStage", "FinetuneStage", "KernelTuneStage", "MagnitudePrune", "ModulePattern", "PruneSpec",
    "PruneStage", "QUANTIZE_SCHEMES", "QuantizeStage", "Recipe", "RecipeError", "Ref", "Resources", "SleepStage",
    "SparseGPTPrune", "StageSpec", "WandaPrune", "bounded_str", "format_validation_error", "load_recipe",
    "parse_pattern", "parse_recipe", "prune_stage",
]


class DataSpec(_Strict):
    """Where calibration and evaluation text come from.

    `builtin:enwiki` is the Wikipedia excerpt shipped with the project's dependencies; it is split by
    article into a calibration part and a held-out evaluation part that never overlap.
    """

    calibration: Ref = "builtin:enwiki"
    evaluation: Ref = "builtin:enwiki"


class CalibrateStage(_StageBase):
    """Draw calibration token windows; optionally record per-Linear input statistics of the dense model."""

    stage: Literal["calibrate"] = "calibrate"
    samples: int = Field(32, ge=1, le=MAX_SAMPLES, description="Number of calibration sequences.")
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN, description="Tokens per calibration sequence.")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    input_norms: bool = Field(
        False, description="Also record each decoder Linear's input sum of squares on the dense model (one "
        "forward pass over the samples). No stage reads them: the prune stage measures every layer itself, "
        "on the outputs of the layers already pruned.",
    )


class FinetuneStage(_StageBase):
    """Masked fine-tuning: pruned weights stay exactly zero; optional distillation from the dense model.

    Defaults follow bench/finetune_recovery.py (SmolLM2-135M, SparseGPT 2:4, 48 steps of 2 x 256 tokens):
    lr 1e-4 recovered 53% of the pruning gap; CE alone matched CE+KD at that budget (49.58 vs 49.83
    held-out perplexity) at 72% of its time, so distillation is opt-in (`beta_kd`).
    """

    resumable: ClassVar[bool] = True
    stage: Literal["finetune"] = "finetune"
    steps: int = Field(20, ge=0, le=MAX_STEPS)
    lr: float = Field(1e-4, gt=0, le=10.0)
    warmup_steps: int = Field(2, ge=0, le=MAX_STEPS)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN)
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH)
    weight_decay: float = Field(0.0, ge=0, le=1e3)
    alpha_ce: float = Field(1.0, ge=0, le=1e6, description="Weight of the cross-entropy loss.")
    beta_kd: float = Field(
        0.0, ge=0, le=1e6, description="Weight of T^2 KL(dense teacher || student); 0 turns KD off."
    )
    temperature: float = Field(2.0, gt=0, le=1e3)
    checkpoint_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="Save a resumable checkpoint every N steps (0: never)."
    )
    max_grad_norm: float = Field(1.0, ge=0, le=1e6, description="Clip the global gradient norm (0: no clipping).")
    gamma_hidden: float = Field(
        0.0, ge=0, le=1e6, description="Weight of the per-layer hidden-state MSE to the teacher."
    )
    teacher_topk: int = Field(
        0, ge=0, le=1 << 24, description="Distil from the teacher's top-k logits only (0: all)."
    )
    teacher_cache: bool = Field(False, description="Cache teacher logits on disk, once per model and data.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on CUDA, else fp32.")
    gradient_checkpointing: bool = False
    lora_rank: int = Field(
        0, ge=0, le=1 << 16, description="Train rank-r LoRA on the kept weights, merged at the end (0: full)."
    )
    lora_alpha: float = Field(16.0, gt=0, le=1e6, description="LoRA scale is lora_alpha / lora_rank.")

    @model_validator(mode="after")
    def _check_loss(self) -> FinetuneStage:
        if self.steps > 0 and self.alpha_ce == 0 and self.beta_kd == 0 and self.gamma_hidden == 0:
            raise ValueError("alpha_ce, beta_kd and gamma_hidden are all 0: the loss would be zero")
        if self.teacher_cache and self.gamma_hidden > 0:
            raise ValueError("teacher_cache stores logits only; gamma_hidden > 0 needs the live teacher")
        if self.teacher_cache and self.beta_kd == 0:
            raise ValueError("teacher_cache is set but beta_kd is 0: there is no teacher to cache")
        return self


class EvaluateStage(_StageBase):
    """Held-out perplexity, sparsity per layer and in total, parameter count and size on disk."""

    stage: Literal["evaluate"] = "evaluate"
    seq_len: int = Field(1024, ge=8, le=MAX_SEQ_LEN, description="Tokens per perplexity window.")
    max_windows: int | None = Field(48, ge=1, le=MAX_SAMPLES, description="Cap on evaluation windows (None: all).")
    batch_size: int = Field(2, ge=1, le=MAX_BATCH)
    compare_dense: bool = Field(True, description="Also measure the job's original dense model.")


class KernelTuneStage(_StageBase):
    """Per Linear shape, time dense vs 2:4 sparse kernels on the GPU and write a kernel plan."""

    stage: Literal["kernel_tune"] = "kernel_tune"
    store_inputs: ClassVar[tuple[str, ...]] = ("kernel_cache",)
    tokens: list[Annotated[int, Field(le=MAX_SEQ_LEN)]] = Field(
        default_factory=lambda: [1, 16, 512, 2048], max_length=MAX_LIST
    )
    dtype: Literal["float16", "bfloat16"] = "float16"
    repeats: int = Field(50, ge=1, le=MAX_STEPS)

    @field_validator("tokens")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(t < 1 for t in value):
            raise ValueError("tokens must be a non-empty list of positive token counts")
        return value


class ActivationProfileStage(_StageBase):
    """Activation sparsity of the FFNs: perplexity vs sparsity overall and per layer, critical sparsity,
    a per-layer allocation, and optionally a model whose FFNs skip inactive neurons.

    A layer's threshold at sparsity s is the s-quantile of |input of down_proj| on the calibration
    text; held-out perplexity is measured on the evaluation text. Sample::

        - stage: activation_profile
          sparsities: [0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9]
          tolerances: [0.01, 0.05]       # critical sparsity: perplexity up by at most 1%, 5%
          layer_sparsities: [0.5, 0.7, 0.9]
          export: true                   # thresholds in config.json, at the critical sparsity
    """

    stage: Literal["activation_profile"] = "activation_profile"
    sparsities: list[float] = Field(
        default_factory=lambda: [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9], max_length=MAX_LIST,
        description="Uniform activation sparsities measured on all layers at once, each in [0, 1).",
    )
    tolerances: list[float] = Field(
        default_factory=lambda: [0.01, 0.05], max_length=MAX_LIST,
        description="Relative perplexity increases defining critical sparsity.",
    )
    layer_sparsities: list[float] | None = Field(
        None, max_length=MAX_LIST,
        description="Sparsities of the one-layer-at-a-time curves (None: the non-zero `sparsities`).",
    )
    allocate_at: list[float] | None = Field(
        None, max_length=MAX_LIST,
        description="Mean sparsities at which the per-layer allocation is compared to uniform (None: all).",
    )
    samples: int = Field(16, ge=1, le=MAX_SAMPLES, description="Calibration sequences.")
    seq_len: int = Field(256, ge=8, le=MAX_SEQ_LEN, description="Tokens per calibration sequence.")
    eval_seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN, description="Tokens per held-out perplexity window.")
    eval_windows: int = Field(
        16, ge=1, le=MAX_SAMPLES, description="Held-out windows for the uniform and allocated curves."
    )
    layer_samples: int = Field(
        8, ge=1, le=MAX_SAMPLES,
        description="Calibration sequences (the first ones) for the one-layer-at-a-time curves.",
    )
    allocation_max_deviation: float = Field(
        0.1, ge=0.0, le=1.0, description="Per-layer allocation: no layer further than this from the mean sparsity."
    )
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    export: bool = Field(False, description="Also write a model whose config carries per-layer thresholds.")
    export_sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description="Mean sparsity of the export (None: critical sparsity at tolerances[0])."
    )
    export_allocation: Literal["per_layer", "uniform"] = "per_layer"

    @field_validator("sparsities", "layer_sparsities", "allocate_at")
    @classmethod
    def _sparsity_grid(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one sparsity")
        bad = [s for s in value if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"every sparsity must be in [0, 1), got {bad}")
        return sorted(set(value))

    @field_validator("tolerances")
    @classmethod
    def _tolerances(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < t < 10.0 for t in value):
            raise ValueError(f"must be a non-empty list of relative increases in (0, 10), got {value}")
        return value

    @model_validator(mode="after")
    def _check_grid(self) -> ActivationProfileStage:
        if not any(s > 0 for s in self.sparsities):
            raise ValueError("sparsities: needs at least one non-zero sparsity")
        if self.layer_sparsities is not None and not any(s > 0 for s in self.layer_sparsities):
            raise ValueError("layer_sparsities: needs at least one non-zero sparsity")
        top = max(self.layer_sparsities or self.sparsities)
        beyond = [s for s in (self.allocate_at or []) if s > top]
        if beyond:
            raise ValueError(f"allocate_at: {beyond} beyond the largest per-layer sparsity {top}")
        return self


class SleepStage(_StageBase):
    """Stand-in for benchmarks: hold the stage's resources for `seconds`, report progress, write a marker.

    It changes and measures nothing, so it may go anywhere in a recipe.
    """

    stage: Literal["sleep"] = "sleep"
    seconds: float = Field(1.0, ge=0.0, le=MAX_SLEEP_S, description="How long to hold the stage's resources.")


def _stage_of(value: Any) -> str | None:
    if isinstance(value, dict):
        stage = value.get("stage")
        return stage if isinstance(stage, str) else None
    return getattr(value, "stage", None)


# A callable discriminator: with `Field(discriminator="stage")` the JSON schema maps each stage to a $ref,
# which the prune stage (itself a union on `method`) is not, and OpenAPI refuses the mapping.
StageSpec = Annotated[
    Annotated[CalibrateStage, Tag("calibrate")] | Annotated[PruneSpec, Tag("prune")]
    | Annotated[FinetuneStage, Tag("finetune")] | Annotated[EvaluateStage, Tag("evaluate")]
    | Annotated[KernelTuneStage, Tag("kernel_tune")] | Annotated[ActivationProfileStage, Tag("activation_profile")]
    | Annotated[SleepStage, Tag("sleep")] | Annotated[QuantizeStage, Tag("quantize")],
    Discriminator(
        _stage_of, custom_error_type="stage_kind", custom_error_message="'stage' must be one of 'calibrate', "
        "'prune', 'finetune', 'quantize', 'evaluate', 'kernel_tune', 'activation_profile', 'sleep'",
    ),
]


class Recipe(_Strict):
    """A whole compression job."""

    name: bounded_str(200, 1) = "job"
    model: Ref = "builtin:smollm2-135m"
    data: DataSpec = DataSpec()
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seeds data sampling and training (32 bits).")
    reuse_cached: bool = Field(
        True, description="Reuse outputs of an earlier identical stage run (same inputs, parameters, code)."
    )
    max_resumes: int = Field(
        1, ge=0, le=10, description="Times the service resumes this job by itself after its runner died "
        "(a killed worker or API process); finished stages are never recomputed.",
    )
    stages: list[StageSpec] = Field(min_length=1, max_length=MAX_STAGES)

    @model_validator(mode="after")
    def _check_order(self) -> Recipe:
        for i, stage in enumerate(self.stages):
            calibrated = any(s.stage == "calibrate" for s in self.stages[:i])
            if isinstance(stage, PruneStage) and stage.needs_calibration and not calibrated:
                needs = f"method {stage.method!r}" if stage.needs_calibration_data else "profile 'owl'"
                raise ValueError(f"stages.{i}: {needs} needs a 'calibrate' stage before it")
            if isinstance(stage, QuantizeStage) and stage.needs_calibration and not calibrated:
                raise ValueError(f"stages.{i}: {stage.calibration_reason} needs a 'calibrate' stage before it")
        self._check_model_stages_first()
        return self

    def _check_model_stages_first(self) -> None:
        """Prune, finetune and quantize change the model; evaluate and kernel_tune measure the model given.

        A measuring stage placed before a changing one would report on the unpruned model (its perplexity
        shown as the sparse one), so the order is refused rather than guessed. Finetune recovers what
        pruning lost, so when both are present the first finetune follows a prune. Quantize rounds the
        final weights to FP8, so it comes after every prune and finetune (they would train or prune
        weights off the FP8 grid), and at most once.
        """
        kinds = [s.stage for s in self.stages]
        for i, kind in enumerate(kinds):
            if kind not in ("prune", "finetune", "quantize"):
                continue
            measured = next((j for j in range(i) if kinds[j] in ("evaluate", "kernel_tune")), None)
            if measured is not None:
                raise ValueError(
                    f"stages.{i}: {kind!r} comes after the {kinds[measured]!r} at stages.{measured}; "
                    "prune, finetune and quantize must come before evaluate and kernel_tune, which measure the "
                    "final model"
                )
        check_quantize_order(kinds)
        if "prune" in kinds and "finetune" in kinds and kinds.index("finetune") < kinds.index("prune"):
            i, j = kinds.index("finetune"), kinds.index("prune")
            raise ValueError(
                f"stages.{i}: 'finetune' comes before the 'prune' at stages.{j}; "
                "finetune recovers the pruned model's quality, so it must come after prune"
            )


def format_validation_error(error: ValidationError) -> str:
    """One line per problem, each naming the field path (`stages.1.sparsity`) and the reason."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p)[:100] for p in item["loc"]) or "recipe"  # a huge unknown key is cut, not echoed
        parts.append(f"{loc}: {item['msg']}")
    return "; ".join(parts)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe mapping, raising `RecipeError` with a field-naming message."""
    if not isinstance(data, dict):
        raise RecipeError(f"recipe must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(error), error.errors(include_url=False)) from error


def load_recipe(path: str | Path) -> Recipe:
    """Read a YAML or JSON recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    size = path.stat().st_size
    if size > MAX_RECIPE_FILE_BYTES:
        raise RecipeError(f"{path}: recipe file is {size} bytes; the limit is {MAX_RECIPE_FILE_BYTES} bytes")
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"{path}: cannot read the recipe file as UTF-8 text: {error}") from error
    try:
        data = json.loads(content) if path.suffix == ".json" else yaml.safe_load(content)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as error:
        raise RecipeError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    return parse_recipe(data)
