"""bench/scaling_projection.py: the figures docs/scaling.md quotes, and the projection formula on a made-up row."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from scaling_projection import SHAPES, layer_parts, project, table, work  # noqa: E402

DIMS_70B = {"hidden": 8192, "mlp": 28672, "heads": 64, "kv_heads": 8, "layers": 3, "vocab": 32000,
            "samples": 128, "seq_len": 2048}


def test_405b_work_ratios_quoted_in_the_docs() -> None:
    a, b = work(SHAPES["70B"]), work(SHAPES["405B"])
    ratios = {key: round(b[key] / a[key], 2) for key in a}
    assert ratios == {"solve": 6.88, "columns": 1.92, "forward": 3.63, "io": 3.73}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    for figure in ("×6.88", "×1.92", "×3.63", "×3.73"):
        assert figure in docs


def test_projection_of_a_70b_row() -> None:
    row = {"pattern": "2:4", "status": "ok", "layer_s": [25.0, 20.0, 15.0], "solve_layer_s": [8.0, 8.0, 8.0],
           "read_layer_s": [0.5, 0.5, 0.5], "write_layer_s": [1.5, 1.5, 1.5]}
    parts = layer_parts(row)
    assert parts == pytest.approx({"layer": 20.0, "solve": 8.0, "io": 2.0, "forward": 10.0, "setup": 5.0})
    projected = project(row, DIMS_70B)
    assert projected["70B"][1] == pytest.approx((5 + 80 * 20.0,) * 2)  # measured at 70B: no range
    assert projected["70B"][8] == pytest.approx((5 + 80 * (2 + 18 / (8 * 0.75)),) * 2)
    low, high = projected["405B"][1]
    assert low == pytest.approx(5 + 126 * (2 * 3.725 + 8 * 1.923 + 10 * 3.634), rel=1e-3)
    assert high == pytest.approx(5 + 126 * (2 * 3.725 + 8 * 6.878 + 10 * 3.634), rel=1e-3)
    text = table({"device": "NVIDIA H200", "dims": DIMS_70B, "rows": [row]})
    assert "| 2:4 | 20.0 (8.0 / 10.0 / 2.0) | 0.45 h |" in text
