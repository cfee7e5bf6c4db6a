"""The quantize stage on the tiny Llama: prune 2:4 -> quantize -> evaluate, its artifacts, and the recipe rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import stage_context
from transformers import AutoModelForCausalLM

from pipelines.export import is_24_sparse
from pipelines.modelio import load_model
from pipelines.quantize import SIDECAR_NAME, fp8_codes, is_fp8_model, read_fp8_layers
from pipelines.quantize.emulate import Fp8EmulatedLinear, attach_emulation
from pipelines.recipe import EvaluateStage, QuantizeStage, RecipeError, parse_recipe, prune_stage
from pipelines.stage import StageError
from pipelines.stages import evaluate, prune, quantize

LINEARS = 14


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The tiny Llama magnitude-pruned to 2:4, stored in bf16 (as real checkpoints are)."""
    tmp = tmp_path_factory.mktemp("pruned")
    bf16 = tmp / "bf16"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model.save_pretrained(bf16)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, bf16 / name)
    ctx = stage_context(tmp, bf16, bf16, tmp / "unused.txt")
    result = prune.run(prune_stage(method="magnitude", pattern="2:4", export="none"), ctx)
    return result.outputs["model"]


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.safetensors"
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    save_file({"input_ids": ids}, str(path), metadata={"num_tokens": "128", "seq_len": "32", "samples": "4"})
    return path


def _quantize(tmp_path: Path, model_dir: Path, text: Path, calibration: Path | None = None, **spec):
    ctx = stage_context(tmp_path, model_dir, model_dir, text)
    if calibration is not None:
        ctx.inputs["calibration"] = calibration
    return quantize.run(QuantizeStage(**spec), ctx)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory, pruned_dir: Path, tiny_text_file: Path):
    return _quantize(tmp_path_factory.mktemp("q"), pruned_dir, tiny_text_file)


def test_quantize_keeps_24_zeros_and_writes_grid_weights_with_sidecar(pruned_dir: Path, quantized) -> None:
    assert set(quantized.outputs) == {"model", "compressed_model", "report"}
    out = quantized.outputs["model"]
    assert is_fp8_model(out) and not is_fp8_model(pruned_dir)
    layers = read_fp8_layers(out)
    assert len(layers) == LINEARS
    before = load_file(str(pruned_dir / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for name, layer in layers.items():
        weight, original = after[f"{name}.weight"], before[f"{name}.weight"]
        assert weight.dtype == torch.bfloat16 and layer.activations == "dynamic" and layer.input_scale is None
        assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.shape == (weight.shape[0],)
        assert torch.all(weight[original == 0] == 0) and is_24_sparse(weight)
        codes = fp8_codes(weight, layer.weight_scale)
        # stored weight == codes * scale rounded to bf16, i.e. on the grid; codes recovered exactly
        assert torch.equal((codes.float() * layer.weight_scale[:, None]).to(torch.bfloat16), weight)
        assert float(codes.float().abs().max()) == 448.0
        assert not torch.equal(weight, original)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(after[name], before[name])
    metrics = {m.name: m.value for m in quantized.metrics}
    assert metrics["zeros_preserved"] == 1.0
    assert metrics["sparsity_before"] == pytest.approx(0.5) and metrics["sparsity_after"] >= metrics["sparsity_before"]
    assert 0 < metrics["weight_rel_error"] < 0.05 and metrics["quantized_linears"] == LINEARS
    assert all(0 < metrics[f"weight_rel_error.{n}"] < 0.05 for n in layers)
    report = json.loads(quantized.outputs["report"].read_text())
    assert report["scheme"] == "fp8_dynamic" and len(report["linears"]) == LINEARS


def test_evaluate_reports_emulated_fp8_perplexity(tmp_path: Path, pruned_dir: Path, quantized,
                                                  tiny_text_file: Path) -> None:
    spec = EvaluateStage(seq_len=32, max_windows=4, compare_dense=False)
    fp8 = evaluate.run(spec, stage_context(tmp_path / "a", quantized.outputs["model"], pruned_dir, tiny_text_file))
    plain = evaluate.run(spec, stage_context(tmp_path / "b", pruned_dir, pruned_dir, tiny_text_file))
    report = json.loads(fp8.outputs["report"].read_text())
    assert report["quantization"] == {"scheme": "fp8_dynamic", "activations": "dynamic", "linears": LINEARS,
                                      "fp8_execution": "emulated"}
    assert fp8.summary["fp8_execution"] == "emulated" and fp8.summary["quantization"] == "fp8_dynamic"
    assert any("fp8_execution: emulated" in note for note in fp8.notes)
    assert json.loads(plain.outputs["report"].read_text())["quantization"] is None
    assert report["sparsity"]["total"]["sparsity"] >= 0.5
    ppl, base = fp8.summary["perplexity"], plain.summary["perplexity"]
    assert ppl != base and abs(ppl / base - 1) < 0.05


def _emulated(model_dir: Path) -> torch.nn.Module:
    model = load_model(model_dir)
    attach_emulation(model, read_fp8_layers(model_dir))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(ids).logits.float()


def test_compressed_export_loads_with_our_loader_transformers_and_compressed_tensors(quantized) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig

    from pipelines.export import load_compressed_model

    folder = quantized.outputs["compressed_model"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format"] == "float-quantized" and config["quantization_status"] == "compressed"
    group = config["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == "channel" and group["input_activations"]["strategy"] == "token"
    assert group["input_activations"]["dynamic"] is True and len(group["targets"]) == LINEARS
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    tensors = load_file(str(folder / "model.safetensors"))
    codes = tensors["model.layers.0.mlp.up_proj.weight"]
    assert codes.dtype == torch.float8_e4m3fn and tensors["model.layers.0.mlp.up_proj.weight_scale"].shape[1] == 1
    assert is_24_sparse(codes.float())

    reference = _logits(_emulated(quantized.outputs["model"]))
    ours = load_compressed_model(folder, dtype=torch.float32)
    assert isinstance(ours.model.layers[0].mlp.up_proj, Fp8EmulatedLinear)
    assert torch.equal(_logits(ours), reference)

    stock = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    stock_logits = _logits(stock)  # the first forward decompresses; inputs are fake-quantized per token
    # the tolerance is far below what unquantized activations change (1.7e-2 on these logits)
    assert torch.allclose(stock_logits, reference, rtol=0, atol=1e-5)
    weight = stock.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(weight.float(), ours.model.layers[1].self_attn.o_proj.weight.float())

    qconfig = QuantizationConfig.model_validate(config)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    apply_quantization_config(model, qconfig)
    compressor = ModelCompressor(quantization_config=qconfig)
    compressor.compress_model(model)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    compressor.decompress_model(model)
    assert torch.allclose(_logits(model.eval()), reference, rtol=0, atol=1e-5)


def test_static_activations_need_and_use_calibration(tmp_path: Path, pruned_dir: Path, calibration: Path,
                                                     tiny_text_file: Path) -> None:
    with pytest.raises(StageError, match="calibration"):
        _quantize(tmp_path / "x", pruned_dir, tiny_text_file, activations="static")
    result = _quantize(tmp_path / "s", pruned_dir, tiny_text_file, calibration, activations="static",
                       targets=[r"re:.*\.mlp\.\w+_proj$"])
    layers = read_fp8_layers(result.outputs["model"])
    assert len(layers) == 6 and all(layer.activations == "static" for layer in layers.values())
    assert all(layer.input_scale.shape == () and float(layer.input_scale) > 0 for layer in layers.values())
    folder = result.outputs["compressed_model"]
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["strategy"] == "tensor" and group["input_activations"]["dynamic"] is False
    reference = _logits(_emulated(result.outputs["model"]))
    stock = _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    assert torch.allclose(stock, reference, rtol=0, atol=1e-5)
    with pytest.raises(StageError, match="already FP8"):
        _quantize(tmp_path / "again", result.outputs["model"], tiny_text_file)
    assert (result.outputs["model"] / SIDECAR_NAME).is_file()


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"stage": "quantize"}, {"stage": "prune", "method": "magnitude"}],
         "stages.0: 'quantize' comes before the 'prune' at stages.1"),
        ([{"stage": "prune", "method": "magnitude"}, {"stage": "quantize"}, {"stage": "finetune"}],
         "stages.1: 'quantize' comes before the 'finetune' at stages.2"),
        ([{"stage": "quantize"}, {"stage": "quantize"}], "stages.1: a second 'quantize'"),
        ([{"stage": "evaluate"}, {"stage": "quantize"}], "stages.1: 'quantize' comes after the 'evaluate'"),
        ([{"stage": "quantize", "activations": "static"}], "stages.0: activations 'static' needs a 'calibrate'"),
        ([{"stage": "quantize", "scheme": "int8"}], "stages.0.quantize.scheme"),
        ([{"stage": "quantize", "activation": "static"}], "stages.0.quantize.activation: Extra inputs"),
    ],
)
def test_recipe_refuses_bad_quantize_stages(stages: list, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({"stages": stages})


def test_recipe_accepts_prune_finetune_quantize_evaluate() -> None:
    recipe = parse_recipe({"stages": [{"stage": "calibrate"}, {"stage": "prune", "method": "sparsegpt",
                                       "pattern": "2:4"}, {"stage": "finetune"},
                                      {"stage": "quantize", "activations": "static"}, {"stage": "evaluate"}]})
    assert isinstance(recipe.stages[3], QuantizeStage) and recipe.stages[3].scheme == "fp8_dynamic"



def test_packed_24_export_loads_with_our_loader_and_is_refused_by_stock(tmp_path: Path, pruned_dir: Path,
                                                                        quantized, tiny_text_file: Path) -> None:
    from pipelines.export import load_compressed_model

    result = _quantize(tmp_path, pruned_dir, tiny_text_file, export="sparse-24-bitmask")
    folder = result.outputs["compressed_model"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["sparsity_config"]["format"] == "sparse-24-bitmask" and config["format"] == "float-quantized"
    tensors = load_file(str(folder / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.compressed"]
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == (64, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight"].numel() == 0  # the guard
    bitmask = tensors["model.layers.0.mlp.down_proj.bitmask"]
    assert packed.numel() + bitmask.numel() == 0.625 * 64 * 128  # bytes per weight: 1/2 values + 1/8 mask
    reference = _logits(_emulated(quantized.outputs["model"]))
    assert torch.equal(_logits(load_compressed_model(folder, dtype=torch.float32)), reference)
    # The [0] guard: refused, never random. transformers 5.24 + compressed-tensors 0.20 refuse the load;
    # 5.17 + 0.19 (the H200 image) load the empty weight as it is, and the first forward raises.
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes|shapes cannot be multiplied"):
        _logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def test_packed_24_export_refuses_a_dense_model(tmp_path: Path, tiny_model_dir: Path, tiny_text_file: Path) -> None:
    with pytest.raises(StageError, match="export 'sparse-24-bitmask'.*not 2:4"):
        _quantize(tmp_path, tiny_model_dir, tiny_text_file, export="sparse-24-bitmask")


def test_targets_that_match_nothing_are_refused_naming_the_field(tmp_path: Path, pruned_dir: Path,
                                                                   tiny_text_file: Path) -> None:
    with pytest.raises(StageError, match="quantize: targets.0: pattern 'nothing_proj' matches no Linear"):
        _quantize(tmp_path, pruned_dir, tiny_text_file, targets=["nothing_proj"])


def test_gptq_rounding_stage(tmp_path: Path, pruned_dir: Path, calibration: Path, quantized,
                             tiny_text_file: Path) -> None:
    with pytest.raises(RecipeError, match="stages.0: weight_rounding 'gptq' needs a 'calibrate'"):
        parse_recipe({"stages": [{"stage": "quantize", "weight_rounding": "gptq"}]})
    result = _quantize(tmp_path, pruned_dir, tiny_text_file, calibration, weight_rounding="gptq", export="none")
    out = result.outputs["model"]
    layers, nearest = read_fp8_layers(out), read_fp8_layers(quantized.outputs["model"])
    before, after = load_file(str(pruned_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    differs = 0
    for name, layer in layers.items():
        assert torch.equal(layer.weight_scale, nearest[name].weight_scale)  # scales from the original rows
        weight = after[f"{name}.weight"]
        assert torch.all(weight[before[f"{name}.weight"] == 0] == 0)
        codes = fp8_codes(weight, layer.weight_scale)
        assert torch.equal((codes.float() * layer.weight_scale[:, None]).to(torch.bfloat16), weight)
        differs += int(not torch.equal(weight, load_file(str(quantized.outputs["model"] / "model.safetensors"))[
            f"{name}.weight"]))
    assert differs == LINEARS  # GPTQ moved codes in every Linear
    metrics = {m.name: m.value for m in result.metrics}
    assert metrics["zeros_preserved"] == 1.0 and 0 < metrics["weight_rel_error"] < 0.1
    assert result.summary["weight_rounding"] == "gptq"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stage_and_evaluate_on_cuda_match_cpu(tmp_path: Path, pruned_dir: Path, calibration: Path, quantized,
                                              tiny_text_file: Path) -> None:
    def ctx(name: str, model_dir: Path):
        context = stage_context(tmp_path / name, model_dir, pruned_dir, tiny_text_file)
        context.device = torch.device("cuda")
        context.inputs["calibration"] = calibration
        return context

    nearest = quantize.run(QuantizeStage(export="none"), ctx("n", pruned_dir))
    cpu_file = load_file(str(quantized.outputs["model"] / "model.safetensors"))
    for name, tensor in load_file(str(nearest.outputs["model"] / "model.safetensors")).items():
        assert torch.equal(tensor, cpu_file[name]), name  # rounding to nearest is device-independent
    gptq = quantize.run(QuantizeStage(weight_rounding="gptq", export="none"), ctx("g", pruned_dir))
    assert {m.name: m.value for m in gptq.metrics}["zeros_preserved"] == 1.0
    spec = EvaluateStage(seq_len=32, max_windows=4, compare_dense=False)
    on_gpu = evaluate.run(spec, ctx("e", nearest.outputs["model"]))
    on_cpu = evaluate.run(spec, stage_context(tmp_path / "c", quantized.outputs["model"], pruned_dir, tiny_text_file))
    if evaluate._fp8_gemms_available(torch.device("cuda")):  # real FP8 GEMMs, the rest of the model in bf16
        assert on_gpu.summary["fp8_execution"] == "gpu"
        assert on_gpu.summary["perplexity"] == pytest.approx(on_cpu.summary["perplexity"], rel=2e-2)
    else:
        assert on_gpu.summary["fp8_execution"] == "emulated"
        assert on_gpu.summary["perplexity"] == pytest.approx(on_cpu.summary["perplexity"], rel=1e-3)
