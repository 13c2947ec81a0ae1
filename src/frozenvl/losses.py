"""The training loss, written once (the model's `.loss` and the trainer both use it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy (in float32) over positions whose label is not -100: their mean, or
    with `reduction="sum"` their sum (what a trainer divides by the global label count)."""
    labels = labels.to(logits.device)
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    if reduction == "mean" and not (shift_labels != IGNORE_INDEX).any():
        return shift_logits.sum() * 0.0  # nothing to learn here; keep the graph, no NaN
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
