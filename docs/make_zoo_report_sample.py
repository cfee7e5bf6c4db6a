"""Write docs/zoo-report-sample.html: what a nightly zoo report looks like, from made-up data.

Every number here is invented (seeded, so the page is the same on every run); the page says so in a
banner. Four models with two recipes each over eight nights; on the last night one pair reuses the
previous night's stages, one job runs out of GPU memory and one perplexity regresses past its +2%
tolerance. Run it from the repository root:

    .venv/bin/python docs/make_zoo_report_sample.py [--out docs/zoo-report-sample.html]
"""

from __future__ import annotations

import argparse
import logging
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orchestrator.zoo_report import Night, NightJob, Regression, render_html, text_summary

logger = logging.getLogger(__name__)

NOTICE = ("Sample report for the documentation: the zoo, the jobs and every number on this page are made up. "
          "A real report is produced by each night of `sparseflow nightly`.")
# model -> (dense perplexity, size of the dense model in bytes, Linear shapes (out, in) of one decoder layer)
MODELS = {
    "builtin:tiny-llama": (31.2, 9.1e6, [(256, 256), (688, 256), (256, 688)]),
    "Qwen/Qwen2.5-0.5B": (13.1, 0.99e9, [(896, 896), (128, 896), (4864, 896), (896, 4864)]),
    "meta-llama/Llama-3.2-1B": (9.8, 2.47e9, [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]),
    "mistralai/Mistral-7B-v0.3": (5.3, 14.5e9, [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]),
}
# recipe -> (sparsity, perplexity factor over dense, stages that run)
RECIPES = {
    "wanda-60": (0.60, 1.41, ["calibrate", "prune", "evaluate", "export"]),
    "sparsegpt-2of4-ft": (0.50, 1.18, ["calibrate", "prune", "finetune", "evaluate", "kernel_tune", "export"]),
}
STAGE_BASE_S = {"calibrate": 40, "prune": 120, "finetune": 900, "evaluate": 60, "kernel_tune": 150, "export": 30}
TOKENS = (16, 2048)
NIGHTS = 8
FIRST_NIGHT = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)


def _speedups(rng: random.Random, shapes: list[tuple[int, int]]) -> tuple[tuple[str, float], ...]:
    pairs = []
    for out, inp in shapes:
        for tokens in TOKENS:
            gain = 0.55 * min(out * inp / 16e6, 1.0) * (1.0 if tokens >= 512 else 0.35)
            pairs.append((f"{out}x{inp}.{tokens}", round(0.92 + gain + rng.uniform(-0.04, 0.04), 3)))
    return tuple(pairs)


def _job_id(rng: random.Random) -> str:
    return f"{rng.getrandbits(64):016x}"


def _job(rng: random.Random, night: int, model: str, recipe: str, *, status: str = "succeeded",
         reused: bool = False, ppl_bump: float = 1.0, error: str | None = None) -> NightJob:
    dense_ppl, size, shapes = MODELS[model]
    sparsity, factor, stages = RECIPES[recipe]
    scale = size / 2.47e9 + 0.2
    seconds = {s: round(STAGE_BASE_S[s] * scale * rng.uniform(0.85, 1.15), 1) for s in stages}
    if reused:
        seconds = {s: round(rng.uniform(0.2, 0.6), 2) for s in stages}
    if status != "succeeded":
        seconds = dict(list(seconds.items())[:3])
        return NightJob(model, recipe, _job_id(rng), status, stage_seconds=seconds, error=error)
    metrics = {"perplexity": round(dense_ppl * factor * ppl_bump * rng.uniform(0.995, 1.005), 3),
               "dense_perplexity": dense_ppl, "sparsity": sparsity,
               "model_size_bytes": round(size * (0.62 if "kernel_tune" in stages else 0.56))}
    speedups = _speedups(rng, shapes) if "kernel_tune" in stages else ()
    return NightJob(model, recipe, _job_id(rng), status, reused=reused, metrics=metrics,
                    stage_seconds=seconds, kernel_speedups=speedups)


def sample_nights() -> list[Night]:
    """Eight made-up nights of the sample zoo, oldest first; the last one has the interesting events."""
    rng = random.Random(13)
    nights = []
    for n in range(NIGHTS):
        last = n == NIGHTS - 1
        jobs = []
        for model in MODELS:
            for recipe in RECIPES:
                if last and model == "mistralai/Mistral-7B-v0.3" and recipe == "sparsegpt-2of4-ft":
                    jobs.append(_job(rng, n, model, recipe, status="failed",
                                     error="torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB"))
                elif last and model == "Qwen/Qwen2.5-0.5B" and recipe == "wanda-60":
                    jobs.append(_job(rng, n, model, recipe, ppl_bump=1.031))
                else:
                    jobs.append(_job(rng, n, model, recipe, reused=last and model == "builtin:tiny-llama"))
        started = FIRST_NIGHT + timedelta(days=n, minutes=rng.randint(0, 3))
        wall = timedelta(seconds=max(sum(j.stage_seconds.values()) for j in jobs) * 1.08)
        regressions = []
        if last:
            bumped = next(j for j in jobs if j.model == "Qwen/Qwen2.5-0.5B" and j.recipe == "wanda-60")
            before = next(j for j in nights[-1].jobs if j.model == bumped.model and j.recipe == bumped.recipe)
            regressions.append(Regression(bumped.model, bumped.recipe, "perplexity", before.metrics["perplexity"],
                                          bumped.metrics["perplexity"], 0.02, bumped.job_id, before.job_id))
        nights.append(Night("sample-zoo", f"2026-11-{23 + n:02d}", started, started + wall, jobs, regressions))
    return nights


def build(out: Path) -> Path:
    nights = sample_nights()
    out.write_text(render_html(nights[-1], nights[:-1], notice=NOTICE), encoding="utf-8")
    logger.info("wrote %s (%d bytes); webhook text:\n%s", out, out.stat().st_size, text_summary(nights[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "zoo-report-sample.html")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
