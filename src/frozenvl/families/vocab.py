"""A workflow's own vocabulary: tokens added to the shared tokenizer whose embedding and head rows
the workflow owns, so the base's tables are never written and `text` never sees them.

Two users: every family's ``location_tokens`` (``<loc_00>`` .. ``<loc_N-1>``, grounding boxes
written as one token per coordinate, as Kosmos-2 / PaliGemma / Florence-2 do; box format
``loc<N>`` in data/boxes.py), and cross_attention's ``extra_tokens`` (``<image>``,
``<|endofchunk|>``). A new token's id is wherever the tokenizer put it: right after the base
vocabulary (the common case, logits are then concatenated), or inside the embedding table's range
when the tokenizer is shorter than the table (its logit is then replaced by the workflow's row).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def location_token_names(n: int) -> list[str]:
    """``<loc_0>`` .. for `n` cells per axis, zero-padded to the width of ``n - 1`` (``<loc_00>`` .. ``<loc_31>``
    for 32), the strings the ``loc<N>`` box format writes."""
    width = len(str(n - 1))
    return [f"<loc_{i:0{width}d}>" for i in range(n)]


def mean_rows(weight: torch.Tensor, k: int, *, noise: float = 0.0) -> torch.Tensor:
    """`k` new rows for the table `weight` [V, d]: its mean row (transformers' own initialisation of
    added embeddings), plus `noise` x each column's std of Gaussian noise (from torch's global
    generator) so that new tokens start apart."""
    w = weight.detach().float()
    rows = w.mean(0).repeat(k, 1)
    if noise:
        rows = rows + noise * w.std(0) * torch.randn(k, w.shape[1], device=w.device)
    return rows.to(weight.dtype)


def embed_with_rows(lookup: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                    token_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Embeddings of `input_ids` with the ids in `token_ids` [k] taken from `rows` [k, d] and every other
    id from `lookup` (the base's table, or a family's)."""
    match = input_ids.unsqueeze(-1) == token_ids  # [B, T, k]
    is_new = match.any(-1)
    h = lookup(input_ids.masked_fill(is_new, 0))
    # always the select, never "if is_new.any()": that would sync with the device at every decode step
    # F.embedding, not rows[which]: its backward sums in a fixed order (indexing's adds atomically on
    # CPU, so runs and resumed trainings would drift apart)
    which = match.long().argmax(-1)
    return torch.where(is_new.unsqueeze(-1), F.embedding(which, rows).to(h.dtype), h)


def logits_with_rows(logits: torch.Tensor, extra: torch.Tensor, token_ids: list[int],
                     index: torch.Tensor) -> torch.Tensor:
    """`logits` [.., V] with the new tokens' logits `extra` [.., k] at `token_ids` (`index`: the same ids
    as a tensor on the logits' device, kept by the caller so no step copies them there): concatenated
    when the ids follow the last column, else written into (and, beyond V, padded to) their columns;
    a padded column that belongs to no one gets the dtype's minimum (never sampled)."""
    width = logits.shape[-1]
    if token_ids == list(range(width, width + len(token_ids))):
        return torch.cat([logits, extra], dim=-1)
    need = max(token_ids) + 1
    if need > width:
        logits = F.pad(logits, (0, need - width), value=torch.finfo(logits.dtype).min)
    return logits.index_copy(-1, index, extra)
