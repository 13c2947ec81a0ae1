"""bind (ImageBind-LLM): identity at init, the gated visual vector, cached decoding, frozen base,
checkpoints, and the visual cache's math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import frozenvl
from frozenvl.config import ConfigError
from frozenvl.families.bind import blend_with_bank, build_feature_bank, load_feature_bank

from .conftest import (
    assert_gradients_only_in_workflow,
    batch_inputs,
    perturb,
)

BIND = {"family": "bind"}


def _text(inputs):
    return {k: v for k, v in inputs.items() if k != "pixel_values"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_init_is_the_base_bit_for_bit(bases, images, arch):
    llm, vis = bases(arch)
    model = frozenvl.build(llm, vis, workflows={"mm": BIND})
    prompts = ["<image>\nwhat colour is it", "<image> a red square"]
    with_images = batch_inputs(model, "mm", prompts, [[images[0]], [images[1]]])
    text_only = batch_inputs(model, "mm", ["what colour is it", "a red square left of"], None)
    with torch.no_grad():
        for inputs in (with_images, text_only):
            assert torch.equal(model(**inputs, task="mm").logits, model(**_text(inputs), task="text").logits)
        perturb(model, "mm", scale=0.3)
        assert not torch.equal(model(**with_images, task="mm").logits, model(**_text(with_images), task="text").logits)


def test_added_term_matches_hand_computation(bases, images):
    """Layer 0's attention output gets tanh(gate) * v_proj(bind vector + prompt) per head, at every token."""
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": {**BIND, "layers": [0], "gate_init": 0.7}})
    family = model.workflow("mm")
    inputs = batch_inputs(model, "mm", "<image> what is", [images[0]])
    attn = model.llm.model.layers[0].self_attn
    captured = []
    hook = attn.o_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            model(**inputs, task="mm")
            model(**_text(inputs), task="text")
    finally:
        hook.remove()
    ours, base = captured  # o_proj inputs of layer 0 (whose input is the same token embeddings)
    heads = model.llm.config.num_attention_heads
    with torch.no_grad():
        vec = model._image_embeds("mm", inputs["pixel_values"])[:, 0]
        v = attn.v_proj(vec + family.prompt["0"]).view(-1, attn.head_dim)  # [kv, d]
        v = v[torch.arange(heads) // (heads // v.shape[0])]
        expected = (torch.tanh(family.gate["0"])[:, None] * v).reshape(-1)
    torch.testing.assert_close(ours - base, expected.expand_as(ours), atol=1e-6, rtol=1e-5)


def test_gradients_reach_only_the_workflow(bases, images):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": BIND, "other": BIND})
    family = model.workflow("mm")
    assert set(family.parts()) == {"bind", "prompt", "gate"}
    assert sum(p.numel() for p in model.trainable_parameters("mm")) == sum(p.numel() for p in family.parameters())
    perturb(model, "mm", scale=0.3)
    assert_gradients_only_in_workflow(model, "mm", "other", images)


def test_save_load_round_trip(bases, images, tmp_path):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": {**BIND, "layers": [1, 3], "bind_blocks": 2}})
    perturb(model, "mm", scale=0.3)
    model.save_pretrained(tmp_path)
    loaded = frozenvl.load(tmp_path)
    inputs = model.prepare_inputs("<image> what is it", [images[1]], task="mm")
    with torch.no_grad():
        assert torch.equal(model(**inputs, task="mm").logits, loaded(**inputs, task="mm").logits)


# --------------------------------------------------------------------------- the visual cache
def test_blend_with_bank_by_hand():
    query = torch.tensor([[1.0, 0.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    # top-2 neighbours: rows 0 (sim 1) and 2 (sim 0.6); weights softmax(20 * [1, 0.6])
    w0 = 1.0 / (1.0 + math.exp(-8.0))
    w2 = 1.0 - w0
    retrieved = torch.tensor([w0 * 1.0 + w2 * 0.6, w2 * 0.8, 0.0])
    blended = 0.5 * query[0] + 0.5 * retrieved
    expected = blended / blended.norm()
    got = blend_with_bank(query, bank, topk=2, temperature=20.0, ratio=0.5)
    torch.testing.assert_close(got[0], expected, atol=1e-7, rtol=1e-6)
    # the query normalised first, bank rows too; top-k larger than the bank uses the whole bank
    got_all = blend_with_bank(3 * query, 2 * bank, topk=10, temperature=1.0, ratio=1.0)
    sims = torch.tensor([1.0, 0.0, 0.6, 0.0])
    w = torch.softmax(sims, 0)
    r = (w[:, None] * bank).sum(0)
    torch.testing.assert_close(got_all[0], r / r.norm(), atol=1e-7, rtol=1e-6)
    # a bank holding only the query leaves it unchanged; ratio 0 too
    torch.testing.assert_close(blend_with_bank(query, query, topk=3), query)
    q2 = F.normalize(torch.randn(2, 3), dim=-1)
    torch.testing.assert_close(blend_with_bank(q2, bank, ratio=0.0), q2)


def test_feature_bank_and_visual_cache(bases, images, tmp_path):
    llm, vis = bases()
    model = frozenvl.build(llm, vis, workflows={"mm": BIND})
    folder = tmp_path / "bank"
    folder.mkdir()
    for k, img in enumerate(images):
        img.save(folder / f"{k}.png")
    bank = build_feature_bank(model, "mm", folder, batch_size=2, out=tmp_path / "bank.safetensors")
    assert bank.shape == (len(images), model.vision.hidden_size) and bank.dtype == torch.float32
    torch.testing.assert_close(bank.norm(dim=-1), torch.ones(len(images)))
    torch.testing.assert_close(build_feature_bank(model, "mm", images), bank)
    assert torch.equal(load_feature_bank(tmp_path / "bank.safetensors"), bank)

    # a workflow using that bank file: encode_images = bind(blend(global feature)) in eval mode only
    model.add_workflow("cached", {**BIND, "visual_cache": True, "cache_bank": str(tmp_path / "bank.safetensors"),
                                  "cache_topk": 2})
    cached = model.workflow("cached")
    cached.bind.load_state_dict(model.workflow("mm").bind.state_dict())
    pixels = model.pixel_values([images[0]], "cached")
    feats = model.vision(pixels, select_layer=-2)
    with torch.no_grad():
        g = cached.global_embedding(feats)
        expected = cached.bind(blend_with_bank(g, bank, topk=2, temperature=20.0, ratio=0.5))
        assert torch.equal(cached.encode_images(feats)[:, 0], expected)
        assert not torch.equal(cached.encode_images(feats), model.workflow("mm").encode_images(feats))
    cached.train()  # a training step (train mode, gradients on) never uses the cache
    assert torch.equal(cached.encode_images(feats), model.workflow("mm").encode_images(feats))
    with torch.no_grad():
        assert torch.equal(cached.encode_images(feats)[:, 0], expected)  # generation: no gradients
        cached.eval()
        cached.set_feature_bank(None)
        with pytest.raises(ValueError, match="no feature bank"):
            cached.encode_images(feats)


def test_config_errors(bases):
    llm, vis = bases()
    for extra, word in [({"layers": [0, 9]}, "layers"), ({"layers": "some"}, "layers"), ({"pool": "max"}, "pool"),
                        ({"pool": "cls"}, "keep_cls"), ({"llm_train": "full"}, "frozen")]:
        with pytest.raises(ConfigError, match=word):
            frozenvl.build(llm, vis, workflows={"mm": {**BIND, **extra}})
