"""Token-reducing connectors: InternVL's pixel shuffle and average pooling, alone and end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import frozenvl
from frozenvl.config import ConfigError, parse_workflow
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.vision.connectors import (
    AvgPoolConnector,
    MLPConnector,
    PixelShuffleConnector,
    build_connector,
    check_connector_name,
    pixel_shuffle,
)


def _internvl_layout(x: torch.Tensor, side: int) -> torch.Tensor:
    """InternVL's extract_feature + pixel_shuffle(scale 0.5, ps_version v2), written out step by step.

    tokens [n, side*side, C] -> grid [n, h, w, C] -> view (n, h, w/2, 2C) -> permute -> view
    (n, w/2, h/2, 4C) -> permute back -> [n, (side/2)^2, 4C].
    """
    n, _, c = x.shape
    g = x.reshape(n, side, side, c)
    g = g.view(n, side, side // 2, 2 * c)
    g = g.permute(0, 2, 1, 3).contiguous()
    g = g.view(n, side // 2, side // 2, 4 * c)
    g = g.permute(0, 2, 1, 3).contiguous()
    return g.reshape(n, -1, 4 * c)


def _features(n: int = 2, side: int = 4, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, side * side, c, generator=torch.Generator().manual_seed(seed))


def test_pixel_shuffle_matches_internvl_layout():
    x = _features(n=2, side=6, c=5)  # non-symmetric: random values, C odd, 2 images
    got = pixel_shuffle(x, 2)
    assert got.shape == (2, 9, 20)
    assert torch.equal(got, _internvl_layout(x, 6))
    # Spelled out: merged token (i, j) holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    grid = x.reshape(2, 6, 6, 5)
    i, j = 1, 2
    token = got[:, i * 3 + j]
    expected = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1],
                          grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    assert torch.equal(token, expected)


def test_pixel_shuffle_matches_transformers_internvl():
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    x = _features(n=3, side=8, c=4, seed=1)
    ref = internvl.InternVLModel.pixel_shuffle(None, x.reshape(3, 8, 8, 4), scale_factor=0.5)
    assert torch.equal(pixel_shuffle(x, 2), ref.reshape(3, -1, 16))


def test_pixel_shuffle_factor_3_and_avg_pool_reference():
    x = _features(n=2, side=6, c=3, seed=2)
    grid = x.reshape(2, 6, 6, 3)
    got = pixel_shuffle(x, 3)
    assert got.shape == (2, 4, 27)
    block = grid[:, 3:6, 0:3].reshape(2, 27)  # token (1, 0): rows 3-5, cols 0-2, row-major
    assert torch.equal(got[:, 2], block)

    pool = build_connector("avg_pool", 3, 8)
    assert isinstance(pool, AvgPoolConnector)
    with torch.no_grad():
        ref = F.avg_pool2d(grid.permute(0, 3, 1, 2), 2).flatten(2).transpose(1, 2)  # [2, 9, 3]
        mlp = MLPConnector(3, 8, 2)
        mlp.load_state_dict(pool.state_dict())
        torch.testing.assert_close(pool(x), mlp(ref), atol=1e-6, rtol=0)


def test_names_options_and_token_counts():
    shuffle = build_connector("pixel_shuffle", 32, 64)
    assert isinstance(shuffle, PixelShuffleConnector) and shuffle.factor == 2
    assert [n for n, _ in shuffle.named_children()] == ["linear_1", "linear_2", "act", "layer_norm"]
    assert shuffle.linear_1.in_features == 128 and shuffle.layer_norm.normalized_shape == (128,)
    assert shuffle.num_tokens(256) == 64 and shuffle.num_tokens(16) == 4
    assert build_connector("pixel_shuffle:factor=4", 32, 64).num_tokens(256) == 16
    one = build_connector("avg_pool:factor=2,depth=1", 32, 64)
    assert one.depth == 1 and one.num_tokens(576) == 144
    with pytest.raises(ValueError, match="257 tokens, not a square.*keep_cls"):
        shuffle.num_tokens(257)
    with pytest.raises(ValueError, match="5x5 patch grid is not divisible by factor 2"):
        shuffle.num_tokens(25)
    with pytest.raises(ValueError, match="not divisible by factor 4"):
        build_connector("pixel_shuffle:factor=4", 32, 64)(torch.zeros(1, 36, 32))
    for bad in ("pixel_shuffle:factor=0", "pixel_shuffle:size=2", "avg_pool:factor=two", "pixel_shuffle:2"):
        with pytest.raises(ValueError, match="bad option"):
            check_connector_name(bad)
    with pytest.raises(ValueError, match="unknown connector.*pixel_shuffle"):
        check_connector_name("pixelshuffle")
    with pytest.raises(ValueError, match=r"\[n_images, N, C\].*adaption_prompt"):
        shuffle(torch.zeros(2, 32))  # a pooled vector per image


@pytest.mark.parametrize("family", ["bind", "cross_attention", "adaption_prompt"])
def test_families_without_a_token_grid_connector_refuse_it(family):
    with pytest.raises(ConfigError, match=f"merges patch tokens, but {family}"):
        parse_workflow("mm", {"family": family, "connector": "pixel_shuffle"})
    parse_workflow("mm", {"family": family, "connector": "linear"})  # unchanged


@pytest.mark.parametrize("vision", ["clip", "dinov2_registers"])
def test_reduced_tokens_end_to_end_and_training(bases, images, vision):
    """4x4 patches -> 2x2 tokens per image in prefix and inner_adaptor; the step trains the connector."""
    llm, vdir = bases("llama", vision)
    workflows = {
        "ps": {"family": "prefix", "connector": "pixel_shuffle"},
        "pool": {"family": "prefix", "connector": "avg_pool"},
        "iaa": {"family": "inner_adaptor", "layers": [0, 1], "connector": "pixel_shuffle"},
        "full": {"family": "prefix"},
    }
    model = frozenvl.build(llm, vdir, workflows=workflows)
    assert [model.tokens_per_image(t) for t in workflows] == [4, 4, 4, 16]
    for task in ("ps", "pool", "iaa"):
        inputs = model.prepare_inputs(["<image>\nwhat shape", "<image> and <image> differ"],
                                      [[images[0]], images[1:3]], task=task)
        assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * 4
        full = model.prepare_inputs(["<image>\nwhat shape"], [[images[0]]], task="full")["input_ids"]
        one = model.prepare_inputs(["<image>\nwhat shape"], [[images[0]]], task=task)["input_ids"]
        assert full.shape[1] - one.shape[1] == 16 - 4  # the sequence really is shorter
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        connector = model.workflows[task].connector
        before = {n: p.detach().clone() for n, p in connector.named_parameters()}
        opt = torch.optim.AdamW(model.trainable_parameters(task), lr=1e-2)
        model.train()
        out = model(**inputs, labels=labels, task=task)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        out.loss.backward()
        opt.step()
        assert all(not torch.equal(before[n], p) for n, p in connector.named_parameters()), task
    model.eval()
    cached = model.generate(prompt="<image>\nwhat", images=[images[0]], task="ps", max_new_tokens=4, eos_token_id=[])
    full = model.generate(prompt="<image>\nwhat", images=[images[0]], task="ps", max_new_tokens=4, eos_token_id=[],
                          use_cache=False)
    assert torch.equal(cached, full)


def test_keep_cls_with_pixel_shuffle_is_a_clear_error(bases, images):
    llm, vdir = bases("llama", "dinov2")
    model = frozenvl.build(llm, vdir, workflows={"mm": {"family": "prefix", "connector": "pixel_shuffle",
                                                        "keep_cls": True}})
    with pytest.raises(ValueError, match="17 tokens, not a square.*keep_cls: false"):
        model.prepare_inputs(["<image>\nhi"], [[images[0]]], task="mm")


def test_pixel_shuffle_workflow_saves_and_loads(bases, images, tmp_path):
    from .conftest import perturb

    llm, vdir = bases("llama", "dinov2")
    model = frozenvl.build(llm, vdir, workflows={"mm": {"family": "prefix", "connector": "pixel_shuffle:factor=2"}})
    perturb(model, "mm")
    model.save_pretrained(tmp_path / "saved")
    again = frozenvl.load(tmp_path / "saved")
    assert again.workflows["mm"].cfg.connector == "pixel_shuffle:factor=2"
    inputs = model.prepare_inputs(["<image>\nwhat shape"], [[images[1]]], task="mm")
    with torch.no_grad():
        assert torch.equal(model(**inputs, task="mm").logits, again(**inputs, task="mm").logits)
