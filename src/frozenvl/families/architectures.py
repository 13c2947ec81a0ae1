"""Which base architectures each family runs exactly, and what a transformers version calls things.

A family runs the base's own decoder layers (prefix, inner_adaptor, cross_attention) or writes the
Llama block out to act inside its attention or MLP (adaption_prompt, bind, wings, visual_experts:
`base.decoder_block`). Matching
attribute names is not enough for either: Gemma2's block has four norms and attention-logit
softcapping, OLMo2 normalises attention and MLP *outputs*, Phi3 fuses its projections. So every
architecture is listed here with what it supports, each entry backed by tests against the bare
base (tests/test_architectures.py, table in docs/architectures.md), and anything else is refused
when a workflow is built, with an error that names what is missing.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from ..config import ConfigError


@dataclass(frozen=True)
class Architecture:
    """What frozenvl knows about one `config.model_type`."""

    llama_block: bool  # the decoder layer is exactly `base.decoder_block` (attention-rewriting families run)
    why_not: str = ""  # what differs from the Llama block, when it does


LLAMA_BLOCK = Architecture(llama_block=True)

ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA_BLOCK,
    "qwen2": LLAMA_BLOCK,
    "qwen3": LLAMA_BLOCK,
    "mistral": LLAMA_BLOCK,
    "gemma": LLAMA_BLOCK,  # its embedding scale lives in the embedding module, its (1 + w) in the norms
    "gemma2": Architecture(False, "four norms per layer, attention-logit softcapping and query_pre_attn_scalar"),
    "gemma3_text": Architecture(False, "four norms per layer and a separate rotary embedding per attention type"),
    "olmo2": Architecture(False, "norms on the attention and MLP outputs and q/k norms over all heads at once"),
    "phi3": Architecture(False, "fused qkv_proj and gate_up_proj (no q_proj/k_proj/v_proj)"),
}

# Families that write the decoder block out (`base.decoder_block` / `base.self_attention`).
BLOCK_REWRITING = ("adaption_prompt", "bind", "wings", "visual_experts")


def check_architecture(config, family: str, rewrites_block: bool) -> Architecture:
    """The entry for `config`'s model type, or a ConfigError naming what `family` cannot run there."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ConfigError(
            f"base architecture {model_type!r} is not supported by frozenvl's families (tested: "
            f"{sorted(ARCHITECTURES)}); see docs/architectures.md"
        )
    if rewrites_block and not arch.llama_block:
        others = sorted({"prefix", "inner_adaptor", "cross_attention"})
        raise ConfigError(
            f"family {family!r} rewrites the Llama decoder block and is not supported on {model_type!r}: "
            f"{arch.why_not}. On {model_type!r} use one of {others}; see docs/architectures.md"
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"{model_type!r} with use_bidirectional_attention is an encoder, not a causal LM")
    return arch


# ---- names that differ between transformers versions, read off the installed one's signatures ----
CACHE_NAMES = ("cache", "past_key_values")  # 5.24 renamed past_key_values (removed in 5.40) to cache


@functools.cache
def cache_kwarg(fn: Callable) -> str:
    """The keyword under which `fn` (a HF forward or mask function) takes the KV cache.

    Read off the signature (through the deprecation shim's `__wrapped__`) rather than the version
    number: a HF layer's `**kwargs` would swallow a stale name silently, and the cache with it.
    """
    params = inspect.signature(fn).parameters
    for name in CACHE_NAMES:
        if name in params:
            return name
    raise TypeError(
        f"{getattr(fn, '__qualname__', fn)} takes none of {list(CACHE_NAMES)}: this transformers version's "
        "cache API is not supported by frozenvl"
    )


@functools.cache
def takes_parameter(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters
