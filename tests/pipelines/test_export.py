"""compressed-tensors export: both sparse formats round-trip to the pruned weights."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from compressed_tensors.config import CompressionFormat, SparsityCompressionConfig
from compressed_tensors.utils import unpack_bitmasks
from safetensors import safe_open

from pipelines.export import (
    ExportError,
    choose_format,
    compress_24_bitmask,
    compress_bitmask,
    decompress,
    export_compressed,
    load_compressed_state_dict,
    read_sparsity_config,
)
from pipelines.pruning.magnitude import prune_magnitude


def _pruned_tiny_model(nm):
    from tiny_models import build_tiny_model

    model = build_tiny_model(512)
    names = [n for n, m in model.named_modules() if n.endswith("_proj")]
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            linear.weight.copy_(prune_magnitude(linear.weight, 0.5, nm).weight)
    return model, names


@pytest.mark.parametrize(("nm", "fmt"), [(None, "sparse-bitmask"), ((2, 4), "sparse-24-bitmask"),
                                         ((4, 8), "sparse-bitmask")])
def test_export_round_trips_to_the_pruned_weights(tmp_path: Path, tiny_model_dir: Path, nm, fmt: str) -> None:
    model, names = _pruned_tiny_model(nm)
    assert choose_format(nm) == fmt
    out = export_compressed(model, tmp_path / "compressed", fmt, names, tokenizer_source=tiny_model_dir,
                            sparsity_structure="2:4" if nm == (2, 4) else "unstructured")

    config = read_sparsity_config(out)
    assert config.format == fmt and sorted(config.targets) == sorted(names)
    assert config.global_sparsity == pytest.approx(0.5)
    # compressed-tensors' own registry parses the config we wrote
    raw = config.model_dump()
    parsed = SparsityCompressionConfig.load_from_registry(raw.pop("format"), **raw)
    assert parsed.format == CompressionFormat(fmt).value

    state = load_compressed_state_dict(out)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name == "lm_head.weight":  # tied to the embeddings: stored once
            continue
        assert torch.equal(state[name], tensor), name

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())  # noqa: SIM118
    module = names[0]
    assert f"{module}.weight" not in keys and f"{module}.bitmask" in keys and f"{module}.compressed" in keys
    assert (f"{module}.row_offsets" in keys) == (fmt == "sparse-bitmask")
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()


def test_bitmask_layout_matches_compressed_tensors() -> None:
    weight = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 4.0]])
    parts = compress_bitmask(weight)
    assert parts["shape"].tolist() == [2, 5]
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0, 4.0]
    assert parts["row_offsets"].tolist() == [0, 3]
    assert torch.equal(unpack_bitmasks(parts["bitmask"], [2, 5]), weight != 0)
    assert torch.equal(decompress(parts), weight)


def test_24_layout_keeps_two_values_per_group() -> None:
    weight = prune_magnitude(torch.randn(3, 16), 0.5, (2, 4)).weight
    parts = compress_24_bitmask(weight)
    assert parts["compressed"].shape == (3, 8) and parts["shape"].shape == (2, 1)
    assert torch.equal(decompress(parts), weight)


def test_24_format_refuses_a_weight_that_is_not_2_4() -> None:
    with pytest.raises(ExportError, match="not 2:4"):
        compress_24_bitmask(torch.ones(2, 8), "model.layers.0.mlp.up_proj")


def test_unknown_format_is_an_error(tmp_path: Path) -> None:
    model, names = _pruned_tiny_model(None)
    with pytest.raises(ExportError, match="unknown format"):
        export_compressed(model, tmp_path, "marlin-24", names)


LEGACY_CHECK = r"""
import sys, torch
from compressed_tensors.compressors import ModelCompressor
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
path, expected = sys.argv[1], load_file(sys.argv[2])
compressor = ModelCompressor.from_pretrained(path)
config = AutoConfig.from_pretrained(path)
del config.quantization_config
model = AutoModelForCausalLM.from_config(config)
compressor.decompress(path, model)
state = model.state_dict()
bad = [k for k, v in expected.items() if not torch.equal(state[k], v)]
print(compressor.sparsity_config.format, "mismatch:", bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.skipif(not os.environ.get("SPARSEFLOW_CT_LEGACY_PYTHON"),
                    reason="set SPARSEFLOW_CT_LEGACY_PYTHON to a python with compressed-tensors<0.14")
@pytest.mark.parametrize(("nm", "fmt"), [(None, "sparse-bitmask"), ((2, 4), "sparse-24-bitmask")])
def test_legacy_compressed_tensors_decompresses_our_export(tmp_path: Path, nm, fmt: str) -> None:
    """compressed-tensors releases that still ship the sparse compressors load our files with their own code."""
    from safetensors.torch import save_file

    model, names = _pruned_tiny_model(nm)
    out = export_compressed(model, tmp_path / "compressed", fmt, names)
    save_file({n + ".weight": model.get_submodule(n).weight.detach().contiguous() for n in names},
              str(tmp_path / "expected.safetensors"))
    proc = subprocess.run([os.environ["SPARSEFLOW_CT_LEGACY_PYTHON"], "-c", LEGACY_CHECK, str(out),
                           str(tmp_path / "expected.safetensors")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"{fmt} mismatch: []" in proc.stdout
