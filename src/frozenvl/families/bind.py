"""bind (ImageBind-LLM): one gated visual vector added to every token's attention output.

Per image, a global embedding (mean of the selected vision layer's patch features, or CLS with
``pool: cls``; L2-normalised) goes through the *bind network*: Linear(vision, hidden), then
``bind_blocks`` residual blocks ``x = x + SwiGLU(RMSNorm(x))``, giving one vector per image. At every
selected layer l the adapter is that vector plus a learned per-layer vector p_l; as a length-1 prompt
its attention weight is always 1, so the attention collapses to

    attn_out[b, t, head] += tanh(gate_l[head]) * v_proj(visual_b + p_l)[head]

for every token t, through the layer's frozen ``v_proj`` (grouped-query heads repeated as the layer
does), before ``o_proj``. Per-head gates start at ``gate_init`` (0: the workflow is the base LLM at
initialisation). Images never enter the token sequence (``<image>`` placeholders are removed); a
sample with several images gets the mean of their vectors, one without images none (p_l alone);
images are assigned to batch rows as in :func:`frozenvl.families.adaption_prompt.visual_prompt_per_row`.
As there, the per-row visual vectors are kept on the KV cache object for the decode steps.

Optional inference-time visual cache (``visual_cache: true``; used in eval mode or without
gradients, e.g. in generation, never in a training step): the query's normalised global feature
retrieves its ``cache_topk`` nearest neighbours (cosine) from a bank of features, weights them by
``softmax(cache_temperature * sims)``, blends ``(1 - cache_ratio) * query + cache_ratio * retrieved``
and renormalises. Build a bank with
:func:`build_feature_bank` (same vision layer and pooling as the workflow) and give its file as
``cache_bank`` or set it on a running workflow with :meth:`BindFamily.set_feature_bank`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, WorkflowConfig
from .adaption_prompt import (
    POOL_MODES,
    embed_without_placeholders,
    global_feature,
    per_row_visual,
    repeat_kv_heads,
)
from .base import DecodeContext, Family, check_layer_indices, decoder_block

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BANK_KEY = "features"


@dataclass
class BindConfig(WorkflowConfig):
    bind_blocks: int = 3  # residual RMSNorm + SwiGLU blocks after the input projection
    gate_init: float = 0.0  # initial value of every per-head gate (tanh(0) = 0: starts as the base LLM)
    layers: str | list[int] = "all"  # "all" or the decoder layer indices that get the visual vector
    pool: str = "mean"  # global image feature: "mean" of the patch features | "cls" (needs keep_cls)
    visual_cache: bool = False  # inference-time retrieval from a feature bank (not in training steps)
    cache_bank: str | None = None  # file written by build_feature_bank (safetensors, key "features")
    cache_topk: int = 8
    cache_temperature: float = 20.0
    cache_ratio: float = 0.5  # weight of the retrieved feature in the blend

    def validate(self) -> None:
        super().validate()
        if self.pool not in POOL_MODES:
            raise ConfigError(f"bind pool {self.pool!r} is not one of {list(POOL_MODES)}")
        if self.pool == "cls" and not self.keep_cls:
            raise ConfigError("bind pool 'cls' needs keep_cls: true (the CLS token is dropped otherwise)")
        if self.bind_blocks < 0:
            raise ConfigError(f"bind bind_blocks must be >= 0, got {self.bind_blocks}")
        listed = isinstance(self.layers, list) and all(isinstance(i, int) for i in self.layers)
        if not (self.layers == "all" or listed):
            raise ConfigError(f"bind layers must be 'all' or a list of layer indices, got {self.layers!r}")
        if self.cache_topk < 1 or not 0.0 <= self.cache_ratio <= 1.0:
            raise ConfigError("bind needs cache_topk >= 1 and 0 <= cache_ratio <= 1")
        if self.llm_train != "frozen":
            raise ConfigError("bind adapts a frozen LLM: llm_train must be 'frozen'")


# ---------------------------------------------------------------------------------------------
# the visual cache
# ---------------------------------------------------------------------------------------------
def blend_with_bank(
    query: torch.Tensor, bank: torch.Tensor, topk: int = 8, temperature: float = 20.0, ratio: float = 0.5
) -> torch.Tensor:
    """ImageBind-LLM's training-free visual cache, on L2-normalised features (computed in float32).

    query [n, C], bank [M, C] -> [n, C]: sims = q . bank (cosine; bank rows are normalised here too),
    the top-k sims weighted by softmax(temperature * sims) average their bank rows, the result is blended
    ``(1 - ratio) * q + ratio * retrieved`` and renormalised.
    """
    dtype = query.dtype
    q = F.normalize(query.float(), dim=-1)
    b = F.normalize(bank.to(q.device, torch.float32), dim=-1)
    sims = q @ b.T  # [n, M]
    top, idx = sims.topk(min(topk, b.shape[0]), dim=-1)
    weights = torch.softmax(temperature * top, dim=-1)  # [n, k]
    retrieved = torch.einsum("nk,nkc->nc", weights, b[idx])
    return F.normalize((1.0 - ratio) * q + ratio * retrieved, dim=-1).to(dtype)


def load_feature_bank(path: str | os.PathLike) -> torch.Tensor:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"visual cache bank {path} not found (write one with frozenvl.families.bind.build_feature_bank)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        data = load_file(path)
        if BANK_KEY not in data:
            raise ValueError(f"{path} has no {BANK_KEY!r} tensor; it has {sorted(data)}")
        bank = data[BANK_KEY]
    else:
        bank = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2:
        raise ValueError(f"{path}: a feature bank is a 2-d tensor [n_images, features]")
    return bank


def _image_files(folder: str | os.PathLike) -> list[str]:
    files = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


@torch.no_grad()
def build_feature_bank(
    model,
    task: str,
    images: str | os.PathLike | Sequence[Any],
    *,
    batch_size: int = 16,
    out: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Normalised global features [n_images, vision_dim] (float32, CPU) of `images` for workflow `task`.

    `images`: a folder (its image files in sorted name order) or a list of PIL images / paths / bytes.
    The features use the workflow's vision layer, CLS choice and pooling, so they live in the space the
    workflow's visual cache searches. With `out` the bank is also written there (safetensors).
    """
    family = model.workflow(task)
    if not isinstance(family, BindFamily):
        raise ValueError(f"workflow {task!r} is {family.cfg.family!r}, not a bind workflow")
    items = _image_files(images) if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise ValueError("no images given for the feature bank")
    pre = model.preprocessor(task)
    chunks = []
    for start in range(0, len(items), batch_size):
        pixels = pre(items[start : start + batch_size]).to(model.device)
        feats = model.vision(pixels, select_layer=family.cfg.select_layer, keep_cls=family.cfg.keep_cls)
        chunks.append(family.global_embedding(feats).float().cpu())
    bank = torch.cat(chunks)
    if out is not None:
        from safetensors.torch import save_file

        save_file({BANK_KEY: bank.contiguous()}, os.fspath(out), metadata={"format": "pt"})
    return bank


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class _SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, dtype: torch.dtype | None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.w3 = nn.Linear(dim, hidden, bias=False, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class BindNetwork(nn.Module):
    """Linear(vision, d), then `blocks` x [x + SwiGLU(RMSNorm(x))] (SwiGLU width 8d/3 rounded up to 64)."""

    def __init__(self, vision_dim: int, hidden: int, blocks: int, dtype: torch.dtype | None = None):
        super().__init__()
        ffn = -(-(8 * hidden // 3) // 64) * 64
        self.proj = nn.Linear(vision_dim, hidden, dtype=dtype)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden, eps=1e-6, dtype=dtype) for _ in range(blocks))
        self.ffns = nn.ModuleList(_SwiGLU(hidden, ffn, dtype) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for norm, ffn in zip(self.norms, self.ffns):
            # Under autocast x is bf16 while the norm's (fp32 master) weight is not: match them.
            x = x + ffn(norm(x.to(norm.weight.dtype)))
        return x


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
class BindFamily(Family):
    name = "bind"
    config_class = BindConfig
    rewrites_block = True  # runs base.decoder_block / self_attention: Llama-block architectures only

    def __init__(self, cfg: BindConfig, llm, vision_hidden: int | None):
        super().__init__(cfg, llm, vision_hidden)
        self.connector = None  # the bind network is this family's visual side
        if vision_hidden is None:
            raise ConfigError("bind needs a vision encoder")
        conf = self.lm.config
        n = self.lm.num_layers
        self.bound = check_layer_indices(list(range(n)) if cfg.layers == "all" else list(cfg.layers), n, "bind")
        self.layers_replaced = frozenset(self.bound)
        hidden, heads, dtype = conf.hidden_size, conf.num_attention_heads, llm.dtype
        self.num_heads = heads
        self.bind = BindNetwork(vision_hidden, hidden, cfg.bind_blocks, dtype=dtype)
        self.prompt = nn.ParameterDict({str(i): nn.Parameter(torch.randn(hidden).to(dtype)) for i in self.bound})
        self.gate = nn.ParameterDict(
            {str(i): nn.Parameter(torch.full((heads,), float(cfg.gate_init), dtype=dtype)) for i in self.bound}
        )
        # Not a parameter and not saved with the workflow: it is data, given by file or at run time.
        self.register_buffer("feature_bank", None, persistent=False)
        if cfg.visual_cache and cfg.cache_bank:
            self.set_feature_bank(load_feature_bank(cfg.cache_bank))

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()
        parts["bind"] = list(self.bind.parameters())
        parts["prompt"] = list(self.prompt.parameters())
        parts["gate"] = list(self.gate.parameters())
        return parts

    def set_feature_bank(self, bank: torch.Tensor | None) -> None:
        """Use `bank` [n, vision_dim] (e.g. from build_feature_bank) for the visual cache (None: drop it)."""
        if bank is not None and (bank.dim() != 2 or bank.shape[1] != self.bind.proj.in_features):
            raise ValueError(
                f"feature bank of shape {tuple(bank.shape)}: expected [n, {self.bind.proj.in_features}]"
            )
        device = self.bind.proj.weight.device
        self.feature_bank = None if bank is None else bank.to(device, torch.float32)

    # ---- images ------------------------------------------------------------------------------
    def image_tokens_per_image(self, num_vision_tokens: int) -> int:
        return 0  # images stay out of the sequence

    def global_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [n, N, vis] -> L2-normalised global features [n, vis] (float32)."""
        return F.normalize(global_feature(features, self.cfg.pool).float(), dim=-1)

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [n, N, vis] -> one bind vector per image [n, 1, hidden]."""
        g = self.global_embedding(features)
        if self.cfg.visual_cache and not (self.training and torch.is_grad_enabled()):
            if self.feature_bank is None:
                raise ValueError(
                    "bind visual_cache is on but no feature bank is set: give cache_bank (a file from "
                    "build_feature_bank) or call set_feature_bank"
                )
            g = blend_with_bank(g, self.feature_bank, self.cfg.cache_topk, self.cfg.cache_temperature,
                                self.cfg.cache_ratio)
        return self.bind(g.to(self.bind.proj.weight.dtype)).unsqueeze(1)

    # ---- the forward pass ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        return embed_without_placeholders(self.embed_text, input_ids, self.name)

    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        visual = per_row_visual(f"{self.name}.visual", ctx, h.shape[0])
        ctx.state["visual"] = None if visual is None else visual[:, 0]  # [B, hidden]
        return super().decode(h, ctx)

    def run_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        layer = self.lm.layers[idx]
        adapter = self.prompt[str(idx)].unsqueeze(0)  # [1, hidden]
        visual = ctx.state.get("visual")
        if visual is not None:
            adapter = adapter + visual.to(adapter.dtype)  # [B, hidden]
        gate = self.gate[str(idx)]

        def add_visual(x: torch.Tensor, attn_out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            heads, head_dim = q.shape[1], q.shape[3]
            v = layer.self_attn.v_proj(adapter)  # [b, kv * head_dim]
            v = repeat_kv_heads(v.view(v.shape[0], -1, head_dim), heads, dim=1)  # [b, heads, head_dim]
            v = torch.tanh(gate).to(v.dtype).view(1, heads, 1) * v
            return attn_out + v.reshape(v.shape[0], 1, heads * head_dim).to(attn_out.dtype)

        return decoder_block(layer, h, ctx, self.lm.layer_types[idx], attn_extra=add_visual)
