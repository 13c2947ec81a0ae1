"""The monolithic visual embedding (Mono-InternVL): image patches into the LLM without a vision encoder.

    pixels [n, 3, S, S] -> Conv2d(3, width, patch, stride=patch) -> + learned absolute position
    embedding (bicubically resized when the patch grid differs from the one it was made for)
    -> pixel shuffle (factor 2: each 2x2 block of patches one token, 4x channels)
    -> LayerNorm -> MLP to the LLM width

A 448-px tile with patch 14 is a 32x32 grid: 256 tokens after the shuffle. The shuffle, LayerNorm and
MLP are `PixelShuffleConnector`'s (vision/connectors.py), so the layout is InternVL's. It is a
connector (`connector: monolithic[:size=..,patch=..,width=..,factor=..,depth=..]`) that takes pixels:
a workflow using it needs no vision encoder (`build(..., vision=None)`).

Tiles: the embedding works per tile. `forward` takes [n, 3, H, W] (one tile per image) or
[n, tiles, 3, H, W] and then returns each image's tiles' tokens concatenated in tile order, so a
dynamic tiling can feed it without changing it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .connectors import PixelShuffleConnector
from .images import IMAGENET_MEAN, IMAGENET_STD, ImagePreprocessor

# InternVL's image statistics and resampling (ImageNet mean/std, bicubic).
MONOLITHIC_MEAN, MONOLITHIC_STD, MONOLITHIC_RESAMPLE = IMAGENET_MEAN, IMAGENET_STD, 3


class MonolithicEmbedding(PixelShuffleConnector):
    """Patch embedding + position embedding in front of InternVL's pixel-shuffle connector."""

    takes_pixels = True  # read by the model: images reach this connector as pixels, not vision features

    def __init__(
        self,
        hidden: int,
        *,
        size: int = 448,
        patch: int = 14,
        width: int = 0,
        factor: int = 2,
        depth: int = 2,
        name: str = "monolithic",
        dtype: torch.dtype | None = None,
    ):
        width = width or hidden
        if size % patch or (size // patch) % factor:
            raise ValueError(
                f"connector {name!r}: a {size}-px tile is not a whole number of {patch}-px patches whose grid "
                f"the pixel-shuffle factor {factor} divides"
            )
        super().__init__(width, hidden, factor, depth, name, dtype=dtype)
        self.image_size, self.patch_size, self.width, self.hidden = size, patch, width, hidden
        self.grid = size // patch  # the grid the position embedding is learned at
        self.num_patches = self.grid * self.grid
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch, stride=patch, dtype=dtype)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, width, dtype=dtype) * 0.02)

    def preprocessor(self, mode: str = "resize") -> ImagePreprocessor:
        """What turns an image into one `size` x `size` tile (InternVL's mean/std and bicubic resize)."""
        return ImagePreprocessor(
            size=(self.image_size, self.image_size), image_mean=MONOLITHIC_MEAN, image_std=MONOLITHIC_STD,
            mode=mode, resample=MONOLITHIC_RESAMPLE,
        )

    def position_embedding(self, grid: int) -> torch.Tensor:
        """[1, grid*grid, width]: the learned table, bicubically resized (in float32) when `grid` differs."""
        if grid == self.grid:
            return self.pos_embed
        table = self.pos_embed.float().reshape(1, self.grid, self.grid, self.width).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid * grid, self.width).to(self.pos_embed.dtype)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] tiles -> [n, (H/patch)^2, width] row-major patch tokens with positions added."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"connector {self.name!r} takes pixel tiles [n, 3, H, W], got shape {tuple(pixels.shape)}")
        h, w = pixels.shape[-2:]
        if h != w or h % (self.patch_size * self.factor):
            raise ValueError(
                f"connector {self.name!r}: tiles of {h}x{w} px; it takes square tiles whose side is a multiple of "
                f"{self.patch_size * self.factor} (patch {self.patch_size} x pixel-shuffle factor {self.factor}), "
                f"e.g. {self.image_size}"
            )
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # [n, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [n, g*g, width], row-major
        return x + self.position_embedding(h // self.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, T, hidden]; [n, tiles, 3, H, W] -> [n, tiles * T, hidden] (tiles in order)."""
        if pixels.dim() == 5:
            n, tiles = pixels.shape[:2]
            return self(pixels.flatten(0, 1)).reshape(n, -1, self.hidden)
        return super().forward(self.patch_tokens(pixels))
