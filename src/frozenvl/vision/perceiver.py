"""Perceiver resampler (Flamingo): any number of vision tokens -> a fixed number of latents.

Per image: learned latents [L, d]; each layer layer-norms the media and the latents, takes queries
from the latents and keys/values from concat(media, latents), adds the attention output to the
latents, then a feed-forward block (LayerNorm, Linear, activation, Linear; no biases) with a residual;
a final LayerNorm. The width stays the vision encoder's (`d`): Flamingo-style cross-attention projects
media to the LLM's heads itself.

Settings cover OpenFlamingo (8 heads x 64, GELU) and IDEFICS (16 heads x 96, ReLU, optional per-head
LayerNorm on queries and keys). With ``max_frames`` a learned per-frame embedding is added to the
features of each frame of a multi-frame medium ([n, frames, tokens, d]) before the frames are
flattened into one token sequence, as OpenFlamingo does for video.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, dtype: torch.dtype | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim, dtype=dtype)
        self.norm_latents = nn.LayerNorm(dim, dtype=dtype)
        self.q_proj = nn.Linear(dim, inner, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(dim, inner, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(dim, inner, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(inner, dim, bias=False, dtype=dtype)
        self.q_norm = nn.LayerNorm(head_dim, dtype=dtype) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, dtype=dtype) if qk_norm else None

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        media, latents = self.norm_media(media), self.norm_latents(latents)
        both = torch.cat([media, latents], dim=1)
        q, k, v = self.q_proj(latents), self.k_proj(both), self.v_proj(both)
        q, k, v = (x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2) for x in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class PerceiverFeedForward(nn.Module):
    def __init__(self, dim: int, inner: int, activation: str, dtype: torch.dtype | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.fc1 = nn.Linear(dim, inner, bias=False, dtype=dtype)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(inner, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class PerceiverLayer(nn.Module):
    def __init__(self, attn: PerceiverAttention, ff: PerceiverFeedForward):
        super().__init__()
        self.attn, self.ff = attn, ff


class PerceiverResampler(nn.Module):
    """[n, tokens, d] (or [n, frames, tokens, d] with ``max_frames``) -> [n, num_latents, d]."""

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 6,
        heads: int = 8,
        head_dim: int = 64,
        num_latents: int = 64,
        ff_mult: int = 4,
        activation: str = "gelu",
        qk_norm: bool = False,
        max_frames: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"perceiver activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.latents = nn.Parameter(torch.randn(num_latents, dim, dtype=dtype))
        self.frame_embeds = nn.Parameter(torch.randn(max_frames, dim, dtype=dtype)) if max_frames else None
        self.layers = nn.ModuleList(
            PerceiverLayer(
                PerceiverAttention(dim, heads, head_dim, qk_norm, dtype),
                PerceiverFeedForward(dim, dim * ff_mult, activation, dtype),
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, dtype=dtype)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        media = media.to(self.latents.dtype)
        if media.dim() == 4:  # [n, frames, tokens, d]
            frames = media.shape[1]
            if self.frame_embeds is None or frames > self.frame_embeds.shape[0]:
                limit = 0 if self.frame_embeds is None else self.frame_embeds.shape[0]
                raise ValueError(f"media with {frames} frames but the resampler has frame embeddings for {limit}")
            media = (media + self.frame_embeds[:frames, None]).flatten(1, 2)
        elif media.dim() != 3:
            raise ValueError(f"perceiver input must be [n, tokens, d] or [n, frames, tokens, d], got {tuple(media.shape)}")
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = latents + layer.attn(media, latents)
            latents = latents + layer.ff(latents)
        return self.norm(latents)
