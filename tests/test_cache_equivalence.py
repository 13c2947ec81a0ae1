"""Cached generation == full recomputation, per step and per logit, through generation.py's own loop,
for every family, on workflows whose greedy output is not one repeated token."""

from __future__ import annotations

import pytest

import frozenvl

from .conftest import assert_cache_matches_recompute, perturb

# Small but complete workflows of every family, with the perturbation (std, parts) that makes each one's
# greedy output non-degenerate on the tiny bases (checked by the assertion itself). cross_attention
# keeps its new tokens' rows at their init: perturbed, those logits win every step ([512] * 10).
WORKFLOWS = {
    "prefix": ({"family": "prefix"}, 0.2, None),
    "inner_adaptor": ({"family": "inner_adaptor", "layers": [0, 2]}, 0.3, None),
    "adaption_prompt": ({"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"}, 0.1,
                        None),
    "bind": ({"family": "bind"}, 0.1, None),
    "cross_attention": ({"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                         "resampler_heads": 2, "resampler_head_dim": 8}, 0.5, ["xattn", "resampler"]),
}
# A Llama-block base with grouped-query attention and a Gemma2 base (sliding window of 4 < the prompts,
# softcapped logits) for the families that run on it.
CELLS = [(f, "llama") for f in WORKFLOWS] + [(f, "gemma2") for f in ("prefix", "inner_adaptor", "cross_attention")]


@pytest.mark.parametrize("family,arch", CELLS)
def test_step_logits_of_the_cached_loop_equal_recomputation(bases, images, family, arch):
    llm, vis = bases(arch)
    workflow, scale, parts = WORKFLOWS[family]
    model = frozenvl.build(llm, vis, workflows={"mm": workflow})
    perturb(model, "mm", scale=scale, parts=parts)
    model.workflow("mm").cfg.text_fallback = False  # every row through the workflow's own cache
    # the tiny Gemma2 under cross-attention settles into a 2-token cycle in one row: still not one token
    assert_cache_matches_recompute(model, "mm", images, min_distinct=2 if (family, arch) == ("cross_attention", "gemma2") else 3)
