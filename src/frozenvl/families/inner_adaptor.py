"""inner_adaptor (IAA): trainable full decoder layers inserted after chosen frozen layers.

After frozen layer i (for i in `layers`), a trainable copy-shaped decoder layer runs in series and
its output feeds frozen layer i+1. The workflow also owns copies of the input embeddings, the final
norm and the LM head. Each inserted layer has its own KV-cache entry (indices after the base
layers'), so cached generation is exact.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, WorkflowConfig
from .base import DecodeContext, Family, call_layer, check_layer_indices

# The released IAA-14 insertion pattern on a 32-layer Llama-3-8B: pairs every 5 layers.
IAA14_LAYERS_32 = (0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31)
INIT_MODES = ("copy", "random")


def default_insertion_layers(num_layers: int) -> list[int]:
    """The IAA-14 pattern scaled to `num_layers`: pairs of adjacent layers, evenly spaced from the
    first to the last layer, as many pairs as keep the released density (7 pairs in 32 layers)."""
    if num_layers <= 2:
        return list(range(num_layers))
    pairs = max(1, round(7 * num_layers / 32))
    starts = [0] if pairs == 1 else [round(j * (num_layers - 2) / (pairs - 1)) for j in range(pairs)]
    return sorted({i for s in starts for i in (s, s + 1)})


@dataclass
class InnerAdaptorConfig(WorkflowConfig):
    layers: list[int] | None = None  # base layers an adaptor layer follows; None = scaled IAA-14 pattern
    init: str = "copy"  # "copy" (weights of the frozen layer it follows) | "random"

    def validate(self) -> None:
        super().validate()
        if self.init not in INIT_MODES:
            raise ConfigError(f"inner_adaptor init {self.init!r} is not one of {list(INIT_MODES)}")
        if self.llm_train != "frozen":
            raise ConfigError("inner_adaptor keeps the LLM frozen by construction: llm_train must be 'frozen'")


class InnerAdaptorFamily(Family):
    name = "inner_adaptor"
    config_class = InnerAdaptorConfig

    def __init__(self, cfg: InnerAdaptorConfig, llm, vision_hidden):
        super().__init__(cfg, llm, vision_hidden)
        n = self.lm.num_layers
        layers = cfg.layers if cfg.layers is not None else default_insertion_layers(n)
        cfg.layers = check_layer_indices(layers, n, "inner_adaptor", allow_empty=True)
        self.layers_after = frozenset(cfg.layers)
        self.adaptors = nn.ModuleDict()
        for k, i in enumerate(cfg.layers):
            layer = copy.deepcopy(self.lm.layers[i]).requires_grad_(True)
            # Its own cache slot, after the base layers' ones.
            layer.self_attn.layer_idx = n + k
            if cfg.init == "random":
                _reinit(layer, llm.config)
            self.adaptors[str(i)] = layer
        self.embed_copy = copy.deepcopy(self.lm.embed_tokens).requires_grad_(True)
        self.norm_copy = copy.deepcopy(self.lm.norm).requires_grad_(True)
        self.head_copy = copy.deepcopy(self.lm.lm_head).requires_grad_(True)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()
        parts["adapter"] = list(self.adaptors.parameters())
        parts["embed"] = list(self.embed_copy.parameters())
        parts["norm"] = list(self.norm_copy.parameters())
        parts["head"] = list(self.head_copy.parameters())
        return parts

    def embed_tokens(self) -> nn.Embedding:
        return self.embed_copy

    def after_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return call_layer(self.adaptors[str(idx)], h, ctx, self.lm.layer_types[idx])

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm_copy(h)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.finish_logits(self.head_copy(h))

    def extra_cache_layer_types(self) -> list[str]:
        return [self.lm.layer_types[i] for i in self.cfg.layers]


def _reinit(layer: nn.Module, config) -> None:
    std = getattr(config, "initializer_range", 0.02)
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.dim() == 1:
            nn.init.ones_(m.weight)  # norms
