"""Calibrate: draw calibration sequences, and on request record each decoder Linear's input statistics.

The token windows are what later stages read. With `input_norms: true`, for every `nn.Linear` inside
the decoder layers a forward pre-hook also accumulates the per-input-column sum of squares of its
inputs over all calibration tokens (Wanda's ||X_j||^2 before the square root), on the dense model.
That costs a forward pass of the whole model over the samples, and no stage reads them (the prune
stage measures each layer on the outputs of the layers already pruned), so it is off by default.
Output (kind `calibration`), one safetensors file::

    input_ids                       int64 [samples, seq_len]
    sq_norm.<linear name>           fp32  [in_features]     only with input_norms: true
    metadata: num_tokens, source, seq_len, samples           (strings, as safetensors requires)

Recipe sample::

    - stage: calibrate
      samples: 32
      seq_len: 256
      batch_size: 4           # sequences per forward pass, with input_norms
      input_norms: false
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.data import calibration_samples
from pipelines.modeling import decoder_linears
from pipelines.modelio import load_model, load_tokenizer
from pipelines.recipe import CalibrateStage
from pipelines.sources import describe, load_text
from pipelines.stage import Metric, StageContext, StageResult

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.safetensors"
SQ_NORM_PREFIX = "sq_norm."


@dataclass
class Calibration:
    """A calibration artifact read back: token ids, per-Linear input sum of squares, and metadata."""

    input_ids: torch.Tensor
    sq_norms: dict[str, torch.Tensor]
    num_tokens: int
    source: str
    seq_len: int
    samples: int


def read_calibration(path: Path) -> Calibration:
    """Load a `calibration.safetensors` written by this stage."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    tensors = load_file(str(path))
    return Calibration(
        input_ids=tensors.pop("input_ids"),
        sq_norms={k.removeprefix(SQ_NORM_PREFIX): v for k, v in tensors.items() if k.startswith(SQ_NORM_PREFIX)},
        num_tokens=int(meta["num_tokens"]),
        source=meta.get("source", ""),
        seq_len=int(meta["seq_len"]),
        samples=int(meta["samples"]),
    )


@torch.inference_mode()
def collect_input_norms(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, progress=None
) -> tuple[dict[str, torch.Tensor], int]:
    """Run `input_ids` through the model's decoder and sum x_j^2 per input column of every decoder Linear.

    Returns the sums (fp32, on CPU) and the number of tokens each Linear saw. The LM head is not run.
    """
    linears = decoder_linears(model)
    device = next(model.parameters()).device
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float32, device=device) for name, lin in linears.items()}
    seen = dict.fromkeys(linears, 0)

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += x.square().sum(dim=0)
            seen[name] += x.shape[0]

        return hook

    handles = [lin.register_forward_pre_hook(make_hook(name)) for name, lin in linears.items()]
    try:
        batches = (input_ids.shape[0] + batch_size - 1) // batch_size
        for b in range(batches):
            batch = input_ids[b * batch_size : (b + 1) * batch_size].to(device)
            model.base_model(input_ids=batch, use_cache=False)
            if progress is not None:
                progress(b + 1, batches, f"calibration batch {b + 1}/{batches}")
    finally:
        for handle in handles:
            handle.remove()
    counts = set(seen.values())
    if len(counts) != 1:
        raise RuntimeError(f"decoder Linears saw different token counts: {sorted(counts)}")
    return {name: s.cpu() for name, s in sums.items()}, counts.pop()


def run(spec: CalibrateStage, ctx: StageContext) -> StageResult:
    model_dir = ctx.require("model")
    tokenizer = load_tokenizer(model_dir)
    text = load_text(ctx.data.calibration, "calibration", ctx.cache_dir)
    input_ids = calibration_samples(tokenizer, text, spec.samples, spec.seq_len, ctx.seed)
    sums: dict[str, torch.Tensor] = {}
    num_tokens = input_ids.numel()
    if spec.input_norms:
        model = load_model(model_dir, device=ctx.device)
        sums, num_tokens = collect_input_norms(model, input_ids, spec.batch_size, ctx.progress)
    else:
        ctx.progress(1, 1, f"drew {spec.samples} windows of {spec.seq_len} tokens")

    ctx.workdir.mkdir(parents=True, exist_ok=True)
    out = ctx.workdir / CALIBRATION_FILE
    tensors = {"input_ids": input_ids.contiguous()}
    tensors.update({SQ_NORM_PREFIX + name: s.contiguous() for name, s in sums.items()})
    metadata = {
        "num_tokens": str(num_tokens),
        "source": describe(ctx.data.calibration),
        "seq_len": str(spec.seq_len),
        "samples": str(spec.samples),
    }
    save_file(tensors, str(out), metadata=metadata)
    logger.info("calibration: %d tokens, input norms of %d Linears -> %s", num_tokens, len(sums), out)
    return StageResult(
        outputs={"calibration": out},
        metrics=[Metric("calibration_tokens", float(num_tokens))],
        summary={"linears": len(sums), "num_tokens": num_tokens, "seq_len": spec.seq_len, "samples": spec.samples},
    )
