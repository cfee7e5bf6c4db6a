"""cuSPARSELt algorithm / split-k search, run in a child process.

cuSPARSELt's search has been seen to kill its process (illegal instruction), so the worker never
searches in-process: `search_configs` writes a job file, runs `python -m kernels.cslt_search` and
reads one JSON line per case back. The child writes a `start` line before each case, so when it dies
the parent knows which case killed it, records that as a failure, and restarts on the rest.

Per case (out, in, tokens): every algorithm id the plan admits, times split-k 1 (and 2, 4 for small
token counts), each checked against dense first, then timed; the fastest correct one wins.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent


def search_configs(
    cases: list[tuple[int, int, int]],
    dtype: torch.dtype,
    device: torch.device,
    *,
    timeout_s: float = 600.0,
    max_restarts: int = 3,
    library_search: bool = False,
) -> dict[tuple[int, int, int], dict[str, Any]]:
    """(out, in, tokens) -> {"alg_id", "split_k", "split_k_mode", "ms", ...} or {"error": ...}."""
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
                                       "device": device.index or 0}))
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
        if started is None and code is not None and code > 0:
            break  # a failure outside any case: retrying would fail the same way
    for case in todo:
        results.setdefault(case, {"error": "search did not reach this case"})
    return results


def _search_case(lib, out_f: int, in_f: int, tokens: int, dtype: torch.dtype, library_search: bool) -> dict[str, Any]:
    from kernels.cslt import CsltError
    from kernels.sparse24 import mask_24
    from kernels.timing import time_calls

    device = lib.device
    weight = torch.randn(out_f, in_f, device=device, dtype=dtype)
    weight = weight * mask_24(weight)
    packed = lib.compress(weight)
    rows = tokens + (-tokens) % 8
    x = torch.randn(rows, in_f, device=device, dtype=dtype)
    ref = torch.nn.functional.linear(x, weight)
    scale = ref.abs().max().item() or 1.0
    y = torch.empty(rows, out_f, device=device, dtype=dtype)
    probe = lib.plan(out_f, in_f, rows, dtype, device)
    tried: list[dict[str, Any]] = []
    split_ks = (1, 2, 4) if tokens <= 128 else (1,)
    for alg in range(probe.max_alg + 1):
        for split_k in split_ks:
            for mode in ((0,) if split_k == 1 else (1, 2)):
                entry: dict[str, Any] = {"alg_id": alg, "split_k": split_k, "split_k_mode": mode}
                try:
                    plan = lib.plan(out_f, in_f, rows, dtype, device, alg, split_k, mode)
                    y.fill_(float("nan"))
                    plan.matmul(packed, x, y)
                    err = ((y - ref).abs().max().item()) / scale
                    if not err < 2e-2:
                        entry["error"] = f"max rel error {err:.3g}"
                    else:
                        entry["ms"] = time_calls(lambda _i, p=plan: p.matmul(packed, x, y), warmup=3,
                                                 repeats=7, target_ms=0.3).median_ms
                    plan.close()
                except CsltError as error:
                    entry["error"] = str(error)
                tried.append(entry)
    good = [t for t in tried if "ms" in t]
    result: dict[str, Any] = {"max_alg": probe.max_alg, "padded_tokens": rows, "tried": len(tried)}
    if library_search:
        try:
            alg, split_k, mode = probe.search(packed, x, y)
            result["library_choice"] = {"alg_id": alg, "split_k": split_k, "split_k_mode": mode}
        except CsltError as error:
            result["library_choice"] = {"error": str(error)}
    probe.close()
    if not good:
        result["error"] = "no correct configuration: " + "; ".join(t.get("error", "") for t in tried[:3])
        return result
    best = min(good, key=lambda t: t["ms"])
    default = next((t for t in good if t["alg_id"] == 0 and t["split_k"] == 1), None)
    result.update(best)
    result["default_ms"] = default["ms"] if default else None
    return result


def main(argv: list[str]) -> int:
    from kernels.cslt import Cslt

    job = json.loads(Path(argv[0]).read_text())
    dtype = getattr(torch, job["dtype"])
    device = torch.device("cuda", job.get("device", 0))
    torch.cuda.set_device(device)
    lib = Cslt.load(device)
    with open(argv[1], "a") as sink:
        for out_f, in_f, tokens in job["cases"]:
            head = {"out": out_f, "in": in_f, "tokens": tokens}
            sink.write(json.dumps({**head, "start": True}) + "\n")
            sink.flush()
            result = _search_case(lib, out_f, in_f, tokens, dtype, job.get("library_search", False))
            sink.write(json.dumps({**head, "result": result}) + "\n")
            sink.flush()
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
