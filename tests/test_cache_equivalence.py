"""Cached generation == full recomputation, per step and per logit, through generation.py's own loop,
for every family, on workflows whose greedy output is not one repeated token."""

from __future__ import annotations

import pytest

import frozenvl
from frozenvl.tiny import build_llm

from .conftest import assert_cache_matches_recompute, perturb

# Small but complete workflows of every family, with the perturbation (std, parts) that makes each one's
# greedy output non-degenerate on the tiny bases (checked by the assertion itself). cross_attention
# keeps its new tokens' rows at their init: perturbed, those logits win every step ([512] * 10).
WORKFLOWS = {
    "prefix": ({"family": "prefix"}, 0.1, None),
    "inner_adaptor": ({"family": "inner_adaptor", "layers": [0, 2]}, 0.2, None),
    "adaption_prompt": ({"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"}, 0.1,
                        None),
    "bind": ({"family": "bind"}, 0.1, None),
    "cross_attention": ({"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                         "resampler_heads": 2, "resampler_head_dim": 8}, 0.1, ["xattn", "resampler"]),
    "cross_attention_idefics": ({"family": "cross_attention", "style": "idefics", "gate_type": "vector", "qk_norm": True,
                                 "every": 1, "resampler_depth": 1, "resampler_latents": 4, "resampler_heads": 2,
                                 "resampler_head_dim": 8}, 0.1, ["xattn", "resampler"]),
    # the demo's recipe: cross-attention over the raw patch features, no resampler
    "cross_attention_raw": ({"family": "cross_attention", "every": 1, "resampler": False}, 0.1, ["xattn"]),
    "visual_experts": ({"family": "visual_experts", "connector": "monolithic:size=56", "attention_experts": True},
                       0.1, None),
}
# A Llama-block base with grouped-query attention and a Gemma2 base (sliding window of 4 < the prompts,
# softcapped logits) for the families that run on it.
CELLS = [(f, "llama") for f in WORKFLOWS] + [(f, "gemma2") for f in ("prefix", "inner_adaptor", "cross_attention")]


@pytest.fixture(scope="module")
def sharp_bases(bases, tmp_path_factory):
    """The tiny bases re-initialised with std 0.2 instead of 0.02: at 0.02 attention is almost uniform,
    so a decode step at the wrong position moves the logits by only ~1e-4 (about the tolerance)."""
    built = {}

    def get(arch):
        if arch not in built:
            llm_dir, vis = bases(arch)
            out = tmp_path_factory.mktemp(f"sharp-{arch}")
            built[arch] = build_llm(out, arch=arch, tokenizer_dir=llm_dir, initializer_range=0.2), vis
        return built[arch]

    return get


@pytest.mark.parametrize("family,arch", CELLS)
def test_step_logits_of_the_cached_loop_equal_recomputation(sharp_bases, images, family, arch):
    llm, vis = sharp_bases(arch)
    workflow, scale, parts = WORKFLOWS[family]
    model = frozenvl.build(llm, vis, workflows={"mm": workflow})
    perturb(model, "mm", scale=scale, parts=parts)
    model.workflow("mm").cfg.text_fallback = False  # every row through the workflow's own cache
    assert_cache_matches_recompute(model, "mm", images, min_distinct=4)
