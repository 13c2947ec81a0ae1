"""Connectors: map vision features [B, N, vis_dim] to the LLM width [B, M, hidden]."""

from __future__ import annotations

import re

import torch
from torch import nn

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")
CONNECTOR_NAMES = ("linear", "mlpNx_gelu (e.g. mlp2x_gelu)")


def check_connector_name(name: str) -> None:
    if name == "linear":
        return
    m = _MLP_RE.match(name)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown connector {name!r}; available: {list(CONNECTOR_NAMES)}")


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


def build_connector(name: str, vision_dim: int, hidden: int, dtype: torch.dtype | None = None) -> nn.Module:
    check_connector_name(name)
    depth = 1 if name == "linear" else int(_MLP_RE.match(name).group(1))
    return MLPConnector(vision_dim, hidden, depth, dtype=dtype)
