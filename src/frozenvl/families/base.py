"""The family interface and the one decoder loop every multimodal workflow runs through.

A family says only what differs from the base forward pass. The places it can act:

1. input embeddings: `embed` (default: token embeddings with connector output spliced in at the
   image placeholder positions);
2. around a decoder layer: `before_layer` / `after_layer` for the layer indices listed in
   `layers_before` / `layers_after`;
3. inside attention and 4. inside the MLP: `run_layer` for the indices in `layers_replaced`
   (a family re-implements the decoder block there, reusing the frozen submodules; every other
   layer runs as the HF layer itself);
plus its own final norm / LM head / embedding table where it owns copies.

The loop, mask and rotary preparation, and cache handling are written once (`decode`), for the
Hugging Face decoders listed in `architectures.ARCHITECTURES` (others are refused at build time).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..config import ConfigError, WorkflowConfig
from ..constants import IMAGE_TOKEN_ID
from ..vision.connectors import build_connector, takes_pixels
from .architectures import cache_kwarg, check_architecture, takes_parameter
from .vocab import embed_with_rows, location_token_names, logits_with_rows, mean_rows


def layer_types(config) -> list[str]:
    """Attention type of each base layer ('full_attention' / 'sliding_attention')."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


class LMParts:
    """References to the pieces of a HF causal LM the decoder loop needs.

    A plain object (not an nn.Module) so that a family holding it does not register the frozen base
    as its own submodule: the base's weights never end up in a workflow's state dict.
    """

    def __init__(self, causal_lm: PreTrainedModel, family: str = "prefix", rewrites_block: bool = False):
        self.architecture = check_architecture(causal_lm.config, family, rewrites_block)
        inner = causal_lm.model
        for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
            if not hasattr(inner, attr):
                raise ValueError(
                    f"{type(causal_lm).__name__} has no model.{attr}: frozenvl supports decoder LLMs laid out like "
                    "Llama (model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head)"
                )
        self.causal_lm = causal_lm
        self.config = causal_lm.config
        self.embed_tokens: nn.Embedding = inner.embed_tokens
        self.layers: nn.ModuleList = inner.layers
        self.norm: nn.Module = inner.norm
        self.rotary_emb: nn.Module = inner.rotary_emb
        self.lm_head: nn.Module = causal_lm.get_output_embeddings()
        self.layer_types = layer_types(self.config)
        self.num_layers = len(self.layers)
        # Gemma2/3: the causal LM's forward caps the logits after the head; the family heads do it too.
        self.final_logit_softcapping: float | None = getattr(self.config, "final_logit_softcapping", None)
        # Gemma3: one rotary embedding per attention type (local and global rope bases).
        self.rotary_per_type = takes_parameter(type(self.rotary_emb).forward, "layer_type")

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the causal LM's forward does to the head's output (the same ops in the same order)."""
        cap = self.final_logit_softcapping
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def position_embeddings(self, h: torch.Tensor, position_ids: torch.Tensor, types: set[str]) -> dict[str, Any]:
        """(cos, sin) per attention type, computed as the base model's forward computes them."""
        if self.rotary_per_type:
            return {t: self.rotary_emb(h, position_ids, t) for t in sorted(types)}
        return dict.fromkeys(types, self.rotary_emb(h, position_ids))


def check_layer_indices(layers: list[int], num_layers: int, what: str, *, allow_empty: bool = False) -> list[int]:
    """`layers` sorted, or a ConfigError unless they are distinct decoder-layer indices (and not none)."""
    if any(not 0 <= i < num_layers for i in layers) or len(set(layers)) != len(layers) or not (layers or allow_empty):
        raise ConfigError(f"{what} layers {layers}: need distinct indices in [0, {num_layers - 1}]")
    return sorted(layers)


CACHE_STATE_ATTR = "frozenvl_state"


def cache_state(cache: DynamicCache) -> dict[str, Any]:
    """Family state kept on a KV cache object between the calls of one generation (visual prompts,
    media keys/values, ...), created empty on first use; keys are prefixed with the family's name."""
    state = getattr(cache, CACHE_STATE_ATTR, None)
    if state is None:
        state = {}
        setattr(cache, CACHE_STATE_ATTR, state)
    return state


@dataclass
class DecodeContext:
    """What every layer of one forward pass sees."""

    attention_mask: torch.Tensor  # [B, past + T] 1 = real token, 0 = padding
    position_ids: torch.Tensor  # [B, T]
    cache: DynamicCache | None
    image_mask: torch.Tensor | None = None  # [B, T] True at vision-token positions
    masks: dict[str, Any] = field(default_factory=dict)  # per attention type, built in `decode`
    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # per attention type
    state: dict[str, Any] = field(default_factory=dict)  # family-private per-call state

    @property
    def use_cache(self) -> bool:
        return self.cache is not None


class Family(nn.Module):
    """Base class of a family's per-workflow module: it owns exactly the workflow's trainable weights."""

    name: ClassVar[str]
    config_class: ClassVar[type[WorkflowConfig]] = WorkflowConfig
    uses_images: ClassVar[bool] = True
    # True for families whose layers run `decoder_block` / `self_attention` (the Llama block written
    # out): only architectures whose block is exactly that can take them.
    rewrites_block: ClassVar[bool] = False
    # True for families that read images by cross-attention (one `<image>` token in the sequence):
    # with `tiling`, an image's encoded tiles are joined into one medium (vision/tiling.TiledMedia)
    # instead of being laid out as tokens in the sequence.
    tiles_as_media: ClassVar[bool] = False

    gradient_checkpointing: bool = False  # recompute each layer in backward (frozen base layers included)
    layers_before: frozenset[int] = frozenset()
    layers_after: frozenset[int] = frozenset()
    layers_replaced: frozenset[int] = frozenset()

    def __init__(self, cfg: WorkflowConfig, llm: PreTrainedModel, vision_hidden: int | None):
        super().__init__()
        self.cfg = cfg
        parts = dict(family=self.name, rewrites_block=self.rewrites_block)
        if cfg.llm_train == "frozen":
            self.lm = LMParts(llm, **parts)
        elif cfg.llm_train == "full":
            # The LLaVA fine-tuned baseline: the workflow owns a full trainable copy of the LLM,
            # so `text` still runs the untouched original.
            LMParts(llm, **parts)  # refuse an unsupported base before copying it
            self.own_llm = copy.deepcopy(llm).requires_grad_(True)
            self.lm = LMParts(self.own_llm, **parts)
        else:  # lora
            LMParts(llm, **parts)
            self.own_llm = _lora_copy(llm, cfg)
            self.lm = LMParts(self.own_llm.base_model.model, **parts)
        self.connector = (
            build_connector(cfg.connector, vision_hidden, llm.config.hidden_size, dtype=llm.dtype)
            if self.uses_images and (vision_hidden is not None or takes_pixels(cfg.connector))
            else None
        )
        if cfg.location_tokens:
            # Location tokens' own rows: embeddings drawn around the base rows' mean at their spread (so
            # they start apart), head rows at the mean (every location equally likely at first).
            n = cfg.location_tokens
            self.loc_embed = nn.Parameter(mean_rows(self.lm.embed_tokens.weight, n, noise=1.0))
            self.loc_head = nn.Parameter(mean_rows(self.lm.lm_head.weight, n))
            self.register_buffer("loc_token_ids", torch.full((n,), -1, dtype=torch.long,
                                                             device=self.loc_embed.device), persistent=False)
            self._loc_ids: list[int] | None = None

    # ---- names a training stage can select -------------------------------------------------
    def parts(self) -> dict[str, list[nn.Parameter]]:
        """Named trainable parts (e.g. 'connector', 'adapter', 'llm'); every trainable parameter is in one."""
        parts: dict[str, list[nn.Parameter]] = {}
        if self.connector is not None:
            parts["connector"] = list(self.connector.parameters())
        if self.cfg.llm_train == "full":
            parts["llm"] = list(self.own_llm.parameters())
        elif self.cfg.llm_train == "lora":
            parts["llm"] = [p for n, p in self.own_llm.named_parameters() if "lora_" in n]
        if self.cfg.location_tokens:
            parts["location"] = [self.loc_embed, self.loc_head]
        return parts

    def owned_state_dict(self) -> dict[str, torch.Tensor]:
        """The workflow's own weights (every part, trainable now or not), without shared base weights."""
        owned = {id(p) for ps in self.parts().values() for p in ps}
        return {n: p.detach() for n, p in self.named_parameters() if id(p) in owned}

    # ---- tokens the family adds to the tokenizer ----------------------------------------------
    def extra_tokens(self) -> list[str]:
        """Special tokens the workflow adds to the model's tokenizer (its own embeddings and head rows)."""
        return []

    def set_token_ids(self, ids: list[int]) -> None:
        """The tokenizer ids `extra_tokens` got; called when the workflow is attached to a model."""

    def location_tokens(self) -> list[str]:
        """The workflow's location tokens (plain, not special: decoded text keeps them), or []."""
        return location_token_names(self.cfg.location_tokens) if self.cfg.location_tokens else []

    def set_location_ids(self, ids: list[int]) -> None:
        """The tokenizer ids `location_tokens` got; called when the workflow is attached to a model."""
        if len(ids) != self.cfg.location_tokens or len(set(ids)) != len(ids):
            raise ValueError(f"{len(ids)} distinct ids expected for {self.cfg.location_tokens} location tokens, got {ids}")
        self._loc_ids = list(ids)
        self.loc_token_ids = torch.tensor(ids, dtype=torch.long, device=self.loc_embed.device)

    def _location_ids(self) -> list[int]:
        if self._loc_ids is None:
            raise RuntimeError("location token ids are not set: attach the workflow to a model (or call set_location_ids)")
        return self._loc_ids

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings of `input_ids` (no image placeholders): the family's table, and the
        workflow's own rows for its location tokens."""
        table = self.embed_tokens()
        if not self.cfg.location_tokens:
            return table(input_ids)
        self._location_ids()
        return embed_with_rows(table, input_ids, self.loc_token_ids, self.loc_embed)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output logits of final hidden states: the family's head (`lm_head`), widened by the
        location tokens' columns where the workflow has them."""
        out = self.lm_head(h)
        if not self.cfg.location_tokens:
            return out
        ids = self._location_ids()
        # capped as the base caps its logits (Gemma2/3), like the head's own columns
        extra = self.lm.finish_logits(F.linear(h, self.loc_head.to(h.dtype)))
        return logits_with_rows(out, extra, ids, self.loc_token_ids)

    # ---- images -----------------------------------------------------------------------------
    def image_tokens_per_image(self, num_vision_tokens: int) -> int:
        """How many placeholder positions one image occupies in input_ids (0: images are not in the sequence)."""
        return self.connector.num_tokens(num_vision_tokens) if self.connector is not None else 0

    def max_frames(self) -> int:
        """Frames one medium may have (pixel_values [n, frames, 3, H, W]); 0: still images only."""
        return 0

    def encode_images(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [n_images, N, vis] -> what the family consumes (default: connector output)."""
        return self.connector(features.to(self.connector.linear_1.weight.dtype))

    # ---- the places a family acts ------------------------------------------------------------
    def embed_tokens(self) -> nn.Embedding:
        return self.lm.embed_tokens

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> torch.Tensor:
        is_image = input_ids == IMAGE_TOKEN_ID
        h = self.embed_text(input_ids.masked_fill(is_image, 0))
        if image_embeds is not None and image_embeds.shape[1] > 0:  # (a count of image tokens, not vision tokens)
            n_slots, n_given = int(is_image.sum()), image_embeds.shape[0] * image_embeds.shape[1]
            if n_slots != n_given:
                raise ValueError(
                    f"input has {n_slots} image-token positions but the {image_embeds.shape[0]} image(s) give "
                    f"{n_given} vision tokens ({image_embeds.shape[1]} each): one <image> per image is expected"
                )
            h = h.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(h.dtype))
        return h

    def before_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return h

    def after_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        return h

    def run_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """Layer `idx` (one of `layers_replaced`) as the family changes it; see `decoder_block`."""
        raise NotImplementedError(f"{type(self).__name__} lists layer {idx} in layers_replaced but has no run_layer")

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.norm(h)

    def lm_head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm.finish_logits(self.lm.lm_head(h))

    def extra_cache_layer_types(self) -> list[str]:
        """Attention types of cache entries the family adds after the base layers' ones."""
        return []

    # ---- the loop ----------------------------------------------------------------------------
    def new_cache(self) -> DynamicCache:
        cfg = copy.copy(self.lm.config)
        extra = self.extra_cache_layer_types()
        types = self.lm.layer_types + extra
        cfg.layer_types = types
        cfg.num_hidden_layers = len(types)
        return DynamicCache(config=cfg)

    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        """Run all decoder layers (with the family's additions) and the final norm."""
        mask_args = dict(config=self.lm.config, inputs_embeds=h, attention_mask=ctx.attention_mask,
                         position_ids=ctx.position_ids)
        needed = set(self.lm.layer_types) | set(self.extra_cache_layer_types())
        for kind, make_mask in (("full_attention", create_causal_mask),
                                ("sliding_attention", create_sliding_window_causal_mask)):
            if kind in needed:
                ctx.masks[kind] = make_mask(**mask_args, **{cache_kwarg(make_mask): ctx.cache})
        ctx.position_embeddings = self.lm.position_embeddings(h, ctx.position_ids, needed)
        # Checkpoint here rather than in HF's layers: those skip it in eval mode, where the frozen
        # base layers stay, yet their activations are what gradients to earlier adapters flow through.
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for idx in range(self.lm.num_layers):
            if recompute:
                h = torch.utils.checkpoint.checkpoint(self._layer_step, idx, h, ctx, use_reentrant=False)
            else:
                h = self._layer_step(idx, h, ctx)
        return self.final_norm(h)

    def _layer_step(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        if idx in self.layers_before:
            h = self.before_layer(idx, h, ctx)
        if idx in self.layers_replaced:
            h = self.run_layer(idx, h, ctx)
        else:
            h = call_layer(self.lm.layers[idx], h, ctx, self.lm.layer_types[idx])
        if idx in self.layers_after:
            h = self.after_layer(idx, h, ctx)
        return h


def call_layer(layer: nn.Module, h: torch.Tensor, ctx: DecodeContext, attn_type: str) -> torch.Tensor:
    """Call a HF decoder layer exactly as its own model's forward does (the cache under the name the
    installed transformers gives it)."""
    out = layer(
        h,
        attention_mask=ctx.masks[attn_type],
        position_embeddings=ctx.position_embeddings[attn_type],
        position_ids=ctx.position_ids,
        use_cache=ctx.use_cache,
        **{cache_kwarg(type(layer).forward): ctx.cache},
    )
    return out[0] if isinstance(out, tuple) else out


Projection = Callable[[str, torch.Tensor], torch.Tensor]  # (name: "q_proj" | ... | "o_proj", x) -> projected x

# Attention implementations that take values with a different head size than queries and keys;
# for the others (flash kernels) `self_attention` pads queries and keys with zero channels instead.
UNEQUAL_VALUE_DIM_OK = ("eager", "sdpa")


def self_attention(
    attn: nn.Module, x: torch.Tensor, ctx: DecodeContext, attn_type: str, *,
    project: Projection | None = None, extra_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """A HF Llama-style attention module's forward, up to (not including) `o_proj`.

    Returns (attention output [B, T, heads * head_dim], rotated query states [B, heads, T, head_dim])
    so that a family can add its own term in head space before `o_proj` (adaption prompts, bind,
    learners). Same ops in the same order as transformers' own forward: the result is bit-identical.

    `project(name, x)` replaces the q/k/v projections (visual_experts: per-token attention experts).

    `extra_values` [B, past + T, c] (aligned with `ctx.attention_mask`'s columns) are extra value
    channels, the same for every head: appended to the values after the cache update (so the cache
    never holds them), they come out of the attention kernel as each query's attention-weighted
    sum of them, returned as a third tensor [B, T, heads, c]. A channel that is 1 at some keys and 0
    elsewhere gives the attention mass on those keys without materialising the attention matrix
    (sdpa and flash kernels return no probabilities); the first output is then equal to the plain
    one up to the kernel's rounding. A decode step (one query per row) with eager or sdpa attention
    takes a cheaper road to the same numbers: the plain kernel for the output (bit for bit the
    base's), and the one row of scores per head it needs for the channels (`_attended_by_one_query`),
    since a wider value tensor would send sdpa to its slow math kernel and copy the values every step.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    if project is None:
        project = lambda name, t: getattr(attn, name)(t)  # noqa: E731  (the frozen projection)
    input_shape = x.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    q = project("q_proj", x).view(hidden_shape)
    k = project("k_proj", x).view(hidden_shape)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = project("v_proj", x).view(hidden_shape).transpose(1, 2)
    cos, sin = ctx.position_embeddings[attn_type]
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if ctx.cache is not None:
        k, v = ctx.cache.update(k, v, attn.layer_idx)
    implementation = attn.config._attn_implementation
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    kwargs = {"sliding_window": attn.sliding_window} if getattr(attn, "sliding_window", None) is not None else {}
    q_in, k_in = q, k
    one_query = extra_values is not None and q.shape[2] == 1 and implementation in UNEQUAL_VALUE_DIM_OK
    if extra_values is not None and not one_query:
        q_in, k_in, v = _with_value_channels(q, k, v, extra_values, implementation in UNEQUAL_VALUE_DIM_OK)
    out, _ = interface(
        attn, q_in, k_in, v, ctx.masks[attn_type],
        dropout=0.0 if not attn.training else attn.attention_dropout, scaling=attn.scaling, **kwargs,
    )
    if one_query:
        attended = _attended_by_one_query(q, k, extra_values, ctx.masks[attn_type], attn.scaling, ctx.state)
        return out.reshape(*input_shape, -1).contiguous(), q, attended
    if extra_values is None:
        return out.reshape(*input_shape, -1).contiguous(), q
    d, c = q.shape[-1], extra_values.shape[-1]
    return out[..., :d].reshape(*input_shape, -1).contiguous(), q, out[..., d : d + c]


def _attended_by_one_query(
    q: torch.Tensor, k: torch.Tensor, extra: torch.Tensor, mask: torch.Tensor | None, scaling: float,
    shared: dict[Any, Any] | None = None,
) -> torch.Tensor:
    """`extra` [B, >= S, c] attended by queries q [B, heads, T, d] over keys k [B, kv, S, d] (T small: a
    decode step), with the mask the eager / sdpa kernel got (bool: True = attend, or additive; None:
    every key): [B, T, heads, c]. Materialises T x S scores per head, which for one query is one row.
    What does not depend on the layer (the mask as an additive one, the channels) is made once per
    forward pass and kept in `shared` (the call's family state): a decode step is many tiny ops per layer."""
    bsz, heads, t, d = q.shape
    kv, keys = k.shape[1], k.shape[2]
    memo_key = ("one_query", id(mask), id(extra), t, keys)
    prepared = shared.get(memo_key) if shared is not None else None
    if prepared is None:
        add = None
        if mask is not None:
            mask = mask[:, :, -t:, :keys]  # as the kernels slice it (a longer mask than the cache's keys)
            add = (torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
                   .masked_fill_(~mask, torch.finfo(torch.float32).min) if mask.dtype == torch.bool else mask.float())
        prepared = (add, extra[:, -keys:].float().unsqueeze(1))  # channels [B, 1, S, c]
        if shared is not None:  # (the call's masks and extra values outlive it: their ids stay theirs)
            shared[memo_key] = prepared
    add, channels = prepared
    scores = torch.matmul(q.reshape(bsz, kv, heads // kv * t, d), k.transpose(-1, -2)).view(bsz, heads, t, keys)
    scores = scores.float() * scaling if add is None else torch.add(add, scores.float(), alpha=scaling)
    return torch.matmul(torch.softmax(scores, dim=-1), channels).to(q.dtype).transpose(1, 2)


def _with_value_channels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: torch.Tensor, unequal_ok: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values [B, kv, S, d] with `extra` [B, >= S, c] appended per head (its last S columns: a sliding
    window cache returns only the last keys); queries and keys padded with zero channels to the
    values' size (rounded up to 8) where the kernel needs equal sizes (the scores do not change)."""
    bsz, kv, keys, _ = v.shape
    if extra.shape[0] != bsz or extra.shape[1] < keys:
        raise ValueError(f"extra_values of shape {tuple(extra.shape)} for values of shape {tuple(v.shape)}")
    channels = extra[:, -keys:].to(v.dtype).unsqueeze(1).expand(bsz, kv, keys, extra.shape[-1])
    v = torch.cat([v, channels], dim=-1)
    if unequal_ok:
        return q, k, v
    size = -(-v.shape[-1] // 8) * 8
    pad = (0, size - q.shape[-1])
    return F.pad(q, pad), F.pad(k, pad), F.pad(v, (0, size - v.shape[-1]))


def decoder_block(
    layer: nn.Module,
    h: torch.Tensor,
    ctx: DecodeContext,
    attn_type: str,
    *,
    attn_extra: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    mlp: Callable[[torch.Tensor], torch.Tensor] | None = None,
    project: Projection | None = None,
    extra_values: torch.Tensor | None = None,
    after_attention: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A Llama-style decoder block written out, with the places families act inside it.

    `attn_extra(x_normed, attn_out, query_states)` returns the attention output to feed `o_proj`
    (in head space, e.g. `attn_out + gate * prompt_attention`); `mlp(x_normed)` replaces the MLP;
    `project(name, x)` replaces the q/k/v/o projections (visual_experts).
    `after_attention(h1, attended)` gets the stream after the attention residual and returns what
    goes into the post-attention norm and the MLP residual (Wings' learners); `attended` is
    `extra_values` attended by the main attention ([B, T, heads, c], see `self_attention`), or None.
    With none of them, the result is bit-identical to calling `layer` itself.
    """
    attn = layer.self_attn
    residual = h
    x = layer.input_layernorm(h)
    attended = None
    if extra_values is None:
        attn_out, q = self_attention(attn, x, ctx, attn_type, project=project)
    else:
        attn_out, q, attended = self_attention(attn, x, ctx, attn_type, project=project, extra_values=extra_values)
    if attn_extra is not None:
        attn_out = attn_extra(x, attn_out, q)
    h = residual + (project("o_proj", attn_out) if project is not None else attn.o_proj(attn_out))
    if after_attention is not None:
        h = after_attention(h, attended)
    residual = h
    x = layer.post_attention_layernorm(h)
    return residual + (mlp(x) if mlp is not None else layer.mlp(x))


def _lora_copy(llm: PreTrainedModel, cfg: WorkflowConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("llm_train: lora needs peft: pip install 'frozenvl[lora]'") from e
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    # LoRA wraps modules in place, so it goes on a copy of the module tree that shares (not copies)
    # the frozen base tensors: the memo maps each base parameter and buffer to itself.
    memo = {id(t): t for t in (*llm.parameters(), *llm.buffers())}
    return get_peft_model(copy.deepcopy(llm, memo), lora)
