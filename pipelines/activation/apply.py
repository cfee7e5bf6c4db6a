"""Serving activation sparsity: thresholded FFNs in a model, stored in and restored from its config.

A model directory exported with activation sparsity carries, in `config.json`::

    "activation_sparsity": {"thresholds": [0.021, 0.034, ...],   # one per decoder layer
                            "sparsity": 0.5,                     # mean target sparsity
                            "layer_sparsities": [0.42, 0.61, ...],
                            "allocation": "per_layer"}

Plain `from_pretrained` ignores the entry (the model is the dense one); `load_activation_sparse_model`
loads it and `install_thresholds` replaces each gated MLP by a `ThresholdedMLP` holding the same
Linears (state dict keys unchanged) that zeroes `|h| < threshold` before `down_proj`. On a CUDA device
with triton, one-token decode steps take the sparse down kernel of `kernels.activation_sparse` (with more
tokens the union of active neurons is nearly all of them and dense wins); every other call, and every call
on the CPU, takes the dense thresholded product (same result).

`threshold_hooks` and `record_hooks` do the same thresholding, and the recording, with forward
pre-hooks on `down_proj` and no change to the model; the profile stage uses them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from kernels.activation_sparse import SparseDown, can_use_kernel, dense_down, sparse_down_proj, threshold_activations
from pipelines.modeling import decoder_layers
from pipelines.modelio import load_model
from pipelines.stage import StageError

logger = logging.getLogger(__name__)

CONFIG_KEY = "activation_sparsity"
_GATED = ("gate_proj", "up_proj", "down_proj", "act_fn")


class ActivationSparsityError(StageError, ValueError):
    """A model or configuration activation sparsity cannot be applied to; the message names the field."""


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated FFN (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`) of every decoder layer, in order."""
    _, layers = decoder_layers(model)
    found = []
    for i, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        missing = [name for name in _GATED if mlp is None or not hasattr(mlp, name)]
        if missing or not all(isinstance(getattr(mlp, n), nn.Linear) for n in _GATED[:3]):
            kind = type(mlp).__name__ if mlp is not None else "no mlp"
            raise ActivationSparsityError(
                f"model: layer {i} ({kind}) has no gated FFN with {', '.join(_GATED)}; activation sparsity "
                "needs SwiGLU-style MLPs (Llama, Mistral, Qwen2, ...)"
            )
        found.append(mlp)
    return found


@contextmanager
def threshold_hooks(mlps: list[nn.Module], thresholds: dict[int, float]) -> Iterator[None]:
    """While active, layer i's `down_proj` input has `|h| < thresholds[i]` zeroed (layers absent: dense)."""

    def make(threshold: float) -> Callable[[nn.Module, tuple], tuple]:
        return lambda _module, args: (threshold_activations(args[0], threshold), *args[1:])

    handles = [mlps[i].down_proj.register_forward_pre_hook(make(t)) for i, t in thresholds.items() if t > 0]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_hooks(mlps: list[nn.Module], sink: Callable[[int, Tensor], None]) -> Iterator[None]:
    """While active, `sink(i, h)` sees every input `h` of layer i's `down_proj` (after any threshold hook)."""

    def make(i: int) -> Callable[[nn.Module, tuple], None]:
        return lambda _module, args: sink(i, args[0])

    handles = [mlp.down_proj.register_forward_pre_hook(make(i)) for i, mlp in enumerate(mlps)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class ThresholdedMLP(nn.Module):
    """A gated MLP whose `down_proj` sees `h` with `|h| < threshold` zeroed; same parameters, same keys."""

    def __init__(self, mlp: nn.Module, threshold: float, use_kernel: bool) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (getattr(mlp, n) for n in _GATED)
        self.threshold = float(threshold)
        self.use_kernel = use_kernel
        self._sparse: SparseDown | None = None

    def forward(self, x: Tensor) -> Tensor:
        h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        # one token only: with more, the union of active neurons is ~90-100% and dense cuBLAS wins
        # (bench/results/activation_sparsity_gpu.json: 0.69-0.81x at 4 and 16 tokens on an H200)
        if self.use_kernel and self.threshold > 0 and h.numel() == h.shape[-1]:
            if self._sparse is None or self._sparse.weight_t.device != h.device:
                self._sparse = SparseDown.from_dense(self.down_proj.weight, self.down_proj.bias)
            if can_use_kernel(h, self._sparse)[0]:
                return sparse_down_proj(h, self._sparse, self.threshold)
        return dense_down(h, self.down_proj.weight, self.down_proj.bias, self.threshold)


@dataclass
class InstallInfo:
    """What `install_thresholds` did: layers patched, and the path decode steps take (with the reason)."""

    layers: int
    backend: str
    reason: str


def install_thresholds(model: PreTrainedModel, thresholds: list[float], use_kernel: bool | None = None) -> InstallInfo:
    """Replace every decoder layer's MLP by a `ThresholdedMLP` with its threshold.

    `use_kernel`: None takes the sparse down kernel where it can run (CUDA and triton), False never.
    """
    mlps = gated_mlps(model)
    if len(thresholds) != len(mlps):
        raise ActivationSparsityError(
            f"{CONFIG_KEY}.thresholds: {len(thresholds)} values for {len(mlps)} decoder layers"
        )
    if any(not t >= 0 for t in thresholds):
        raise ActivationSparsityError(f"{CONFIG_KEY}.thresholds: must be >= 0, got {thresholds}")
    device = next(model.parameters()).device
    probe_dtype = next(model.parameters()).dtype
    probe = torch.empty(1, mlps[0].down_proj.in_features, device=device, dtype=probe_dtype)
    weight = mlps[0].down_proj.weight
    ok, why = can_use_kernel(probe, SparseDown(weight_t=weight.t(), bias=None))
    kernel = ok if use_kernel is None else (use_kernel and ok)
    if use_kernel and not ok:
        raise ActivationSparsityError(f"use_kernel: the sparse down kernel cannot run here: {why}")
    _, layers = decoder_layers(model)
    for layer, mlp, threshold in zip(layers, mlps, thresholds, strict=True):
        layer.mlp = ThresholdedMLP(mlp, threshold, kernel)
    info = InstallInfo(len(mlps), "triton-sparse-down" if kernel else "dense", "" if kernel else why)
    if not kernel:
        logger.info("activation sparsity: dense thresholded down_proj (%s)", why or "kernel not requested")
    return info


def write_config(model: PreTrainedModel, thresholds: list[float], sparsity: float, layer_sparsities: list[float],
                 allocation: str) -> None:
    """Store the thresholds in `model.config` so that `save_pretrained` writes them into config.json."""
    setattr(model.config, CONFIG_KEY, {
        "thresholds": [float(t) for t in thresholds],
        "sparsity": float(sparsity),
        "layer_sparsities": [float(s) for s in layer_sparsities],
        "allocation": allocation,
    })


def read_config(model: PreTrainedModel) -> dict:
    """The `activation_sparsity` entry of a loaded model's config, checked."""
    entry = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(entry, dict) or not isinstance(entry.get("thresholds"), list):
        raise ActivationSparsityError(f"config.{CONFIG_KEY}: missing or without a 'thresholds' list")
    return entry


def load_activation_sparse_model(path: str | Path, device: torch.device | str = "cpu",
                                 dtype: torch.dtype = torch.float32,
                                 use_kernel: bool | None = None) -> tuple[PreTrainedModel, InstallInfo]:
    """Load an exported model directory and install its stored thresholds (see the module doc)."""
    model = load_model(path, device, dtype)
    info = install_thresholds(model, read_config(model)["thresholds"], use_kernel)
    return model, info
