"""Fine-tuning losses as pure tensor functions, all computed in fp32.

- `causal_ce`: next-token cross-entropy, mean over the predicted tokens (positions 0..L-2).
- `kd_kl`: T^2 * KL(teacher || student) of the temperature-softened distributions, mean over every
  position (0..L-1; the teacher's prediction at the last position is as good a target as any).
- `kd_kl_topk`: the same against a teacher kept only as its top-k logits (renormalized over those k);
  equals `kd_kl` when k is the vocabulary size.
- `hidden_mse`: mean over layers of the mean squared difference of hidden states.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def causal_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `logits` [B, L, V] for `input_ids` [B, L]."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1))


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over positions of sum_v p_t(v) (log p_t(v) - log p_s(v)), with p = softmax(z / T)."""
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * t * t


def kd_kl_topk(
    student_logits: torch.Tensor, top_values: torch.Tensor, top_indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """`kd_kl` against a teacher given as its top-k logits (`top_values`, `top_indices`: [B, L, k]).

    The teacher distribution is softmax(top_values / T) over its k tokens; the student's full
    log-softmax is gathered at those tokens.
    """
    t = temperature
    log_s = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, top_indices.long())
    log_t = F.log_softmax(top_values.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return kl.mean() * t * t


def hidden_mse(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of mean((h_s - h_t)^2); the two sequences pair up layer by layer."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hidden states: {len(student)} student vs {len(teacher)} teacher layers")
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(losses).mean()
