"""The layer-sequential driver for models bigger than memory: decoder layers streamed from the checkpoint.

`run_streaming` is `run_sequential` (sequential.py) with one difference: where a decoder layer's
weights come from and go to. The model is a skeleton (`pipelines.streamio.skeleton`: parameters on
the `meta` device, only the embeddings and final norm loaded), so the capture runs the model's own
embedding, rotary and mask code exactly as in memory. Then for each decoder layer:

1. its tensors are read from the memory-mapped safetensors files straight onto the compute device,
   in the compute dtype (`load_layer`);
2. the same capture/collect/prune/propagate steps as `run_sequential` run on it, through the same
   loop (`sequential.run_layers`), so masks and weights equal the in-memory path's;
3. its tensors are written, pruned, as one shard of the output folder (`ShardWriter`), and the layer
   goes back to `meta`.

Memory bound. Compute device: one decoder layer, its input statistics and one batch of activations
(as in memory). Host: the embeddings and final norm (in the compute dtype), the two activation
buffers [samples, seq_len, hidden] of `run_sequential`, and one layer's tensors while its shard is
written; never the whole model. The tensors outside the decoder stack (embeddings, LM head) are
copied to the output first, read and written once (`copy_rest`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from pipelines.modeling import decoder_layers
from pipelines.pruning.sequential import CalibrationError, LayerWork, run_layers
from pipelines.stage import ProgressFn
from pipelines.streamio import CheckpointReader, ShardWriter, load_layer, skeleton, unload_layer

logger = logging.getLogger(__name__)


@dataclass
class StreamedModel:
    """A model folder opened for streaming: the skeleton, its decoder stack and the checkpoint it reads."""

    model_dir: Path
    model: PreTrainedModel
    reader: CheckpointReader
    prefix: str
    layers: nn.ModuleList
    dtype: torch.dtype

    @classmethod
    def open(cls, model_dir: str | Path, dtype: torch.dtype) -> StreamedModel:
        """Build the skeleton of `model_dir` computing in `dtype` (reads the headers, embeddings and norm only)."""
        reader = CheckpointReader(model_dir)
        model = skeleton(model_dir, reader, dtype)
        prefix, layers = decoder_layers(model)
        return cls(Path(model_dir), model, reader, prefix, layers, dtype)

    def layer_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def rest_names(self) -> list[str]:
        """Checkpoint tensors outside the decoder stack (embeddings, final norm, LM head)."""
        return [name for name in self.reader.names() if not name.startswith(self.prefix + ".")]

    def writer(self, out_dir: str | Path, stored_dtype: torch.dtype) -> ShardWriter:
        """A writer for the pruned copy: shard 0 holds `rest_names`, shard i + 1 decoder layer i."""
        return ShardWriter(self.model_dir, out_dir, len(self.layers) + 1, stored_dtype)


def copy_rest(streamed: StreamedModel, writer: ShardWriter) -> None:
    """Shard 0 of the output: the tensors outside the decoder stack, as stored."""
    writer.put(0, streamed.reader.read(streamed.rest_names(), "cpu"))


def _store(streamed: StreamedModel, index: int, layer: nn.Module, writer: ShardWriter | None) -> None:
    """Write a finished layer to its shard (if writing) and free its weights."""
    if writer is not None:
        prefix = streamed.layer_prefix(index)
        writer.put(index + 1, {f"{prefix}.{name}": tensor for name, tensor in layer.state_dict().items()})
    unload_layer(layer)


def run_streaming(
    streamed: StreamedModel,
    input_ids: Tensor,
    targets: dict[int, dict[str, nn.Linear]],
    on_layer: Callable[[LayerWork], None],
    *,
    device: torch.device,
    batch_size: int = 4,
    full_stats: bool = True,
    propagate: Literal["pruned", "dense"] = "pruned",
    within_layer: bool = False,
    replay: bool | None = None,
    progress: ProgressFn | None = None,
    writer: ShardWriter | None = None,
) -> int:
    """`run_sequential` over a streamed model (same arguments and result: the peak device memory, 0 on
    the CPU); each layer is loaded before its work and, with `writer`, written to its shard after it.

    `targets` must be `resolve_targets` of `streamed.model` (the skeleton's Linears: their weights are
    filled in while their layer is loaded).
    """
    if input_ids.ndim != 2 or input_ids.numel() == 0:
        raise CalibrationError(f"calibration: input_ids must be a non-empty [samples, seq_len] tensor, got "
                               f"shape {tuple(input_ids.shape)}")
    device = torch.device(device)

    def load(index: int, layer: nn.Module) -> None:
        load_layer(layer, streamed.layer_prefix(index), streamed.reader, device, streamed.dtype)

    def unload(index: int, layer: nn.Module) -> None:
        _store(streamed, index, layer, writer)

    return run_layers(streamed.model, streamed.prefix, streamed.layers, streamed.dtype, input_ids, targets, on_layer,
                      device=device, batch_size=batch_size, full_stats=full_stats, propagate=propagate,
                      within_layer=within_layer, replay=replay, progress=progress, load=load, unload=unload,
                      label=" (streamed)")


def stream_without_data(
    streamed: StreamedModel,
    targets: dict[int, dict[str, nn.Linear]],
    on_layer: Callable[[int, dict[str, nn.Linear]], None],
    *,
    device: torch.device,
    writer: ShardWriter | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Each decoder layer loaded onto `device`, `on_layer(index, linears)` for a targeted one, then
    written and freed: pruning that needs no forward pass (magnitude). Returns the peak device memory."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for index, layer in enumerate(streamed.layers):
            load_layer(layer, streamed.layer_prefix(index), streamed.reader, device, streamed.dtype)
            if index in targets:
                on_layer(index, targets[index])
            _store(streamed, index, layer, writer)
            if progress is not None:
                progress(index + 1, len(streamed.layers), f"decoder layer {index + 1}/{len(streamed.layers)}")
    return int(torch.cuda.max_memory_allocated(device)) if on_cuda else 0
