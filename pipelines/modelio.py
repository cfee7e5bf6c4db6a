"""Loading and saving model directories, the unit every stage passes on.

A model directory is what `save_pretrained` writes (config + safetensors) plus its tokenizer, so
plain `transformers.AutoModelForCausalLM.from_pretrained(path)` loads any stage's output.

Dtype: stages compute in fp32 (or the dtype a stage asks for), but an artifact keeps the dtype its
source was stored in. `load_model` records the directory's declared dtype (config `dtype`, formerly
`torch_dtype`) on the model as `source_dtype`; `save_model` writes the weights in that dtype unless
it is given another, so a bf16 model is not handed back as an fp32 copy twice its size.

Older readers: transformers 5 writes RoPE settings only as `rope_parameters`, which transformers 4.x
ignores, silently falling back to its default `rope_theta` (10000; SmolLM2 uses 100000).
`finish_config` also writes the 4.x keys (`rope_theta`, and `rope_scaling` for a non-default
RoPE type) beside them; transformers 5 reads `rope_parameters` either way.

File modes: safetensors writes its files 0600 while everything else in a model directory is 0644
under the usual umask; `save_model` gives every file the mode `open()` would (`pipelines.filemodes`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipelines.filemodes import normalize_modes
from pipelines.sources import check_weight_files

SOURCE_DTYPE_ATTR = "source_dtype"
_DTYPE_KEYS = ("dtype", "torch_dtype")  # transformers 5 writes `dtype`, 4.x `torch_dtype`


def declared_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a model directory's config.json declares its weights in (None if it declares none)."""
    config = json.loads((Path(path) / "config.json").read_text())
    for key in _DTYPE_KEYS:
        name = config.get(key)
        if isinstance(name, str) and name != "auto":
            dtype = getattr(torch, name.removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{path}/config.json: {key} {name!r} is not a torch dtype")
            return dtype
    return None


def source_dtype(model: PreTrainedModel) -> torch.dtype:
    """The dtype `model` is saved in: what its source directory declared, else its parameters' dtype."""
    recorded = getattr(model, SOURCE_DTYPE_ATTR, None)
    return recorded if isinstance(recorded, torch.dtype) else next(model.parameters()).dtype


def load_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a model directory for computation (eval mode, on `device`, in `dtype`), noting its stored dtype."""
    check_weight_files(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    setattr(model, SOURCE_DTYPE_ATTR, declared_dtype(path) or dtype)
    return model.to(device).eval()


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))


def legacy_rope_keys(config: dict) -> dict:
    """transformers 4.x's `rope_theta` / `rope_scaling` for a config that has only 5.x's `rope_parameters`."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_theta"), int | float):
        return {}  # absent, or one set per attention type (no 4.x spelling)
    keys = {"rope_theta": rope["rope_theta"]}
    if rope.get("rope_type", "default") != "default":
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return {k: v for k, v in keys.items() if config.get(k) is None}


def finish_config(config_path: Path, dtype: torch.dtype) -> None:
    """Make a saved config.json declare `dtype` (each dtype key present) and carry the 4.x RoPE keys."""
    config = json.loads(config_path.read_text())
    name = str(dtype).removeprefix("torch.")
    keys = [k for k in _DTYPE_KEYS if k in config] or ["dtype"]
    config.update(dict.fromkeys(keys, name))
    config.update(legacy_rope_keys(config))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def cast_state_dict(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`model`'s state dict with floating tensors in `dtype`; tied tensors stay one shared tensor."""
    cast: dict[tuple[int, torch.dtype, tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            state[name] = tensor
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key not in cast:
            cast[key] = tensor.to(dtype)
        state[name] = cast[key]
    return state


def save_model(
    model: PreTrainedModel, tokenizer_source: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write `model` with safetensors, in `dtype` (default: its source dtype), and the tokenizer of `tokenizer_source`.

    The model in memory is left as it is: the cast goes into the state dict handed to `save_pretrained`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype or source_dtype(model)
    model.save_pretrained(out_dir, state_dict=cast_state_dict(model, dtype), safe_serialization=True)
    finish_config(out_dir / "config.json", dtype)
    load_tokenizer(tokenizer_source).save_pretrained(out_dir)
    normalize_modes(out_dir)
    return out_dir
