"""The frozen vision tower: any Hugging Face ViT-style encoder (CLIP, SigLIP, DINOv2, ViT, ...).

What the tower needs from the model is read off its config and embeddings, never its class name:
`image_size` / `patch_size` / `hidden_size`, a CLS token when the embeddings hold one (`cls_token`:
DINOv2, ViT; `class_embedding`: CLIP), register tokens from `num_register_tokens` (DINOv2 with
registers), and whether its position embeddings can follow another input size.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

# Attributes of a ViT embeddings module that hold the CLS token.
_CLS_ATTRS = ("cls_token", "class_embedding")


def _pair(value: object, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"vision config {what} {value!r}: expected an int or (height, width)")


def count_prefix_tokens(model: PreTrainedModel) -> tuple[int, int]:
    """(CLS tokens, register tokens) the encoder puts before its patch tokens, from config and embeddings."""
    # transformers < 5.24 keeps CLIPVisionModel's embeddings one level down, at vision_model.embeddings
    embeddings = getattr(getattr(model, "vision_model", model), "embeddings", getattr(model, "embeddings", None))
    n_cls = 1 if any(isinstance(getattr(embeddings, a, None), torch.Tensor) for a in _CLS_ATTRS) else 0
    n_reg = int(getattr(model.config, "num_register_tokens", 0) or 0)
    return n_cls, n_reg


class VisionTower(nn.Module):
    """Wraps a HF vision encoder; returns patch features of one hidden layer (CLS kept on request).

    Token layout of the encoder: [CLS?][registers...][patch grid, row-major]. Registers are always
    dropped (they carry no image position); CLS is dropped unless `keep_cls`.
    """

    def __init__(self, model: PreTrainedModel, input_size: tuple[int, int] | None = None):
        super().__init__()
        self.model = model
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.image_size: int = cfg.image_size
        self.patch_size: int = cfg.patch_size
        native = _pair(cfg.image_size, "image_size")
        patch = _pair(cfg.patch_size, "patch_size")
        self.input_size: tuple[int, int] = tuple(input_size) if input_size is not None else native  # type: ignore[assignment]
        if self.input_size[0] % patch[0] or self.input_size[1] % patch[1]:
            raise ValueError(
                f"{type(model).__name__}: input size {self.input_size} (height, width) is not a multiple of "
                f"the patch size {patch}"
            )
        self.grid: tuple[int, int] = (self.input_size[0] // patch[0], self.input_size[1] // patch[1])
        self.num_patches: int = self.grid[0] * self.grid[1]
        self.num_cls, self.num_registers = count_prefix_tokens(model)
        self._forward_kwargs: dict[str, bool] = {}
        if self.input_size != native:
            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
                self._forward_kwargs["interpolate_pos_encoding"] = True  # CLIP, SigLIP, ViT
            elif not callable(getattr(getattr(model, "embeddings", None), "interpolate_pos_encoding", None)):
                # DINOv2's embeddings always interpolate; anything else would fail at the first image.
                raise ValueError(
                    f"{type(model).__name__} was trained at {native} but its preprocessing gives {self.input_size}, "
                    "and it cannot interpolate its position embeddings (no `interpolate_pos_encoding`)"
                )

    @property
    def config(self):
        return self.model.config

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, dtype: torch.dtype | None = None, attn_implementation: str | None = None
    ) -> VisionTower:
        from .images import ImagePreprocessor

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
        # The encoder sees what its preprocessing produces (DINOv2: 224 crops for a 518 config), so the
        # patch grid follows the preprocessor's size. Its fallback warning is the model's to give.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            size = ImagePreprocessor.from_pretrained(name_or_path, vision_config=model.config).size
        return cls(model, input_size=size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> VisionTower:
        # The tower is frozen: it stays in eval mode (no dropout) whatever the parent does.
        return super().train(False)

    def has_cls(self) -> bool:
        return self.num_cls > 0

    def num_tokens(self, keep_cls: bool = False) -> int:
        return self.num_patches + (self.num_cls if keep_cls else 0)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -2, keep_cls: bool = False) -> torch.Tensor:
        if tuple(pixel_values.shape[-2:]) != self.input_size:
            raise ValueError(
                f"pixel_values of size {tuple(pixel_values.shape[-2:])}: this vision tower takes {self.input_size} "
                "(height, width), as its preprocessor produces"
            )
        out = self.model(
            pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True, **self._forward_kwargs
        )
        if getattr(out, "hidden_states", None) is None:
            raise ValueError(f"{type(self.model).__name__} returned no hidden_states: cannot select a layer")
        feats = out.hidden_states[select_layer]
        n_prefix = self.num_cls + self.num_registers
        if feats.dim() != 3 or feats.shape[1] != n_prefix + self.num_patches:
            raise ValueError(
                f"{type(self.model).__name__} hidden state of shape {tuple(feats.shape)}: expected "
                f"[n, {n_prefix + self.num_patches}, C] ({self.num_cls} CLS + {self.num_registers} register + "
                f"{self.grid[0]}x{self.grid[1]} patch tokens)"
            )
        patches = feats[:, n_prefix:]
        if keep_cls and self.num_cls:
            return torch.cat([feats[:, :1], patches], dim=1)
        return patches
