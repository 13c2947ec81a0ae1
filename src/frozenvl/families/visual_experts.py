"""visual_experts (Mono-InternVL): image patches inside the frozen LLM, routed to trainable visual experts.

There is no vision encoder by default: the `monolithic` connector (vision/monolithic.py) embeds each
448-px tile into 256 tokens, written into the image slots between a `<img>` and a `</img>` embedding
(owned by the workflow, part `tokens`). In every chosen layer the frozen text FFN gets a trainable
visual twin, and the token's modality picks one statically:

    h = FFN_text(x)   for text tokens (the delimiters and padding included)
    h = FFN_visual(x) for image tokens

Each expert runs only on its own tokens (gather/scatter; `routing: dense` computes both on every
token and mixes them, as the release does). Visual experts start as copies of the text FFN (the
paper; `init: random` is the release's). `attention_experts: true` (Mono-InternVL-1.5) adds visual
q/k/v/o projections the same way; attention itself (one softmax over the whole sequence), the norms
and rotary embeddings stay shared and frozen.

Cache: a forward pass without images (every decode step: its tokens are text) runs the base's own
decoder layers, so decoding costs what the base costs; image tokens are prefilled once into the
shared KV cache (their keys/values from the visual q/k/v when there are attention experts).

`vision: <HF encoder>` with a standard connector (`connector: mlp2x_gelu`, ...) puts a ViT in front
of the experts instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..config import ConfigError, WorkflowConfig
from .base import DecodeContext, Family, call_layer, check_layer_indices, decoder_block
from .inner_adaptor import _reinit

INIT_MODES = ("copy", "random")
ROUTING_MODES = ("gather", "dense")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
STATE_KEY = "visual_experts"


@dataclass
class VisualExpertsConfig(WorkflowConfig):
    connector: str = "monolithic"  # pixels -> 256 tokens per 448 tile, no vision encoder (or any connector + vision)
    image_mode: str = "resize"  # InternVL resizes a tile to 448x448 (no padding)
    layers: list[int] | None = None  # layers that get a visual expert; None: every layer
    init: str = "copy"  # "copy" (of the text FFN / projections: the paper) | "random" (the release)
    attention_experts: bool = False  # Mono-InternVL-1.5: visual q/k/v/o projections too
    image_delimiters: bool = True  # a trainable <img> / </img> embedding around each image's tokens
    routing: str = "gather"  # "gather": each expert on its own tokens | "dense": both on every token, mixed

    def validate(self) -> None:
        super().validate()
        if self.init not in INIT_MODES:
            raise ConfigError(f"visual_experts init {self.init!r} is not one of {list(INIT_MODES)}")
        if self.routing not in ROUTING_MODES:
            raise ConfigError(f"visual_experts routing {self.routing!r} is not one of {list(ROUTING_MODES)}")
        if self.llm_train != "frozen":
            raise ConfigError("visual_experts keeps the LLM frozen (the experts are the trainable part): "
                              "llm_train must be 'frozen'")


@dataclass
class Routing:
    """Which tokens of one forward pass are image tokens: the mask [B, T] and both index sets (flat B*T)."""

    mask: torch.Tensor
    visual: torch.Tensor
    text: torch.Tensor


def route(r: Routing, text_fn: Callable[[torch.Tensor], torch.Tensor], visual_fn: Callable[[torch.Tensor], torch.Tensor],
          x: torch.Tensor, dense: bool = False) -> torch.Tensor:
    """text_fn on the text tokens of x [B, T, D], visual_fn on the image tokens, scattered back in place."""
    if dense:  # the release's formula: both experts on every token
        m = r.mask.unsqueeze(-1).to(x.dtype)
        return text_fn(x) * (1 - m) + visual_fn(x) * m
    flat = x.reshape(-1, x.shape[-1])
    y_text = text_fn(flat.index_select(0, r.text))
    y_vis = visual_fn(flat.index_select(0, r.visual))
    out = y_text.new_empty(flat.shape[0], y_text.shape[-1])
    out = out.index_copy(0, r.text, y_text).index_copy(0, r.visual, y_vis)  # out of place: autograd
    return out.view(*x.shape[:-1], -1)


class VisualExpertsFamily(Family):
    name = "visual_experts"
    config_class = VisualExpertsConfig
    rewrites_block = True  # runs `decoder_block` with the routed MLP / projections

    def __init__(self, cfg: VisualExpertsConfig, llm, vision_hidden):
        super().__init__(cfg, llm, vision_hidden)
        n = self.lm.num_layers
        cfg.layers = check_layer_indices(list(range(n)) if cfg.layers is None else cfg.layers, n, "visual_experts")
        self.layers_replaced = frozenset(cfg.layers)
        self.ffn_experts = nn.ModuleDict(
            {str(i): copy.deepcopy(self.lm.layers[i].mlp).requires_grad_(True) for i in cfg.layers}
        )
        self.attn_experts = nn.ModuleDict()
        if cfg.attention_experts:
            for i in cfg.layers:
                attn = self.lm.layers[i].self_attn
                self.attn_experts[str(i)] = nn.ModuleDict(
                    {p: copy.deepcopy(getattr(attn, p)).requires_grad_(True) for p in PROJECTIONS}
                )
        if cfg.init == "random":
            for expert in (*self.ffn_experts.values(), *self.attn_experts.values()):
                _reinit(expert, llm.config)
        # <img> and </img> start at the mean of the base embedding rows (a neutral point of its space).
        base_embed = self.lm.embed_tokens.weight
        self.delimiters = (
            nn.Parameter(base_embed.detach().float().mean(0).repeat(2, 1).to(base_embed.dtype))
            if cfg.image_delimiters else None
        )

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()
        parts["experts"] = list(self.ffn_experts.parameters())
        if self.cfg.attention_experts:
            parts["attention_experts"] = list(self.attn_experts.parameters())
        if self.delimiters is not None:
            parts["tokens"] = [self.delimiters]
        return parts

    # ---- images ------------------------------------------------------------------------------
    def image_tokens_per_image(self, num_vision_tokens: int) -> int:
        return super().image_tokens_per_image(num_vision_tokens) + (2 if self.delimiters is not None else 0)

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Pixels (monolithic) or vision features -> [n, <img> + tokens + </img>, hidden]."""
        tokens = super().encode_images(features)
        if self.delimiters is None:
            return tokens
        start, end = (d.to(tokens.dtype).expand(tokens.shape[0], 1, -1) for d in self.delimiters.split(1))
        return torch.cat([start, tokens, end], dim=1)

    # ---- the forward pass ----------------------------------------------------------------------
    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        # Without images in this pass (every cached decode step) no token is visual: the base layers run.
        ctx.state[STATE_KEY] = self._routing(ctx) if ctx.state.get("image_embeds") is not None else None
        return super().decode(h, ctx)

    def _routing(self, ctx: DecodeContext) -> Routing:
        slots = ctx.image_mask
        per_image = ctx.state["image_embeds"].shape[1]
        mask = slots
        if self.delimiters is not None:
            k = (slots.long().cumsum(-1) - 1) % per_image  # position of a slot within its image (images in order)
            mask = slots & (k != 0) & (k != per_image - 1)
        flat = mask.reshape(-1)
        return Routing(mask, flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))

    def run_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        layer, attn_type = self.lm.layers[idx], self.lm.layer_types[idx]
        r: Routing | None = ctx.state[STATE_KEY]
        if r is None:
            return call_layer(layer, h, ctx, attn_type)
        dense = self.cfg.routing == "dense"
        mlp = partial(route, r, layer.mlp, self.ffn_experts[str(idx)], dense=dense)
        project = None
        if self.cfg.attention_experts:
            attn, experts = layer.self_attn, self.attn_experts[str(idx)]

            def project(name: str, x: torch.Tensor) -> torch.Tensor:
                return route(r, getattr(attn, name), experts[name], x, dense=dense)

        return decoder_block(layer, h, ctx, attn_type, mlp=mlp, project=project)
