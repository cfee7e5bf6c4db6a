"""Evaluate: held-out perplexity, sparsity, parameter counts and size on disk.

Perplexity is measured on the evaluation split of `data.evaluation` with consecutive 1024-token
windows (see `pipelines.data`). With `compare_dense`, the job's original model (`base_model`) is
measured on the same windows; that figure is cached under `<cache_dir>/dense_ppl/`, keyed by the
base model's weights and the exact token windows, so it is computed once per model and data.

Sparsity counts exact zeros: per decoder Linear, per decoder layer, in total over decoder Linears
(the `sparsity` metric), and separately for the input embeddings and the LM head. Output (kind
`report`): `report.json`.

An FP8 model (a quantize stage's output, `pipelines.quantize.is_fp8_model`) is evaluated as FP8. On a
GPU with FP8 tensor cores (sm89+) the model runs in bf16 and every quantized Linear through real FP8 GEMMs
(`fp8_execution: gpu`); elsewhere through the emulation (`pipelines.quantize.emulate`: inputs rounded to
E4M3 per token or with the static scale, codes multiplied in fp32, both scales applied;
`fp8_execution: emulated`). The report's `quantization` block, the summary and a note say which, with the
metric `fp8_linears`. Recipe sample::

    - stage: evaluate
      seq_len: 1024
      max_windows: 48
      batch_size: 2
      compare_dense: true
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.data import eval_windows, perplexity
from pipelines.modeling import decoder_layers, decoder_linears
from pipelines.modelio import load_model, load_tokenizer
from pipelines.quantize import is_fp8_model, read_fp8_layers, read_sidecar_metadata
from pipelines.quantize.emulate import attach_emulation
from pipelines.recipe import EvaluateStage
from pipelines.sources import describe, hash_weights, load_text
from pipelines.stage import Metric, ProgressFn, StageContext, StageResult

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
_DENSE_CACHE_VERSION = 1


def _zero_stats(weight: torch.Tensor) -> dict[str, float]:
    numel = weight.numel()
    zeros = numel - int(torch.count_nonzero(weight))
    return {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}


def sparsity_report(model: nn.Module) -> dict[str, Any]:
    """Exact zero counts: per decoder Linear, per decoder layer, total over decoder Linears, embeddings, head."""
    prefix, layers = decoder_layers(model)
    linears = {name: _zero_stats(lin.weight) for name, lin in decoder_linears(model).items()}
    per_layer: dict[str, dict[str, float]] = {}
    for i in range(len(layers)):
        layer = f"{prefix}.{i}"
        members = [s for n, s in linears.items() if n.startswith(layer + ".")]
        zeros, numel = sum(s["zeros"] for s in members), sum(s["numel"] for s in members)
        per_layer[layer] = {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0}
    zeros, numel = sum(s["zeros"] for s in linears.values()), sum(s["numel"] for s in linears.values())
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    return {
        "total": {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0},
        "layers": per_layer,
        "linears": linears,
        "embeddings": _zero_stats(embeddings.weight),
        "lm_head": _zero_stats(head.weight) if head is not None else None,
        "lm_head_tied": head is not None and head.weight is embeddings.weight,
    }


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters); a tied tensor is counted once."""
    params = list(model.parameters())  # deduplicated by identity
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


def dir_size(path: Path) -> int:
    """Bytes of all files under `path` (recursively)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def dense_cache_key(base_dir: Path, data_ref: str, windows: torch.Tensor) -> str:
    """Hash of the base model's safetensors, the data reference and the exact evaluation windows."""
    digest = hashlib.sha256(f"v{_DENSE_CACHE_VERSION}|{data_ref}|{tuple(windows.shape)}|".encode())
    hash_weights(base_dir, digest)
    digest.update(windows.numpy().tobytes())
    return digest.hexdigest()[:32]


def _dense_cache_file(base_dir: Path, windows: torch.Tensor, ctx: StageContext) -> Path | None:
    if ctx.cache_dir is None:
        return None
    return Path(ctx.cache_dir) / "dense_ppl" / f"{dense_cache_key(base_dir, ctx.data.evaluation, windows)}.json"


def _store_dense(cache_file: Path, value: float, base_dir: Path, windows: torch.Tensor) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"perplexity": value, "base_model": str(base_dir), "windows": list(windows.shape)}))
    os.replace(tmp, cache_file)


def _offset(progress: ProgressFn, done_before: int, total: int, label: str) -> ProgressFn:
    """A progress sink for one phase of a stage whose bar spans all phases."""
    return lambda done, _total, message: progress(done_before + done, total, f"{label}: {message}")


def _fp8_gemms_available(device: torch.device) -> bool:
    """Whether `device` runs real FP8 GEMMs (an sm89+ GPU with `torch._scaled_mm`)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def _run_as_fp8(model: nn.Module, model_dir: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any] | None]:
    """For an FP8 model folder, run its quantized Linears as FP8 and describe how; else (model, None).

    On an FP8-capable GPU the model runs in bf16 with real FP8 GEMMs (`kernels.fp8_backends.use_fp8_gemms`:
    per-token quantization kernel, `torch._scaled_mm`), as it would be served; elsewhere the Linears are
    emulated (`pipelines.quantize.emulate`: the same arithmetic in fp32)."""
    if not is_fp8_model(model_dir):
        return model, None
    meta = read_sidecar_metadata(model_dir)
    layers = read_fp8_layers(model_dir)
    described = {"scheme": meta["scheme"], "activations": meta["activations"], "linears": len(layers)}
    if _fp8_gemms_available(device):
        from kernels.fp8 import Fp8Scales
        from kernels.fp8_backends import use_fp8_gemms

        model = model.to(torch.bfloat16)
        use_fp8_gemms(model, {name: Fp8Scales(layer.weight_scale, layer.input_scale) for name, layer in layers.items()})
        return model, {**described, "fp8_execution": "gpu"}
    attach_emulation(model, layers)
    return model, {**described, "fp8_execution": "emulated"}


def run(spec: EvaluateStage, ctx: StageContext) -> StageResult:
    model_dir = ctx.require("model")
    tokenizer = load_tokenizer(model_dir)
    text = load_text(ctx.data.evaluation, "evaluation", ctx.cache_dir)
    windows = eval_windows(tokenizer, text, spec.seq_len, spec.max_windows)
    batches = math.ceil(windows.shape[0] / spec.batch_size)

    notes: list[str] = []
    dense_ppl, dense_file, base_dir = None, None, None
    if spec.compare_dense:
        base_dir = ctx.require("base_model")
        dense_file = _dense_cache_file(base_dir, windows, ctx)
        if dense_file is not None and dense_file.is_file():
            dense_ppl = float(json.loads(dense_file.read_text())["perplexity"])
            notes.append("dense perplexity taken from the cache")
    same_model = base_dir is not None and Path(base_dir).resolve() == Path(model_dir).resolve()
    total = batches * (2 if spec.compare_dense and dense_ppl is None and not same_model else 1)

    model = load_model(model_dir, device=ctx.device)
    sparsity = sparsity_report(model)
    params, nonzero = parameter_counts(model)
    size = dir_size(model_dir)
    model, quantization = _run_as_fp8(model, model_dir, ctx.device)
    if quantization is not None:
        how = ("FP8 GEMMs on the GPU, the rest of the model in bf16" if quantization["fp8_execution"] == "gpu"
               else f"emulated: FP8 W8A8 with fp32 accumulation, computed on {ctx.device.type}")
        notes.append(f"quantization: {quantization['scheme']} ({quantization['activations']} activations, "
                     f"{quantization['linears']} Linears); fp8_execution: {quantization['fp8_execution']} ({how})")
    ppl = perplexity(model, windows, spec.batch_size, _offset(ctx.progress, 0, total, "model"))
    del model
    if spec.compare_dense and dense_ppl is None:
        if same_model:
            dense_ppl = ppl
            notes.append("the evaluated model is the base model: dense perplexity not recomputed")
        else:
            base = load_model(base_dir, device=ctx.device)
            dense_ppl = perplexity(base, windows, spec.batch_size, _offset(ctx.progress, batches, total, "dense"))
            del base
        if dense_file is not None:
            _store_dense(dense_file, dense_ppl, base_dir, windows)

    report = {
        "perplexity": ppl,
        "dense_perplexity": dense_ppl,
        "eval": {
            "source": describe(ctx.data.evaluation),
            "windows": windows.shape[0],
            "seq_len": spec.seq_len,
            "tokens_scored": windows.shape[0] * (spec.seq_len - 1),
        },
        "sparsity": sparsity,
        "param_count": params,
        "nonzero_params": nonzero,
        "model_size_bytes": size,
        "quantization": quantization,
    }
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    out = ctx.workdir / REPORT_FILE
    out.write_text(json.dumps(report, indent=2))

    metrics = [
        Metric("perplexity", ppl),
        Metric("sparsity", sparsity["total"]["sparsity"]),
        Metric("param_count", float(params)),
        Metric("nonzero_params", float(nonzero)),
        Metric("model_size_bytes", float(size)),
    ]
    if dense_ppl is not None:
        metrics.append(Metric("dense_perplexity", dense_ppl))
    if quantization is not None:
        metrics.append(Metric("fp8_linears", float(quantization["linears"])))
    for group in ("layers", "linears"):
        metrics += [Metric(f"sparsity.{name}", s["sparsity"]) for name, s in sparsity[group].items()]
    logger.info("perplexity %.3f (dense %s), sparsity %.4f", ppl, dense_ppl, sparsity["total"]["sparsity"])
    summary = {k: report[k] for k in ("perplexity", "dense_perplexity", "param_count", "nonzero_params")}
    summary["sparsity"] = sparsity["total"]["sparsity"]
    if quantization is not None:
        summary["quantization"], summary["fp8_execution"] = quantization["scheme"], quantization["fp8_execution"]
    return StageResult(outputs={"report": out}, metrics=metrics, summary=summary, notes=notes)
