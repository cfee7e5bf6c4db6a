"""Loading and saving model directories, the unit every stage passes on.

A model directory is what `save_pretrained` writes (config + safetensors) plus its tokenizer, so
plain `transformers.AutoModelForCausalLM.from_pretrained(path)` loads any stage's output.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a model directory for computation (eval mode, on `device`, in `dtype`)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def save_model(model: PreTrainedModel, tokenizer_source: str | Path, out_dir: str | Path) -> Path:
    """Write `model` with safetensors and the tokenizer found in `tokenizer_source`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    return out_dir
