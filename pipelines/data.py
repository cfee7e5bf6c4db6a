"""Token windows from text, and perplexity over them.

Calibration and fine-tuning draw random windows (deterministic for a seed); evaluation uses
consecutive, non-overlapping windows from the start of the held-out text, so the figure is
reproducible and every token is scored at most once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipelines.stage import ProgressFn, StageError


class TextTooShortError(StageError):
    """The text has fewer tokens than a window needs."""


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(ids: torch.Tensor, samples: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`samples` windows of `seq_len` consecutive tokens at uniform random starts: LongTensor[samples, seq_len]."""
    if ids.numel() < seq_len:
        raise TextTooShortError(f"text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    starts = torch.randint(0, ids.numel() - seq_len + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def calibration_samples(
    tokenizer: PreTrainedTokenizerBase, text: str, samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """Random windows of the tokenized text, the same for the same seed: LongTensor[samples, seq_len]."""
    generator = torch.Generator().manual_seed(seed)
    return sample_windows(tokenize(tokenizer, text), samples, seq_len, generator)


def eval_windows(
    tokenizer: PreTrainedTokenizerBase, text: str, seq_len: int, max_windows: int | None
) -> torch.Tensor:
    """Consecutive non-overlapping windows from the start of the text: LongTensor[n, seq_len].

    n is the number of whole windows the text holds, capped at `max_windows` (None: no cap); the
    trailing partial window is dropped.
    """
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise TextTooShortError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood (fp32) and the number of predicted tokens."""
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:].to(shifted.device)
    nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
    return nll, targets.numel()


@torch.inference_mode()
def perplexity(
    model: PreTrainedModel, windows: torch.Tensor, batch_size: int, progress: ProgressFn | None = None
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (seq_len - 1 per window)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = math.ceil(windows.shape[0] / batch_size)
    for b in range(batches):
        batch = windows[b * batch_size : (b + 1) * batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll, n = token_nll(logits, batch)
        total += nll.item()
        count += n
        if progress is not None:
            progress(b + 1, batches, f"perplexity batch {b + 1}/{batches}")
    return math.exp(total / count)
