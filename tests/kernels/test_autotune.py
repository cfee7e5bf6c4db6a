"""Choice logic of the tuner and crash isolation of the cuSPARSELt search (CPU: no timing done)."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import torch

from kernels import cslt_search
from kernels.autotune import TuneSettings, choose, eager_route, paired_ratios

S = TuneSettings(min_gain=1.05, confirm_rounds=3)


def test_dense_wins_when_sparse_gain_is_below_threshold():
    c = choose({"dense": 1.0, "cusparselt-planned": 0.97}, {}, {}, S)
    assert c["backend"] == "dense" and c["speedup"] == 1.0 and "below 1.05x" in c["reason"]


def test_sparse_wins_with_its_config_when_confirmed():
    c = choose({"dense": 1.0, "cusparselt-planned": 0.5, "torch-semi-structured": 0.8}, {}, {}, S,
               config_of=lambda name: {"layout": 1, "alg_id": 3}, confirm=lambda name: [1.9, 2.0, 2.1])
    assert c["backend"] == "cusparselt-planned" and c["config"] == {"layout": 1, "alg_id": 3}
    assert c["speedup"] == 2.0 and c["confirmed_speedups"] == [1.9, 2.0, 2.1]


def test_paired_retiming_can_overturn_a_lucky_first_timing():
    c = choose({"dense": 1.0, "cusparselt-planned": 0.9}, {}, {}, S, confirm=lambda name: [0.97, 0.99, 1.2])
    assert c["backend"] == "dense" and "paired re-timing" in c["reason"]


def test_paired_retiming_decides_between_close_sparse_backends():
    times = {"dense": 1.0, "torch-semi-structured": 0.70, "cutlass-sm90": 0.72, "cusparselt-planned": 0.95}
    paired = {"torch-semi-structured": [1.20, 1.22, 1.25], "cutlass-sm90": [1.38, 1.40, 1.41]}
    asked = []

    def confirm(name):
        asked.append(name)
        return paired[name]

    c = choose(times, {}, {}, S, confirm=confirm)
    assert asked == ["torch-semi-structured", "cutlass-sm90"]  # the 0.95 one is not close enough to ask
    assert c["backend"] == "cutlass-sm90" and c["speedup"] == 1.4


def test_no_correct_sparse_backend_means_dense_with_reason():
    c = choose({"dense": 1.0}, {"cusparselt-planned": 0.5}, {"cusparselt-planned": "max rel error 0.5 > 0.02"}, S)
    assert c["backend"] == "dense" and c["reason"] == "no correct sparse backend"
    assert c["rejected"]["cusparselt-planned"].startswith("max rel error")


def test_untimed_dense_baseline_reports_no_speedup():
    c = choose({}, {}, {"dense": "failed: boom"}, S)
    assert c["backend"] == "dense" and c["speedup"] is None and "boom" in c["reason"]


def test_paired_ratios_alternate_order():
    calls = []
    ratios = paired_ratios(lambda: calls.append("d") or 2.0, lambda: calls.append("s") or 1.0, 3)
    assert ratios == [2.0, 2.0, 2.0] and calls == ["d", "s", "s", "d", "d", "s"]


def test_search_survives_a_child_killed_mid_case(monkeypatch):
    """First child dies (SIGILL) inside case 2; the parent records it and restarts on the rest."""
    cases = [(64, 64, 1), (64, 64, 16), (128, 64, 1)]
    runs = []

    def fake_run(cmd, **kwargs):
        job_path, out_path = cmd[-2], cmd[-1]
        todo = [tuple(c) for c in json.loads(Path(job_path).read_text())["cases"]]
        runs.append(todo)
        with open(out_path, "a") as out:
            for case in todo:
                head = dict(zip(("out", "in", "tokens"), case, strict=True))
                out.write(json.dumps({**head, "start": True}) + "\n")
                if case == (64, 64, 16) and len(runs) == 1:
                    return SimpleNamespace(returncode=-4, stderr="")
                out.write(json.dumps({**head, "result": {"layout": 1, "alg_id": 0, "ms": 0.1}}) + "\n")
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(cslt_search.subprocess, "run", fake_run)
    results = cslt_search.search_configs(cases, torch.float16, torch.device("cuda", 0))
    assert runs == [cases, [(128, 64, 1)]]
    assert results[(64, 64, 1)]["ms"] == 0.1 and results[(128, 64, 1)]["ms"] == 0.1
    assert results[(64, 64, 16)] == {"error": "search process killed by SIGILL"}


def test_search_reports_a_child_that_cannot_start(monkeypatch):
    monkeypatch.setattr(cslt_search.subprocess, "run",
                        lambda cmd, **kw: SimpleNamespace(returncode=1, stderr="RuntimeError: no CUDA"))
    results = cslt_search.search_configs([(64, 64, 1)], torch.float16, torch.device("cuda"))
    assert results[(64, 64, 1)] == {"error": "search did not reach this case"}


def test_search_timeout_is_recorded_and_not_retried(monkeypatch):
    calls = []

    def hang(cmd, **kwargs):
        calls.append(cmd)
        raise subprocess.TimeoutExpired(cmd, 1)

    monkeypatch.setattr(cslt_search.subprocess, "run", hang)
    results = cslt_search.search_configs([(64, 64, 1)], torch.float16, torch.device("cuda"), timeout_s=1)
    assert "error" in results[(64, 64, 1)] and len(calls) == 1


def test_eager_route_keeps_sparse_when_its_host_cost_matches_dense():
    out = eager_route("cutlass-sm90", 1, {"dense": 16.0, "cutlass-sm90": 16.3}, TuneSettings())
    assert out["eager_backend"] == "cutlass-sm90" and out["host_us"]["dense"] == 16.0


def test_eager_route_falls_back_to_dense_when_decode_pays_more_host_time():
    # decode of an 8B-shaped MLP: the sparse call saves GPU time but costs 4.5 us more host per call
    out = eager_route("cutlass-sm90", 16, {"dense": 16.0, "cutlass-sm90": 20.5}, TuneSettings())
    assert out["eager_backend"] == "dense"
    assert "+4.5" in out["eager_reason"]


def test_eager_route_keeps_sparse_at_prefill_sizes():
    out = eager_route("cutlass-sm90", 2048, {"dense": 16.0, "cutlass-sm90": 20.0}, TuneSettings())
    assert out["eager_backend"] == "cutlass-sm90" and "paced by the GPU" in out["eager_reason"]
