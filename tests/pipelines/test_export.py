"""compressed-tensors export: both sparse formats round-trip to the pruned weights."""

from __future__ import annotations

import os
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
    infer_export,
    load_compressed_model,
    load_compressed_state_dict,
    read_sparsity_config,
)
from pipelines.modelio import load_model, save_model
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
    assert f"{module}.bitmask" in keys and f"{module}.compressed" in keys
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor(f"{module}.weight").shape == (0,)  # the guard against loaders that guess
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


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_load_compressed_model_gives_the_exact_model(tmp_path: Path, nm) -> None:
    model, names = _pruned_tiny_model(nm)
    out = export_compressed(model, tmp_path / "c", choose_format(nm), names)
    loaded = load_compressed_model(out)
    assert loaded.dtype == torch.float32 and "quantization_config" not in loaded.config.to_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half = load_compressed_model(out, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.lm_head.weight, model.lm_head.weight.bfloat16())


def test_load_compressed_model_refuses_a_plain_folder(tiny_model_dir: Path) -> None:
    with pytest.raises(ExportError, match="sparsity_config.format"):
        load_compressed_model(tiny_model_dir)


def test_export_keeps_the_source_dtype_and_plain_file_modes(tmp_path: Path, tiny_model_dir: Path) -> None:
    source = load_model(tiny_model_dir)
    source_16 = save_model(source, tiny_model_dir, tmp_path / "src16", dtype=torch.bfloat16)
    model = load_model(source_16)  # computes in fp32, remembers bf16
    assert next(model.parameters()).dtype == torch.float32
    names = [n for n, _ in model.named_modules() if n.endswith("_proj")]
    with torch.no_grad():
        for name in names:
            linear = model.get_submodule(name)
            linear.weight.copy_(prune_magnitude(linear.weight, 0.5, (2, 4)).weight)
    out = export_compressed(model, tmp_path / "c", "sparse-24-bitmask", names, tokenizer_source=tiny_model_dir)
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        dtypes = {handle.get_tensor(k).dtype for k in handle.keys() if not k.endswith((".shape", ".bitmask"))}  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    assert load_compressed_model(out).dtype == torch.bfloat16
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert set(modes.values()) == {0o666 & ~_umask()}, modes


def test_infer_export_finds_the_pattern_from_the_zeros() -> None:
    dense, _ = _pruned_tiny_model(None)
    from tiny_models import build_tiny_model

    assert infer_export(build_tiny_model(512)) is None
    fmt, modules, structure = infer_export(dense)
    assert (fmt, structure) == ("sparse-bitmask", "unstructured") and len(modules) == 14
    two_four, names = _pruned_tiny_model((2, 4))
    assert infer_export(two_four) == ("sparse-24-bitmask", sorted(names), "2:4")



def test_documented_loading_example_runs(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    """docs/examples/load_compressed.py: loads an export, generates, writes a plain copy from_pretrained reads."""
    import runpy

    from transformers import AutoModelForCausalLM

    model, names = _pruned_tiny_model((2, 4))
    out = export_compressed(model, tmp_path / "compressed", "sparse-24-bitmask", names, tokenizer_source=tiny_model_dir)
    example = runpy.run_path(str(Path(__file__).parents[2] / "docs" / "examples" / "load_compressed.py"))
    example["main"](str(out), str(tmp_path / "plain"))
    assert capsys.readouterr().out.startswith("The quick")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    for name, tensor in model.state_dict().items():
        assert torch.equal(plain.state_dict()[name], tensor), name


def test_configs_carry_the_rope_keys_older_transformers_read() -> None:
    from pipelines.modelio import legacy_rope_keys

    assert legacy_rope_keys({"rope_parameters": {"rope_theta": 1e5, "rope_type": "default"}}) == {"rope_theta": 1e5}
    llama3 = {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}
    assert legacy_rope_keys({"rope_parameters": llama3}) == {
        "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    assert legacy_rope_keys({"rope_parameters": llama3, "rope_theta": 5e5, "rope_scaling": {"x": 1}}) == {}
    per_layer_type = {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}
    assert legacy_rope_keys({"rope_parameters": per_layer_type}) == {}


def test_load_compressed_model_refuses_an_export_missing_a_tensor(tmp_path: Path) -> None:
    """A weight absent from the folder is an error, not a randomly initialised parameter."""
    from safetensors.torch import load_file, save_file

    model, names = _pruned_tiny_model((2, 4))
    out = export_compressed(model, tmp_path / "c", "sparse-24-bitmask", names)
    state = load_file(str(out / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"missing \['model.norm.weight'\]"):
        load_compressed_model(out)
