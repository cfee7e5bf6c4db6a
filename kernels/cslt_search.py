"""cuSPARSELt algorithm / split-k search, run in a child process.

cuSPARSELt's search has been seen to kill its process (illegal instruction), so the worker never
searches in-process: `search_configs` writes a job file, runs `python -m kernels.cslt_search` and
reads one JSON line per case back. The child writes a `start` line before each case, so when it dies
the parent knows which case killed it, records that as a failure, and restarts on the rest.

Per case (out, in, tokens): every algorithm id of every layout (see the shim) at split-k 1, then
split-k 2 and 4 on the best of those for small token counts; each configuration is checked against
dense first, then timed; the fastest correct one wins. A layout whose plans are slow to build is
tried with its default only. The time budget is shared out case by case (an equal share of what is
left), so a search that runs short still reaches the last cases, and each layout's default is
always tried.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = (1, 2, 0)
SLOW_PLAN_MS = 20.0


def search_configs(
    cases: list[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    timeout_s: float = 600.0,
    max_restarts: int = 3,
    library_search: bool = False,
    budget_s: float = 300.0,
) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(out, in, tokens) -> {"layout", "alg_id", "split_k", "split_k_mode", "ms", ...} or {"error": ...}.

    `budget_s` bounds the whole search: cases past it keep their best so far, or report the cutoff.
    """
    results: dict[tuple[int, int, int], dict[str, Any]] = {}
    todo = list(dict.fromkeys(cases))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]))
    for attempt in range(max_restarts + 1):
        if not todo:
            break
        with tempfile.TemporaryDirectory(prefix="sf-cslt-") as tmp:
            job, out = Path(tmp) / "job.json", Path(tmp) / "out.jsonl"
            job.write_text(json.dumps({"dtype": str(dtype).removeprefix("torch."), "cases": todo,
                                       "library_search": library_search,
                                       "device": device.index or 0, "deadline": time.time() + budget_s}))
            try:
                done = subprocess.run([sys.executable, "-m", "kernels.cslt_search", str(job), str(out)], env=env,
                                      capture_output=True, text=True, timeout=timeout_s)
                code, tail = done.returncode, done.stderr[-1500:]
            except subprocess.TimeoutExpired:
                code, tail = None, f"timed out after {timeout_s:.0f} s"
            started = None
            for line in out.read_text().splitlines() if out.exists() else []:
                record = json.loads(line)
                key = (record["out"], record["in"], record["tokens"])
                if record.get("start"):
                    started = key
                else:
                    results[key] = record["result"]
                    started = None
        if code == 0:
            break
        reason = (f"search process killed by {signal.Signals(-code).name}" if code is not None and code < 0
                  else f"search process failed (exit {code}): {tail.strip()[-500:]}")
        log.warning("cuSPARSELt search attempt %d: %s", attempt + 1, reason)
        if started is not None:
            results[started] = {"error": reason}
        todo = [c for c in todo if c not in results]
        if code is None or (started is None and code > 0):
            break  # out of time, or a failure outside any case that a retry would repeat
    for case in todo:
        results.setdefault(case, {"error": "search did not reach this case"})
    return results


def _search_case(lib, out_f: int, in_f: int, tokens: int, dtype: torch.dtype, library_search: bool,
                 deadline: float) -> dict[str, Any]:
    from kernels.cslt import CsltError
    from kernels.sparse24 import mask_24
    from kernels.timing import time_calls

    device = lib.device
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype)
    weight = weight * mask_24(weight)
    packed = {fam: lib.compress(weight, fam) for fam in (0, 2)}
    rows = tokens + (-tokens) % 8
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    ref = torch.nn.functional.linear(x, weight)
    scale = ref.abs().max().item() or 1.0
    tried: list[dict[str, Any]] = []
    result: dict[str, Any] = {"padded_tokens": rows, "plan_ms": {}, "max_alg": {}}
    outs = {lay: torch.empty((out_f, rows) if lay == 1 else (rows, out_f), device=device, dtype=dtype)
            for lay in LAYOUTS}

    def attempt(layout: int, alg: int, split_k: int = 1, mode: int = 0) -> None:
        entry: dict[str, Any] = {"layout": layout, "alg_id": alg, "split_k": split_k, "split_k_mode": mode}
        out, want, w = outs[layout], (ref.t() if layout == 1 else ref), packed[2 if layout == 2 else 0]
        try:
            plan = lib.plan(out_f, in_f, rows, dtype, device, layout, alg, split_k, mode)
            out.fill_(float("nan"))
            plan.matmul(w, x, out)
            err = (out - want).abs().max().item() / scale
            if not err < 2e-2:
                entry["error"] = f"max rel error {err:.3g}"
            else:
                entry["ms"] = time_calls(lambda _i, p=plan, w=w, o=out: p.matmul(w, x, o), warmup=3,
                                         repeats=7, target_ms=0.3).median_ms
            plan.close()
        except CsltError as error:
            entry["error"] = str(error)
        tried.append(entry)

    # stage 1: every algorithm of every layout, split-k 1
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        try:
            probe = lib.plan(out_f, in_f, rows, dtype, device, layout)
        except CsltError as error:
            tried.append({"layout": layout, "error": str(error)})
            continue
        plan_ms = (time.perf_counter() - t0) * 1e3
        result["plan_ms"][layout], result["max_alg"][layout] = round(plan_ms, 3), probe.max_alg
        if library_search and layout == LAYOUTS[0]:
            try:
                found = probe.search(packed[2 if layout == 2 else 0], x, outs[layout])
                result["library_choice"] = dict(zip(("alg_id", "split_k", "split_k_mode"), found, strict=True))
            except CsltError as error:
                result["library_choice"] = {"error": str(error)}
        probe.close()
        # plans that take long to build (layout 0 with cuSPARSELt 0.8 on H100: ~0.2 s) get the default only
        for alg in range(probe.max_alg + 1) if plan_ms < SLOW_PLAN_MS else range(1):
            if alg > 0 and time.time() > deadline:  # every layout's default is always tried
                result["truncated"] = "search time budget exhausted"
                break
            attempt(layout, alg)
    # stage 2: split-k on the best (layout, algorithm), where few tokens leave the GPU underused
    good = [t for t in tried if "ms" in t]
    if good and tokens <= 128 and time.time() < deadline:
        best = min(good, key=lambda t: t["ms"])
        if result["plan_ms"].get(best["layout"], SLOW_PLAN_MS) < SLOW_PLAN_MS:
            for split_k in (2, 4):
                for mode in (1, 2):
                    attempt(best["layout"], best["alg_id"], split_k, mode)
    good = [t for t in tried if "ms" in t]
    result["tried"] = len(tried)
    result["by_layout_ms"] = {lay: min((t["ms"] for t in good if t["layout"] == lay), default=None)
                              for lay in LAYOUTS}
    if not good:
        reasons = "; ".join(t.get("error", "") for t in tried[:3])
        result["error"] = result.get("truncated") if not tried else f"no correct configuration: {reasons}"
        return result
    best = min(good, key=lambda t: t["ms"])
    result.update(best)
    return result


def main(argv: list[str]) -> int:
    from kernels.cslt import Cslt

    job = json.loads(Path(argv[0]).read_text())
    dtype = getattr(torch, job["dtype"])
    device = torch.device("cuda", job.get("device", 0))
    torch.cuda.set_device(device)
    lib = Cslt.load(device)
    deadline = job.get("deadline", float("inf"))
    cases = job["cases"]
    with open(argv[1], "a") as sink:
        for i, (out_f, in_f, tokens) in enumerate(cases):
            head = {"out": out_f, "in": in_f, "tokens": tokens}
            sink.write(json.dumps({**head, "start": True}) + "\n")
            sink.flush()
            # an equal share of what is left: the last (often largest) shapes are searched too;
            # a case that finishes early leaves its time to the rest
            share = time.time() + max(deadline - time.time(), 0.0) / (len(cases) - i)
            result = _search_case(lib, out_f, in_f, tokens, dtype, job.get("library_search", False),
                                  min(deadline, share))
            sink.write(json.dumps({**head, "result": result}) + "\n")
            sink.flush()
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
