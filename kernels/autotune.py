"""Pick, per Linear shape and token count, the fastest correct kernel: check first, then time.

For each distinct (out, in) shape: prepare every available backend on the same 2:4 weight, compare
each backend's output with dense on fresh random inputs (max error relative to the output's largest
magnitude), time the ones that pass with rotating weight copies, and choose the fastest per token
count. A sparse backend wins only if it beats dense by `min_gain`, first in the plain timing and
then in the median of `confirm_rounds` back-to-back dense/sparse pairs (a first H100 run picked
sparse on a 4% edge that a fresh timing turned into 0.90x: clocks drift between measurements);
otherwise, and wherever nothing sparse is correct, the choice is dense, with the reason written down.

The result is the `shapes` part of a kernel plan (see `kernels.plan`); nothing is cached in-process.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels.backends import GPU_CANDIDATES, Backend, make_backends, nearest_bucket
from kernels.sparse24 import mask_24
from kernels.timing import copies_to_defeat_l2, host_us_per_call, time_calls

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class TuneSettings:
    tokens: tuple[int, ...] = (1, 16, 512, 2048)
    dtype: torch.dtype = torch.float16
    repeats: int = 50
    warmup: int = 5
    max_rel_error: float = 2e-2
    min_gain: float = 1.05
    confirm_rounds: int = 5
    contender_margin: float = 1.15  # a runner-up this close to the best sparse time is confirmed too
    backends: tuple[str, ...] = GPU_CANDIDATES
    search_configs: bool = True
    search_budget_s: float = 300.0
    # eager routing: a sparse choice also runs outside CUDA graphs if its call costs the host at most this
    # much more than dense's, or at this many tokens and more, where a decoder layer is paced by the GPU
    eager_host_slack_us: float = 0.5
    eager_gpu_bound_tokens: int = 1024


@dataclass(frozen=True)
class TuneTarget:
    """One representative Linear of a plan shape key.

    `mask` None: derive a 2:4 mask by magnitude (the weight is pruned here). `fp8_scale` (fp32 [out]): the
    layer was quantized to FP8 and the FP8 kernels are candidates too. `sparse` False: the layer does not
    follow 2:4, so only dense kernels (bf16, and FP8 where quantized) are candidates."""

    weight: torch.Tensor
    mask: torch.Tensor | None = None
    fp8_scale: Any = None  # fp32 weight scale [out], or kernels.fp8.Fp8Scales
    sparse: bool = True


def shape_key(out_features: int, in_features: int, fp8: bool = False, sparse: bool = True) -> str:
    """Plan key of a Linear: its weight shape, out x in, with `:fp8` for a layer quantized to FP8 (whose
    candidates include the FP8 kernels; a plain layer of the same shape keeps its own choices), and
    `:fp8-dense` for a quantized layer that is not 2:4 (dense bf16 or dense FP8 only)."""
    return f"{out_features}x{in_features}" + ((":fp8" if sparse else ":fp8-dense") if fp8 else "")


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    if y.shape != ref.shape:
        return float("inf")
    err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
    return err if err == err else float("inf")  # NaN fails


def _planned_configs(cases: list[tuple[int, int, int]], settings: TuneSettings, device: torch.device):
    from kernels.cslt_search import search_configs

    return search_configs(cases, settings.dtype, device, budget_s=settings.search_budget_s)


def tune_shape(
    weight: torch.Tensor,
    mask: torch.Tensor | None,
    settings: TuneSettings,
    backends: dict[str, Backend],
    configs: dict[int, dict[str, Any]] | None = None,
    fp8_scale: Any = None,
    sparse: bool = True,
) -> dict[int, dict[str, Any]]:
    """Choices for one shape: tokens -> {backend, config, times_ms, max_rel_error, speedup, reason}.

    `fp8_scale` (fp32 [out], or `kernels.fp8.Fp8Scales` with a static activation scale) marks a layer quantized to
    FP8: `weight` is then its dequantized weight, the FP8 backends are candidates too, and they are checked against
    the dequantized FP8 reference (`kernels.fp8.reference_linear`); without it they are not tried. `sparse` False
    tries dense kernels only."""
    device, dtype = weight.device, settings.dtype
    weight = weight.detach().to(device=device, dtype=dtype)
    if mask is not None:
        weight = weight * mask.to(device)
    out_f, in_f = weight.shape
    copies = copies_to_defeat_l2(weight.numel() * weight.element_size() // 2, device)
    handles: dict[str, list[Any]] = {}
    failures: dict[str, str] = {}
    for name, backend in backends.items():
        if (backend.fp8 and fp8_scale is None) or (backend.sparse and not sparse):
            continue
        if backend.fp8 and dtype != torch.bfloat16:
            failures[name] = f"FP8 kernels output bfloat16; this tuning is in {dtype}"
            continue
        cfg = {t: c for t, c in (configs or {}).items() if "error" not in c} if name == "cusparselt-planned" else None
        extra = {"scale": fp8_scale} if backend.fp8 else {}
        try:
            first = backend.prepare(weight, None, cfg, **extra)
            # rotate over distinct weight copies (same values) so repeats do not read L2
            handles[name] = [first] + [backend.prepare(weight.clone(), None, cfg, **extra) for _ in range(copies - 1)]
        except Exception as error:  # noqa: BLE001 - a backend that cannot take this weight is skipped, with reason
            failures[name] = f"prepare failed: {error}"
    fp8_codes = None
    if fp8_scale is not None:
        from kernels.fp8 import Fp8Scales
        from kernels.fp8_backends import fp8_codes as codes_of

        static = Fp8Scales.of(fp8_scale).input
        fp8_codes = (*codes_of(weight, fp8_scale), None if static is None else static.to(device))
    choices: dict[int, dict[str, Any]] = {}
    searched: dict[str, dict[int, dict[str, int]]] = {}  # backend -> tokens -> config found in-process
    for tokens in settings.tokens:
        xs = [torch.randn(tokens, in_f, device=device, dtype=dtype) for _ in range(copies)]
        ref = F.linear(xs[0], weight)
        ref_fp8 = None if fp8_codes is None else _fp8_reference(xs[0], *fp8_codes)
        times: dict[str, float] = {}
        errors: dict[str, float] = {}
        notes: dict[str, str] = dict(failures)
        calls: dict[str, Callable[[int], Any]] = {}
        for name, hs in handles.items():
            backend = backends[name]
            expected = ref_fp8 if backend.fp8 else ref
            candidates = backend.candidate_configs(tokens)
            if candidates:
                found = search_in_process(backend, candidates, hs, xs, expected, copies, settings)
                if "error" in found:
                    notes[name] = found["error"]
                    continue
                searched.setdefault(name, {})[tokens] = found["config"]
                errors[name], times[name] = found["max_rel_error"], found["ms"]
                calls[name] = lambda i, b=backend, hs=hs, xs=xs, c=found["config"]: b.linear(xs[i], hs[i], c)
                continue
            try:
                errors[name] = _rel_error(backend.linear(xs[0], hs[0]), expected)
                if errors[name] > settings.max_rel_error:
                    notes[name] = f"max rel error {errors[name]:.3g} > {settings.max_rel_error}"
                    continue
                calls[name] = lambda i, b=backend, hs=hs, xs=xs: b.linear(xs[i], hs[i])
                times[name] = time_calls(calls[name], copies, warmup=settings.warmup,
                                         repeats=settings.repeats).median_ms
            except Exception as error:  # noqa: BLE001 - recorded in the plan as this backend's reason
                notes[name] = f"failed: {error}"

        # a second timing of every correct candidate, after all the others: a candidate whose first timing
        # fell into a slow spell (seen on H100: whole 20-50 ms windows 2-3x slower) keeps the better one
        for name in list(times):
            try:
                times[name] = min(times[name], time_calls(calls[name], copies, warmup=settings.warmup,
                                                          repeats=settings.repeats).median_ms)
            except Exception as error:  # noqa: BLE001 - recorded in the plan as this backend's reason
                notes[name] = f"failed on re-timing: {error}"
                del times[name]

        def confirm(name: str, calls=calls) -> list[float]:
            rounds_repeats = max(5, settings.repeats // max(settings.confirm_rounds, 1))
            return paired_ratios(
                lambda: time_calls(calls["dense"], copies, warmup=2, repeats=rounds_repeats).median_ms,
                lambda: time_calls(calls[name], copies, warmup=2, repeats=rounds_repeats).median_ms,
                settings.confirm_rounds,
            )

        def config_of(name: str, tokens=tokens) -> dict[str, int]:
            configs_used = searched.get(name) or handles[name][0].configs
            if not configs_used:
                return {}
            used = configs_used[nearest_bucket(tokens, list(configs_used))]
            return {k: int(used[k]) for k in backends[name].config_keys if k in used}

        choices[tokens] = choose(times, errors, notes, settings, config_of, confirm)
        chosen = choices[tokens]["backend"]
        if chosen != "dense":
            host = {name: round(host_us_per_call(calls[name], copies), 3) for name in ("dense", chosen)}
            choices[tokens].update(eager_route(chosen, tokens, host, settings))
        found = {name: configs[tokens] for name, configs in searched.items() if tokens in configs}
        if found:
            choices[tokens]["searched_configs"] = found
        log.info("%s tokens=%d -> %s", shape_key(out_f, in_f), tokens, choices[tokens]["backend"])
    return choices


def _fp8_reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   input_scale: torch.Tensor | None) -> torch.Tensor:
    from kernels.fp8 import reference_linear

    return reference_linear(x, codes, scale, input_scale)


def search_in_process(
    backend: Backend,
    candidates: list[dict[str, int]],
    handles: list[Any],
    xs: list[torch.Tensor],
    ref: torch.Tensor,
    copies: int,
    settings: TuneSettings,
) -> dict[str, Any]:
    """Fastest correct config of a backend whose kernels are safe to try in this process.

    Every candidate is checked against dense before it is timed (half the repeats of the final
    timing); one that fails either way is skipped. {"config", "ms", "max_rel_error"} or {"error"}."""
    best: dict[str, Any] | None = None
    failures: list[str] = []
    for config in candidates:
        try:
            err = _rel_error(backend.linear(xs[0], handles[0], config), ref)
            if err > settings.max_rel_error:
                failures.append(f"{config}: max rel error {err:.3g}")
                continue
            ms = time_calls(lambda i, c=config: backend.linear(xs[i], handles[i], c), copies, warmup=2,
                            repeats=max(5, settings.repeats // 2)).median_ms
        except Exception as error:  # noqa: BLE001 - a config that cannot run this problem is skipped
            failures.append(f"{config}: {error}")
            continue
        if best is None or ms < best["ms"]:
            best = {"config": config, "ms": ms, "max_rel_error": err}
    if best is None:
        return {"error": "no config ran correctly: " + "; ".join(failures[:4])}
    best["ms"] = time_calls(lambda i: backend.linear(xs[i], handles[i], best["config"]), copies,
                            warmup=settings.warmup, repeats=settings.repeats).median_ms
    return best


def paired_ratios(time_dense: Callable[[], float], time_sparse: Callable[[], float], rounds: int) -> list[float]:
    """Dense/sparse time ratios from back-to-back pairs, so clock or power drift hits both sides alike."""
    ratios = []
    for i in range(rounds):
        if i % 2 == 0:
            dense = time_dense()
            sparse = time_sparse()
        else:
            sparse = time_sparse()
            dense = time_dense()
        ratios.append(dense / sparse)
    return ratios


def choose(
    times: dict[str, float],
    errors: dict[str, float],
    notes: dict[str, str],
    settings: TuneSettings,
    config_of: Callable[[str], dict[str, int]] = lambda _name: {},
    confirm: Callable[[str], list[float]] | None = None,
) -> dict[str, Any]:
    """The choice for one (shape, tokens) from the checked candidates' median times.

    A sparse backend is chosen only if it beats dense by `min_gain` in the first timing and, when
    `confirm` is given, in the median of paired re-timings too; otherwise dense, with the reason.
    """
    entry: dict[str, Any] = {
        "times_ms": {k: round(v, 6) for k, v in times.items()},
        "max_rel_error": {k: (round(v, 6) if v != float("inf") else None) for k, v in errors.items()},
    }
    if notes:
        entry["rejected"] = notes
    dense = times.get("dense")
    if dense is None:
        return {**entry, "backend": "dense", "config": {}, "speedup": None,
                "reason": "dense baseline could not be timed: " + notes.get("dense", "unknown")}
    sparse = {k: v for k, v in times.items() if k != "dense"}
    if not sparse:
        return {**entry, "backend": "dense", "config": {}, "speedup": 1.0, "reason": "no correct sparse backend"}
    ranked = sorted(sparse, key=sparse.get)
    best = ranked[0]
    gain = dense / sparse[best]
    if gain < settings.min_gain:
        return {**entry, "backend": "dense", "config": {}, "speedup": 1.0,
                "reason": f"best sparse ({best}) {gain:.2f}x, below {settings.min_gain:.2f}x"}
    if confirm is not None and settings.confirm_rounds > 0:
        # a runner-up within `contender_margin` of the best is re-timed in pairs too: one-off timings in
        # sequence favour whatever ran on a cooler GPU, so the paired medians decide between them
        contenders = [best] + [n for n in ranked[1:2] if sparse[n] <= sparse[best] * settings.contender_margin
                               and dense / sparse[n] >= settings.min_gain]
        paired = {name: confirm(name) for name in contenders}
        best = max(paired, key=lambda name: statistics.median(paired[name]))
        entry["confirmed_speedups"] = [round(r, 4) for r in paired[best]]
        gain = statistics.median(paired[best])
        if gain < settings.min_gain:
            return {**entry, "backend": "dense", "config": {}, "speedup": 1.0,
                    "reason": f"best sparse ({best}) {dense / sparse[best]:.2f}x first, {gain:.2f}x in paired "
                              f"re-timing, below {settings.min_gain:.2f}x"}
    return {**entry, "backend": best, "config": config_of(best), "speedup": round(gain, 4), "reason": "fastest"}


def eager_route(backend: str, tokens: int, host_us: dict[str, float], settings: TuneSettings) -> dict[str, Any]:
    """Which backend a sparse choice's token count uses in eager mode (outside CUDA graphs), and why.

    A decode step of a small model is paced by the host: every op is queued, and the GPU finishes it
    before the host has issued the next. There a sparse call that saves GPU time but costs the host
    more than `F.linear` makes the model slower, so eager mode keeps it only when its host cost is
    within `eager_host_slack_us` of dense's. At `eager_gpu_bound_tokens` and more, every op of a
    decoder layer keeps the GPU busier than the host (a 4096-wide layer at 2048 tokens: about 1.5 ms of
    GPU work against 0.5 ms of host time, measured on an H200), and the GPU time saved counts.
    CUDA-graph replay has no host cost and always uses the plan's `backend`."""
    dense_host, sparse_host = host_us["dense"], host_us[backend]
    extra = sparse_host - dense_host
    if extra <= settings.eager_host_slack_us:
        return {"host_us": host_us, "eager_backend": backend,
                "eager_reason": f"host {sparse_host:.1f} us per call, dense {dense_host:.1f}"}
    if tokens >= settings.eager_gpu_bound_tokens:
        return {"host_us": host_us, "eager_backend": backend,
                "eager_reason": f"{tokens} tokens: paced by the GPU (host +{extra:.1f} us per call hidden)"}
    return {"host_us": host_us, "eager_backend": "dense",
            "eager_reason": f"host {sparse_host:.1f} us per call against dense {dense_host:.1f} us (+{extra:.1f}); "
                            f"below {settings.eager_gpu_bound_tokens} tokens a small model's eager step is paced "
                            f"by the host"}


def tune(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor | None] | TuneTarget],
    settings: TuneSettings,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> dict[str, dict[int, dict[str, Any]]]:
    """shape key -> tokens -> choice, for one representative `TuneTarget` (or (weight, mask)) per shape key.

    `mask` None means: derive the 2:4 mask by magnitude (the weight is pruned here).
    """
    targets = {k: v if isinstance(v, TuneTarget) else TuneTarget(*v) for k, v in weights.items()}
    backends = make_backends(list(settings.backends))
    usable: dict[str, Backend] = {}
    skipped: dict[str, str] = {}
    for name, backend in backends.items():
        ok, why = backend.available(device)
        if ok:
            usable[name] = backend
        else:
            skipped[name] = why
    if skipped:
        log.info("backends skipped: %s", skipped)
    configs: dict[tuple[int, int, int], dict[str, Any]] = {}
    if settings.search_configs and "cusparselt-planned" in usable:
        cases = sorted({(x.weight.shape[0], x.weight.shape[1], t) for x in targets.values() if x.sparse
                        for t in settings.tokens})
        configs = _planned_configs(cases, settings, device)
    plan: dict[str, dict[int, dict[str, Any]]] = {}
    for i, (key, target) in enumerate(targets.items()):
        if progress:
            progress(i, len(targets), f"tuning {key}")
        weight = target.weight.to(device=device, dtype=settings.dtype)
        mask = (None if not target.sparse else mask_24(weight) if target.mask is None
                else target.mask.to(device))
        shape_cfg = {t: configs.get((weight.shape[0], weight.shape[1], t), {}) for t in settings.tokens}
        plan[key] = tune_shape(weight, mask, settings, usable, shape_cfg, target.fp8_scale, target.sparse)
        for tokens, choice in plan[key].items():
            if skipped:
                choice.setdefault("rejected", {}).update({k: f"unavailable: {v}" for k, v in skipped.items()})
            cfg = shape_cfg.get(tokens, {})
            if "error" in cfg:  # the backend then ran with a neighbouring bucket's config or the default
                choice.setdefault("rejected", {})["cusparselt-planned config search"] = cfg["error"]
        torch.cuda.empty_cache()
    if progress:
        progress(len(targets), len(targets), "tuning done")
    return plan
