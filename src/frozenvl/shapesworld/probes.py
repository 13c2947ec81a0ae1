"""Linear probes of a vision tower's patch features on ShapesWorld scenes: what its features say
about each shape (colour, kind, size, box) and each image (count), read by least squares.

They tell how much of what the questions ask the frozen encoder gives a workflow at all: the tiny
track probes its own ViT once per build (`bases.probe_vit`), the real track probes DINOv2 at each
run (:func:`probe_tower`). Fit on 70% of the scenes, scored on the other 30%.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..data.boxes import box_iou, to_square_box
from ..vision.images import ImagePreprocessor, square_pad_offsets
from .world import COLOURS, KINDS, SIZES, sample_scene

if TYPE_CHECKING:
    from ..vision.encoder import VisionTower


def _ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> torch.Tensor:
    """Least-squares linear map (with bias) from x to y: a linear probe in closed form."""
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    eye[-1, -1] = 0
    return torch.linalg.solve(x.T @ x + lam * len(x) * eye, x.T @ y)


def _apply(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ w


def centre_patch(scene, shape, grid: int, pre: ImagePreprocessor | None = None) -> int:
    """Row-major index of the patch under `shape`'s centre on a `grid` x `grid` patch grid, after
    the preprocessing `pre` does (pad to a square, then a resize and a centre crop where it has
    them, as DINOv2's 256 -> 224); without `pre`, pad and resize only."""
    side, left, top = square_pad_offsets(scene.width, scene.height)
    resize = getattr(pre, "resize", None) if pre is not None else None
    if resize is None and (pre is None or pre.mode == "pad"):
        px = min(grid - 1, int((shape.cx + left + 0.5) / side * grid))
        py = min(grid - 1, int((shape.cy + top + 0.5) / side * grid))
        return py * grid + px
    # where the centre lands as a share of the (padded, or stretched) image, then of the centre crop
    if pre.mode == "pad":
        ux, uy = (shape.cx + left + 0.5) / side, (shape.cy + top + 0.5) / side
    else:
        ux, uy = (shape.cx + 0.5) / scene.width, (shape.cy + 0.5) / scene.height
    (rh, rw), (ch, cw) = resize or pre.size, pre.size
    fx, fy = (ux * rw - (rw - cw) / 2) / cw, (uy * rh - (rh - ch) / 2) / ch
    px, py = (min(grid - 1, max(0, int(f * grid))) for f in (fx, fy))
    return py * grid + px


def linear_probes(scenes: Sequence, feats: torch.Tensor, grid: int,
                  pre: ImagePreprocessor | None = None) -> dict[str, float]:
    """Probes on patch features `feats` [n_scenes, grid*grid, C] of `scenes`: per shape, from the
    patch under its centre, its colour, kind and size (accuracy) and its box (Acc@0.5 of the
    linearly read box on the padded square); per image, from the mean patch feature, the count."""
    feats = feats.double()
    rows = []  # (scene index, feature, colour, kind, size, box)
    for k, sc in enumerate(scenes):
        for s in sc.shapes:
            rows.append((k, feats[k, centre_patch(sc, s, grid, pre)], list(COLOURS).index(s.colour),
                         KINDS.index(s.kind), SIZES.index(s.size), to_square_box(s.bbox(), sc.width, sc.height)))
    split = int(0.7 * len(scenes))
    fit = [r for r in rows if r[0] < split]
    test = [r for r in rows if r[0] >= split]
    x_fit, x_test = torch.stack([r[1] for r in fit]), torch.stack([r[1] for r in test])
    out: dict[str, float] = {}
    for name, col, n_cls in (("colour", 2, len(COLOURS)), ("kind", 3, len(KINDS)), ("size", 4, len(SIZES))):
        y = F.one_hot(torch.tensor([r[col] for r in fit]), n_cls).double()
        pred = _apply(_ridge(x_fit, y), x_test).argmax(1)
        out[name] = float((pred == torch.tensor([r[col] for r in test])).double().mean())
    w = _ridge(x_fit, torch.tensor([r[5] for r in fit], dtype=torch.float64))
    boxes = _apply(w, x_test).tolist()
    out["box_acc50"] = sum(box_iou(b, r[5]) >= 0.5 for b, r in zip(boxes, test)) / len(test)
    pooled = feats.mean(1)
    counts = torch.tensor([len(sc.shapes) for sc in scenes])
    y = F.one_hot(counts - 1, 4).double()
    pred = _apply(_ridge(pooled[:split], y[:split]), pooled[split:]).argmax(1) + 1
    out["count"] = float((pred == counts[split:]).double().mean())
    out["n_shapes_scored"] = len(test)
    return out


@torch.no_grad()
def probe_tower(tower: VisionTower, pre: ImagePreprocessor, n_scenes: int = 300, seed: int = 0,
                layer: int = -2, batch: int = 32) -> dict[str, float]:
    """:func:`linear_probes` of a frozenvl vision tower (any encoder: DINOv2, CLIP, SigLIP...) at
    hidden layer `layer`, on `n_scenes` fresh scenes preprocessed by `pre` (the workflows' own
    preprocessing)."""
    from .. import inputs

    if tower.grid[0] != tower.grid[1]:
        raise ValueError(f"the probes read a square patch grid; this tower's is {tower.grid}")
    rng = random.Random(f"shapesworld:{seed}:tower-probe")
    scenes = [sample_scene(rng) for _ in range(n_scenes)]
    feats = torch.cat([
        tower(inputs.to_pixel_values([s.render() for s in scenes[i : i + batch]], pre), select_layer=layer).float().cpu()
        for i in range(0, n_scenes, batch)])
    return {**linear_probes(scenes, feats, tower.grid[0], pre), "layer": layer}
