"""Mixed vision encoders (SPHINX, Prismatic): several frozen encoders read one image, each one's patch
features are resampled to one token grid, and the features are concatenated along channels per token,
so one connector sees [n, grid tokens, sum of widths].

Configured as a list under ``vision``: each entry a path / hub id, or ``{"path": ..., "select_layer": k}``
(the same encoder twice with two layers is two entries; it is loaded once). The first entry is the
primary: the images are preprocessed for it, and its patch grid is the token grid. Every other encoder
gets that view resampled (bilinear) to its own input size and re-normalised with its own mean / std,
and its features are resampled to the grid: block averages (adaptive average pooling) when its grid is
finer, bilinear interpolation when coarser.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import VisionTower
from .images import ImagePreprocessor


@dataclass(frozen=True)
class EncoderEntry:
    path: str
    select_layer: int | None = None  # None: the workflow's select_layer


def parse_vision(spec: Any) -> list[EncoderEntry]:
    """A `vision` list -> its entries; errors name the entry that is wrong."""
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ValueError(f"vision: a list of encoders must hold at least one entry, got {spec!r}")
    entries = []
    for k, item in enumerate(spec):
        if isinstance(item, str):
            entries.append(EncoderEntry(item))
            continue
        if not isinstance(item, dict) or "path" not in item or set(item) - {"path", "select_layer"}:
            raise ValueError(f"vision[{k}]: expected a path or {{'path': ..., 'select_layer': int}}, got {item!r}")
        layer = item.get("select_layer")
        if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
            raise ValueError(f"vision[{k}]: select_layer must be an int, got {layer!r}")
        entries.append(EncoderEntry(str(item["path"]), layer))
    return entries


def is_single(spec: Any) -> bool:
    """`vision` names one encoder (a path or hub id, str or os.PathLike), not a list of them."""
    return isinstance(spec, (str, os.PathLike))


def map_paths(spec: Any, fn: Callable[[str], str | None]) -> Any:
    """`spec` (a path, None, or a mixed-encoder list) with `fn` applied to every path in it."""
    if spec is None or is_single(spec):
        return fn(spec) if spec is not None else None
    return [fn(item) if isinstance(item, str) else {**item, "path": fn(item["path"])} for item in spec]


def primary_path(spec: Any) -> str | None:
    """The path whose preprocessing the images get: the vision path, or the first mixed entry's."""
    if spec is None or is_single(spec):
        return spec
    return parse_vision(spec)[0].path


class MixedVisionTower(nn.Module):
    """Several frozen VisionTowers behind the VisionTower interface; see the module docstring."""

    def __init__(self, towers: Sequence[VisionTower], layers: Sequence[int | None],
                 preprocessors: Sequence[ImagePreprocessor]):
        super().__init__()
        if not len(towers) == len(layers) == len(preprocessors) >= 1:
            raise ValueError("one select_layer and one preprocessor per encoder")
        self.towers = nn.ModuleList(towers)  # the same tower twice (two layers of one) holds its weights once
        self.layers = list(layers)
        self.preprocessors = list(preprocessors)
        primary = towers[0]
        self.input_size, self.grid = primary.input_size, primary.grid
        self.num_patches = primary.num_patches
        self.hidden_size = sum(t.hidden_size for t in towers)
        self.num_cls = self.num_registers = 0

    @property
    def config(self):
        return self.towers[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.towers[0].dtype

    @property
    def device(self) -> torch.device:
        return self.towers[0].device

    def train(self, mode: bool = True) -> MixedVisionTower:
        return super().train(False)  # frozen, always in eval mode

    def has_cls(self) -> bool:
        return False

    def num_tokens(self, keep_cls: bool = False) -> int:
        return self.num_patches

    def _view_for(self, k: int, pixels: torch.Tensor) -> torch.Tensor:
        """The primary's normalised view, as encoder k's input (its size, its mean / std)."""
        src, dst = self.preprocessors[0], self.preprocessors[k]
        same = (src.image_mean, src.image_std) == (dst.image_mean, dst.image_std)
        if same and self.towers[k].input_size == tuple(pixels.shape[-2:]):
            return pixels  # the primary itself, or an encoder that takes the very same input

        def stats(pre: ImagePreprocessor) -> tuple[torch.Tensor, torch.Tensor]:
            mean = torch.tensor(pre.image_mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
            std = torch.tensor(pre.image_std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
            return mean, std

        (m0, s0), (m1, s1) = stats(src), stats(dst)
        unit = pixels * s0 + m0  # back to [0, 1]
        size = self.towers[k].input_size
        if tuple(unit.shape[-2:]) != size:
            unit = F.interpolate(unit, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (unit - m1) / s1

    def _to_grid(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[n, h*w, C] on a (h, w) grid -> [n, G*G', C] on the primary's grid."""
        n, _, channels = feats.shape
        x = feats.transpose(1, 2).reshape(n, channels, *grid)
        if grid != self.grid:
            if grid[0] >= self.grid[0] and grid[1] >= self.grid[1]:
                x = F.adaptive_avg_pool2d(x, self.grid)
            else:
                x = F.interpolate(x, size=self.grid, mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -2, keep_cls: bool = False) -> torch.Tensor:
        if keep_cls:
            raise ValueError("mixed vision encoders give patch tokens only: set keep_cls: false")
        out = []
        for k, tower in enumerate(self.towers):
            layer = self.layers[k] if self.layers[k] is not None else select_layer
            feats = tower(self._view_for(k, pixel_values), select_layer=layer)
            out.append(self._to_grid(feats, tower.grid).to(self.dtype))
        return torch.cat(out, dim=-1)


def build_vision(spec: Any, dtype: torch.dtype | None = None, attn_implementation: str | None = None
                 ) -> VisionTower | MixedVisionTower:
    """The vision side a `vision` config names: one VisionTower for a path, a MixedVisionTower for a list."""
    if is_single(spec):
        return VisionTower.from_pretrained(spec, dtype=dtype, attn_implementation=attn_implementation)
    entries = parse_vision(spec)
    loaded: dict[str, VisionTower] = {}
    for e in entries:
        if e.path not in loaded:
            loaded[e.path] = VisionTower.from_pretrained(e.path, dtype=dtype, attn_implementation=attn_implementation)
    towers = [loaded[e.path] for e in entries]
    preprocessors = [ImagePreprocessor.from_pretrained(e.path, vision_config=t.config) for e, t in zip(entries, towers)]
    return MixedVisionTower(towers, [e.select_layer for e in entries], preprocessors)
