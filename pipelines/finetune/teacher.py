"""The dense teacher for distillation: live, or its logits cached on disk once per model and data.

Fine-tuning draws the windows of micro-batch (step, micro) from a pure function of the seed, so the
teacher's output for it is a pure function of (teacher weights, token ids, seed, batch shape,
precision). The cache directory is keyed by a hash of exactly those; each micro-batch is one
safetensors file: `top_values` (fp32) and `top_indices` (int32) when `teacher_topk > 0`, else full
`logits` stored in fp16 (half the size; ~1e-3 relative error). A second fine-tune on the same data (another lr,
a resume) reads the files and never loads the teacher.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from pipelines.sources import hash_weights

_CACHE_VERSION = 1


@dataclass
class TeacherOutput:
    """Logits (full, or top-k values and indices) and, when asked for, per-layer hidden states."""

    logits: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    top_indices: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Teacher:
    """Gives teacher outputs for a micro-batch, loading the model lazily and caching logits if asked."""

    def __init__(
        self,
        model_dir: Path,
        load: Callable[[Path], PreTrainedModel],
        topk: int,
        hidden: bool,
        autocast: Callable[[], AbstractContextManager],
        cache_root: Path | None = None,
        data_digest: str = "",
    ) -> None:
        self.model_dir, self._load, self.topk, self.hidden, self.autocast = model_dir, load, topk, hidden, autocast
        self._model: PreTrainedModel | None = None
        self.hits = self.misses = 0
        self.cache_dir = None
        if cache_root is not None:
            digest = hashlib.sha256(f"teacher-v{_CACHE_VERSION}|topk={topk}|{data_digest}|".encode())
            hash_weights(model_dir, digest)
            self.cache_dir = Path(cache_root) / digest.hexdigest()[:32]

    @property
    def model(self) -> PreTrainedModel:
        if self._model is None:
            self._model = self._load(self.model_dir).eval().requires_grad_(False)
        return self._model

    @torch.no_grad()
    def _compute(self, batch: torch.Tensor) -> TeacherOutput:
        with self.autocast():
            out = self.model(input_ids=batch, use_cache=False, output_hidden_states=self.hidden)
        logits = out.logits.float()
        result = TeacherOutput(hidden_states=tuple(out.hidden_states[1:]) if self.hidden else None)
        if self.topk:
            result.top_values, result.top_indices = logits.topk(self.topk, dim=-1)
        else:
            result.logits = logits
        return result

    def __call__(self, batch: torch.Tensor, step: int, micro: int) -> TeacherOutput:
        if self.cache_dir is None:
            return self._compute(batch)
        path = self.cache_dir / f"step{step:06d}_micro{micro:03d}.safetensors"
        if path.is_file():
            self.hits += 1
            stored = load_file(str(path), device=str(batch.device))
            if "logits" in stored:
                return TeacherOutput(logits=stored["logits"].float())
            return TeacherOutput(top_values=stored["top_values"], top_indices=stored["top_indices"].long())
        self.misses += 1
        result = self._compute(batch)
        if self.topk:
            tensors = {"top_values": result.top_values, "top_indices": result.top_indices.to(torch.int32)}
        else:
            tensors = {"logits": result.logits.half()}
            result.logits = tensors["logits"].float()  # use what a later run will read: same loss either way
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        return result

    def release(self) -> None:
        self._model = None
