"""Benchmark: 2:4 sparsity composed with FP8 on Hopper, per Llama Linear shape and token count, then end to end.

Per (shape, tokens), on a 2:4-pruned random weight quantized to FP8 E4M3 (per-channel scales, as the quantize
stage does), each timed in back-to-back pairs with dense bf16 (`nn.Linear` on the dequantized weight):

- dense FP8: `torch._scaled_mm` after the fused per-token activation quantization (`kernels.fp8`);
- bf16 2:4: our CUTLASS sm90 2:4 kernel, with the config the tuner found for that row;
- FP8 2:4: our CUTLASS sm90 FP8 2:4 kernel (scales in the epilogue, bf16 out), quantization included;
- tuned: the `SparseLinear` a tuned FP8 model runs (eager routes, the wrapper's per-call cost included).

Per-token quantization takes our CUDA kernel (`kernels/csrc/fp8_quant.cu`); `--quantizer triton` times the
Triton kernel instead, whose launch cost tens of microseconds of host time per call on an H200.

Every candidate is checked first: FP8 outputs against the dequantized FP8 reference, bf16 against dense.
End to end: a 4-layer Llama-3-8B-shaped model (bf16, random weights, 2:4 by magnitude, every decoder
Linear quantized), dense bf16 against the bf16 2:4 plan and the FP8 2:4 plan: prefill at 2048 and 8192
tokens (with the logits of every position, as `model(ids)` does, and of the last one only, as a server's
prefill does: the 128256 x 4096 output layer is neither sparse nor FP8), decode per token from a CUDA graph
and eagerly. Eager decode is paced by the host, whose speed drifts on these machines: the models take turns
step by step (`kernels_bench.interleaved_decode`) in blocks of 32 steps from a 128-token prompt, and the ratio is
the median over adjacent steps (also given: the ratio of medians, and of 10th percentiles).

    PYTHONUNBUFFERED=1 python bench/fp8_kernels_bench.py --out $OUT     # on an H200
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.kernels_bench import _linear, interleaved_decode, run_decode_graph, run_prefill  # noqa: E402
from kernels.autotune import TuneSettings, TuneTarget, paired_ratios, shape_key, tune  # noqa: E402
from kernels.backends import make_backends  # noqa: E402
from kernels.fp8 import dequantize, quantize_weight, reference_linear  # noqa: E402
from kernels.fp8_backends import fp8_codes  # noqa: E402
from kernels.plan import KernelChoice, SparseLinear, apply_plan, environment_of, plan_from_tuning  # noqa: E402
from kernels.sparse24 import mask_24  # noqa: E402
from kernels.timing import copies_to_defeat_l2, device_info, time_calls  # noqa: E402

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
TOKENS = [1, 16, 128, 512, 2048, 8192]
log = logging.getLogger("bench")


def fp8_layer(out_f: int, in_f: int, dev: torch.device, gen: torch.Generator):
    """(dequantized bf16 weight, 2:4 mask, fp32 per-channel scale) of a random 2:4 FP8 layer."""
    w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16, generator=gen)
    mask = mask_24(w)
    codes, scale = quantize_weight(w * mask)
    return dequantize(codes, scale, torch.bfloat16), mask, scale


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def retime(weight, mask, scale, tuned_shape: dict, repeats: int, rounds: int = 5) -> list[dict]:
    dev = weight.device
    out_f, in_f = weight.shape
    backends = make_backends(sorted({"dense", "dense-fp8", "cutlass-sm90", "cutlass-sm90-fp8"}
                                    | {c["backend"] for c in tuned_shape.values()}))
    copies = copies_to_defeat_l2(weight.numel(), dev)
    choices = {int(t): KernelChoice(**c) for t, c in tuned_shape.items()}
    codes, _ = fp8_codes(weight, scale)
    rows = []
    for tokens, choice in tuned_shape.items():
        xs = [torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        ref = torch.nn.functional.linear(xs[0], weight)
        ref_fp8 = reference_linear(xs[0], codes, scale)
        row = {"shape": shape_key(out_f, in_f), "out": out_f, "in": in_f, "tokens": tokens,
               "choice": choice["backend"], "config": choice.get("config", {}), "reason": choice.get("reason")}
        searched = choice.get("searched_configs", {})
        calls = {}
        for label, name in (("dense_fp8", "dense-fp8"), ("bf16_24", "cutlass-sm90"), ("fp8_24", "cutlass-sm90-fp8")):
            b = backends[name]
            cfg = {tokens: searched[name]} if name in searched else None
            extra = {"scale": scale} if b.fp8 else {}
            try:
                hs = [b.prepare(weight if i == 0 else weight.clone(), mask if b.sparse else None, cfg, **extra)
                      for i in range(copies)]
                row[f"{label}_rel_err"] = _rel(b.linear(xs[0], hs[0]), ref_fp8 if b.fp8 else ref)
                calls[label] = lambda i, b=b, hs=hs, xs=xs: b.linear(xs[i], hs[i])
            except Exception as error:  # noqa: BLE001 - recorded in the row
                row[f"{label}_error"] = str(error)[:300]
        dense_modules = [_linear(weight if i == 0 else weight.clone()) for i in range(copies)]
        tuned_modules = [SparseLinear(m, mask, choices, backends, scale) for m in dense_modules]
        row["eager_route"] = tuned_modules[0].backend_for(tokens)
        row["tuned_rel_err"] = _rel(tuned_modules[0](xs[0]), ref)
        calls["dense"] = lambda i, ms=dense_modules, xs=xs: ms[i](xs[i])
        calls["tuned"] = lambda i, ms=tuned_modules, xs=xs: ms[i](xs[i])
        samples: dict[str, list[float]] = {label: [] for label in calls}

        def timed(label: str, calls=calls, samples=samples):
            def run() -> float:
                samples[label].append(time_calls(calls[label], copies, repeats=repeats).median_ms)
                return samples[label][-1]

            return run

        ratios = {label: paired_ratios(timed("dense"), timed(label), rounds) for label in calls if label != "dense"}
        if "fp8_24" in calls and "dense_fp8" in calls:
            ratios_fp8 = paired_ratios(timed("dense_fp8"), timed("fp8_24"), rounds)
            row["fp8_24_vs_dense_fp8_x"] = statistics.median(ratios_fp8)
        for label, times in samples.items():
            row[f"{label}_ms"] = statistics.median(times)
        for label, values in ratios.items():
            row[f"{label}_x"] = statistics.median(values)
            row[f"{label}_pair_ratios"] = [round(v, 4) for v in values]
        rows.append(row)
        log.info("%s %d: %s", row["shape"], tokens, {k: round(v, 3) for k, v in row.items() if k.endswith("_x")})
    return rows


def e2e_models(tuned: dict, settings: TuneSettings, dev: torch.device) -> tuple[Any, dict[str, Any], dict]:
    """(config, {"dense", "bf16_24", "fp8_24": model}, facts) for the 4-layer Llama-3-8B-shaped model: every
    decoder Linear 2:4 by magnitude and FP8-rounded; the two sparse models carry the bf16 2:4 and FP8 2:4 plans
    (shapes missing from `tuned` are tuned here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    scales = {}
    with torch.no_grad():
        for name, m in linears.items():
            codes, scales[name] = quantize_weight(m.weight * mask_24(m.weight))
            m.weight.copy_(dequantize(codes, scales[name], torch.bfloat16))
    keys = {name: shape_key(m.out_features, m.in_features) for name, m in linears.items()}
    need_bf16 = {k: TuneTarget(linears[n].weight) for n, k in keys.items()}
    need_fp8 = {k + ":fp8": TuneTarget(linears[n].weight, None, scales[n]) for n, k in keys.items()}
    missing = {k: v for k, v in {**need_bf16, **need_fp8}.items() if k not in tuned}
    if missing:
        tuned = {**tuned, **tune(missing, settings, dev)}
    layers = {k: [n for n, kk in keys.items() if kk == k] for k in need_bf16}
    plans = {
        "bf16_24": plan_from_tuning({k: tuned[k] for k in need_bf16}, layers, list(settings.tokens), "bfloat16",
                                    environment_of(dev)),
        "fp8_24": plan_from_tuning({k + ":fp8": tuned[k + ":fp8"] for k in need_bf16},
                                   {k + ":fp8": v for k, v in layers.items()}, list(settings.tokens), "bfloat16",
                                   environment_of(dev)),
    }
    models = {"dense": model}
    facts: dict = {"config": {"layers": 4, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8,
                              "vocab": 128256, "dtype": "bfloat16"}}
    for label, plan in plans.items():
        models[label] = copy.deepcopy(model)
        report = apply_plan(models[label], plan, fp8_scales=scales if label == "fp8_24" else None)
        facts[f"{label}_replaced"] = len(report.replaced)
        facts[f"{label}_plan"] = {k: {t: c.backend for t, c in s.choices.items()} for k, s in plan.shapes.items()}
        facts[f"{label}_eager"] = {k: {t: c.route(graphed=False) for t, c in s.choices.items()}
                                   for k, s in plan.shapes.items()}
    return cfg, models, facts


def e2e(tuned: dict, settings: TuneSettings, dev: torch.device, repeats: int, rounds: int = 3,
        graph_rounds: int = 7, decode_blocks: int = 20, decode_steps: int = 32) -> dict:
    cfg, models, result = e2e_models(tuned, settings, dev)
    result.update(rounds=rounds, graph_rounds=graph_rounds, decode_blocks=decode_blocks, decode_steps=decode_steps)
    samples: dict[str, list[float]] = {}
    logits: dict[str, torch.Tensor] = {}
    order = list(models)
    for r in range(rounds):
        for label in (order if r % 2 == 0 else order[::-1]):
            for tokens in (2048, 8192):
                ms, logits[f"{label}_{tokens}"] = run_prefill(models[label], cfg, dev, tokens, repeats)
                samples.setdefault(f"{label}_prefill_{tokens}_ms", []).append(ms)
                ms, _ = run_prefill(models[label], cfg, dev, tokens, repeats, last_logits=True)
                samples.setdefault(f"{label}_prefill_last_logits_{tokens}_ms", []).append(ms)
    for r in range(graph_rounds):
        for label in (order if r % 2 == 0 else order[::-1]):
            try:
                samples.setdefault(f"{label}_decode_graph_ms", []).append(run_decode_graph(models[label], cfg, dev))
            except Exception as error:  # noqa: BLE001 - recorded; the eager rows still count
                result[f"{label}_decode_graph_error"] = str(error)[:400]
    interleaved_decode(models, cfg, dev, steps=decode_steps)  # warm-up
    steps: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(decode_blocks):  # fresh caches every block (see interleaved_decode)
        for label, times in interleaved_decode(models, cfg, dev, steps=decode_steps).items():
            steps[label] += times
    pair_ratios: dict[str, list[float]] = {}
    for label in models:
        samples[f"{label}_decode_ms"] = steps[label]
        if label != "dense":
            pair_ratios[label] = [d / t for d, t in zip(steps["dense"], steps[label], strict=True)]
    result.update({k: statistics.median(v) for k, v in samples.items()})
    result["samples"] = samples
    for label in pair_ratios:
        for tokens in (2048, 8192):
            d, s = logits[f"dense_{tokens}"], logits[f"{label}_{tokens}"]
            result[f"{label}_logits_rel_err_{tokens}"] = _rel(s, d)
            for kind in ("prefill", "prefill_last_logits"):
                result[f"{label}_{kind}_{tokens}_x"] = (result[f"dense_{kind}_{tokens}_ms"]
                                                        / result[f"{label}_{kind}_{tokens}_ms"])
        quartiles = statistics.quantiles(pair_ratios[label], n=4)
        result[f"{label}_decode_pair_quartiles"] = [round(v, 4) for v in quartiles]
        result[f"{label}_decode_x"] = statistics.median(pair_ratios[label])  # of the adjacent steps' ratios
        result[f"{label}_decode_median_x"] = result["dense_decode_ms"] / result[f"{label}_decode_ms"]
        tenth = {m: statistics.quantiles(samples[f"{m}_decode_ms"], n=10)[0] for m in ("dense", label)}
        result[f"{label}_decode_p10_x"] = tenth["dense"] / tenth[label]  # the quiet host's pace
        if f"{label}_decode_graph_ms" in result and "dense_decode_graph_ms" in result:
            result[f"{label}_decode_graph_x"] = result["dense_decode_graph_ms"] / result[f"{label}_decode_graph_ms"]
    return result


def goals(rows: list[dict], e2e_result: dict | None) -> dict:
    big = [r for r in rows if r["tokens"] >= 2048 and r["out"] >= 4096 and r["in"] >= 4096]
    out = {
        "fp8_24_ge_1.3x_dense_fp8_large": {"worst": min((r.get("fp8_24_vs_dense_fp8_x") or 0) for r in big),
                                           "rows_met": sum((r.get("fp8_24_vs_dense_fp8_x") or 0) >= 1.3 for r in big),
                                           "rows": len(big)},
        "tuned_ge_2.2x_dense_bf16_large": {"worst": min((r.get("tuned_x") or 0) for r in big),
                                           "rows_met": sum((r.get("tuned_x") or 0) >= 2.2 for r in big),
                                           "rows": len(big)},
        "tuned_ge_1.00_every_row": {"worst": min((r.get("tuned_x") or 0) for r in rows),
                                    "rows_met": sum((r.get("tuned_x") or 0) >= 1.0 for r in rows), "rows": len(rows)},
    }
    if e2e_result:
        out["e2e"] = e2e_goals(e2e_result)
    return out


def e2e_goals(e2e_result: dict | None) -> dict:
    return {k: round(v, 3) for k, v in (e2e_result or {}).items() if k.endswith("_x")}


def table(rows: list[dict]) -> str:
    def f(v, fmt=".2f"):
        return format(v, fmt) if isinstance(v, int | float) else "err"

    lines = ["| shape | tokens | dense bf16 ms | dense FP8 x | bf16 2:4 x | FP8 2:4 x | FP8 2:4 / dense FP8 "
             "| tuned (eager route) | tuned x |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {f(r.get('dense_ms'), '.4f')} | {f(r.get('dense_fp8_x'))} | "
                     f"{f(r.get('bf16_24_x'))} | {f(r.get('fp8_24_x'))} | {f(r.get('fp8_24_vs_dense_fp8_x'))} | "
                     f"{r['choice']} ({r.get('eager_route')}) | {f(r.get('tuned_x'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--e2e-only", action="store_true", help="no per-shape rows; the model's shapes are tuned alone")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first N shapes")
    ap.add_argument("--quantizer", choices=["cuda", "triton"], default="cuda")
    args = ap.parse_args()
    if args.quantizer == "triton":
        import kernels.fp8

        kernels.fp8._cuda_quantizer = lambda: None
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dev = torch.device("cuda")
    t0 = time.time()
    info = device_info(dev)
    from kernels.cutlass24 import find_cutlass, library_key

    info["cutlass"], info["sparse24_sm90"] = find_cutlass()[1], library_key()[0]
    info["quantizer"] = args.quantizer
    settings = TuneSettings(tokens=tuple(TOKENS), dtype=torch.bfloat16, repeats=args.repeats, search_configs=False,
                            backends=("dense", "cutlass-sm90", "dense-fp8", "cutlass-sm90-fp8"))
    gen = torch.Generator(dev).manual_seed(0)
    shapes = [] if args.e2e_only else SHAPES[: args.shapes]
    layers = {shape_key(o, i, fp8=True): fp8_layer(o, i, dev, gen) for o, i in shapes}
    tuned = tune({k: TuneTarget(w, m, s) for k, (w, m, s) in layers.items()}, settings, dev) if layers else {}
    log.info("tuned in %.0f s", time.time() - t0)
    result = {"benchmark": "fp8_kernels", "device": info, "command": " ".join(sys.argv),
              "versions": {k: info.get(k) for k in ("torch", "cuda", "cutlass", "sparse24_sm90", "driver", "python")},
              "settings": {"tokens": TOKENS, "repeats": args.repeats, "min_gain": settings.min_gain,
                           "backends": list(settings.backends)},
              "tuned": tuned}
    rows = []
    for key, (w, m, s) in layers.items():
        rows += retime(w, m, s, tuned[key], args.repeats)
        torch.cuda.empty_cache()
    result["rows"] = rows
    (args.out / "fp8_kernels_bench.json").write_text(json.dumps(result, indent=1, default=str))
    layers.clear()
    e2e_result = None
    if not args.skip_e2e:
        try:
            e2e_result = e2e(tuned, settings, dev, repeats=10)
        except Exception as error:  # noqa: BLE001 - the kernel rows still count
            log.exception("e2e failed")
            result["e2e_error"] = str(error)[:500]
        result["e2e"] = e2e_result
    result["goals"] = goals(rows, e2e_result) if rows else {"e2e": e2e_goals(e2e_result)}
    result["elapsed_s"] = round(time.time() - t0, 1)
    result["table"] = table(rows)
    (args.out / "fp8_kernels_bench.json").write_text(json.dumps(result, indent=1, default=str))
    print("\n" + result["table"])
    print("\ngoals:", json.dumps(result["goals"], indent=1))
    print(f"elapsed {result['elapsed_s']} s")


if __name__ == "__main__":
    main()
