"""Bounding boxes for grounding data: pixel boxes -> normalised boxes on LLaVA's padded square.

In LLaVA's "pad" image mode the image is centred on a ``side x side`` canvas
(``side = max(width, height)``, see :func:`frozenvl.vision.images.square_pad_offsets`), so a box
the model sees must be expressed in that canvas' coordinates, normalised to 0-1. Boxes are
written in text as ``[x1,y1,x2,y2]`` with a fixed number of decimals.

How a box is *written in an answer* is a :class:`BoxFormat` (:func:`box_format` parses its name):

* ``unit`` (``unit2``, ``unit3``...): ``[0.12,0.30,0.25,0.43]``, 0-1 with 2 (3...) decimals:
  IAA's and LLaVA's format, the default;
* ``int1000``: ``[120,300,250,430]``, integers 0-999 (Qwen-VL's scale), no padding;
* ``bins<N>`` (e.g. ``bins32``): a coarse grid of N cells per axis, written as fixed-width
  zero-padded integers (``[03,09,08,13]`` for N=32), so every coordinate is the same number of
  digit tokens and each digit's place in the answer says what it means;
* ``loc<N>`` (e.g. ``loc32``): the same grid written as N location tokens, one per coordinate
  (``<loc_03><loc_09><loc_08><loc_13>``), as Kosmos-2 / PaliGemma / Florence-2 do. A workflow
  trained on it needs ``location_tokens: N``, which gives those tokens the workflow's own embedding
  and head rows (families/vocab.py); without it they are plain text to the tokenizer.

A format renders a 0-1 box (:meth:`BoxFormat.render`) and parses every box of its own syntax
back to 0-1 (:meth:`BoxFormat.parse`); anything else in a model's output (3 numbers, a value out
of range, x2 < x1, another format) is not a box, so scoring counts it as a miss.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..vision.images import square_pad_offsets

__all__ = ["BOX_FORMATS", "BoxFormat", "box_format", "box_iou", "format_box", "format_boxes", "parse_boxes",
           "to_square_box"]

BOX_FORMATS = ("xyxy", "xywh")

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUMBER})"] * 4) + r"\s*\]")


def _four_numbers(box: Sequence[float]) -> list[float]:
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"a box must be 4 numbers, got {box!r}") from exc
    if len(values) != 4:
        raise ValueError(f"a box must be 4 numbers, got {len(values)}: {box!r}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"box values must be finite, got {box!r}")
    return values


def _clamp01(v: float) -> float:
    return min(1.0, max(0.0, v))


def to_square_box(box: Sequence[float], width: int, height: int, fmt: str = "xyxy") -> list[float]:
    """A pixel box on the original ``width x height`` image -> ``[x1, y1, x2, y2]`` in 0-1 on the padded square.

    ``fmt`` is "xyxy" (corners) or "xywh" (COCO: top-left corner, width, height). The result is
    clamped to [0, 1]. A box with x2 < x1 / y2 < y1 (negative width/height), non-finite values,
    a non-positive image size or an unknown ``fmt`` raises ValueError.
    """
    if fmt not in BOX_FORMATS:
        raise ValueError(f"unknown box format {fmt!r}; valid: {BOX_FORMATS}")
    a, b, c, d = _four_numbers(box)
    if fmt == "xywh":
        if c < 0 or d < 0:
            raise ValueError(f"xywh box has a negative size: {box!r}")
        x1, y1, x2, y2 = a, b, a + c, b + d
    else:
        x1, y1, x2, y2 = a, b, c, d
        if x2 < x1 or y2 < y1:
            raise ValueError(f"xyxy box needs x1 <= x2 and y1 <= y2, got {box!r}")
    side, left, top = square_pad_offsets(int(width), int(height))
    return [
        _clamp01((x1 + left) / side),
        _clamp01((y1 + top) / side),
        _clamp01((x2 + left) / side),
        _clamp01((y2 + top) / side),
    ]


def format_box(box: Sequence[float], decimals: int = 2) -> str:
    """``[0.123, 0.3, ...]`` -> ``"[0.12,0.30,...]"`` (fixed decimals, no spaces)."""
    values = _four_numbers(box)
    if decimals < 0:
        raise ValueError(f"decimals must be >= 0, got {decimals}")
    # "+ 0.0" turns a -0.0 from rounding into 0.0, so no "-0.00" is ever written.
    return "[" + ",".join(f"{round(v, decimals) + 0.0:.{decimals}f}" for v in values) + "]"


def format_boxes(boxes: Sequence[Sequence[float]], decimals: int = 2) -> str:
    """Several boxes, ``"; "``-joined."""
    return "; ".join(format_box(b, decimals) for b in boxes)


def parse_boxes(text: str) -> list[list[float]]:
    """Every ``[a, b, c, d]`` (4 numbers, any spacing) in ``text``, in order of appearance."""
    return [[float(g) for g in m.groups()] for m in _BOX_RE.finditer(text)]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0.0 when the union is empty)."""
    ax1, ay1, ax2, ay2 = _four_numbers(a)
    bx1, by1, bx2, by2 = _four_numbers(b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------- answer formats

_INT_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([r"(\d+)"] * 4) + r"\s*\]")
_LOC_BOX_RE = re.compile(r"\s*".join([r"<loc_(\d+)>"] * 4))
_FORMAT_RE = re.compile(r"^(?:(?P<unit>unit)(?P<decimals>\d?)|(?P<int>int1000)|bins(?P<bins>\d+)|loc(?P<loc>\d+))$")
MAX_BINS = 10_000  # a grid finer than this is not a coarse format any more


@dataclass(frozen=True)
class BoxFormat:
    """How boxes are written in answers: ``unit`` (0-1 decimals) or integer cells of a grid.

    `bins`: cells per axis for the integer formats (a 0-1 value v is cell ``min(bins-1,
    floor(v*bins))``, read back as the cell's centre); `width`: digits of a zero-padded cell
    (0 = no padding); `tokens`: cells written as location tokens ``<loc_NN>`` instead of a
    bracketed list. Build one with :func:`box_format`.
    """

    name: str
    decimals: int = 2
    bins: int | None = None
    width: int = 0
    tokens: bool = False

    @property
    def resolution(self) -> float:
        """The largest error a render -> parse round trip adds to a coordinate."""
        return 0.5 * 10.0 ** -self.decimals if self.bins is None else 0.5 / self.bins

    def render(self, box: Sequence[float]) -> str:
        """A 0-1 ``[x1, y1, x2, y2]`` box in this format's text."""
        values = _four_numbers(box)
        if any(v < 0 or v > 1 for v in values):
            raise ValueError(f"a box to render must lie in 0-1, got {box!r}")
        if self.bins is None:
            return format_box(values, self.decimals)
        cells = [min(self.bins - 1, math.floor(v * self.bins)) for v in values]
        if self.tokens:
            return "".join(f"<loc_{c:0{self.width}d}>" for c in cells)
        return "[" + ",".join(f"{c:0{self.width}d}" for c in cells) + "]"

    def render_many(self, boxes: Sequence[Sequence[float]]) -> str:
        return "; ".join(self.render(b) for b in boxes)

    def parse(self, text: str) -> list[list[float]]:
        """Every box of this format in `text`, as 0-1 boxes, in order. A bracket that is not a
        well-formed box of this format (values out of range, x2 < x1 or y2 < y1, wrong width)
        is skipped: it is no box."""
        out = []
        if self.bins is None:
            for m in _BOX_RE.finditer(text):
                values = [float(g) for g in m.groups()]
                if all(0.0 <= v <= 1.0 for v in values) and _ordered(values):
                    out.append(values)
            return out
        for m in (_LOC_BOX_RE if self.tokens else _INT_BOX_RE).finditer(text):
            if self.width and any(len(g) != self.width for g in m.groups()):
                continue
            cells = [int(g) for g in m.groups()]
            if all(c < self.bins for c in cells) and _ordered(cells):
                out.append([(c + 0.5) / self.bins for c in cells])
        return out

    def first(self, text: str) -> list[float] | None:
        boxes = self.parse(text)
        return boxes[0] if boxes else None


def _ordered(values: Sequence[float]) -> bool:
    return values[0] <= values[2] and values[1] <= values[3]


def box_format(spec: str | BoxFormat | None) -> BoxFormat:
    """The :class:`BoxFormat` named `spec`: ``unit`` / ``unit<D>`` (D decimals), ``int1000``,
    ``bins<N>`` or ``loc<N>`` (2 <= N <= 10000); None = ``unit``. A format passes through."""
    if isinstance(spec, BoxFormat):
        return spec
    spec = "unit" if spec is None else spec
    m = _FORMAT_RE.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"unknown box format {spec!r}; valid: 'unit', 'unit<decimals>', 'int1000', 'bins<N>', 'loc<N>'")
    if m["unit"]:
        decimals = int(m["decimals"] or 2)
        if decimals < 1:
            raise ValueError(f"box format {spec!r}: decimals must be >= 1")
        return BoxFormat(spec, decimals=decimals)
    if m["int"]:
        return BoxFormat(spec, bins=1000)
    bins = int(m["bins"] or m["loc"])
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"box format {spec!r}: bins must be in 2..{MAX_BINS}")
    return BoxFormat(spec, bins=bins, width=len(str(bins - 1)), tokens=m["loc"] is not None)
