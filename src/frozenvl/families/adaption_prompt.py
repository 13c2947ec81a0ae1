"""adaption_prompt (LLaMA-Adapter v1 / v2): gated, zero-initialised prompts inside the top L layers.

For each adapted layer (the top ``adapter_layers`` decoder layers) the workflow owns ``adapter_len``
learned prompt vectors P [adapter_len, hidden]. Their keys and values come from the layer's own frozen
``k_proj`` / ``v_proj`` (no rotary embedding; Qwen3's ``k_norm`` is applied like for the layer's own
keys), every token attends to the whole prompt through a *separate* softmax, and the result is scaled
by a gate that starts at 0::

    out = o_proj(attn) + W_o (gate * softmax(Q K_p^T / sqrt(head_dim)) V_p)

``W_o`` is ``o_proj``'s weight without its bias, i.e. the adapter term joins the attention output in
head space, before ``o_proj`` (``o_proj(attn + adapter)``); it is written as a sum of two projections so
that ``gate: scalar`` reproduces PEFT's ``AdaptionPromptConfig`` bit for bit (PEFT adds
``o_proj(adapter)`` after the attention module, which also adds ``o_proj``'s bias a second time when
it has one: we do not). Grouped-query attention repeats the prompt's key/value heads like the layer
does, and nothing assumes ``heads * head_dim == hidden`` (PEFT does).

Gate modes: ``scalar`` (PEFT: one number per layer, no tanh), ``per_head`` (the paper: one per head),
``per_head_tanh`` (the v2 release: tanh of a per-head gate). All start at 0, so at initialisation the
workflow's logits equal the base LLM's exactly.

Images (``visual``) never enter the token sequence (``<image>`` placeholders are removed):

* ``v1``: the global image feature (mean of the selected vision layer's patch features, or CLS with
  ``pool: cls``) goes through the connector to one vector that is ADDED to every prompt position of
  every adapted layer;
* ``v2``: ``v2_queries`` learned queries attend over the image's vision tokens through ``v2_blocks``
  small transformer blocks (joint self-attention over queries + projected vision tokens, as in the v2
  release) and the query outputs, projected to the LLM width, are added position-wise to the prompts:
  ``v2_queries`` must equal ``adapter_len`` (the v2 release has the same constraint);
* ``none``: a text-only adapter (what PEFT trains); such a workflow needs no vision encoder.

Several images in one sample: their visual prompts are averaged (mean), so the scale does not grow
with the image count. A sample without an image gets a zero visual prompt. See
:func:`visual_prompt_per_row` for how images are assigned to batch rows.

``bias_tuning`` (v2's "bias and scale" tuning) adds to each adapted layer's q/k/v/o projections a
zero-initialised bias and a one-initialised scale, ``y = s * (W x + b_frozen + b)``: still the identity
at initialisation.

KV-cached decoding: the prompt keys/values are recomputed from the parameters at every step (they are
``adapter_len`` tokens), but the per-row visual prompt depends on the images, which a decode step no
longer receives. The family therefore stores it on the cache object of the call
(``cache.frozenvl_state[<family>.visual]``) during prefill and reads it back on every later step of
the same cache; a fresh cache without that entry means "no images".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, WorkflowConfig
from ..vision.connectors import build_connector
from .base import IMAGE_TOKEN_ID, DecodeContext, Family, cache_state, self_attention

GATE_MODES = ("scalar", "per_head", "per_head_tanh")
VISUAL_MODES = ("none", "v1", "v2")
POOL_MODES = ("mean", "cls")


# ---------------------------------------------------------------------------------------------
# helpers shared with the bind family
# ---------------------------------------------------------------------------------------------
def global_feature(features: torch.Tensor, pool: str) -> torch.Tensor:
    """Vision features [n, N, C] -> one global feature per image [n, C] ("mean" of tokens or "cls")."""
    if pool == "mean":
        return features.mean(dim=1)
    n_tokens = features.shape[1]
    if math.isqrt(n_tokens) ** 2 == n_tokens:
        # ViT patch grids are square; with a CLS token in front the count is not.
        raise ValueError(
            f"pool 'cls' but the vision features have {n_tokens} tokens (a square patch grid, no CLS token): "
            "set keep_cls: true with an encoder that has a CLS token (CLIP), or use pool: mean"
        )
    return features[:, 0]


def visual_prompt_per_row(
    per_image: torch.Tensor, batch: int, image_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image visual prompts [n_images, K, d] -> per-row prompts [batch, K, d] (mean over a row's images).

    Images come flattened in row order. When ``image_rows`` ([n_images], the batch row of each image)
    is given, rows get the mean of their own images and rows without images get zeros. Without it the
    row of an image is only known when the batch is a single row (all images are its own) or when every
    row has the same number of images (n_images = k * batch: k consecutive images per row); anything
    else is an error, since guessing could give a row another sample's image.
    """
    n = per_image.shape[0]
    if image_rows is not None:
        image_rows = image_rows.to(per_image.device, torch.long)
        if image_rows.shape != (n,):
            raise ValueError(f"image_rows has shape {tuple(image_rows.shape)}, expected ({n},)")
        out = per_image.new_zeros((batch, *per_image.shape[1:]))
        out.index_add_(0, image_rows, per_image)
        counts = torch.bincount(image_rows, minlength=batch).clamp(min=1).to(per_image.dtype)
        return out / counts.view(-1, *([1] * (per_image.dim() - 1)))
    if batch == 1:
        return per_image.mean(dim=0, keepdim=True)
    if n % batch != 0:
        raise ValueError(
            f"{n} image(s) for a batch of {batch} rows: this family keeps images out of the token sequence, so "
            "the row of each image is only known when every row has the same number of images (or the batch "
            "is one row). Batch samples with equal image counts, or run them one by one."
        )
    return per_image.view(batch, n // batch, *per_image.shape[1:]).mean(dim=1)


def per_row_visual(key: str, ctx: DecodeContext, batch: int) -> torch.Tensor | None:
    """The per-row visual prompt of this call: from this call's image embeddings (and then kept on the
    KV cache, under ``key``, for the decode steps that follow), or read back from the cache."""
    embeds = ctx.state.get("image_embeds")
    if embeds is None or embeds.shape[0] == 0:
        return cache_state(ctx.cache).get(key) if ctx.cache is not None else None
    visual = visual_prompt_per_row(embeds, batch, ctx.state.get("image_rows"))
    if ctx.cache is not None:
        cache_state(ctx.cache)[key] = visual
    return visual


def embed_without_placeholders(embed_text: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor,
                               family: str) -> torch.Tensor:
    if (input_ids == IMAGE_TOKEN_ID).any():
        raise ValueError(
            f"the {family} family keeps images out of the token sequence, but input_ids hold image placeholders: "
            "tokenize with the workflow's tokens_per_image (0), e.g. through model.prepare_inputs"
        )
    return embed_text(input_ids)


def repeat_kv_heads(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """[.., kv, ..] -> [.., heads, ..] along `dim`: query head h uses key/value head h // (heads / kv)."""
    kv = x.shape[dim]
    if heads % kv != 0:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv} key/value heads")
    return x if kv == heads else torch.repeat_interleave(x, heads // kv, dim=dim)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
@dataclass
class AdaptionPromptConfig(WorkflowConfig):
    adapter_len: int = 10  # prompt vectors per adapted layer
    adapter_layers: int = 8  # how many layers (from the top) are adapted
    gate: str = "scalar"  # "scalar" (PEFT) | "per_head" (paper) | "per_head_tanh" (v2 release)
    visual: str = "v1"  # "none" | "v1" (global feature -> connector) | "v2" (learned visual queries)
    v2_queries: int = 10  # must equal adapter_len
    v2_blocks: int = 2
    v2_width: int | None = None  # width of the v2 query blocks; None: the vision encoder's width
    v2_heads: int = 8
    pool: str = "mean"  # v1 global feature: "mean" of the patch features | "cls" (needs keep_cls)
    bias_tuning: bool = False  # v2: zero-init bias + scale on the adapted layers' q/k/v/o projections

    def validate(self) -> None:
        if self.text_fallback is None and self.visual == "none":
            # a text-only adapter (e.g. imported from PEFT) exists to change text answers: no fallback
            self.text_fallback = False
        super().validate()
        if self.gate not in GATE_MODES:
            raise ConfigError(f"adaption_prompt gate {self.gate!r} is not one of {list(GATE_MODES)}")
        if self.visual not in VISUAL_MODES:
            raise ConfigError(f"adaption_prompt visual {self.visual!r} is not one of {list(VISUAL_MODES)}")
        if self.pool not in POOL_MODES:
            raise ConfigError(f"adaption_prompt pool {self.pool!r} is not one of {list(POOL_MODES)}")
        if self.pool == "cls" and not self.keep_cls:
            raise ConfigError("adaption_prompt pool 'cls' needs keep_cls: true (the CLS token is dropped otherwise)")
        if self.adapter_len < 1 or self.adapter_layers < 1:
            raise ConfigError(
                f"adaption_prompt needs adapter_len >= 1 and adapter_layers >= 1, got {self.adapter_len}, "
                f"{self.adapter_layers}"
            )
        if self.visual == "v2":
            if self.v2_queries != self.adapter_len:
                raise ConfigError(
                    f"adaption_prompt visual 'v2' adds its {self.v2_queries} visual queries position-wise to the "
                    f"{self.adapter_len} prompt vectors: set v2_queries equal to adapter_len"
                )
            if self.v2_blocks < 0 or self.v2_heads < 1 or (self.v2_width is not None and self.v2_width < 1):
                raise ConfigError("adaption_prompt needs v2_blocks >= 0, v2_heads >= 1 and v2_width >= 1")
        if self.llm_train != "frozen":
            raise ConfigError("adaption_prompt adapts a frozen LLM: llm_train must be 'frozen'")


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class _QueryBlock(nn.Module):
    """Pre-norm transformer block (self-attention + GELU MLP) over [visual queries; vision tokens]."""

    def __init__(self, width: int, heads: int, dtype: torch.dtype | None):
        super().__init__()
        if width % heads != 0:
            raise ConfigError(f"adaption_prompt v2 width {width} is not divisible by v2_heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, dtype=dtype)
        self.qkv = nn.Linear(width, 3 * width, dtype=dtype)
        self.proj = nn.Linear(width, width, dtype=dtype)
        self.norm2 = nn.LayerNorm(width, dtype=dtype)
        self.fc1 = nn.Linear(width, 4 * width, dtype=dtype)
        self.fc2 = nn.Linear(4 * width, width, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, w)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisualQueries(nn.Module):
    """LLaMA-Adapter v2's visual side: learned queries read the vision tokens through a few blocks."""

    def __init__(self, vision_dim: int, hidden: int, n_queries: int, n_blocks: int, width: int, heads: int,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.proj_in = nn.Linear(vision_dim, width, dtype=dtype)
        self.norm_in = nn.LayerNorm(width, dtype=dtype)
        self.queries = nn.Parameter(torch.randn(n_queries, width).mul_(0.02).to(dtype))
        self.blocks = nn.ModuleList(_QueryBlock(width, heads, dtype) for _ in range(n_blocks))
        self.proj_out = nn.Linear(width, hidden, dtype=dtype)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [n, N, vision_dim] -> [n, Q, hidden]
        tokens = self.norm_in(self.proj_in(features))
        q = self.queries.shape[0]
        x = torch.cat([self.queries.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x[:, :q])


class _TunedAttention:
    """A frozen attention module seen through bias/scale tuning: q/k/v_proj give s * (W x + b_frozen + b).

    Everything else (head_dim, layer_idx, config, norms, ...) is the wrapped module's own, so the shared
    `self_attention` helper runs unchanged on it.
    """

    def __init__(self, attn: nn.Module, tuning: nn.ParameterDict):
        self._attn = attn
        self._tuning = tuning
        self.q_proj = lambda x: self.project("q", x)
        self.k_proj = lambda x: self.project("k", x)
        self.v_proj = lambda x: self.project("v", x)
        self.o_proj = lambda x: self.project("o", x)

    def project(self, which: str, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self._attn, f"{which}_proj")(x)
        return (y + self._tuning[f"{which}_bias"]) * self._tuning[f"{which}_scale"]

    def project_weight_only(self, which: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, getattr(self._attn, f"{which}_proj").weight) * self._tuning[f"{which}_scale"]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._attn, name)


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
class AdaptionPromptFamily(Family):
    name = "adaption_prompt"
    config_class = AdaptionPromptConfig
    rewrites_block = True  # runs base.decoder_block / self_attention: Llama-block architectures only
    # Class level: a `visual: none` workflow (e.g. an imported PEFT adapter) runs without a vision
    # encoder. Each instance sets the truth for its own config in __init__.
    uses_images = False

    def __init__(self, cfg: AdaptionPromptConfig, llm, vision_hidden: int | None):
        super().__init__(cfg, llm, vision_hidden)
        self.uses_images = cfg.visual != "none"
        conf = self.lm.config
        n = self.lm.num_layers
        if cfg.adapter_layers > n:
            raise ConfigError(f"adaption_prompt adapter_layers {cfg.adapter_layers} > the LLM's {n} layers")
        self.adapted = list(range(n - cfg.adapter_layers, n))
        self.layers_replaced = frozenset(self.adapted)
        hidden, heads, dtype = conf.hidden_size, conf.num_attention_heads, llm.dtype
        self.num_heads = heads

        # Standard normal prompts (LLaMA-Adapter's embedding init, as PEFT), zero gates.
        self.prompt = nn.ParameterDict(
            {str(i): nn.Parameter(torch.randn(cfg.adapter_len, hidden).to(dtype)) for i in self.adapted}
        )
        gate_size = 1 if cfg.gate == "scalar" else heads
        self.gate = nn.ParameterDict({str(i): nn.Parameter(torch.zeros(gate_size, dtype=dtype)) for i in self.adapted})

        if cfg.visual != "none":
            if vision_hidden is None:
                raise ConfigError(
                    f"adaption_prompt visual {cfg.visual!r} needs a vision encoder: build the model with vision=..., "
                    "or set visual: none"
                )
            if cfg.visual == "v1":
                self.connector = build_connector(cfg.connector, vision_hidden, hidden, dtype=dtype)
            else:
                self.connector = VisualQueries(
                    vision_hidden, hidden, cfg.v2_queries, cfg.v2_blocks, cfg.v2_width or vision_hidden,
                    cfg.v2_heads, dtype=dtype,
                )

        self.bias = None
        if cfg.bias_tuning:
            self.bias = nn.ModuleDict()
            for i in self.adapted:
                attn = self.lm.layers[i].self_attn
                tuning = nn.ParameterDict()
                for which in "qkvo":
                    out = getattr(attn, f"{which}_proj").out_features
                    tuning[f"{which}_bias"] = nn.Parameter(torch.zeros(out, dtype=dtype))
                    tuning[f"{which}_scale"] = nn.Parameter(torch.ones(out, dtype=dtype))
                self.bias[str(i)] = tuning

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()  # "connector" (the visual side) when visual is not none
        parts["prompt"] = list(self.prompt.parameters())
        parts["gate"] = list(self.gate.parameters())
        if self.bias is not None:
            parts["bias"] = list(self.bias.parameters())
        return parts

    # ---- images ------------------------------------------------------------------------------
    def image_tokens_per_image(self, num_vision_tokens: int) -> int:
        return 0  # images stay out of the sequence

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [n, N, vis] -> per-image visual prompts [n, 1 (v1) or adapter_len (v2), hidden]."""
        if self.connector is None:
            raise ValueError("this adaption_prompt workflow has visual: none and takes no images")
        dtype = next(self.connector.parameters()).dtype
        if self.cfg.visual == "v1":
            return self.connector(global_feature(features, self.cfg.pool).to(dtype)).unsqueeze(1)
        return self.connector(features.to(dtype))

    # ---- the forward pass ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        return embed_without_placeholders(self.embed_text, input_ids, self.name)

    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        ctx.state["visual"] = per_row_visual(f"{self.name}.visual", ctx, h.shape[0]) if self.uses_images else None
        return super().decode(h, ctx)

    def run_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        layer = self.lm.layers[idx]
        attn = layer.self_attn
        view = _TunedAttention(attn, self.bias[str(idx)]) if self.bias is not None else attn
        residual = h
        x = layer.input_layernorm(h)
        attn_out, q = self_attention(view, x, ctx, self.lm.layer_types[idx])
        adapter = self.prompt_attention(idx, view, q, ctx.state.get("visual"), memo=self._kv_memo(ctx))
        if self.bias is not None:
            out = view.o_proj(attn_out) + view.project_weight_only("o", adapter)
        else:
            # o_proj(attn) + W_o adapter: PEFT's sum (bit for bit when o_proj has no bias), and
            # o_proj(attn + adapter) up to rounding.
            out = attn.o_proj(attn_out) + F.linear(adapter, attn.o_proj.weight)
        h = residual + out.to(residual.dtype)
        residual = h
        return residual + layer.mlp(layer.post_attention_layernorm(h))

    def _kv_memo(self, ctx: DecodeContext) -> dict | None:
        """Where the prompt keys/values of a generate call live between decode steps: they depend only
        on the (fixed) prompts and visual prompt, so inference computes them once per call."""
        if ctx.cache is None or torch.is_grad_enabled():
            return None
        return cache_state(ctx.cache).setdefault(f"{self.name}.prompt_kv", {})

    def prompt_attention(self, idx: int, attn: Any, q: torch.Tensor, visual: torch.Tensor | None,
                         memo: dict | None = None) -> torch.Tensor:
        """gate * softmax(Q K_p^T / sqrt(d)) V_p in head space: [B, T, heads * head_dim].

        `q` is the layer's rotated query [B, heads, T, head_dim]; `visual` the per-row visual prompt
        [B, 1 or adapter_len, hidden] or None. Same ops in the same order as PEFT's AdaptedAttention.
        `memo` (inference with a cache) keeps each layer's prompt keys/values for later steps.
        """
        bsz, heads, q_len, head_dim = q.shape
        if memo is not None and idx in memo:
            key, value = memo[idx]
        else:
            key, value = self._prompt_kv(idx, attn, visual, bsz, heads, head_dim)
            if memo is not None:
                memo[idx] = (key, value)
        dtype = q.dtype
        scores = torch.matmul(q, key.transpose(2, 3).to(dtype)) / math.sqrt(head_dim)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        gate = self.gate[str(idx)]
        if self.cfg.gate == "per_head":
            gate = gate.view(1, heads, 1, 1)
        elif self.cfg.gate == "per_head_tanh":
            gate = torch.tanh(gate).view(1, heads, 1, 1)
        probs = gate * probs
        return torch.matmul(probs, value).transpose(1, 2).reshape(bsz, q_len, -1)

    def _prompt_kv(self, idx: int, attn: Any, visual: torch.Tensor | None, bsz: int, heads: int,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values through the layer's frozen k/v projections: [B, heads, L, head_dim]."""
        prompt = self.prompt[str(idx)].unsqueeze(0)  # [1, L, hidden]
        if visual is not None:
            prompt = prompt + visual.to(prompt.dtype)  # [B, L, hidden]
        length = prompt.shape[1]
        key = attn.k_proj(prompt)
        value = attn.v_proj(prompt)
        kv_heads = key.shape[-1] // head_dim
        key = key.view(prompt.shape[0], length, kv_heads, head_dim)
        if hasattr(attn, "k_norm"):  # Qwen3: the layer's keys are normed before rotary, so are these
            key = attn.k_norm(key)
        value = value.view(prompt.shape[0], length, kv_heads, head_dim)
        if prompt.shape[0] != bsz:
            key, value = key.repeat(bsz, 1, 1, 1), value.repeat(bsz, 1, 1, 1)
        key = repeat_kv_heads(key.transpose(1, 2), heads, dim=1)  # [B, heads, L, head_dim]
        value = repeat_kv_heads(value.transpose(1, 2), heads, dim=1)
        return key, value
