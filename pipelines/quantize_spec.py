"""The quantize stage's recipe: FP8 E4M3 weights and activations after pruning and fine-tuning.

One scheme today, `fp8_dynamic` (compressed-tensors' FP8_DYNAMIC preset): weights with one scale per
output channel, activations quantized per token at run time; `activations: static` instead fixes one
input scale per Linear from the calibration tokens (it needs a calibrate stage before it). `scheme` is
a Literal so that other schemes can be added beside it. Sample::

    - stage: quantize
      scheme: fp8_dynamic
      activations: dynamic       # or static: per-tensor input scales from the calibration data
      weight_rounding: nearest   # or gptq: error-compensated rounding on the calibration data
      act_order: true            # gptq: columns by decreasing Hessian diagonal
      targets: ["re:.*\\.(self_attn|mlp)\\.\\w+_proj$"]   # the default: every decoder Linear
      ignore: [lm_head]

Torch-free, like `pipelines.prune_spec`, so the API can validate recipes without loading torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.recipe_base import MAX_BATCH, MAX_LIST, ModulePattern, _StageBase

QUANTIZE_SCHEMES = ("fp8_dynamic",)


class QuantizeStage(_StageBase):
    """FP8 E4M3 quantization of the decoder Linears; the zeros of a pruned model stay exactly zero."""

    stage: Literal["quantize"] = "quantize"
    scheme: Literal["fp8_dynamic"] = Field(
        "fp8_dynamic", description="fp8_dynamic: E4M3 weights, one scale per output channel, and E4M3 inputs."
    )
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: one input scale per token, computed at run time; static: one per Linear, "
        "fixed from the calibration tokens (needs a calibrate stage before this one).",
    )
    targets: list[ModulePattern] = Field(
        default_factory=lambda: [r"re:.*\.(self_attn|mlp)\.\w+_proj$"], max_length=MAX_LIST
    )
    ignore: list[ModulePattern] = Field(
        default_factory=lambda: ["lm_head", r"re:.*embed_tokens$"], max_length=MAX_LIST
    )
    weight_rounding: Literal["nearest", "gptq"] = Field(
        "nearest", description="nearest: each weight to its nearest E4M3 value; gptq: column by column, each "
        "rounding error spread over the columns not yet rounded through the inverse Hessian of the calibration "
        "inputs (as SparseGPT prunes; the zeros stay zero). gptq needs a calibrate stage before this one.",
    )
    block_size: int = Field(128, ge=1, le=MAX_BATCH, description="gptq: columns per lazy update block.")
    dampening: float = Field(0.01, gt=0.0, le=1e6, description="gptq: diagonal damping, fraction of mean diag.")
    act_order: bool = Field(
        True, description="gptq: round the columns by decreasing Hessian diagonal (GPTQ's act-order), so the "
        "inputs that matter most are rounded while the rest can still absorb their errors.",
    )
    batch_size: int = Field(
        4, ge=1, le=MAX_BATCH, description="Calibration sequences per forward pass (static activations, gptq)."
    )
    export: Literal["float-quantized", "sparse-24-bitmask", "none"] = Field(
        "float-quantized", description="The compressed-tensors copy (`compressed_model`): float-quantized (FP8 "
        "codes in place, the 2:4 structure recorded in the sparsity config; stock transformers and "
        "compressed-tensors load it), sparse-24-bitmask (codes packed 2:4, 0.625 bytes a weight; only "
        "sparseflow's loader reads it), or none.",
    )

    @property
    def needs_calibration(self) -> bool:
        """Static input scales are observed on the calibration tokens; GPTQ measures its Hessians on them."""
        return self.activations == "static" or self.weight_rounding == "gptq"

    @property
    def calibration_reason(self) -> str:
        """What in this spec reads calibration tokens, as the recipe spells it (for error messages)."""
        return "weight_rounding 'gptq'" if self.weight_rounding == "gptq" else "activations 'static'"


def check_quantize_order(kinds: list[str]) -> None:
    """Quantize comes after every prune and finetune, and only once (an FP8 model is not quantized again).

    Raises ValueError naming both stages: pruning or training after quantize would move weights off the
    FP8 grid that the scales describe.
    """
    if "quantize" not in kinds:
        return
    q = kinds.index("quantize")
    again = next((j for j in range(q + 1, len(kinds)) if kinds[j] == "quantize"), None)
    if again is not None:
        raise ValueError(f"stages.{again}: a second 'quantize' (the first is stages.{q}); quantize once")
    later = next((j for j in range(q + 1, len(kinds)) if kinds[j] in ("prune", "finetune")), None)
    if later is not None:
        raise ValueError(
            f"stages.{q}: 'quantize' comes before the {kinds[later]!r} at stages.{later}; "
            f"{kinds[later]} changes the weights, so quantize must come after it"
        )
