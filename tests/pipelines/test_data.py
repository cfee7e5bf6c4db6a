"""Token windows and perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipelines.data import TextTooShortError, calibration_samples, eval_windows, perplexity, tokenize
from pipelines.modelio import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def text(tiny_text_file: Path) -> str:
    return tiny_text_file.read_text()


def test_perplexity_equals_direct_computation(tiny_model_dir: Path, tokenizer, text: str) -> None:
    model = load_model(tiny_model_dir)
    windows = eval_windows(tokenizer, text, seq_len=32, max_windows=5)
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:  # one window at a time, log-softmax and gather by hand
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            total -= logp[torch.arange(31), window[1:]].sum().item()
            count += 31
    calls = []
    got = perplexity(model, windows, batch_size=2, progress=lambda d, t, m: calls.append((d, t)))
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_eval_windows_are_consecutive_and_non_overlapping(tokenizer, text: str) -> None:
    ids = tokenize(tokenizer, text)
    windows = eval_windows(tokenizer, text, seq_len=50, max_windows=None)
    assert windows.shape == (ids.numel() // 50, 50)
    assert torch.equal(windows.reshape(-1), ids[: windows.numel()])  # each token at most once, in order
    assert eval_windows(tokenizer, text, seq_len=50, max_windows=3).shape == (3, 50)


def test_calibration_samples_are_deterministic_per_seed(tokenizer, text: str) -> None:
    a = calibration_samples(tokenizer, text, samples=6, seq_len=40, seed=1)
    b = calibration_samples(tokenizer, text, samples=6, seq_len=40, seed=1)
    c = calibration_samples(tokenizer, text, samples=6, seq_len=40, seed=2)
    assert a.shape == (6, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = tokenize(tokenizer, text).tolist()
    row = a[0].tolist()
    assert any(ids[s : s + 40] == row for s in range(len(ids) - 39))  # a real window of the text


def test_too_short_text_is_an_error(tokenizer) -> None:
    with pytest.raises(TextTooShortError, match="fewer than one window"):
        calibration_samples(tokenizer, "tiny text", samples=2, seq_len=64, seed=0)
    with pytest.raises(TextTooShortError, match="fewer than one window"):
        eval_windows(tokenizer, "tiny text", seq_len=64, max_windows=4)
