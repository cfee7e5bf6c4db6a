"""The streaming prune: same masks and weights as in memory, a loadable sharded folder, and a bounded host memory."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipelines.masks import load_masks, read_mask_metadata
from pipelines.recipe import DataSpec, prune_stage
from pipelines.stage import StageContext, StageError
from pipelines.stages.prune import decide_streaming, run
from pipelines.streamio import INDEX_FILE, CheckpointError, CheckpointReader, write_safetensors_stream

ROOT = Path(__file__).resolve().parents[2]


def _save_llama(out: Path, tokenizer_from: Path, layers: int, hidden: int, mlp: int, dtype: torch.dtype, tied: bool,
                seed: int = 0, shard_size: str = "5GB") -> Path:
    """A random Llama model folder (weights in `dtype`) with the tokenizer of `tokenizer_from`."""
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).eval().save_pretrained(out, max_shard_size=shard_size)
    for path in tokenizer_from.glob("tokenizer*"):
        shutil.copyfile(path, out / path.name)
    return out


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.safetensors"
    save_file({"input_ids": torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(1))}, str(path))
    return path


def _run(tmp_path: Path, model_dir: Path, calibration: Path, name: str, device: str = "cpu", **fields):
    ctx = StageContext(workdir=tmp_path / name, inputs={"model": model_dir, "calibration": calibration},
                       data=DataSpec(), seed=0, device=torch.device(device))
    return run(prune_stage(**fields), ctx)


def _digest(model_dir: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(model_dir.glob("*.safetensors")))).hexdigest()


def _assert_same(streamed, in_memory, tied: bool) -> None:
    masks_s, masks_m = load_masks(streamed.outputs["masks"]), load_masks(in_memory.outputs["masks"])
    assert masks_s.keys() == masks_m.keys() and masks_s
    for name in masks_m:
        assert torch.equal(masks_s[name], masks_m[name]), name
    assert read_mask_metadata(streamed.outputs["masks"]) == read_mask_metadata(in_memory.outputs["masks"])
    assert not (streamed.outputs["masks"].parent / "masks-parts").exists()  # spilled masks, removed once written
    a = AutoModelForCausalLM.from_pretrained(streamed.outputs["model"])  # plain transformers, sharded folder
    b = AutoModelForCausalLM.from_pretrained(in_memory.outputs["model"])
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_b:
        assert state_a[key].dtype == state_b[key].dtype, key
        torch.testing.assert_close(state_a[key], state_b[key], rtol=1e-6, atol=1e-7, msg=key)
    assert (a.lm_head.weight is a.model.embed_tokens.weight) == tied
    metrics_s = {m.name: m.value for m in streamed.metrics}
    metrics_m = {m.name: m.value for m in in_memory.metrics}
    for key, value in metrics_m.items():
        if key.startswith(("sparsity", "recon_error", "damping")):
            assert metrics_s[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize(
    ("method", "pattern"),
    [("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"), ("wanda", "2:4"),
     ("magnitude", "unstructured"), ("magnitude", "2:4")],
)
def test_streaming_equals_in_memory(tmp_path: Path, tiny_model_dir: Path, calibration: Path, method: str,
                                    pattern: str) -> None:
    fields = {"method": method, "pattern": pattern}
    source = _digest(tiny_model_dir)
    in_memory = _run(tmp_path, tiny_model_dir, calibration, "memory", streaming=False, **fields)
    streamed = _run(tmp_path, tiny_model_dir, calibration, "stream", streaming=True, **fields)
    _assert_same(streamed, in_memory, tied=True)
    assert _digest(tiny_model_dir) == source  # the memory-mapped checkpoint is read, never written through

    out = streamed.outputs["model"]
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3  # the rest, then one shard per decoder layer
    assert (out / "tokenizer.json").exists() and not (out / "model.safetensors").exists()
    assert "compressed_model" not in streamed.outputs and "compressed_model" in in_memory.outputs
    assert any(note.startswith("export: no compressed copy") for note in streamed.notes)
    report = json.loads(streamed.outputs["report"].read_text())
    assert report["streaming"] is True and report["streaming_reason"] == "streaming true in the recipe"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "pattern"), [("sparsegpt", "2:4"), ("sparsegpt", "unstructured"),
                                                 ("wanda", "unstructured")])
def test_streaming_equals_in_memory_on_the_gpu(tmp_path: Path, tiny_model_dir: Path, calibration: Path, method: str,
                                               pattern: str) -> None:
    fields = {"method": method, "pattern": pattern, "dtype": "bfloat16"}
    in_memory = _run(tmp_path, tiny_model_dir, calibration, "memory", "cuda", streaming=False, **fields)
    streamed = _run(tmp_path, tiny_model_dir, calibration, "stream", "cuda", streaming=True, **fields)
    _assert_same(streamed, in_memory, tied=True)
    assert {m.name: m.value for m in streamed.metrics}["peak_gpu_mem_bytes"] > 0


def test_streaming_untied_bf16_owl_sharded_source(tmp_path: Path, tiny_model_dir: Path, calibration: Path) -> None:
    """An untied LM head, weights stored in bf16 and computed in fp32, a sharded source, the OWL pass streamed too."""
    source = _save_llama(tmp_path / "src", tiny_model_dir, layers=3, hidden=64, mlp=128, dtype=torch.bfloat16,
                         tied=False, seed=3, shard_size="100KB")
    assert (source / INDEX_FILE).exists()
    fields = {"method": "wanda", "sparsity": 0.5, "profile": "owl", "export": "none"}
    in_memory = _run(tmp_path, source, calibration, "memory", streaming=False, **fields)
    streamed = _run(tmp_path, source, calibration, "stream", streaming=True, **fields)
    _assert_same(streamed, in_memory, tied=False)
    weights = CheckpointReader(streamed.outputs["model"])
    assert weights.stored_dtype() == torch.bfloat16 and "lm_head.weight" in weights.names()
    report = json.loads(streamed.outputs["report"].read_text())
    assert report["layer_sparsity"] == json.loads(in_memory.outputs["report"].read_text())["layer_sparsity"]


def test_auto_streams_above_host_memory_gb(tiny_model_dir: Path) -> None:
    weights = CheckpointReader(tiny_model_dir).weight_bytes(torch.float32)
    low = prune_stage(method="magnitude", host_memory_gb=weights / 2e9)
    high = prune_stage(method="magnitude", host_memory_gb=weights * 2 / 1e9)
    assert decide_streaming(low, tiny_model_dir, torch.float32)[0] is True
    assert decide_streaming(high, tiny_model_dir, torch.float32)[0] is False
    assert decide_streaming(low, tiny_model_dir, torch.bfloat16)[0] is False  # half the bytes at bf16
    assert "host_memory_gb" in decide_streaming(low, tiny_model_dir, torch.float32)[1]


def test_streaming_errors_name_the_fields(tmp_path: Path, tiny_model_dir: Path, calibration: Path) -> None:
    with pytest.raises(ValueError, match="host_memory_gb and streaming"):
        prune_stage(method="wanda", streaming=False, host_memory_gb=1.0)
    with pytest.raises(ValueError, match="export and streaming"):
        prune_stage(method="wanda", streaming=True, export="sparse-bitmask")
    with pytest.raises(StageError, match="export and streaming"):  # auto decided to stream at run time
        _run(tmp_path, tiny_model_dir, calibration, "x", method="wanda", export="sparse-bitmask",
             host_memory_gb=1e-9)
    with pytest.raises(CheckpointError, match="streaming"):
        CheckpointReader(tmp_path)


def test_safetensors_stream_round_trips_and_checks_the_layout(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(7),
               "c": torch.ones(2, 3, dtype=torch.uint8)}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    path = tmp_path / "x.safetensors"
    write_safetensors_stream(path, layout, {"k": "v"}, iter(tensors.items()))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
        for name, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(name), tensor)
    with pytest.raises(ValueError, match="expected"):
        write_safetensors_stream(path, layout, {}, iter([("b", tensors["b"])]))
    with pytest.raises(ValueError, match="never written"):
        write_safetensors_stream(path, layout, {}, iter(list(tensors.items())[:2]))


_CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    from pipelines.recipe import DataSpec, prune_stage
    from pipelines.stage import StageContext
    from pipelines.stages.prune import run

    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

    model_dir, warm_up_model, calibration, work = sys.argv[1:5]
    streaming = sys.argv[5] == "1"
    spec = prune_stage(method="wanda", sparsity=0.5, streaming=streaming, export="none")

    def context(model, work):
        return StageContext(workdir=Path(work), inputs={"model": Path(model), "calibration": Path(calibration)},
                            data=DataSpec(), seed=0)

    run(spec, context(warm_up_model, work + "-warm-up"))  # lazy imports and first-use allocations, not measured
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the current RSS
    base = status("VmRSS")
    run(spec, context(model_dir, work))
    print("RESULT " + json.dumps({"growth": status("VmHWM") - base}))
""")


def _peak_growth(model_dir: Path, warm_up_model: Path, calibration: Path, work: Path, streaming: bool) -> int:
    """Peak RSS growth of one prune stage run in a fresh process, after a warm-up run on `warm_up_model`.

    glibc's malloc would serve the test's 1-4 MB tensors from its heap (its mmap threshold rises to 32 MB
    as large blocks are freed) and keep freed heap pages, so the RSS would drift layer by layer; tensors
    of a real model are far above that threshold and always mmapped. MALLOC_MMAP_THRESHOLD_ gives the
    small test model that behaviour.
    """
    args = [str(model_dir), str(warm_up_model), str(calibration), str(work), "1" if streaming else "0"]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
             "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULT "))["growth"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_streaming_keeps_host_memory_under_a_cap_the_in_memory_path_exceeds(
    tmp_path: Path, tiny_model_dir: Path, calibration: Path
) -> None:
    """12 layers of 3.1 M fp32 parameters (152 MB of weights), Wanda: streaming grows the peak RSS by a few layers'
    worth (one layer, its copy being written, the statistics), loading whole by at least the model."""
    model_dir = _save_llama(tmp_path / "model", tiny_model_dir, layers=12, hidden=512, mlp=1536, dtype=torch.float32,
                            tied=True)
    weights = CheckpointReader(model_dir).weight_bytes()
    cap = weights // 2
    streamed = _peak_growth(model_dir, tiny_model_dir, calibration, tmp_path / "stream", streaming=True)
    in_memory = _peak_growth(model_dir, tiny_model_dir, calibration, tmp_path / "memory", streaming=False)
    assert streamed < cap < weights <= in_memory, (streamed, cap, in_memory)
