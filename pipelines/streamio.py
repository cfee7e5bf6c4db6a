"""A model folder read one decoder layer at a time, and a pruned copy written back shard by shard.

The streaming prune (`pipelines.pruning.streaming`) never holds the whole model. It needs:

- `CheckpointReader`: which safetensors file holds each tensor (a single `model.safetensors`, or the
  files a `model.safetensors.index.json` names), the bytes of the weights from the headers alone, and
  `read(names)`, which memory-maps only the files holding `names`, copies those tensors out (onto the
  compute device, in the compute dtype) and closes the files again: a mapping kept open would keep
  every page read so far resident in the process (file-backed RSS), layer after layer.
- `skeleton(...)`: the model built from its config with every parameter on the `meta` device (no
  memory), buffers computed on the CPU (RoPE tables), and then only the parameters of the base model
  outside the decoder stack (embeddings, final norm) loaded. The LM head is never needed: the driver
  runs the base model for the capture only.
- `ShardWriter`: the output folder as `save_pretrained` writes a sharded model: one shard for the
  tensors outside the decoder stack, one per decoder layer, `model.safetensors.index.json`, the
  config (declaring the stored dtype, `pipelines.modelio.finish_config`) and every other file of the
  source folder (tokenizer, generation config) copied as is. `from_pretrained` loads it.
- `MaskSpill`: the packed masks of each finished layer go to a part file on disk, and at the end
  the masks artifact (`pipelines.masks` layout, one file) is written tensor by tensor
  (`write_safetensors_stream`), so the host never holds every layer's masks (8.6 GB for a 70B model).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from pipelines.filemodes import normalize_modes
from pipelines.masks import MASK_FORMAT
from pipelines.modeling import decoder_layers
from pipelines.modelio import finish_config
from pipelines.sources import safetensors_header
from pipelines.stage import StageError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(StageError, ValueError):
    """A model folder that cannot be streamed: no safetensors weights, or a tensor the model needs is absent."""


class CheckpointReader:
    """The safetensors weights of one model folder, read a few tensors at a time (see the module doc)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / INDEX_FILE
        single = self.model_dir / SINGLE_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = {name: self.model_dir / file for name, file in weight_map.items()}
        elif single.exists():
            files = dict.fromkeys(safetensors_header(single), single)
        else:
            raise CheckpointError(f"streaming: {self.model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self.files: dict[str, Path] = files
        self.meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for path in sorted(set(files.values())):
            for name, entry in safetensors_header(path).items():
                self.meta[name] = (_SAFETENSORS_DTYPES.get(entry["dtype"], torch.uint8), tuple(entry["shape"]))

    def names(self) -> list[str]:
        return list(self.files)

    def weight_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of all tensors, floating ones counted in `dtype` when given (the dtype they are computed in)."""
        total = 0
        for stored, shape in self.meta.values():
            size = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
            total += size * int(torch.Size(shape).numel())
        return total

    def stored_dtype(self) -> torch.dtype:
        """The dtype of the floating tensors (the most common one by bytes)."""
        counts: dict[torch.dtype, int] = {}
        for dtype, shape in self.meta.values():
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + int(torch.Size(shape).numel())
        return max(counts, key=counts.__getitem__) if counts else torch.float32

    def read(self, names: list[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[
        str, Tensor
    ]:
        """`names` as tensors on `device`, floating ones in `dtype`; each file opened once and closed after."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise CheckpointError(f"streaming: tensor {missing[0]!r} is not in the checkpoint of {self.model_dir}")
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, Tensor] = {}
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        where = str(device)
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device=where) as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                        tensor = tensor.to(dtype)
                    out[name] = tensor
        return out


def skeleton(model_dir: str | Path, reader: CheckpointReader, dtype: torch.dtype) -> PreTrainedModel:
    """The model of `model_dir` with empty (meta) parameters, except the base model's outside the decoder stack.

    Those (embeddings, final norm) are loaded on the CPU in `dtype`; the decoder layers stay on `meta`
    until the driver loads them one at a time (`load_layer`).
    """
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(str(model_dir))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    prefix, _ = decoder_layers(model)
    base_name = prefix.rpartition(".")[0]
    base = model.get_submodule(base_name) if base_name else model
    lead = f"{base_name}." if base_name else ""
    inside = prefix.removeprefix(lead) + "."
    wanted = [name for name in base.state_dict() if not name.startswith(inside) and f"{lead}{name}" in reader.files]
    tensors = reader.read([f"{lead}{name}" for name in wanted], "cpu", dtype)
    base.load_state_dict({name: tensors[f"{lead}{name}"] for name in wanted}, strict=False, assign=True)
    empty = [name for name, p in base.named_parameters() if p.is_meta and not name.startswith(inside)]
    if empty:
        raise CheckpointError(f"streaming: parameter {lead}{empty[0]} is not in the checkpoint of {model_dir}")
    return model


def layer_tensor_names(layer: nn.Module, layer_prefix: str) -> list[str]:
    """Checkpoint names of one decoder layer's saved tensors (`model.layers.3.mlp.up_proj.weight`, ...)."""
    return [f"{layer_prefix}.{name}" for name in layer.state_dict()]


def load_layer(layer: nn.Module, layer_prefix: str, reader: CheckpointReader, device: torch.device,
               dtype: torch.dtype) -> None:
    """Give an empty (meta) decoder layer its weights, read straight onto `device` in `dtype`."""
    tensors = reader.read(layer_tensor_names(layer, layer_prefix), device, dtype)
    cut = len(layer_prefix) + 1
    layer.load_state_dict({name[cut:]: tensor for name, tensor in tensors.items()}, strict=True, assign=True)


def unload_layer(layer: nn.Module) -> None:
    """Free a decoder layer's weights (back to meta tensors)."""
    layer.to("meta")


class ShardWriter:
    """Writes a model folder shard by shard: `put(shard, tensors)`, then `finish()` (see the module doc)."""

    def __init__(self, source_dir: str | Path, out_dir: str | Path, shards: int, dtype: torch.dtype):
        self.source_dir, self.out_dir, self.shards, self.dtype = Path(source_dir), Path(out_dir), shards, dtype
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def shard_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.shards:05d}.safetensors"

    def put(self, shard: int, tensors: dict[str, Tensor]) -> None:
        """Write `tensors` as shard `shard`, floating ones in the stored dtype: each is cast where it lies and
        copied to the CPU just before its bytes are written, so the host holds one tensor at a time."""
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} outside [0, {self.shards})")
        name = self.shard_name(shard)
        layout = []
        for key, tensor in tensors.items():
            dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
            layout.append((key, dtype, tuple(tensor.shape)))
            self.weight_map[key] = name
            self.total_size += tensor.numel() * dtype.itemsize
        stored = ((key, tensor.detach().to(dtype).to("cpu")) for (key, tensor), (_, dtype, _) in
                  zip(tensors.items(), layout, strict=True))
        write_safetensors_stream(self.out_dir / name, layout, {"format": "pt"}, stored)

    def finish(self) -> Path:
        """The index, the config (declaring the stored dtype) and the source folder's other files."""
        written = set(self.weight_map.values())
        expected = {self.shard_name(i) for i in range(self.shards)}
        if written != expected:
            raise ValueError(f"streaming: shards not written: {sorted(expected - written)}")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for path in sorted(self.source_dir.iterdir()):
            if path.is_file() and path.suffix != ".safetensors" and path.name != INDEX_FILE:
                shutil.copyfile(path, self.out_dir / path.name)
        finish_config(self.out_dir / "config.json", self.dtype)
        normalize_modes(self.out_dir)
        return self.out_dir


def write_safetensors_stream(path: str | Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             metadata: dict[str, str], tensors: Iterable[tuple[str, Tensor]]) -> None:
    """One safetensors file written a tensor at a time: every name, dtype and shape is known up front
    (`layout`), so the header goes first; then `tensors` must yield exactly `layout`, in its order."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in layout:
        size = int(torch.Size(shape).numel()) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    expected = iter(layout)
    with Path(path).open("wb") as out:
        out.write(len(blob).to_bytes(8, "little") + blob)
        for name, tensor in tensors:
            want = next(expected, None)
            if (name, tensor.dtype, tuple(tensor.shape)) != want:
                raise ValueError(f"safetensors stream: got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"expected {want}")
            out.write(memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
    missing = next(expected, None)
    if missing is not None:
        raise ValueError(f"safetensors stream: {missing[0]} was never written")


class MaskSpill:
    """Packed masks parked on disk as layers finish, then written as one masks artifact (see the module doc)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, int]] = {}

    def add(self, outcomes: list) -> None:
        """Move the packed masks of `outcomes` (engine `LinearOutcome`s) to a part file; they keep an empty one."""
        if not outcomes:
            return
        path = self.folder / f"part-{len(set(self.parts.values())):05d}.safetensors"
        save_file({o.name: o.packed_mask.contiguous() for o in outcomes}, str(path))
        for o in outcomes:
            self.parts[o.name], self.shapes[o.name] = path, tuple(o.shape)
            o.packed_mask = torch.empty(0, dtype=torch.uint8)

    def write(self, path: str | Path, meta: dict[str, str]) -> Path:
        """The masks artifact, as `pipelines.masks.save_masks` lays it out; the part files are removed."""
        names = sorted(self.parts)
        layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name in names:
            rows, cols = self.shapes[name]
            layout += [(f"{name}.bitmask", torch.uint8, (rows, -(-cols // 8))), (f"{name}.shape", torch.int64, (2,))]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_stream(path, layout, {"format": MASK_FORMAT, **meta, "linears": json.dumps(names)},
                                 self._tensors(names))
        shutil.rmtree(self.folder)
        return path

    def _tensors(self, names: list[str]) -> Iterator[tuple[str, Tensor]]:
        for name in names:
            with safe_open(str(self.parts[name]), framework="pt") as handle:
                yield f"{name}.bitmask", handle.get_tensor(name)
            yield f"{name}.shape", torch.tensor(self.shapes[name], dtype=torch.int64)
