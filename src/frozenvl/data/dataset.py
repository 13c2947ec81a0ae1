"""LLaVA-format conversations and interleaved image-text documents, collation and modality/length
grouped sampling.

A data file is a JSON list or JSONL of samples, each a conversation::

    {"id": "000001", "image": "coco/1.jpg" | ["a.jpg", "b.jpg"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

or an interleaved document (language modelling over image-text documents, as OpenFlamingo trains
on MMC4)::

    {"id": "doc1",
     "document": ["Some text ", {"image": "a.png"}, " a caption.<|endofchunk|>",
                  {"image": "b.png"}, "more text<|endofchunk|>"]}

Both kinds may be mixed in one file. A document's items are, in order, text (a string) or an image
(``{"image": path}``, relative to the image root as for conversations); see :func:`parse_document`
and :func:`encode_document`. It is tokenized as bos (if the tokenizer adds one), the items in order
(consecutive strings joined as written, no spaces added; each image becomes ``tokens_per_image``
image slots, as ``<image>`` does in :func:`~frozenvl.data.prompt.tokenize_with_images`) and eos.
Every text token and the eos are targets; bos and image slots are not. A document must not have a
top-level ``image`` key nor ``conversations``.

All samples are validated and tokenized when the dataset is built (see
:func:`~frozenvl.data.chat.encode_conversation` and :func:`encode_document`); image files are only
checked for existence then, and decoded in ``__getitem__``.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import IMAGE_TOKEN_ID
from ..inputs import rows_from_counts
from ..vision.images import ImageError, ImagePreprocessor, load_image
from ..vision.tiling import TiledPixels, TiledPreprocessor
from .chat import (
    IGNORE_INDEX,
    EncodedSample,
    SampleError,
    check_encoding_args,
    encode_conversation,
    fit_length,
    sample_error,
    to_messages,
)
from .prompt import IMAGE_PLACEHOLDER, tokenize_with_images

__all__ = [
    "ConversationDataset",
    "DataStats",
    "ModalityLengthGroupedSampler",
    "collate",
    "encode_document",
    "parse_document",
    "read_records",
]

ON_BAD_SAMPLE = ("skip", "error")


@dataclass
class DataStats:
    """Counts of a dataset build. ``seen == used + sum(skipped.values())`` always holds:
    a sample dropped in ``__getitem__`` for a broken image moves from ``used`` to ``skipped``."""

    seen: int = 0
    used: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return f"{self.used}/{self.seen} samples used" + (f"; skipped: {parts}" if parts else "")


# --------------------------------------------------------------------------- reading


def _json_error(path: Path, exc: json.JSONDecodeError, line: int | None = None) -> ValueError:
    if line is None:
        where = f"line {exc.lineno} column {exc.colno} (char {exc.pos})"
    else:
        where = f"line {line} column {exc.colno}"
    return ValueError(f"{path}: invalid JSON at {where}: {exc.msg}")


def read_records(path: str | os.PathLike[str]) -> list[tuple[Any, str]]:
    """Read a JSON list or JSONL file -> ``[(record, where)]`` (``where`` is "item N" or "line N").

    ``.jsonl`` files are read as JSONL; other files as a JSON list if they hold one, else as
    JSONL. Malformed JSON raises ValueError naming the file and the line (and column).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: data file not found") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    text = text.removeprefix("\ufeff")
    stripped = text.lstrip()
    if not stripped:
        raise ValueError(f"{path}: empty data file")

    if path.suffix.lower() != ".jsonl":
        if stripped[0] == "[":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise _json_error(path, exc) from exc
            return [(rec, f"item {i}") for i, rec in enumerate(data)]
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # not one JSON document: read it as JSONL below
        else:
            one_line = "\n" not in text.strip()
            if not (isinstance(data, dict) and one_line):  # a one-line JSONL file is fine
                raise ValueError(
                    f"{path}: expected a JSON list of samples or JSONL (one sample object per line), "
                    f"got a single JSON {type(data).__name__}"
                )

    records = []
    # Split on "\n" only: str.splitlines() would also split on U+2028 etc., legal inside JSON strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((json.loads(line), f"line {lineno}"))
        except json.JSONDecodeError as exc:
            raise _json_error(path, exc, line=lineno) from exc
    return records


# --------------------------------------------------------------------------- interleaved documents


def parse_document(document: Any, *, sample_id: str = "?") -> tuple[str, list[str]]:
    """A document's items -> (text with one ``<image>`` per image item, the image paths in order).

    Items are strings (text) or ``{"image": path}`` (an image; no other keys). Anything else raises
    :class:`SampleError` (kind "bad_format") naming the item's index; a text item containing
    ``<image>`` itself raises kind "placeholder_mismatch" (images are given as items, never in text).
    """
    if not isinstance(document, (list, tuple)) or not document:
        raise sample_error(sample_id, "'document' must be a non-empty list of text and {\"image\": path} items")
    parts: list[str] = []
    images: list[str] = []
    for k, item in enumerate(document):
        if isinstance(item, str):
            if IMAGE_PLACEHOLDER in item:
                raise sample_error(
                    sample_id,
                    f"document item {k}: text contains {IMAGE_PLACEHOLDER}; images in a document are "
                    '{"image": path} items',
                    "placeholder_mismatch",
                )
            parts.append(item)
        elif isinstance(item, dict) and set(item) == {"image"} and isinstance(item["image"], str):
            if not item["image"].strip():
                raise sample_error(sample_id, f"document item {k}: empty image path")
            parts.append(IMAGE_PLACEHOLDER)
            images.append(item["image"])
        else:
            shown = repr(item)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise sample_error(
                sample_id, f'document item {k}: expected a string or {{"image": path}}, got {shown}'
            )
    return "".join(parts), images


def _adds_bos(tokenizer) -> bool:
    """Whether plain encoding (add_special_tokens=True) puts the tokenizer's bos in front."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("", add_special_tokens=True)["input_ids"][:1] == [bos]


def encode_document(
    tokenizer,
    text: str,
    *,
    tokens_per_image: int | Sequence[int],
    max_length: int | None = None,
    truncation: str = "skip",
    sample_id: str = "?",
) -> EncodedSample:
    """An interleaved document (text with ``<image>`` placeholders, see :func:`parse_document`) ->
    input ids and language-modelling labels.

    ids = [bos (if the tokenizer adds one)] + :func:`~frozenvl.data.prompt.tokenize_with_images`
    (``text``, ``tokens_per_image``) + [eos]. Labels are the token id for every text token and the
    eos; -100 for bos and image slots.

    ``max_length`` is handled as in :func:`~frozenvl.data.chat.encode_conversation`: a longer
    sequence raises kind "overlong" with ``truncation="skip"``; with ``"truncate"`` it is cut to
    ``max_length`` unless the cut drops any image slot (kind "image_truncated") or leaves no
    labelled token (kind "answer_truncated").
    """
    check_encoding_args(max_length, truncation, tokens_per_image)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: interleaved documents end with one")

    body = tokenize_with_images(tokenizer, text, tokens_per_image)
    prefix = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    ids = prefix + body + [eos]
    labels = [IGNORE_INDEX] * len(prefix) + [IGNORE_INDEX if t == IMAGE_TOKEN_ID else t for t in body] + [eos]
    num_images = text.count(IMAGE_PLACEHOLDER)

    ids, labels, truncated = fit_length(ids, labels, max_length, truncation, sample_id, "text")
    return EncodedSample(input_ids=ids, labels=labels, num_images=num_images, truncated=truncated)


# --------------------------------------------------------------------------- dataset


def _weighting_keys(record: dict, sample_id: str) -> tuple[str | None, float]:
    """A sample's optional ``task`` (a label of the data, e.g. "grounding") and ``loss_weight``
    (a finite number > 0, default 1): what the trainer's loss weighting reads."""
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise sample_error(sample_id, f"'task' must be a string, got {task!r}", "bad_format")
    weight = record.get("loss_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise sample_error(sample_id, f"'loss_weight' must be a finite number > 0, got {weight!r}", "bad_format")
    return task, float(weight)


class ConversationDataset(torch.utils.data.Dataset):
    """Tokenized LLaVA conversations and interleaved documents (``document`` records, see the module
    docstring), with lazily decoded images.

    Items are ``{"input_ids": LongTensor[L], "labels": LongTensor[L],
    "pixel_values": FloatTensor[n_img, 3, H, W] | None, "id": str}``, or None for a sample whose
    image turned out broken when decoded (``on_bad_sample="skip"``; :func:`collate` drops it).

    ``on_bad_sample="skip"`` drops bad samples and counts them in ``self.stats.skipped[kind]``;
    ``"error"`` raises :class:`SampleError` naming the sample id, its index and the file. A
    tokenizer without a usable chat template (kind "template") always raises.

    With DataLoader worker processes, images found broken in a worker are counted in that
    worker's copy of the dataset; ``stats`` in the main process then only reflects the build.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        tokenizer,
        tokens_per_image: int,
        preprocessor: ImagePreprocessor | TiledPreprocessor | None,
        image_root: str | os.PathLike[str] | None = None,
        max_length: int | None = None,
        truncation: str = "skip",
        on_bad_sample: str = "skip",
        tiles_in_sequence: bool = True,
    ) -> None:
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.tokenizer = tokenizer
        self.tokens_per_image = int(tokens_per_image)
        self.preprocessor = preprocessor
        # False for a family that reads a tiled image as one cross-attention medium: the image keeps
        # `tokens_per_image` slots whatever its tiles
        self.tiles_in_sequence = tiles_in_sequence
        self.max_length = max_length
        self.truncation = truncation
        self.on_bad_sample = on_bad_sample
        self.stats = DataStats()

        self.ids: list[str] = []
        self.image_paths: list[tuple[Path, ...]] = []
        self.lengths: list[int] = []
        self.has_image: list[bool] = []
        # optional per-sample keys the trainer's loss weighting reads (docs/training.md)
        self.tasks: list[str | None] = []
        self.loss_weights: list[float] = []
        self.num_truncated = 0
        self._broken: set[int] = set()
        id_chunks: list[np.ndarray] = []
        label_chunks: list[np.ndarray] = []

        for index, (record, where) in enumerate(read_records(self.path)):
            self.stats.seen += 1
            sample_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
            try:
                enc, paths = self._encode(record, sample_id)
                task, weight = _weighting_keys(record, sample_id)
            except SampleError as exc:
                if exc.kind == "template" or on_bad_sample == "error":
                    raise self._located(exc, sample_id, index, where) from exc
                self.stats.skipped[exc.kind] += 1
                continue
            self.stats.used += 1
            self.num_truncated += enc.truncated
            self.ids.append(sample_id)
            self.image_paths.append(paths)
            self.lengths.append(len(enc.input_ids))
            self.has_image.append(bool(paths))
            self.tasks.append(task)
            self.loss_weights.append(weight)
            id_chunks.append(np.asarray(enc.input_ids, dtype=np.int64))
            label_chunks.append(np.asarray(enc.labels, dtype=np.int64))

        if not self.ids:
            raise ValueError(f"{self.path}: no usable samples ({self.stats.summary()})")
        # Flat arrays (not per-sample lists of ints): compact, and cheap to share with workers.
        self._offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self._input_ids = np.concatenate(id_chunks)
        self._labels = np.concatenate(label_chunks)

    # ----------------------------------------------------------------- building

    def _located(self, exc: SampleError, sample_id: str, index: int, where: str) -> SampleError:
        err = SampleError(
            f"{self.path} ({where}, index {index}), sample {sample_id!r}: {exc}", kind=exc.kind, sample_id=sample_id
        )
        return err

    def _image_list(self, record: dict, sample_id: str) -> list[str]:
        image = record.get("image")
        if image is None:
            return []
        if isinstance(image, str):
            images = [image]
        elif isinstance(image, list) and all(isinstance(p, str) for p in image):
            images = list(image)
        else:
            raise sample_error(sample_id, f"'image' must be a path or a list of paths, got {image!r}", "bad_format")
        if any(not p.strip() for p in images):
            raise sample_error(sample_id, "empty image path", "bad_format")
        return images

    def _encode(self, record: Any, sample_id: str):
        if not isinstance(record, dict):
            raise sample_error(sample_id, f"expected an object, got {type(record).__name__}", "bad_format")
        if "document" in record:
            if "conversations" in record:
                raise sample_error(sample_id, "has both 'document' and 'conversations'; a sample is one or the other")
            if "image" in record:
                raise sample_error(
                    sample_id,
                    "'image' is not used with 'document': images go in the document as {\"image\": path} items",
                )
            text, images = parse_document(record["document"], sample_id=sample_id)
            paths = self._checked_paths(images, sample_id)
            enc = encode_document(
                self.tokenizer,
                text,
                tokens_per_image=self._slots(paths, sample_id),
                max_length=self.max_length,
                truncation=self.truncation,
                sample_id=sample_id,
            )
        elif "conversations" not in record:
            raise sample_error(sample_id, "no 'conversations' (or 'document')", "bad_format")
        else:
            images = self._image_list(record, sample_id)
            paths = self._checked_paths(images, sample_id)
            messages = to_messages(record["conversations"], sample_id=sample_id)
            enc = encode_conversation(
                self.tokenizer,
                messages,
                tokens_per_image=self._slots(paths, sample_id),
                max_length=self.max_length,
                truncation=self.truncation,
                sample_id=sample_id,
                num_images=len(images),
            )
        return enc, paths

    def _checked_paths(self, images: list[str], sample_id: str) -> tuple[Path, ...]:
        paths = tuple(self.image_root / p for p in images)
        for p in paths:
            if not p.is_file():
                raise sample_error(sample_id, f"image {p} not found", "missing_image")
        if paths and self.preprocessor is None:
            raise ValueError(
                f"{self.path}: sample {sample_id!r} has images but the dataset was given no preprocessor"
            )
        return paths

    def _slots(self, paths: tuple[Path, ...], sample_id: str) -> int | list[int]:
        """Image slots: `tokens_per_image` for each image, or for a tiled workflow one count per image
        from its tile layout (which follows its size: the image is read once here, not cut)."""
        if not paths or not isinstance(self.preprocessor, TiledPreprocessor) or not self.tiles_in_sequence:
            return self.tokens_per_image
        counts = []
        for p in paths:
            try:
                img = load_image(str(p), max_pixels=self.preprocessor.base.max_pixels)
            except ImageError as exc:
                raise sample_error(sample_id, f"bad image: {exc}", "bad_image") from exc
            counts.append(self.preprocessor.layout((img.height, img.width)).num_tokens(self.tokens_per_image))
        return counts

    # ----------------------------------------------------------------- access

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self.item(index)

    def item(self, index: int, pixels: bool = True) -> dict[str, Any] | None:
        """Sample `index` (None if its image proved broken); with ``pixels=False`` its images are not
        read (``pixel_values`` None): for a caller that has their features already."""
        if index < 0:
            index += len(self)
        if index in self._broken:
            return None
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        pixel_values = None
        paths = self.image_paths[index]
        if paths and pixels:
            try:
                pixel_values = self.preprocessor([str(p) for p in paths])
            except ImageError as exc:
                sample_id = self.ids[index]
                if self.on_bad_sample == "error":
                    raise SampleError(
                        f"{self.path}, sample {sample_id!r} (index {index}): bad image: {exc}",
                        kind="bad_image",
                        sample_id=sample_id,
                    ) from exc
                self._broken.add(index)
                self.stats.used -= 1
                self.stats.skipped["bad_image"] += 1
                return None
        return {
            "input_ids": torch.from_numpy(self._input_ids[start:end].copy()),
            "labels": torch.from_numpy(self._labels[start:end].copy()),
            "pixel_values": pixel_values,
            "id": self.ids[index],
        }

    def collate_fn(self):
        """:func:`collate` bound to the tokenizer's pad id (eos when it has no pad token)."""
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        return partial(collate, pad_token_id=pad)


# --------------------------------------------------------------------------- batching


def collate(batch: Sequence[dict[str, Any] | None], pad_token_id: int) -> dict[str, Any] | None:
    """Right-pad a list of dataset items; None items are dropped (None if nothing is left).

    Returns ``{"input_ids", "labels" (padded with -100), "attention_mask", "pixel_values"}``;
    ``pixel_values`` is every item's images concatenated in order, or None if there are none.
    """
    if pad_token_id is None:
        raise ValueError("collate needs a pad_token_id")
    items = [b for b in batch if b is not None]
    if not items:
        return None
    width = max(len(b["input_ids"]) for b in items)
    input_ids = torch.full((len(items), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, b in enumerate(items):
        n = len(b["input_ids"])
        input_ids[row, :n] = torch.as_tensor(b["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(b["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    pixels = [b["pixel_values"] for b in items if b.get("pixel_values") is not None]
    # the batch row of each image (families that keep images out of the sequence need it)
    counts = [0 if b.get("pixel_values") is None else len(b["pixel_values"]) for b in items]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": _cat_pixels(pixels) if pixels else None,
        "image_rows": rows_from_counts(counts) if pixels else None,
    }


def _cat_pixels(pixels: list) -> torch.Tensor | TiledPixels:
    """Every item's images in order: one [N, 3, H, W] tensor, or one TiledPixels for tiled workflows."""
    if isinstance(pixels[0], TiledPixels):
        return TiledPixels.cat(pixels)
    return torch.cat(pixels, dim=0)


class ModalityLengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Index order for a DataLoader with ``batch_size``: each batch holds one modality and similar lengths.

    Per modality (image vs text-only) the indices are shuffled, cut into mega-batches of
    ``batch_size * mega_batch_mult``, each sorted by length (longest first) and cut into batches;
    the full batches of both modalities are then shuffled together. The at most two partial
    batches (one per modality) go last, together (so only the final one or two batches can mix
    modalities). Everything is deterministic in ``seed`` and the epoch (:meth:`set_epoch`).
    With ``shuffle=False`` no randomness is used at all.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        has_image: Sequence[bool],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        mega_batch_mult: int = 50,
    ) -> None:
        if len(lengths) != len(has_image):
            raise ValueError(f"lengths ({len(lengths)}) and has_image ({len(has_image)}) differ in size")
        if batch_size <= 0 or mega_batch_mult <= 0:
            raise ValueError("batch_size and mega_batch_mult must be positive")
        self.lengths = [int(x) for x in lengths]
        self.has_image = [bool(x) for x in has_image]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.mega_batch_mult = int(mega_batch_mult)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def _batches(self, indices: list[int], gen: torch.Generator | None) -> list[list[int]]:
        if gen is not None:
            indices = [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
        mega = self.batch_size * self.mega_batch_mult
        out = []
        for s in range(0, len(indices), mega):
            chunk = sorted(indices[s : s + mega], key=lambda i: -self.lengths[i])  # stable
            out.extend(chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size))
        return out

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch."""
        gen = None
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed * 1_000_003 + self.epoch)
        image = [i for i, h in enumerate(self.has_image) if h]
        text = [i for i, h in enumerate(self.has_image) if not h]
        full: list[list[int]] = []
        leftover: list[int] = []
        for group in (image, text):
            for b in self._batches(group, gen):
                if len(b) == self.batch_size:
                    full.append(b)
                else:
                    leftover.extend(b)
        if gen is not None:
            full = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()]
        tail = [leftover[k : k + self.batch_size] for k in range(0, len(leftover), self.batch_size)]
        return full + tail

    def __iter__(self) -> Iterator[int]:
        for b in self.batches():
            yield from b

    def num_batches(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)
