"""Prompts with `<image>` placeholders -> token ids with vision-token slots, and batching."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..constants import IMAGE_TOKEN_ID

IMAGE_PLACEHOLDER = "<image>"


def count_placeholders(text: str) -> int:
    return text.count(IMAGE_PLACEHOLDER)


def tokenize_with_images(
    tokenizer, text: str, tokens_per_image: int | Sequence[int], *, add_special_tokens: bool = False
) -> list[int]:
    """Tokenize `text`, writing `tokens_per_image` IMAGE_TOKEN_ID slots for each `<image>` (or, given one
    count per image, as many as that image's: tiled images).

    With `tokens_per_image == 0` (families that do not put images in the sequence) the placeholder
    is simply removed. Special tokens in the text (from a chat template) are parsed as such.
    """
    ids: list[int] = []
    chunks = text.split(IMAGE_PLACEHOLDER)
    per_image = [tokens_per_image] * (len(chunks) - 1) if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if len(per_image) != len(chunks) - 1:
        raise ValueError(f"{len(chunks) - 1} <image> placeholder(s) but token counts for {len(per_image)} image(s)")
    for k, chunk in enumerate(chunks):
        if k > 0:
            ids.extend([IMAGE_TOKEN_ID] * per_image[k - 1])
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=add_special_tokens and k == 0)["input_ids"])
        elif k == 0 and add_special_tokens and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask) as generation wants them."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (padding positions get 1, as transformers' generate does)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)
