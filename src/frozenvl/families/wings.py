"""wings (Wings, NeurIPS 2024): low-rank visual and textual learners beside every attention block.

Images enter the sequence as in ``prefix`` (connector output at the image slots). In every chosen
layer (default all), after the main self-attention residual ``h1 = h + Attn(LN(h))``:

    h2 = h1 + w_v * visual(h1, image tokens) + w_t * textual(h1, text embeddings)

and then the layer's MLP block on ``h2``. Both learners are LoRRA (low-rank residual attention) with
the LLM's head count over the hidden size (their own head size ``hidden / heads``, whatever the LLM's
``head_dim`` and key/value heads): Q = h1 + B_q A_q h1, K = f + B_k A_k f, V = f + B_v A_v f,
output B_o A_o(softmax(QK^T / sqrt(d)) V), rank ``rank``; A truncated normal (std 0.02), B zero, so a
new workflow is the ``prefix`` workflow with the same connector. The key/value source f is the same
input-level sequence at every layer: the connector's image tokens for the visual learner, the text
tokens' input embeddings for the textual one. Both are causal over sequence positions (a token sees
the images and text at or before it; attending to later text would show the answers in training);
a token with nothing to attend to (no image yet, a row without images) gets no learner output.

Router: per token and layer, the main attention's mass on image keys, per head (an extra value
channel that is 1 at image keys: every attention kernel returns it exactly, no probabilities needed;
`base.self_attention(extra_values=...)`), goes through a small MLP (heads -> ``router_hidden`` -> SiLU -> 2,
last layer zero-initialised) and a softmax over two: (w_v, w_t). Nothing in it depends on the sequence
length (the release's Linear(4096, 2) over summed probabilities does).

Speed: a layer's two learners run as one (joined low-rank maps, see `_joined`), and a decode step
reads the image mass off its one row of scores instead of a wider value tensor
(`base.self_attention`); benchmarks/bench_wings.py measures both against prefix.

KV cache: the base cache holds only the base's keys and values. The learners' keys/values (the
images' once per generate call and layer; each text token's once, for every chosen layer at once since
their sources are the same input embeddings), which columns were image positions and which keys each
learner has are kept in the family's own state on the cache object (`cache_state`).

Training (examples/train_wings.yaml): stage 1 ``[connector, visual]``, stage 2 ``[visual, textual,
router]``, the base frozen; ``llm_train: full`` (add ``llm`` to stage 2) is the paper's stage 2 on
the workflow's own copy of the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, WorkflowConfig
from .base import DecodeContext, Family, cache_state, check_layer_indices, decoder_block

STATE_KEY = "wings"
INIT_STD = 0.02


@dataclass
class WingsConfig(WorkflowConfig):
    rank: int = 8  # rank of every low-rank map in both learners (the release's scripts use 64)
    layers: str | list[int] = "all"  # "all" or the decoder layer indices that get the learners
    router_hidden: int = 16  # width of the router's hidden layer; 0: one Linear(heads, 2)

    def validate(self) -> None:
        super().validate()
        if self.rank < 1:
            raise ConfigError(f"wings rank must be >= 1, got {self.rank}")
        if self.router_hidden < 0:
            raise ConfigError(f"wings router_hidden must be >= 0, got {self.router_hidden}")
        listed = isinstance(self.layers, list) and all(isinstance(i, int) for i in self.layers)
        if not (self.layers == "all" or listed):
            raise ConfigError(f"wings layers must be 'all' or a list of layer indices, got {self.layers!r}")


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype (a decode step runs this per layer: skip the call where it changes nothing)."""
    return x if x.dtype == dtype else x.to(dtype)


# A decode step is a few dozen tiny matmuls per layer on a small base, so their count, not their size,
# is the cost. Maps that read the same input run as one: their A matrices stacked into one matmul,
# their B matrices into one batched matmul (the visual and textual queries; a learner's keys and
# values), and the two learners' outputs leave through one matmul. The joined weights are kept
# between calls when nothing needs their gradient, rebuilt when any part changes (its version).
def _joined(owner: nn.Module, name: str, parts: tuple[torch.Tensor, ...], join) -> torch.Tensor:
    if torch.is_grad_enabled() and any(p.requires_grad for p in parts):
        return join(parts)  # training: through autograd to every part
    stamp = tuple((p.data_ptr(), p._version) for p in parts)
    store = owner.__dict__.setdefault("_joined_weights", {})
    hit = store.get(name)
    if hit is None or hit[0] != stamp:
        hit = store[name] = (stamp, join(parts))
    return hit[1]


def _stack_a(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(parts)  # A weights [r, d] each -> [n r, d]


def _stack_b(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.stack([b.t() for b in parts])  # B weights [d, r] each -> [n, r, d]


def _cat_columns(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat(parts, dim=1)  # B weights [d, r] each -> [d, n r]


def _heads_kv(kv: torch.Tensor, rows: torch.Size, heads: int) -> torch.Tensor:
    """Keys and values of n learners [2 n, B * S, hidden] (from `_residual_maps`, rows (B, S)) split into
    heads: [n, 2, B, heads, S, hidden / heads]."""
    return kv.view(-1, 2, *rows, heads, kv.shape[-1] // heads).transpose(3, 4)


def _keys_values_of(owner: nn.Module, name: str, learners: list[LoRRA], f: torch.Tensor) -> torch.Tensor:
    """Sources f [B, S, hidden] through the K and V maps of n learners at once (their A matrices in one
    matmul, their B matrices in one batched matmul; joined weights kept on `owner` under `name`):
    [n, 2, B, heads, S, hidden / heads]."""
    f = _as(f, learners[0].k.A.weight.dtype)
    a = _joined(owner, f"{name}.A", tuple(w for m in learners for w in (m.k.A.weight, m.v.A.weight)), _stack_a)
    b = _joined(owner, f"{name}.B", tuple(w for m in learners for w in (m.k.B.weight, m.v.B.weight)), _stack_b)
    return _heads_kv(_residual_maps(f.reshape(-1, f.shape[-1]), a, b), f.shape[:2], learners[0].heads)


def _residual_maps(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [N, d] through n maps x + B_i A_i x at once: a [n r, d], b [n, r, d] -> [n, N, d]."""
    n = b.shape[0]
    low = F.linear(x, a).view(x.shape[0], n, -1).transpose(0, 1)  # [n, N, r]
    return torch.baddbmm(x, low, b)


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class LowRank(nn.Module):
    """x -> B A x (rank r; A truncated normal std 0.02 cut at 2 std, B zero: starts as the zero map)."""

    def __init__(self, dim: int, rank: int, dtype: torch.dtype | None):
        super().__init__()
        self.A = nn.Linear(dim, rank, bias=False, dtype=dtype)
        self.B = nn.Linear(rank, dim, bias=False, dtype=dtype)
        with torch.no_grad():
            nn.init.trunc_normal_(self.A.weight, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
            nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))


class LoRRA(nn.Module):
    """Low-rank residual attention: queries from the stream, keys/values from a source sequence."""

    def __init__(self, hidden: int, heads: int, rank: int, dtype: torch.dtype | None):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"wings learners split the hidden size {hidden} into {heads} heads: not divisible")
        self.heads = heads
        self.q, self.k, self.v, self.o = (LowRank(hidden, rank, dtype) for _ in range(4))

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, n, hidden] -> [B, heads, n, hidden / heads]
        return x.view(*x.shape[:2], self.heads, -1).transpose(1, 2)

    def keys_values(self, f: torch.Tensor) -> torch.Tensor:
        """Sources f [B, n, hidden] -> keys and values stacked [2, B, heads, n, hidden / heads] (K and V
        maps as one)."""
        return _keys_values_of(self, "kv", [self], f)[0]

    def forward(self, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: Visibility) -> torch.Tensor:
        """h [B, T, hidden]; k, v [B, heads, S, d]; -> [B, T, hidden] (zero where nothing is visible).
        One learner on its own, as the definition reads; the family runs both learners of a layer at
        once (`WingsFamily.run_layer`), which equals the sum of these within rounding (a test)."""
        h = _as(h, self.q.A.weight.dtype)
        q = self._split(h + self.q(h))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible.mask)
        out = out.transpose(1, 2).reshape(h.shape) * _as(visible.any_key, out.dtype)
        return self.o(out)


class Router(nn.Module):
    """Per-head attention mass on image keys [B, T, heads] -> (w_v, w_t) [B, T, 2] (softmax over two)."""

    def __init__(self, heads: int, hidden: int, dtype: torch.dtype | None):
        super().__init__()
        self.heads = heads
        if hidden:
            # SiLU rather than erf-GELU: on a decode step's few values per layer the erf costs 6x more.
            self.net: nn.Module = nn.Sequential(nn.Linear(heads, hidden, dtype=dtype), nn.SiLU(),
                                                nn.Linear(hidden, 2, dtype=dtype))
            last = self.net[-1]
        else:
            self.net = last = nn.Linear(heads, 2, dtype=dtype)
        with torch.no_grad():  # (0.5, 0.5) for every token at the start
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)

    def forward(self, image_mass: torch.Tensor) -> torch.Tensor:
        # the layers called as functions: per decode step and layer, module calls cost more than the math
        if isinstance(self.net, nn.Linear):
            z = F.linear(_as(image_mass, self.net.weight.dtype), self.net.weight, self.net.bias)
        else:
            first, last = self.net[0], self.net[-1]
            z = F.linear(F.silu(F.linear(_as(image_mass, first.weight.dtype), first.weight, first.bias)),
                         last.weight, last.bias)
        return torch.softmax(z, dim=-1)


# ---------------------------------------------------------------------------------------------
# the learners' keys across the calls of one generation
# ---------------------------------------------------------------------------------------------
@dataclass
class KeyStore:
    """One learner kind's keys: their sequence columns, which are real, and their keys and values:
    per layer, or (text keys computed without autograd) every chosen layer's in one buffer."""

    cols: torch.Tensor  # [B, S] long, the column (cache position) of each key
    valid: torch.Tensor  # [B, S] bool
    kv: dict[int, GrowingKV] = field(default_factory=dict)  # layer -> [2, B, heads, S, d]
    every_layer: GrowingKV | None = None  # [layers, 2, B, heads, S, d], the chosen layers in order


class GrowingKV:
    """Stacked keys and values [..., n, d] appended along n into a buffer that doubles when full: a
    decode step copies only its own keys (torch.cat would copy every earlier key at every step)."""

    def __init__(self, kv: torch.Tensor):
        self._buf, self.length = kv, kv.shape[-2]

    def append(self, kv: torch.Tensor) -> None:
        end = self.length + kv.shape[-2]
        if end > self._buf.shape[-2]:
            buf = self._buf
            grown = buf.new_empty(*buf.shape[:-2], max(end, 2 * buf.shape[-2]), buf.shape[-1])
            grown[..., : self.length, :] = buf[..., : self.length, :]
            self._buf = grown
        self._buf[..., self.length : end, :] = kv
        self.length = end

    def get(self) -> torch.Tensor:
        return self._buf[..., : self.length, :]


def _kept(buffer: GrowingKV | None, kv: torch.Tensor) -> GrowingKV:
    """`kv` appended to `buffer` (generation only: no autograd through a cache, written in place), or
    the first call's buffer."""
    if buffer is None:
        return GrowingKV(kv)
    buffer.append(kv)
    return buffer


@dataclass
class Visibility:
    """Which keys each query of the call sees: causal (key column <= query column) and real."""

    mask: torch.Tensor  # [B, 1, T, S] bool for sdpa; rows that see nothing are all True (and zeroed)
    any_key: torch.Tensor  # [B, T, 1] bool, True where the query sees at least one key

    @classmethod
    def of(cls, store: KeyStore, query_cols: torch.Tensor) -> Visibility:
        seen = store.valid[:, None, :] & (store.cols[:, None, :] <= query_cols[None, :, None])  # [B, T, S]
        any_key = seen.any(-1, keepdim=True)
        # sdpa gives NaN for a row without any allowed key: let such rows see everything, then zero them.
        return cls(mask=(seen | ~any_key).unsqueeze(1), any_key=any_key)


@dataclass
class CallState:
    """What every chosen layer of one forward pass needs."""

    text_new: torch.Tensor  # [B, n, hidden] this call's text sources
    text_kv: torch.Tensor | None  # [layers, 2, B, heads, S, d] every layer's text keys (None: per layer)
    visual_new: torch.Tensor | None  # [B, m, hidden] this call's image tokens (None: the call has none)
    text: KeyStore
    visual: KeyStore | None  # None: the sequence has no image at all (the visual learner is skipped)
    text_visible: Visibility
    visual_visible: Visibility | None
    image_keys: torch.Tensor | None  # [B, past + T, 1] 1 at image columns (the router's value channel)
    reach: torch.Tensor  # [B, T, 2] bool: the (visual, textual) learner sees a key (else it adds nothing)
    cached: bool


def _select(h: torch.Tensor, chosen: torch.Tensor, first_col: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `chosen` positions [B, T] of h [B, T, d], packed to the left per row: (sources [B, n, d],
    columns [B, n], valid [B, n]) with n the largest count of a row."""
    counts = chosen.sum(1)
    n = int(counts.max()) if chosen.numel() else 0
    order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :n]  # chosen positions first
    f = h.gather(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
    valid = torch.arange(n, device=h.device)[None, :] < counts[:, None]
    return f, order + first_col, valid


def _extend(store: KeyStore | None, cols: torch.Tensor, valid: torch.Tensor) -> KeyStore:
    if store is None:
        return KeyStore(cols, valid)
    return KeyStore(torch.cat([store.cols, cols], 1), torch.cat([store.valid, valid], 1), store.kv, store.every_layer)


# ---------------------------------------------------------------------------------------------
# the family
# ---------------------------------------------------------------------------------------------
class WingsFamily(Family):
    name = "wings"
    config_class = WingsConfig
    rewrites_block = True  # runs base.decoder_block: Llama-block architectures only

    def __init__(self, cfg: WingsConfig, llm, vision_hidden: int | None):
        super().__init__(cfg, llm, vision_hidden)
        if self.connector is None:
            raise ConfigError("wings needs a vision encoder (its visual learner reads the connector's image tokens)")
        n = self.lm.num_layers
        self.chosen = check_layer_indices(list(range(n)) if cfg.layers == "all" else list(cfg.layers), n, "wings")
        self.layers_replaced = frozenset(self.chosen)
        conf, dtype = self.lm.config, llm.dtype
        hidden, heads = conf.hidden_size, conf.num_attention_heads
        self.visual = nn.ModuleDict({str(i): LoRRA(hidden, heads, cfg.rank, dtype) for i in self.chosen})
        self.textual = nn.ModuleDict({str(i): LoRRA(hidden, heads, cfg.rank, dtype) for i in self.chosen})
        self.router = nn.ModuleDict({str(i): Router(heads, cfg.router_hidden, dtype) for i in self.chosen})
        self._position = {idx: pos for pos, idx in enumerate(self.chosen)}  # layer -> its row in text_kv

    def parts(self) -> dict[str, list[nn.Parameter]]:
        parts = super().parts()
        parts["visual"] = list(self.visual.parameters())
        parts["textual"] = list(self.textual.parameters())
        parts["router"] = list(self.router.parameters())
        return parts

    # ---- per call ---------------------------------------------------------------------------------
    def decode(self, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        ctx.state[STATE_KEY] = self._prepare(h, ctx)
        return super().decode(h, ctx)

    def _prepare(self, h: torch.Tensor, ctx: DecodeContext) -> CallState:
        """This call's learner sources and key bookkeeping, continued from the cache's family state."""
        bsz, length = h.shape[:2]
        total = ctx.attention_mask.shape[1]
        past = total - length
        store: dict[str, Any] = cache_state(ctx.cache).setdefault(STATE_KEY, {}) if ctx.cache is not None else {}
        image_cols = store.get("image_cols")
        if (image_cols.shape[1] if image_cols is not None else 0) != past:
            raise ValueError(
                f"wings: the cache holds {0 if image_cols is None else image_cols.shape[1]} positions of this "
                f"workflow but the attention mask says {past} came before: give the cache this workflow made"
            )
        is_image = ctx.image_mask if ctx.image_mask is not None else torch.zeros_like(ctx.position_ids, dtype=torch.bool)
        embeds = ctx.state.get("image_embeds")
        call_has_images = embeds is not None and embeds.shape[0] > 0
        real = ctx.attention_mask[:, past:].bool()
        query_cols = torch.arange(past, total, device=h.device)

        # Text keys: this call's text tokens. Packed when the call has image slots (prompts; their
        # image tokens are no text keys); decode steps take their tokens as they are (no host sync).
        if call_has_images:
            text_new, cols, valid = _select(h, real & ~is_image, past)
        else:
            text_new, cols, valid = h, query_cols.expand(bsz, -1), real & ~is_image
        earlier = store.get("text")
        text = _extend(earlier, cols, valid)
        # Every layer's text keys at once (one pair of matmuls, one append) where nothing needs their
        # gradient; with autograd per layer, so that gradient checkpointing recomputes them per layer.
        # A cache keeps the road its first call took.
        at_once = earlier.every_layer is not None if earlier is not None else not torch.is_grad_enabled()
        text_kv = self._text_keys_values(text_new) if at_once else None
        if at_once and ctx.cache is not None:
            text.every_layer = _kept(text.every_layer, text_kv)
            text_kv = text.every_layer.get()

        visual, visual_new = store.get("visual"), None
        if call_has_images:
            visual_new, cols, valid = _select(h, is_image & real, past)
            visual = _extend(visual, cols, valid)

        image_cols = is_image if image_cols is None else torch.cat([image_cols, is_image], 1)
        if ctx.cache is not None:
            store.update(image_cols=image_cols, text=text, visual=visual)
        text_visible = Visibility.of(text, query_cols)
        visual_visible = Visibility.of(visual, query_cols) if visual is not None else None
        sees_image = visual_visible.any_key if visual_visible is not None else torch.zeros_like(text_visible.any_key)
        return CallState(
            text_new=text_new,
            text_kv=text_kv,
            visual_new=visual_new,
            text=text,
            visual=visual,
            text_visible=text_visible,
            visual_visible=visual_visible,
            image_keys=image_cols.unsqueeze(-1).to(h.dtype) if visual is not None else None,
            reach=torch.cat([sees_image, text_visible.any_key], -1),
            cached=ctx.cache is not None,
        )

    # ---- per layer --------------------------------------------------------------------------------
    def run_layer(self, idx: int, h: torch.Tensor, ctx: DecodeContext) -> torch.Tensor:
        st: CallState = ctx.state[STATE_KEY]
        key = str(idx)
        visual, textual, router = self.visual[key], self.textual[key], self.router[key]

        def learners(h1: torch.Tensor, attended: torch.Tensor | None) -> torch.Tensor:
            """h1 + w_v * visual(h1) + w_t * textual(h1), both learners at once (see `_joined`)."""
            # attended [B, T, heads, 1]: the main attention's mass on image keys, per head
            mass = attended[..., 0] if attended is not None else h1.new_zeros(*h1.shape[:2], router.heads)
            w = router(mass) * st.reach  # [B, T, 2]; 0 for a learner that sees no key
            x = _as(h1, textual.q.A.weight.dtype).reshape(-1, h1.shape[-1])  # [N, hidden]
            q = _residual_maps(x, _joined(self, f"{key}.q.A", (visual.q.A.weight, textual.q.A.weight), _stack_a),
                               _joined(self, f"{key}.q.B", (visual.q.B.weight, textual.q.B.weight), _stack_b))
            q = q.view(2, *h1.shape[:2], router.heads, -1).transpose(2, 3)  # [2, B, heads, T, d]
            if st.text_kv is not None:
                k, v = st.text_kv[self._position[idx]]
            else:
                k, v = self._keys_values(idx, textual, st.text, st.text_new, st.cached)
            outs = [F.scaled_dot_product_attention(q[1], k, v, attn_mask=st.text_visible.mask)]
            if st.visual is not None:
                k, v = self._keys_values(idx, visual, st.visual, st.visual_new, st.cached)
                outs.insert(0, F.scaled_dot_product_attention(q[0], k, v, attn_mask=st.visual_visible.mask))
            else:
                w = w[..., 1:]
            n = len(outs)
            o = torch.stack(outs).transpose(2, 3).reshape(n, x.shape[0], -1)  # [n, N, hidden]
            o_a = _joined(self, f"{key}.o.A", (visual.o.A.weight, textual.o.A.weight), _stack_b)[-n:]  # [n, hidden, r]
            o_b = _joined(self, f"{key}.o.B", (visual.o.B.weight, textual.o.B.weight), _cat_columns)  # [hidden, 2 r]
            low = torch.bmm(o, o_a) * w.reshape(-1, n).t().unsqueeze(-1)  # [n, N, r], weighted
            delta = F.linear(low.transpose(0, 1).reshape(x.shape[0], -1), o_b[:, -low.shape[-1] * n:])
            return h1 + _as(delta.view(h1.shape), h1.dtype)

        return decoder_block(self.lm.layers[idx], h, ctx, self.lm.layer_types[idx],
                             extra_values=st.image_keys, after_attention=learners)

    def _text_keys_values(self, f: torch.Tensor) -> torch.Tensor:
        """Text sources f [B, n, hidden] -> every chosen layer's textual keys and values, in one stacked
        A matmul and one batched B matmul (the sources are the same at every layer):
        [layers, 2, B, heads, n, d]. Equal to each layer's `LoRRA.keys_values` within rounding."""
        return _keys_values_of(self, "text.kv", [self.textual[str(i)] for i in self.chosen], f)

    @staticmethod
    def _keys_values(idx: int, learner: LoRRA, store: KeyStore, new: torch.Tensor | None,
                     cached: bool) -> torch.Tensor:
        """Layer idx's keys and values [2, B, heads, S, d] of all of the store's keys: the earlier calls'
        from the cache state, this call's computed now (once) and, with a cache, kept there for the calls
        that follow."""
        past = store.kv.get(idx)
        if new is None:
            return past.get()
        kv = learner.keys_values(new)
        if not cached:
            return kv
        store.kv[idx] = _kept(past, kv)
        return store.kv[idx].get()
