"""User inputs -> model inputs: images flattened and given their batch rows, prompts tokenized and padded.

Images travel flat, sample after sample, with `image_rows` ([n_images]) naming each image's batch
row. Every path that knows how many images each row has turns those counts into rows through
:func:`rows_from_counts`; :func:`resolve_image_rows` is the one place that validates given rows or
reads them off the vision-token slots.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .constants import IMAGE_TOKEN_ID, TEXT_TASK
from .data.prompt import count_placeholders, left_pad, tokenize_with_images
from .vision.tiling import TiledPixels

if TYPE_CHECKING:
    from .model import FrozenVLModel

NO_IMAGES_FOR_TEXT = "the 'text' workflow is the base LLM and takes no images; pick a multimodal task"


# ------------------------------------------------------------------ image lists
def flatten_images(images: Any) -> list[Any]:
    """Nested lists of images -> one flat list, in order."""
    if isinstance(images, (list, tuple)):
        return [x for item in images for x in flatten_images(item)]
    return [images]


def is_per_sample(images: Any, n: int) -> bool:
    """`images` is one list per prompt (n of them)."""
    return isinstance(images, (list, tuple)) and len(images) == n and all(isinstance(x, (list, tuple)) for x in images)


def per_sample_images(images: Any, n: int) -> list[list[Any]]:
    """User `images` for n prompts -> one list per prompt (a flat list is allowed for one prompt)."""
    if images is None:
        return [[] for _ in range(n)]
    if is_per_sample(images, n):
        return [list(x) for x in images]
    if n == 1:
        return [flatten_images(images)]
    raise ValueError(f"{n} prompts: give images as a list of {n} lists (one per prompt, empty for none)")


def to_pixel_values(items: Sequence[Any], preprocess: Callable[[list[Any]], torch.Tensor]) -> torch.Tensor:
    """Flat images -> [N, 3, H, W] (or [N, frames, 3, H, W]). Ready tensors ([3, H, W] per image,
    [frames, 3, H, W] per video) are taken as they are; everything else goes through `preprocess`."""
    others = [x for x in items if not isinstance(x, torch.Tensor)]
    done = iter(preprocess(others)) if others else iter(())
    out = [x if isinstance(x, torch.Tensor) else next(done) for x in items]
    shapes = {tuple(x.shape) for x in out}
    if len(shapes) > 1:
        raise ValueError(f"images of different shapes {sorted(shapes)} cannot be batched: give tensors of one shape "
                         "(the workflow's preprocessor output) or PIL images / paths / bytes")
    if out[0].dim() not in (3, 4):
        raise ValueError(f"an image tensor is [3, H, W] (a video [frames, 3, H, W]); got shape {tuple(out[0].shape)}")
    return torch.stack(out)


# ------------------------------------------------------------------ rows
def rows_from_counts(counts: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Images per batch row -> the batch row of each image, flat in row order ([2, 0, 1] -> [0, 0, 2])."""
    counts = torch.as_tensor(counts, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def resolve_image_rows(
    input_ids: torch.Tensor, n_images: int, tokens_per_image: int | Sequence[int], task: str,
    given: torch.Tensor | None,
) -> torch.Tensor | None:
    """Each image's batch row: `given` (checked), else read off the vision-token slots (None when those
    do not add up: the splice reports the mismatch with its own message), else an error.
    `tokens_per_image` is one count for every image, or one per image (tiled images)."""
    batch = input_ids.shape[0]
    if given is not None:
        given = torch.as_tensor(given, device=input_ids.device, dtype=torch.long)
        if given.shape != (n_images,) or (n_images and not 0 <= int(given.min()) <= int(given.max()) < batch):
            raise ValueError(f"image_rows {given.tolist()} does not fit {n_images} images in {batch} rows")
        return given
    if batch == 1:
        return torch.zeros(n_images, dtype=torch.long, device=input_ids.device)
    if not isinstance(tokens_per_image, int):
        return _rows_from_slots((input_ids == IMAGE_TOKEN_ID).sum(-1).tolist(), list(tokens_per_image), input_ids.device)
    if tokens_per_image:
        per_row = (input_ids == IMAGE_TOKEN_ID).sum(-1) // tokens_per_image
        return rows_from_counts(per_row) if int(per_row.sum()) == n_images else None
    raise ValueError(
        f"workflow {task!r} keeps images out of the token sequence, so which of the {batch} rows "
        f"each of the {n_images} images belongs to is unknown: pass image_rows (prepare_inputs and the "
        "data collator return it), or images as one list per prompt"
    )


def _rows_from_slots(slots: list[int], counts: list[int], device: torch.device) -> torch.Tensor | None:
    """Images of `counts` slots each, in order, over rows holding `slots` slots: each image's row (None
    when they do not add up)."""
    rows, k = [], 0
    for row, left in enumerate(slots):
        while left > 0 and k < len(counts):
            left -= counts[k]
            rows.append(row)
            k += 1
        if left != 0:
            return None
    return torch.tensor(rows, dtype=torch.long, device=device) if k == len(counts) else None


# ------------------------------------------------------------------ lengths
def check_length(llm_config: Any, width: int, new_tokens: int = 0) -> None:
    """A ValueError unless `width` tokens (+ `new_tokens` still to generate) fit the base's context."""
    limit = getattr(llm_config, "max_position_embeddings", None)
    if limit is None or width + new_tokens <= limit:
        return
    if new_tokens:
        raise ValueError(
            f"prompt of {width} tokens (images and left padding included) + max_new_tokens={new_tokens} "
            f"= {width + new_tokens} exceeds the LLM's max_position_embeddings={limit}: shorten the prompt or "
            f"lower max_new_tokens (at most {max(limit - width, 0)} here)"
        )
    raise ValueError(f"sequence of {width} tokens (images included) exceeds the LLM's max_position_embeddings={limit}")


def check_image_tokens(llm_config: Any, per_prompt: Sequence[Sequence[int]]) -> None:
    """A ValueError naming the image token counts when one prompt's images alone exceed the context."""
    limit = getattr(llm_config, "max_position_embeddings", None)
    for i, counts in enumerate(per_prompt):
        if limit is not None and sum(counts) > limit:
            raise ValueError(
                f"prompt {i}: its images take {sum(counts)} tokens ({' + '.join(map(str, counts))}), over the LLM's "
                f"max_position_embeddings={limit}: lower max_tiles (or use fewer images)"
            )


# ------------------------------------------------------------------ whole requests
def images_in(
    model: FrozenVLModel, images: Any, n_rows: int, task: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pixel_values, image_rows) from user `images` next to ready input_ids: a tensor, a flat list, or
    one list per row (only that names the rows; otherwise they are resolved later)."""
    if images is None:
        return None, None
    if task == TEXT_TASK:
        raise ValueError(NO_IMAGES_FOR_TEXT)
    if isinstance(images, (torch.Tensor, TiledPixels)):
        return images, None
    if n_rows > 1 and is_per_sample(images, n_rows):
        per_sample = per_sample_images(images, n_rows)
        flat = [x for imgs in per_sample for x in imgs]
        if not flat:
            return None, None
        return model.pixel_values(flat, task), rows_from_counts([len(x) for x in per_sample])
    return model.pixel_values(images, task), None


def prepare_inputs(
    model: FrozenVLModel,
    prompts: str | Sequence[str],
    images: Any = None,
    task: str = TEXT_TASK,
    *,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """Tokenize prompts (with `<image>` placeholders), left-pad, and preprocess images; see
    :meth:`FrozenVLModel.prepare_inputs`."""
    model._check_task(task)
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    placeholders = [count_placeholders(p) for p in prompts]
    if isinstance(images, (torch.Tensor, TiledPixels)):
        # ready pixel_values: the prompts' placeholders say which row each image belongs to
        if task == TEXT_TASK:
            raise ValueError(NO_IMAGES_FOR_TEXT)
        if len(images) != sum(placeholders):
            raise ValueError(
                f"pixel_values hold {len(images)} image(s) but the prompt(s) have {sum(placeholders)} <image> "
                f"placeholder(s) (per prompt: {placeholders})"
            )
        counts, flat = placeholders, None
    else:
        if single and images is not None and not is_per_sample(images, 1):
            images = [images]
        per_sample = per_sample_images(images, len(prompts))
        counts, flat = [len(x) for x in per_sample], [x for imgs in per_sample for x in imgs]
    for i, (n_ph, n_img) in enumerate(zip(placeholders, counts)):
        if task == TEXT_TASK and (n_ph or n_img):
            raise ValueError(f"prompt {i}: the 'text' workflow takes no images or <image> placeholders")
        if n_ph != n_img:
            raise ValueError(f"prompt {i} has {n_ph} <image> placeholder(s) but {n_img} image(s) were given")
    pixel_values = images if flat is None else (model.pixel_values(flat, task) if flat else None)
    n_tok = model.image_token_counts(task, pixel_values) if task != TEXT_TASK else 0
    if not isinstance(n_tok, int):  # tiled images: each its own count, sliced per prompt
        starts = [0, *itertools.accumulate(counts)]
        n_tok = [n_tok[a:b] for a, b in itertools.pairwise(starts)]
        check_image_tokens(model.llm.config, n_tok)
    else:
        n_tok = [n_tok] * len(prompts)
    with model._tokenizer_lock:  # the Rust tokenizer's settings are shared state (see docs: thread safety)
        seqs = [tokenize_with_images(model.tokenizer, p, n, add_special_tokens=add_special_tokens)
                for p, n in zip(prompts, n_tok)]
    input_ids, attention_mask = left_pad(seqs, model.tokenizer.pad_token_id)
    check_length(model.llm.config, input_ids.shape[1])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_rows": rows_from_counts(counts) if pixel_values is not None else None}
