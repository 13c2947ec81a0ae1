"""Bounding boxes for grounding data: pixel boxes -> normalised boxes on LLaVA's padded square.

In LLaVA's "pad" image mode the image is centred on a ``side x side`` canvas
(``side = max(width, height)``, see :func:`frozenvl.vision.images.square_pad_offsets`), so a box
the model sees must be expressed in that canvas' coordinates, normalised to 0-1. Boxes are
written in text as ``[x1,y1,x2,y2]`` with a fixed number of decimals.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..vision.images import square_pad_offsets

__all__ = ["BOX_FORMATS", "box_iou", "format_box", "format_boxes", "parse_boxes", "to_square_box"]

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
