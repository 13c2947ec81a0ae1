"""The frozen vision tower: any Hugging Face vision encoder (CLIP, SigLIP, ...)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel


class VisionTower(nn.Module):
    """Wraps a HF vision encoder; returns patch features of one hidden layer, CLS dropped."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.image_size: int = cfg.image_size
        self.patch_size: int = cfg.patch_size
        self.num_patches: int = (cfg.image_size // cfg.patch_size) ** 2

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None
    ) -> "VisionTower":
        kwargs = {"dtype": dtype} if dtype is not None else {}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        config = AutoConfig.from_pretrained(name_or_path)
        model = AutoModel.from_pretrained(name_or_path, **kwargs)
        if getattr(config, "vision_config", None) is not None:
            # A dual encoder (CLIPModel, SiglipModel, ...): keep only the vision side.
            if not hasattr(model, "vision_model"):
                raise ValueError(f"{name_or_path}: {type(model).__name__} has no `vision_model` to use as vision tower")
            model = model.vision_model
        if not hasattr(model.config, "image_size") or not hasattr(model.config, "patch_size"):
            raise ValueError(f"{name_or_path}: {type(model).__name__} is not a ViT-style vision encoder")
        model.requires_grad_(False)
        model.eval()
        return cls(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "VisionTower":
        # The tower is frozen: it stays in eval mode (no dropout) whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def has_cls(self) -> bool:
        # transformers < 5.24 keeps CLIPVisionModel's embeddings one level down, at vision_model.embeddings
        inner = getattr(self.model, "vision_model", self.model)
        return hasattr(getattr(inner, "embeddings", getattr(self.model, "embeddings", None)), "class_embedding")

    def num_tokens(self, keep_cls: bool = False) -> int:
        return self.num_patches + (1 if keep_cls and self.has_cls() else 0)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -2, keep_cls: bool = False) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        feats = out.hidden_states[select_layer]
        if feats.shape[1] == self.num_patches + 1 and not keep_cls:  # CLS present (CLIP): patch tokens only
            feats = feats[:, 1:]
        return feats
