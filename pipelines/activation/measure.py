"""Running a model to profile activation sparsity: histograms, held-out sparsity, perplexity curves.

These drive a model (hooks from `pipelines.activation.apply`); the arithmetic lives in `stats` and
`allocation`. The per-layer curves sparsify one decoder layer at a time; since layers before it are
unchanged, their output is computed once per window batch and the forward restarts at the layer
(`inputs_embeds` = the cached hidden state, the decoder stack cut to the layers from it on), which
halves the cost on average. `check_restart` verifies on a batch that the restart reproduces the
full forward for the model at hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipelines.activation.apply import gated_mlps, record_hooks, threshold_hooks
from pipelines.activation.stats import accumulate, fraction_below, new_histograms
from pipelines.data import perplexity, token_nll
from pipelines.modeling import decoder_layers
from pipelines.stage import ProgressFn, StageError


def _batches(windows: Tensor, batch_size: int) -> Iterator[Tensor]:
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start : start + batch_size]


@torch.inference_mode()
def collect_histograms(model: PreTrainedModel, input_ids: Tensor, batch_size: int,
                       progress: ProgressFn | None = None) -> Tensor:
    """Histograms of log10 |h| per decoder layer over every token of `input_ids` [samples, seq_len]."""
    mlps = gated_mlps(model)
    histograms = new_histograms(len(mlps))
    device = next(model.parameters()).device
    batches = math.ceil(input_ids.shape[0] / batch_size)
    with record_hooks(mlps, lambda i, h: accumulate(histograms[i], h)):
        for b, batch in enumerate(_batches(input_ids, batch_size)):
            model.base_model(input_ids=batch.to(device), use_cache=False)
            if progress is not None:
                progress(b + 1, batches, f"calibration batch {b + 1}/{batches}")
    return histograms


@torch.inference_mode()
def perplexity_at(model: PreTrainedModel, windows: Tensor, thresholds: list[float], batch_size: int) -> tuple[
    float, list[float]
]:
    """Perplexity with every layer thresholded, and the sparsity each layer's threshold gave on these tokens."""
    mlps = gated_mlps(model)
    counts = [[0, 0] for _ in mlps]

    def count(i: int, h: Tensor) -> None:  # runs before the threshold hook: the raw |h| of these tokens
        below, total = fraction_below(h, thresholds[i])
        counts[i][0] += below
        counts[i][1] += total

    with record_hooks(mlps, count), threshold_hooks(mlps, dict(enumerate(thresholds))):
        ppl = perplexity(model, windows, batch_size)
    return ppl, [b / t if t else 0.0 for b, t in counts]


@contextmanager
def _suffix(model: PreTrainedModel, start: int) -> Iterator[None]:
    """Temporarily cut the decoder stack to layers `start:`."""
    name, layers = decoder_layers(model)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    attr = name.rpartition(".")[2]
    setattr(parent, attr, nn.ModuleList(list(layers)[start:]))
    try:
        yield
    finally:
        setattr(parent, attr, layers)


def _layer_inputs(model: PreTrainedModel, batch: Tensor) -> list[Tensor]:
    """The hidden state entering each decoder layer (dense model) for one batch."""
    _, layers = decoder_layers(model)
    captured: list[Tensor] = [torch.empty(0)] * len(layers)

    def make(i: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.base_model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _restart_logits(model: PreTrainedModel, hidden: Tensor, start: int) -> Tensor:
    with _suffix(model, start):
        return model(inputs_embeds=hidden, use_cache=False).logits


@torch.inference_mode()
def check_restart(model: PreTrainedModel, batch: Tensor, tolerance: float = 1e-4) -> None:
    """Raise `StageError` if restarting the forward at a middle layer does not reproduce the full forward."""
    device = next(model.parameters()).device
    batch = batch.to(device)
    full = model(input_ids=batch, use_cache=False).logits.float()
    start = len(decoder_layers(model)[1]) // 2
    restarted = _restart_logits(model, _layer_inputs(model, batch)[start], start).float()
    error = float((restarted - full).norm() / full.norm().clamp_min(1e-12))
    if not error <= tolerance:
        raise StageError(f"model: restarting the forward at layer {start} changes the logits (relative error "
                         f"{error:.2e}); per-layer curves need a decoder whose layers take inputs_embeds")


@dataclass
class LayerCurves:
    """One decoder layer sparsified at a time: `perplexity[i][j]` and `kl[i][j]` with only layer i at
    `thresholds[i][j]`; `kl` is the mean over predicted tokens of KL(dense || sparsified) in nats."""

    dense_perplexity: float
    perplexity: list[list[float]]
    kl: list[list[float]]


@torch.inference_mode()
def layer_curves(model: PreTrainedModel, windows: Tensor, layer_thresholds: list[list[float]], batch_size: int,
                 progress: ProgressFn | None = None) -> LayerCurves:
    """Per-layer perplexity and KL curves on `windows` (see `LayerCurves`)."""
    mlps = gated_mlps(model)
    device = next(model.parameters()).device
    n_layers, n_points = len(layer_thresholds), len(layer_thresholds[0])
    nll = [[0.0] * n_points for _ in range(n_layers)]
    kl = [[0.0] * n_points for _ in range(n_layers)]
    dense_nll, tokens = 0.0, 0
    total = n_layers * math.ceil(windows.shape[0] / batch_size)
    done = 0
    for batch in _batches(windows, batch_size):
        batch = batch.to(device)
        dense_logits = model(input_ids=batch, use_cache=False).logits
        dense_logp = F.log_softmax(dense_logits[:, :-1].float(), dim=-1)
        targets = batch[:, 1:].unsqueeze(-1)
        value, count = token_nll(dense_logits, batch)
        dense_nll, tokens = dense_nll + float(value), tokens + count
        inputs = _layer_inputs(model, batch)
        for i in range(n_layers):
            for j, threshold in enumerate(layer_thresholds[i]):
                with threshold_hooks(mlps, {i: threshold}):
                    logits = _restart_logits(model, inputs[i], i)
                logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # one softmax for both NLL and KL
                nll[i][j] -= float(logp.gather(-1, targets).sum())
                kl[i][j] += float(F.kl_div(logp, dense_logp, log_target=True, reduction="sum"))
            done += 1
            if progress is not None:
                progress(done, total, f"layer {i} curve")
    return LayerCurves(
        dense_perplexity=math.exp(dense_nll / tokens),
        perplexity=[[math.exp(v / tokens) for v in row] for row in nll],
        kl=[[max(v, 0.0) / tokens for v in row] for row in kl],
    )
