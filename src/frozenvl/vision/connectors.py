"""Connectors: map vision features [B, N, vis_dim] to the LLM width [B, M, hidden].

Names (the workflow's ``connector``):

* ``linear`` / ``mlpNx_gelu`` (e.g. ``mlp2x_gelu``): LLaVA's projector, one output token per patch.
* ``pixel_shuffle`` (InternVL): each ``factor x factor`` block of neighbouring patches becomes one
  token with ``factor**2`` times the channels, then LayerNorm + MLP (256 tokens -> 64 for factor 2).
* ``avg_pool``: each ``factor x factor`` block is averaged, then LLaVA's MLP.
* ``monolithic`` (Mono-InternVL, ``vision/monolithic.py``): takes *pixels*, not vision features: a
  patch embedding and position embedding in front of ``pixel_shuffle``, so it needs no vision
  encoder (options ``size`` 448, ``patch`` 14, ``width`` = the LLM's, ``factor``, ``depth``).

The token-reducing ones take options after a colon: ``pixel_shuffle:factor=3``,
``avg_pool:factor=2,depth=1`` (``factor`` default 2, ``depth`` = MLP layers, default 2). They need
the patch tokens to form a square grid whose side the factor divides: CLS off (``keep_cls: false``;
the vision tower always drops register tokens).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")
_REDUCE_RE = re.compile(r"^(pixel_shuffle|avg_pool|monolithic)(?::(.*))?$")
_REDUCE_DEFAULTS = {"factor": 2, "depth": 2}
# Options only some kinds take (width 0: the LLM's width).
_KIND_DEFAULTS = {"monolithic": {"size": 448, "patch": 14, "width": 0}}
CONNECTOR_NAMES = (
    "linear",
    "mlpNx_gelu (e.g. mlp2x_gelu)",
    "pixel_shuffle[:factor=F,depth=D]",
    "avg_pool[:factor=F,depth=D]",
    "monolithic[:size=S,patch=P,width=W,factor=F,depth=D] (pixels in: no vision encoder)",
)


def _parse_reducer(name: str) -> tuple[str, dict[str, int]] | None:
    """('pixel_shuffle' | 'avg_pool' | 'monolithic', options) for a token-reducing connector name, else None."""
    m = _REDUCE_RE.match(name)
    if not m:
        return None
    defaults = {**_REDUCE_DEFAULTS, **_KIND_DEFAULTS.get(m.group(1), {})}
    options = dict(defaults)
    for item in filter(None, (m.group(2) or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"connector {name!r}: bad option {item!r}; options are "
                f"{', '.join(f'{k}=<int >= 1> (default {v})' for k, v in defaults.items())}"
            )
        options[key] = int(value)
    return m.group(1), options


def check_connector_name(name: str) -> None:
    if name == "linear" or _parse_reducer(name) is not None:
        return
    m = _MLP_RE.match(name)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown connector {name!r}; available: {list(CONNECTOR_NAMES)}")


def is_token_reducing(name: str) -> bool:
    return _parse_reducer(name) is not None


def takes_pixels(name: str) -> bool:
    """The connector embeds pixels itself (`monolithic`): its workflow needs no vision encoder."""
    reducer = _parse_reducer(name)
    return reducer is not None and reducer[0] == "monolithic"


def grid_side(num_tokens: int, factor: int, connector: str) -> int:
    """Side of the square patch grid of `num_tokens` tokens; errors name what does not fit."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"connector {connector!r} merges neighbouring patches of a square grid, but the vision features have "
            f"{num_tokens} tokens, not a square (a CLS token kept? set keep_cls: false)"
        )
    if side % factor:
        raise ValueError(
            f"connector {connector!r}: the {side}x{side} patch grid is not divisible by factor {factor}"
        )
    return side


def pixel_shuffle(x: torch.Tensor, factor: int, connector: str = "pixel_shuffle") -> torch.Tensor:
    """[n, S*S, C] row-major grid -> [n, (S/f)^2, f*f*C]: each f x f block becomes one token.

    A merged token's channels are its block's patches in row-major order (row offset, then column
    offset), each C wide: InternVL's layout (its pixel_shuffle with scale 1/f, v2).
    """
    n, tokens, channels = x.shape
    g = grid_side(tokens, factor, connector) // factor
    x = x.reshape(n, g, factor, g, factor, channels).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * g, factor * factor * channels)


def _check_tokens(x: torch.Tensor, connector: str) -> None:
    if x.dim() != 3:
        raise ValueError(
            f"connector {connector!r} takes per-image token grids [n_images, N, C], got shape {tuple(x.shape)}: "
            "a family that pools each image to one vector (adaption_prompt visual v1) needs linear or mlpNx_gelu"
        )


class MLPConnector(nn.Module):
    """LLaVA's projector: Linear(vis, d), then (GELU, Linear(d, d)) x (depth - 1).

    Layers are named `linear_1`, `act`, `linear_2`, ... as in transformers' LlavaMultiModalProjector,
    so imported LLaVA weights keep their names.
    """

    def __init__(self, vision_dim: int, hidden: int, depth: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.depth = depth
        self.linear_1 = nn.Linear(vision_dim, hidden, dtype=dtype)
        for k in range(2, depth + 1):
            setattr(self, f"linear_{k}", nn.Linear(hidden, hidden, dtype=dtype))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        for k in range(2, self.depth + 1):
            x = getattr(self, f"linear_{k}")(self.act(x))
        return x

    def num_tokens(self, num_vision_tokens: int) -> int:
        return num_vision_tokens


class PixelShuffleConnector(MLPConnector):
    """InternVL's connector: pixel shuffle (f x f patches -> one token, f^2 C channels), LayerNorm, MLP.

    Named `layer_norm`, `linear_1`, `act`, `linear_2` as transformers' InternVLMultiModalProjector.
    """

    def __init__(self, vision_dim: int, hidden: int, factor: int, depth: int, name: str,
                 dtype: torch.dtype | None = None):
        super().__init__(vision_dim * factor * factor, hidden, depth, dtype=dtype)
        self.factor, self.name = factor, name
        self.layer_norm = nn.LayerNorm(vision_dim * factor * factor, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.name)
        return super().forward(self.layer_norm(pixel_shuffle(x, self.factor, self.name)))

    def num_tokens(self, num_vision_tokens: int) -> int:
        return (grid_side(num_vision_tokens, self.factor, self.name) // self.factor) ** 2


class AvgPoolConnector(MLPConnector):
    """Average each f x f block of patches into one token, then LLaVA's MLP."""

    def __init__(self, vision_dim: int, hidden: int, factor: int, depth: int, name: str,
                 dtype: torch.dtype | None = None):
        super().__init__(vision_dim, hidden, depth, dtype=dtype)
        self.factor, self.name = factor, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_tokens(x, self.name)
        n, tokens, channels = x.shape
        f = self.factor
        g = grid_side(tokens, f, self.name) // f
        pooled = x.reshape(n, g, f, g, f, channels).mean(dim=(2, 4)).reshape(n, g * g, channels)
        return super().forward(pooled)

    def num_tokens(self, num_vision_tokens: int) -> int:
        return (grid_side(num_vision_tokens, self.factor, self.name) // self.factor) ** 2


def build_connector(name: str, vision_dim: int | None, hidden: int, dtype: torch.dtype | None = None) -> nn.Module:
    """The connector `name` (`vision_dim`: the vision features' width; unused by `monolithic`)."""
    check_connector_name(name)
    reducer = _parse_reducer(name)
    if reducer is not None:
        kind, options = reducer
        if kind == "monolithic":
            from .monolithic import MonolithicEmbedding  # it builds on PixelShuffleConnector below

            return MonolithicEmbedding(hidden, name=name, dtype=dtype, **options)
        cls = PixelShuffleConnector if kind == "pixel_shuffle" else AvgPoolConnector
        return cls(vision_dim, hidden, options["factor"], options["depth"], name, dtype=dtype)
    depth = 1 if name == "linear" else int(_MLP_RE.match(name).group(1))
    return MLPConnector(vision_dim, hidden, depth, dtype=dtype)


def add_layout_embeddings(connector: nn.Module, newline: bool, skip: bool) -> None:
    """Give a connector the learned tokens of tiled layouts (vision/tiling.py), as its own parameters
    (so they train, save and load with it): `image_newline` (LLaVA-NeXT: ends each row) and
    `skip_token` (SPHINX-X: stands for a sub-image that is all padding). Both start as small random
    vectors (std 1/sqrt(width), LLaVA-NeXT's init), so different rows and skipped tiles are visible."""
    weight = connector.linear_1.weight
    width = getattr(connector, f"linear_{connector.depth}").out_features
    std = 1.0 / math.sqrt(width)
    for name, wanted in (("image_newline", newline), ("skip_token", skip)):
        if wanted and not hasattr(connector, name):
            connector.register_parameter(
                name, nn.Parameter(torch.randn(width, dtype=weight.dtype, device=weight.device) * std)
            )


def layout_embeddings(connector: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(newline, skip) embeddings of a connector; None where it has none."""
    return getattr(connector, "image_newline", None), getattr(connector, "skip_token", None)
