"""The prune stage's recipe: one class per method, chosen by `method` (a discriminated union).

Each method's class accepts only its own settings, so SparseGPT's `block_size` on a Wanda stage is an
error that names the field, never a knob silently ignored. The pattern is parsed at validation:
`"2:4"` becomes `spec.nm == (2, 4)`. An N:M pattern fixes the sparsity at 1 - N/M, so `sparsity`
beside one is an error naming both fields. Samples::

    - stage: prune
      method: sparsegpt          # block_size, dampening, act_order, damping_retries are SparseGPT's
      pattern: "2:4"
      block_size: 128
    - stage: prune
      method: wanda              # the default method
      sparsity: 0.6
      profile: owl
    - stage: prune
      method: magnitude          # needs no calibrate stage (unless profile: owl) and runs no forward pass
      sparsity: 0.3

Error locations stay `stages.<i>.prune.<field>` whatever the method: the method is not a level of its own.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipelines.recipe_base import MAX_BATCH, MAX_LIST, ModulePattern, _StageBase, bounded_str

DEFAULT_SPARSITY = 0.5
DEFAULT_METHOD = "wanda"


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"N:M"` -> (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", pattern)
    if not match:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


class PruneStage(_StageBase):
    """Settings every prune method shares; a recipe gets one of the per-method classes below.

    Build one from a mapping with `prune_stage(method=..., ...)`; this base is not built directly.
    `profile: owl` gives layers with more activation outliers less sparsity (OWL), same average.
    """

    stage: Literal["prune"] = "prune"
    method: str
    sparsity: float | None = Field(
        None, ge=0.0, lt=1.0, description=f"Fraction of each row's weights to drop (default {DEFAULT_SPARSITY}). "
        "Only for the unstructured pattern: N:M fixes it at 1 - N/M.",
    )
    pattern: bounded_str(32, 1) = Field(
        "unstructured", description="'unstructured', or 'N:M': keep N of every M consecutive input weights."
    )
    profile: Literal["uniform", "owl"] = "uniform"
    owl_lambda: float = Field(0.08, ge=0.0, lt=1.0, description="OWL: max deviation from the mean sparsity.")
    owl_threshold: float = Field(5.0, gt=0.0, le=1e6, description="OWL: outlier if |act| > M x mean.")
    targets: list[ModulePattern] = Field(
        default_factory=lambda: [r"re:.*\.(self_attn|mlp)\.\w+_proj$"], max_length=MAX_LIST
    )
    ignore: list[ModulePattern] = Field(
        default_factory=lambda: ["lm_head", r"re:.*embed_tokens$"], max_length=MAX_LIST
    )
    batch_size: int = Field(
        4, ge=1, le=MAX_BATCH, description="Calibration sequences per forward pass of a decoder layer."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Dtype the model is loaded and run in; statistics are always fp32."
    )
    export: Literal["auto", "none", "sparse-bitmask", "sparse-24-bitmask"] = Field(
        "auto", description="Also write a compressed-tensors copy (auto: sparse-24-bitmask for 2:4)."
    )
    streaming: bool | Literal["auto"] = Field(
        "auto", description="Stream the model from its safetensors checkpoint one decoder layer at a time and "
        "write the pruned copy shard by shard, never holding the whole model (pipelines/pruning/streaming.py). "
        "auto: stream when the weights at `dtype` exceed `host_memory_gb`. Streaming writes no compressed copy "
        "(`export` is then 'none').",
    )
    host_memory_gb: float | None = Field(
        None, gt=0.0, le=1e6, description="For streaming 'auto': the host memory (GB, 1e9 bytes) the model's "
        "weights may take in memory; above it the model is streamed. Default: half the memory available when "
        "the stage starts.",
    )
    needs_calibration_data: ClassVar[bool] = True
    """Whether the method itself runs the calibration tokens through the model."""
    _nm: tuple[int, int] | None = PrivateAttr(None)

    @property
    def nm(self) -> tuple[int, int] | None:
        """The pattern as (N, M), None when unstructured; parsed once, at validation."""
        return self._nm

    @property
    def target_sparsity(self) -> float:
        """The sparsity asked for: 1 - N/M for an N:M pattern, else `sparsity` (default 0.5)."""
        if self._nm is not None:
            return 1.0 - self._nm[0] / self._nm[1]
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    @property
    def needs_calibration(self) -> bool:
        """Whether the stage reads calibration tokens: the method needs them, or the OWL profile does."""
        return self.needs_calibration_data or self.profile == "owl"

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        nm = parse_pattern(value)
        return "unstructured" if nm is None else f"{nm[0]}:{nm[1]}"

    @model_validator(mode="after")
    def _check_combination(self) -> PruneStage:
        if type(self) is PruneStage:
            raise TypeError("PruneStage is the base of the per-method specs; use prune_stage(method=..., ...)")
        self._nm = parse_pattern(self.pattern)
        if self._nm is not None and self.sparsity is not None:
            raise ValueError(
                f"sparsity and pattern: pattern {self.pattern!r} fixes the sparsity at {self.target_sparsity:g}; "
                f"leave sparsity out (got {self.sparsity:g})"
            )
        if self._nm is not None and self.profile == "owl":
            raise ValueError("profile 'owl' varies sparsity per layer and cannot be combined with N:M")
        low, high = self.target_sparsity - self.owl_lambda, self.target_sparsity + self.owl_lambda
        if self.profile == "owl" and not (low >= 0.0 and high < 1.0):
            raise ValueError(
                f"owl_lambda: sparsity {self.target_sparsity} +/- owl_lambda {self.owl_lambda} must stay within [0, 1)"
            )
        if self.host_memory_gb is not None and self.streaming != "auto":
            raise ValueError("host_memory_gb and streaming: host_memory_gb only decides streaming 'auto'; "
                             f"streaming is {str(self.streaming).lower()}")
        if self.streaming is True and self.export not in ("auto", "none"):
            raise ValueError(f"export and streaming: a streamed model gets no compressed copy; set export 'none' "
                             f"or 'auto' (got {self.export!r})")
        if self.export == "sparse-24-bitmask" and self._nm != (2, 4):
            raise ValueError(f"export: 'sparse-24-bitmask' needs pattern '2:4', got {self.pattern!r}")
        return self


class _LayerwiseCalibrated(PruneStage):
    """Settings of the methods that measure each layer's inputs on calibration tokens."""

    sequential: bool = Field(
        True, description="Feed each layer the outputs of the already pruned layers (False: dense outputs)."
    )
    within_layer: bool | None = Field(
        None, description="Inside a layer too: o_proj is calibrated on the pruned q/k/v's outputs, down_proj on the "
        "pruned gate/up's (one more forward of the layer per group). None: on for sparsegpt (whose weight updates "
        "use it, as GPTQ's true-sequential does) and for wanda with an unstructured pattern, off for wanda N:M. "
        "On SmolLM2-135M, over three calibration seeds, it lowered Wanda 50% unstructured perplexity every time "
        "(by 0.36-1.13) and raised Wanda 2:4's every time (by 2.0-13.4).",
    )

    @property
    def calibrate_within_layer(self) -> bool:
        """`within_layer` resolved; None takes the method's default (`_within_layer_default`)."""
        return self._within_layer_default() if self.within_layer is None else self.within_layer

    def _within_layer_default(self) -> bool:
        raise NotImplementedError


class SparseGPTPrune(_LayerwiseCalibrated):
    """SparseGPT: prune with second-order (OBS) updates of the kept weights, from each input's x xᵀ."""

    method: Literal["sparsegpt"] = "sparsegpt"
    block_size: int = Field(128, ge=1, le=MAX_BATCH, description="Columns per lazy update block.")
    dampening: float = Field(0.01, gt=0.0, le=1e6, description="Diagonal damping, fraction of mean diag.")
    act_order: bool | None = Field(
        None, description="Visit columns (N:M: whole groups) by decreasing Hessian diagonal, as GPTQ does. "
        "None: on for N:M (every group must drop M-N weights, so the heaviest groups are decided first, before "
        "errors pile onto them), off for unstructured (measured worse there).",
    )
    damping_retries: int = Field(4, ge=0, le=12, description="Times to retry a failed Cholesky with 10x more damping.")

    @property
    def use_act_order(self) -> bool:
        """`act_order` resolved: None means on for N:M patterns, off for unstructured."""
        return self.nm is not None if self.act_order is None else self.act_order

    def _within_layer_default(self) -> bool:
        return True  # the weight updates compensate for the inputs each Linear will really see


class WandaPrune(_LayerwiseCalibrated):
    """Wanda: score |W| times each input column's norm, drop the lowest of each row (or group of M)."""

    method: Literal["wanda"] = "wanda"

    def _within_layer_default(self) -> bool:
        """On for unstructured, off for N:M.

        Wanda's reference implementation measures a layer once, with the layer dense. Re-measuring
        o_proj's and down_proj's inputs after q/k/v and gate/up are pruned matches them to the model
        they will really see; with a free choice of which half of a row to drop that helped on every
        seed measured, while under N:M (every group of M must lose M-N whatever its scores) it hurt
        on every seed (`bench/results/pruning_quality_wanda_seed*.json`, docs/compression.md).
        """
        return self.nm is None


class MagnitudePrune(PruneStage):
    """Magnitude: drop the smallest |W| of each row (or group of M); reads no calibration data."""

    method: Literal["magnitude"] = "magnitude"
    needs_calibration_data: ClassVar[bool] = False


PRUNE_METHODS: dict[str, type[PruneStage]] = {
    "sparsegpt": SparseGPTPrune,
    "wanda": WandaPrune,
    "magnitude": MagnitudePrune,
}
_OWNERS = {
    field: [m for m, cls in PRUNE_METHODS.items() if field in cls.model_fields]
    for cls in PRUNE_METHODS.values()
    for field in cls.model_fields
}


def _method_of(value: Any) -> str | None:
    if isinstance(value, dict):
        method = value.get("method", DEFAULT_METHOD)
        return method if isinstance(method, str) else None
    return getattr(value, "method", None)


def _errors_at_stage(value: Any, handler: Any) -> PruneStage:
    """Validate, reporting errors at `prune.<field>` (without the method's tag), and extra keys with the
    methods they belong to."""
    try:
        return handler(value)
    except ValidationError as error:
        line_errors = []
        for item in error.errors():
            loc, kind = tuple(item["loc"]), item["type"]
            method = loc[0] if loc and loc[0] in PRUNE_METHODS else None
            if method is not None:
                loc = loc[1:]
            if kind == "prune_method":  # a custom type: from_exception_data takes it only as an error object
                loc, kind = ("method",), PydanticCustomError(kind, item["msg"])
            if kind == "extra_forbidden" and method is not None and len(loc) == 1:
                owners = _OWNERS.get(str(loc[0]), [])
                where = f"; it is a setting of {' and '.join(owners)}" if owners else ""
                kind = PydanticCustomError("extra_forbidden", f"not a setting of method {method!r}{where}")
            line = {"type": kind, "loc": loc, "input": item["input"]}
            if "ctx" in item and not isinstance(kind, PydanticCustomError):
                line["ctx"] = item["ctx"]
            line_errors.append(line)
        raise ValidationError.from_exception_data(error.title, line_errors) from None


PruneSpec = Annotated[
    Annotated[SparseGPTPrune, Tag("sparsegpt")] | Annotated[WandaPrune, Tag("wanda")]
    | Annotated[MagnitudePrune, Tag("magnitude")],
    Discriminator(
        _method_of,
        custom_error_type="prune_method",
        custom_error_message=f"method must be one of {', '.join(repr(m) for m in PRUNE_METHODS)}",
    ),
    WrapValidator(_errors_at_stage),
]
"""The prune stage as a recipe lists it: the class is chosen by `method` (default 'wanda')."""



@cache
def _adapter() -> TypeAdapter[PruneStage]:
    return TypeAdapter(PruneSpec)


def prune_stage(**fields: Any) -> PruneStage:
    """A validated prune spec of the class that `method` names (default 'wanda'); errors name the field."""
    return _adapter().validate_python({"stage": "prune", **fields})
