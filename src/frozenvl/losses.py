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


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a loss is taken at, for a forward pass that computes only their logits.

    Returns ``(keep, targets)``: `keep` [batch, seq] marks each position whose *next* token is a
    label (what ``FrozenVLModel.forward(logits_mask=keep)`` computes logits for), and `targets` [n]
    holds those labels in the same row-major order. Skipping the head at every other position saves
    most of its cost in training: a chat sample labels its answers, a small share of its tokens, and
    a real LLM's head ([vocab, hidden]) is one of its largest matrices.
    """
    is_target = labels[:, 1:] != IGNORE_INDEX
    keep = F.pad(is_target, (0, 1), value=False)
    return keep, labels[:, 1:][is_target]


def selected_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Cross entropy (in float32) of logits [n, vocab] computed at :func:`label_positions`' `keep`
    against its `targets` [n]: the same per-token values as :func:`causal_lm_loss` of the full logits."""
    return F.cross_entropy(logits.float(), targets.to(logits.device), reduction=reduction)
