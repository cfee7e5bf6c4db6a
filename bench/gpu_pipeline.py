"""Every stage of a job on a CUDA GPU, run directly (no Ray or Prefect: the GPU machine has neither).

Builds a Llama-shaped random model (default: 4 decoder layers of Llama-3-8B width would not fit a quick
run on every card, so hidden 2048 / MLP 8192 / 8 layers), a byte-level BPE tokenizer and a local text,
then runs calibrate -> prune (SparseGPT 2:4) -> finetune (bf16 autocast, KD) -> evaluate -> kernel_tune
on `cuda`, checking the invariants a job relies on (2:4 in every group, pruned weights still zero after
fine-tuning) and printing each stage's time. Writes JSON to `--out`.

    python bench/gpu_pipeline.py --out bench/results/gpu_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from service_fixtures import TEXT  # noqa: E402
from tiny_models import build_tiny_tokenizer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from pipelines.recipe import DataSpec, Recipe  # noqa: E402
from pipelines.stage import StageContext  # noqa: E402
from pipelines.stages import get_stage  # noqa: E402

RECIPE = {
    "model": "local",
    "stages": [
        {"stage": "calibrate", "samples": 32, "seq_len": 512, "batch_size": 8},
        {"stage": "prune", "method": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
        {"stage": "finetune", "steps": 20, "batch_size": 4, "seq_len": 512, "beta_kd": 1.0, "lr": 1e-4},
        {"stage": "evaluate", "seq_len": 512, "max_windows": 8},
        {"stage": "kernel_tune", "tokens": [1, 16, 2048], "repeats": 20},
    ],
}


def build_model(directory: Path, hidden: int, mlp: int, layers: int) -> None:
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 512),
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_pipeline.json")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    recipe = Recipe.model_validate(RECIPE)
    work = Path(tempfile.mkdtemp(prefix="gpu-pipeline-"))
    text = work / "text.txt"
    text.write_text(TEXT * 40)
    base = work / "base"
    build_model(base, args.hidden, args.mlp, args.layers)
    inputs = {"model": base, "base_model": base}
    rows = []
    for index, spec in enumerate(recipe.stages):
        ctx = StageContext(workdir=work / f"{index:02d}-{spec.stage}", inputs=dict(inputs),
                           data=DataSpec(calibration=str(text), evaluation=str(text)), seed=0, device=device,
                           cache_dir=work / "cache")
        ctx.workdir.mkdir()
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        started = time.perf_counter()
        result = get_stage(spec.stage)(spec, ctx)
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        inputs.update(result.outputs)
        top = {m.name: round(m.value, 4) for m in result.metrics if "." not in m.name}
        rows.append({"stage": spec.stage, "seconds": round(seconds, 2), "peak_gpu_gib": round(peak / 2**30, 2),
                     "metrics": top, "notes": result.notes})
        print(f"{spec.stage:<12} {seconds:8.2f} s  peak {peak / 2**30:6.2f} GiB  {top}  {result.notes}", flush=True)
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(inputs["model"])
    bad_groups = 0
    for layer in final.model.layers:
        for linear in (layer.mlp.up_proj, layer.mlp.down_proj, layer.self_attn.q_proj):
            bad_groups += int(((linear.weight.reshape(linear.weight.shape[0], -1, 4) != 0).sum(-1) > 2).sum())
    print(f"2:4 violations after fine-tuning: {bad_groups}")
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(sys.argv), "model": vars(args) | {"out": str(args.out)},
            "rows": rows, "violations_2_4_after_finetune": bad_groups}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1, default=str))


if __name__ == "__main__":
    main()
