"""cross_attention (Flamingo: OpenFlamingo, IDEFICS, InfiMM): gated cross-attention blocks before decoder layers.

Images never enter the token sequence as features. Each image is one ``<image>`` token in the text
(an embedding the workflow owns) and, through a perceiver resampler (or as raw vision features),
a set of media tokens at the vision encoder's width. Before each selected frozen decoder layer a
gated block runs

    x = x + tanh(a_attn) * XAttn(norm(x), media)      (queries from text, keys/values from media)
    x = x + tanh(a_ff)   * FF(norm(x))

with both gates starting at 0, so a fresh workflow computes exactly the base LLM's hidden states.

Media masking: a text token attends to the media of the most recent ``<image>`` at or before it
(``media_attention: latest``, Flamingo's rule; the ``<image>`` token itself included) or to every
image so far (``all_previous``); tokens before a row's first image attend to none, and their
attention output is zero. ``skip_rows_without_images`` (InfiMM) also turns the feed-forward branch
off for rows that have no image at all.

Two styles set the defaults of the block's shape:

* ``openflamingo``: LayerNorm, 8 heads x 64, GELU feed-forward of width 4d, a block before layer i
  when ``(i + 1) % every == 0``;
* ``idefics``: RMSNorm, the LLM's own heads, SwiGLU feed-forward at the LLM's width, optional RMSNorm
  on queries and keys (``qk_norm``), a block before layer i when ``i % every == 0``, gates one
  number (``gate_type: float``) or one per hidden channel (``vector``).

New tokens (``extra_tokens``; default ``<image>`` and ``<|endofchunk|>``) are added to the model's
tokenizer when the workflow is attached. Their input embeddings and output-head rows belong to the
workflow (part ``tokens``); the base embedding table and head are untouched. ``<image>`` in a prompt
becomes one ``IMAGE_TOKEN_ID`` slot per image in ``input_ids``, embedded as the ``image_token``.

High resolution (``tiling``, docs/vision.md): each tile (and the thumbnail or global view) goes
through the resampler on its own, and an image's tiles' latents, in the layout's order, form that
image's one medium (``vision.tiling.TiledMedia``; images with fewer tiles are padded and the
padding masked out of the attention). The text still holds one ``<image>`` per image, and the
media rule above applies per image. A skipped (all-padding) tile is simply absent from the medium;
``image_newline`` and ``unpad`` do not apply.

Cache: in a forward pass with images, each image's keys and values are computed once per block
(shared by every batch row that uses the image) and kept on the KV cache object with each row's
image count, so decode steps neither re-encode nor re-project any image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..config import ConfigError, WorkflowConfig
from ..vision.perceiver import ACTIVATIONS, PerceiverResampler
from ..vision.tiling import TiledMedia
from .base import IMAGE_TOKEN_ID, DecodeContext, Family, cache_state, check_layer_indices
from .vocab import embed_with_rows, logits_with_rows, mean_rows

STYLES = ("openflamingo", "idefics")
MEDIA_ATTENTION = ("latest", "all_previous")
GATE_TYPES = ("float", "vector")
DEFAULT_EXTRA_TOKENS = ("<image>", "<|endofchunk|>")
STATE_KEY = "cross_attention"

# Per-style defaults of the fields left at None: (block heads, block head_dim, resampler heads,
# resampler head_dim, resampler activation). None in the table: taken from the LLM.
_STYLE_DEFAULTS = {
    "openflamingo": (8, 64, 8, 64, "gelu"),
    "idefics": (None, None, 16, 96, "relu"),
}


@dataclass
class CrossAttentionConfig(WorkflowConfig):
    style: str = "openflamingo"  # "openflamingo" | "idefics": norms, feed-forward, heads and placement
    every: int = 4  # a block every `every` layers (openflamingo: before layers with (i+1) % every == 0; idefics: i % every == 0)
    layers: list[int] | None = None  # explicit decoder layers to put a block before (overrides `every`)
    heads: int | None = None  # cross-attention heads (None: style default; idefics = the LLM's)
    head_dim: int | None = None
    ff_mult: int = 4  # openflamingo feed-forward width multiple
    gate_type: str = "float"  # "float" (one tanh gate per branch) | "vector" (one per hidden channel)
    qk_norm: bool = False  # RMSNorm on cross-attention queries and keys per head (IDEFICS qk_layer_norms)
    media_attention: str = "latest"  # "latest" (most recent image) | "all_previous" (every image so far)
    skip_rows_without_images: bool = False  # InfiMM: rows with no image skip both branches
    resampler: bool = True  # perceiver resampler over each image's features (else raw features are the media)
    resampler_depth: int = 6
    resampler_latents: int = 64
    resampler_heads: int | None = None
    resampler_head_dim: int | None = None
    resampler_activation: str | None = None  # "gelu" (openflamingo) | "relu" (idefics)
    resampler_qk_norm: bool = False
    resampler_max_frames: int | None = None  # learned per-frame embeddings for multi-frame media
    extra_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_EXTRA_TOKENS))
    image_token: str = "<image>"  # which of extra_tokens marks an image in the text
    unpad: bool = False  # tiling: an image's tiles are one medium, not a token map to unpad

    def validate(self) -> None:
        super().validate()
        if self.style not in STYLES:
            raise ConfigError(f"cross_attention style {self.style!r} is not one of {list(STYLES)}")
        if self.media_attention not in MEDIA_ATTENTION:
            raise ConfigError(f"cross_attention media_attention {self.media_attention!r} is not one of {list(MEDIA_ATTENTION)}")
        if self.gate_type not in GATE_TYPES:
            raise ConfigError(f"cross_attention gate_type {self.gate_type!r} is not one of {list(GATE_TYPES)}")
        if self.every < 1:
            raise ConfigError(f"cross_attention every must be >= 1, got {self.every}")
        if self.resampler_activation is not None and self.resampler_activation not in ACTIVATIONS:
            raise ConfigError(f"cross_attention resampler_activation {self.resampler_activation!r} is not one of {sorted(ACTIVATIONS)}")
        if self.image_token not in self.extra_tokens:
            raise ConfigError(f"cross_attention image_token {self.image_token!r} must be one of extra_tokens {self.extra_tokens}")
        if len(set(self.extra_tokens)) != len(self.extra_tokens) or not all(self.extra_tokens):
            raise ConfigError(f"cross_attention extra_tokens must be distinct non-empty strings, got {self.extra_tokens}")
        if self.llm_train != "frozen":
            raise ConfigError("cross_attention adapts a frozen LLM: llm_train must be 'frozen'")
        # with tiling an image's tiles are one medium of keys/values: no token rows to end or unpad
        for opt in ("image_newline", "unpad"):
            if self.tiling is not None and getattr(self, opt):
                raise ConfigError(
                    f"cross_attention with tiling: {opt} does not apply (an image's tiles are one medium of "
                    "cross-attention keys, not a row of tokens in the sequence); leave it off"
                )

    def block_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return check_layer_indices(list(self.layers), num_layers, "cross_attention")
        offset = 1 if self.style == "openflamingo" else 0
        layers = [i for i in range(num_layers) if (i + offset) % self.every == 0]
        if not layers:
            raise ConfigError(
                f"cross_attention every={self.every} places no block in a {num_layers}-layer LLM: "
                "lower `every` or list `layers`"
            )
        return layers


class GatedCrossAttentionBlock(nn.Module):
    """One tanh-gated cross-attention + feed-forward block (the shape set by the style)."""

    def __init__(self, cfg: CrossAttentionConfig, llm_config, media_dim: int, dtype: torch.dtype | None):
        super().__init__()
        d = llm_config.hidden_size
        style_heads, style_head_dim = _STYLE_DEFAULTS[cfg.style][:2]
        self.heads = cfg.heads or style_heads or llm_config.num_attention_heads
        self.head_dim = cfg.head_dim or style_head_dim or d // self.heads
        inner = self.heads * self.head_dim
        eps = getattr(llm_config, "rms_norm_eps", 1e-6)
        if cfg.style == "idefics":
            self.attn_norm = LlamaRMSNorm(d, eps=eps).to(dtype)
            self.ff_norm = LlamaRMSNorm(d, eps=eps).to(dtype)
            self.gate_proj = nn.Linear(d, llm_config.intermediate_size, bias=False, dtype=dtype)
            self.up_proj = nn.Linear(d, llm_config.intermediate_size, bias=False, dtype=dtype)
            self.down_proj = nn.Linear(llm_config.intermediate_size, d, bias=False, dtype=dtype)
            self.act = ACT2FN[llm_config.hidden_act]
        else:
            self.attn_norm = nn.LayerNorm(d, dtype=dtype)
            self.ff_norm = nn.LayerNorm(d, dtype=dtype)
            self.fc1 = nn.Linear(d, d * cfg.ff_mult, bias=False, dtype=dtype)
            self.fc2 = nn.Linear(d * cfg.ff_mult, d, bias=False, dtype=dtype)
            self.act = nn.GELU()
        self.swiglu = cfg.style == "idefics"
        self.q_proj = nn.Linear(d, inner, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(media_dim, inner, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(media_dim, inner, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(inner, d, bias=False, dtype=dtype)
        self.q_norm = LlamaRMSNorm(self.head_dim, eps=eps).to(dtype) if cfg.qk_norm else None
        self.k_norm = LlamaRMSNorm(self.head_dim, eps=eps).to(dtype) if cfg.qk_norm else None
        gate_shape = (d,) if cfg.gate_type == "vector" else (1,)
        self.attn_gate = nn.Parameter(torch.zeros(gate_shape, dtype=dtype))
        self.ff_gate = nn.Parameter(torch.zeros(gate_shape, dtype=dtype))

    def media_kv(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Media [n, L, media_dim] -> keys, values [n, heads, L, head_dim] (keys normed with qk_norm)."""
        n, length = media.shape[:2]
        media = media.to(self.k_proj.weight.dtype)
        k = self.k_proj(media).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(media).view(n, length, self.heads, self.head_dim).transpose(1, 2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))

    def forward(
        self,
        h: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        sees_image: torch.Tensor | None,
        row_on: torch.Tensor | None,
    ) -> torch.Tensor:
        """h [B, T, d]; kv [B, heads, S, head_dim] each; mask additive [B, 1, T, S] or None;
        sees_image [B, T] (False: the token's attention output is zero); row_on [B] (InfiMM: False turns
        the row's feed-forward branch off too) or None."""
        if kv is not None:
            b, t, _ = h.shape
            x = self.attn_norm(h)
            q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            if self.q_norm is not None:
                q = self.q_norm(q)
            k, v = kv
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)
            out = self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
            # zero for tokens with no image yet, so also for every token of a row without images
            out = out.masked_fill(~sees_image.unsqueeze(-1), 0.0)
            h = h + torch.tanh(self.attn_gate) * out
        ff = self.feed_forward(self.ff_norm(h))
        if row_on is not None:
            ff = ff * row_on.view(-1, 1, 1).to(ff.dtype)
        return h + torch.tanh(self.ff_gate) * ff


class CrossAttentionFamily(Family):
    name = "cross_attention"
    config_class = CrossAttentionConfig
    tiles_as_media = True

    def __init__(self, cfg: CrossAttentionConfig, llm, vision_hidden: int | None):
        super().__init__(cfg, llm, vision_hidden)
        self.connector = None  # the resampler and the blocks' key/value projections take the media
        if vision_hidden is None:
            raise ConfigError("cross_attention needs a vision encoder")
        conf, dtype = self.lm.config, llm.dtype
        self.block_layers = cfg.block_layers(self.lm.num_layers)
        self.layers_before = frozenset(self.block_layers)
        self.blocks = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(cfg, conf, vision_hidden, dtype) for i in self.block_layers}
        )
        _, _, r_heads, r_head_dim, r_act = _STYLE_DEFAULTS[cfg.style]
        self.resampler = (
            PerceiverResampler(
                vision_hidden,
                depth=cfg.resampler_depth,
                heads=cfg.resampler_heads or r_heads,
                head_dim=cfg.resampler_head_dim or r_head_dim,
                num_latents=cfg.resampler_latents,
                activation=cfg.resampler_activation or r_act,
                qk_norm=cfg.resampler_qk_norm,
                max_frames=cfg.resampler_max_frames,
                dtype=dtype,
            )
            if cfg.resampler
            else None
        )
        # New tokens start at the mean of the base rows (a neutral point in the model's own space).
        k = len(cfg.extra_tokens)
        self.token_embed = nn.Parameter(mean_rows(self.lm.embed_tokens.weight, k).to(dtype))
        self.token_head = nn.Parameter(mean_rows(self.lm.lm_head.weight, k).to(dtype))
        self.register_buffer("token_ids", torch.full((k,), -1, dtype=torch.long), persistent=False)
        self._id_list: list[int] | None = None

    # ---- tokens --------------------------------------------------------------------------------
    def extra_tokens(self) -> list[str]:
        return list(self.cfg.extra_tokens)

    def set_token_ids(self, ids: list[int]) -> None:
        """Tokenizer ids of `extra_tokens` (set when the workflow is attached to a model)."""
        if len(ids) != len(self.cfg.extra_tokens):
            raise ValueError(f"{len(ids)} ids for {len(self.cfg.extra_tokens)} extra tokens")
        self.token_ids = torch.tensor(ids, dtype=torch.long, device=self.token_embed.device)
        self._id_list = list(ids)

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()
        if self.resampler is not None:
            parts["resampler"] = list(self.resampler.parameters())
        parts["xattn"] = list(self.blocks.parameters())
        parts["tokens"] = [self.token_embed, self.token_head]
        return parts

    # ---- images --------------------------------------------------------------------------------
    def image_tokens_per_image(self, num_vision_tokens: int) -> int:
        return 1  # the <image> token; the media go to the cross-attention

    def max_frames(self) -> int:
        return (self.cfg.resampler_max_frames or 0) if self.resampler is not None else 0

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [n, N, vis] (or [n, frames, N, vis] for videos) -> media [n, L, vis]
        (resampler latents, or the features)."""
        return self.resampler(features) if self.resampler is not None else features.to(self.token_embed.dtype)

    # ---- the forward pass ----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        if self._id_list is None:
            raise RuntimeError("cross_attention token ids are not set: attach the workflow to a model (or call set_token_ids)")
        is_image = input_ids == IMAGE_TOKEN_ID
        n_images = 0 if image_embeds is None else len(image_embeds)
        if image_embeds is not None and int(is_image.sum()) != n_images:
            raise ValueError(
                f"input has {int(is_image.sum())} <image> positions but {n_images} image(s) were given: "
                "one <image> per image is expected"
            )
        # an image placeholder is the <image> token itself; the media reach the blocks, not the embeddings
        image_id = self._id_list[self.cfg.extra_tokens.index(self.cfg.image_token)]
        return embed_with_rows(self.embed_text, input_ids.masked_fill(is_image, image_id), self.token_ids,
                               self.token_embed)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        # each part capped as the base caps its logits (Gemma2/3), before padding with the dtype's minimum
        base = self.lm.finish_logits(self.lm.lm_head(h))
        extra = self.lm.finish_logits(F.linear(h, self.token_head.to(h.dtype)))
        return logits_with_rows(base, extra, self._id_list, self.token_ids)

    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        self._prepare_media(ctx, h.shape[0])
        return super().decode(h, ctx)

    def before_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        st = ctx.state[STATE_KEY]
        kv = st["layer_kv"][idx] if st["layer_kv"] else None
        return self.blocks[str(idx)](h, kv, st["mask"], st["sees_image"], st["row_on"])

    # ---- media bookkeeping -----------------------------------------------------------------------
    def _prepare_media(self, ctx: DecodeContext, batch: int) -> None:
        """Per call: which image each token attends to, the attention mask, and where keys/values live.

        Persistent per-row facts (images seen so far, the per-layer keys/values) live on the KV cache
        so that decode steps, which bring no images, continue where the prompt left off.
        """
        media = ctx.state.get("image_embeds")
        valid = None  # tiled images: which of an image's (padded) media positions are its own
        if isinstance(media, TiledMedia):
            media, valid = media.tokens, media.valid()
        if media is not None and media.shape[0] == 0:
            media = None
        store = self._media_store(ctx)
        device = ctx.position_ids.device
        is_image = ctx.image_mask if ctx.image_mask is not None else torch.zeros_like(ctx.position_ids, dtype=torch.bool)
        if media is not None:
            if store["kv"]:
                raise NotImplementedError(
                    "cross_attention: new images in a continued KV cache are not supported; start a new cache"
                )
            rows = ctx.state.get("image_rows")
            if rows is None:
                raise ValueError("cross_attention needs each image's batch row (image_rows)")
            rows = rows.to(device)
            count = torch.bincount(rows, minlength=batch)
            # slot of each image inside its row: its rank among that row's images (images come in row order)
            first = torch.cumsum(count, 0) - count
            slot = torch.arange(len(rows), device=device) - first[rows]
            store["count"], store["slots"], store["length"] = count, int(count.max()), media.shape[1]
            store["flat_index"] = rows * store["slots"] + slot
            # [B, slots * L]: media positions each row may attend to at all (None: every one)
            store["valid"] = None if valid is None else valid.new_zeros(batch * store["slots"], media.shape[1]).index_copy(
                0, store["flat_index"], valid).view(batch, -1)
            in_call = is_image.sum(-1)
            if not torch.equal(in_call, count):
                raise ValueError(
                    f"images per row {count.tolist()} do not match the <image> positions per row {in_call.tolist()}"
                )
        seen = store["seen"] if store["seen"] is not None else torch.zeros(batch, dtype=torch.long, device=device)
        latest = seen.unsqueeze(1) + torch.cumsum(is_image.long(), dim=1) - 1  # [B, T]; -1: no image yet
        store["seen"] = latest[:, -1] + 1 if latest.shape[1] else seen
        count = store["count"]
        has_media = media is not None or bool(store["kv"])
        st: dict[str, Any] = {"media": media, "store": store, "mask": None, "sees_image": latest >= 0,
                              "row_on": None, "current": None}
        if self.cfg.skip_rows_without_images:
            st["row_on"] = count > 0 if count is not None else torch.zeros(batch, dtype=torch.bool, device=device)
        if has_media:
            slots, length = store["slots"], store["length"]
            no_new_images = not bool(is_image.any())
            valid = store.get("valid")
            if self.cfg.media_attention == "latest" and no_new_images:
                # Every token of the call sees its row's latest image: attend to that image's keys alone.
                st["current"] = latest[:, 0].clamp(min=0)
                if valid is not None:
                    own = valid.view(batch, slots, length).gather(
                        1, st["current"].view(batch, 1, 1).expand(batch, 1, length))  # [B, 1, L]
                    st["mask"] = self._additive(own.unsqueeze(1))
            else:
                j = torch.arange(slots, device=device)
                cur = latest.unsqueeze(-1)
                allowed = (j == cur) if self.cfg.media_attention == "latest" else (j <= cur)
                allowed = allowed & (j < count.view(-1, 1, 1))
                allowed = allowed.repeat_interleave(length, dim=-1)  # [B, T, slots * L]
                if valid is not None:
                    allowed = allowed & valid.unsqueeze(1)
                st["mask"] = self._additive(allowed.unsqueeze(1))
        # Computed here, before the layer loop, so that gradient checkpointing of the layers never
        # recomputes (or skips) them.
        st["layer_kv"] = {i: self._layer_kv(i, st) for i in self.block_layers} if has_media else {}
        ctx.state[STATE_KEY] = st

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self.token_embed.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)

    @staticmethod
    def _media_store(ctx: DecodeContext) -> dict[str, Any]:
        """The per-sequence media facts: on the KV cache when there is one, else for this call only."""
        fresh = {"kv": {}, "seen": None, "count": None, "slots": 0, "length": 0, "valid": None}
        return fresh if ctx.cache is None else cache_state(ctx.cache).setdefault(STATE_KEY, fresh)

    def _layer_kv(self, idx: int, st: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `idx`'s keys/values for the call: every row's image slots [B, heads, slots * L, hd],
        or, when `current` is set, each row's latest image only [B, heads, L, hd]."""
        store = st["store"]
        if idx not in store["kv"]:
            k, v = self.blocks[str(idx)].media_kv(st["media"])  # once per image, whatever rows use it
            batch, slots = store["count"].shape[0], store["slots"]
            _, heads, length, hd = k.shape

            def to_rows(x: torch.Tensor) -> torch.Tensor:
                out = x.new_zeros(batch * slots, heads, length, hd).index_copy(0, store["flat_index"], x)
                return out.view(batch, slots, heads, length, hd).transpose(1, 2).reshape(batch, heads, slots * length, hd)

            store["kv"][idx] = (to_rows(k), to_rows(v))
        k, v = store["kv"][idx]
        current = st["current"]
        if current is None:
            return k, v
        memo = store.setdefault("current_kv", {})
        key = (idx, tuple(current.tolist()))
        if key not in memo:
            batch, heads, _, hd = k.shape
            length = store["length"]
            pick = current.view(batch, 1, 1, 1, 1).expand(batch, heads, 1, length, hd)
            memo[key] = tuple(x.view(batch, heads, store["slots"], length, hd).gather(2, pick).squeeze(2) for x in (k, v))
        return memo[key]
