"""The calibrate stage: token ids, and per-Linear input statistics when asked."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from pipelines.modelio import load_model
from pipelines.recipe import CalibrateStage, DataSpec
from pipelines.stage import StageContext
from pipelines.stages.calibrate import read_calibration, run


def test_calibrate_writes_ids_and_exact_input_norms(tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    data = DataSpec(calibration=str(tiny_text_file), evaluation=str(tiny_text_file))
    calls = []
    ctx = StageContext(workdir=tmp_path / "w", inputs={"model": tiny_model_dir}, data=data, seed=3,
                       progress=lambda d, t, m: calls.append((d, t)))
    result = run(CalibrateStage(samples=5, seq_len=16, batch_size=2, input_norms=True), ctx)

    path = result.outputs["calibration"]
    assert path == tmp_path / "w" / "calibration.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        meta = handle.metadata()
    assert meta == {"num_tokens": "80", "source": str(tiny_text_file), "seq_len": "16", "samples": "5"}
    projections = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    expected = {"input_ids"} | {f"sq_norm.model.layers.{i}.{p}" for i in range(2) for p in projections}
    assert keys == expected
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [(m.name, m.value) for m in result.metrics] == [("calibration_tokens", 80.0)]

    cal = read_calibration(path)
    assert cal.input_ids.shape == (5, 16) and cal.input_ids.dtype == torch.int64
    assert cal.sq_norms["model.layers.0.mlp.down_proj"].shape == (128,)
    assert all(v.dtype == torch.float32 for v in cal.sq_norms.values())
    # layer 0's q/k/v input is input_layernorm(embeddings): recompute it by hand
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(cal.input_ids))
    expected_q = x.reshape(-1, 64).square().sum(0)
    for proj in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(cal.sq_norms[f"model.layers.0.self_attn.{proj}"], expected_q)


def test_calibrate_by_default_writes_the_ids_without_running_the_model(
    tiny_model_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    """The windows are the same as with input norms; no forward pass, so no statistics."""
    data = DataSpec(calibration=str(tiny_text_file), evaluation=str(tiny_text_file))
    spec = CalibrateStage(samples=5, seq_len=16, batch_size=2)
    assert not spec.input_norms
    plain = run(spec, StageContext(workdir=tmp_path / "a", inputs={"model": tiny_model_dir}, data=data, seed=3))
    full = run(CalibrateStage(samples=5, seq_len=16, batch_size=2, input_norms=True),
               StageContext(workdir=tmp_path / "b", inputs={"model": tiny_model_dir}, data=data, seed=3))
    with safe_open(str(plain.outputs["calibration"]), framework="pt") as handle:
        assert set(handle.keys()) == {"input_ids"}
        assert handle.metadata()["num_tokens"] == "80"
    a, b = read_calibration(plain.outputs["calibration"]), read_calibration(full.outputs["calibration"])
    assert torch.equal(a.input_ids, b.input_ids) and a.sq_norms == {}
    assert [(m.name, m.value) for m in plain.metrics] == [("calibration_tokens", 80.0)]
