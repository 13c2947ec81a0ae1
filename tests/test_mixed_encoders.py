"""frozenvl.vision.mixed: several frozen encoders with different patch grids resampled to one token grid
and concatenated along channels, behind one connector; trains on ShapesWorld captions."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

import frozenvl
from frozenvl.config import ConfigError, ModelConfig
from frozenvl.model import FrozenVLModel
from frozenvl.shapesworld import caption, sample_scene
from frozenvl.tiny import build_tiny_bases, build_vision
from frozenvl.vision.encoder import VisionTower


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    llm, clip = build_tiny_bases(root)  # CLIP 32 px / 8: a 4x4 grid, 32 channels
    dino = build_vision(root / "dino", arch="dinov2", image_size=32, patch_size=4, hidden_size=24, seed=1)  # 8x8, 24
    siglip = build_vision(root / "siglip", arch="siglip", image_size=16, patch_size=8, hidden_size=16, seed=2)  # 2x2
    return llm, clip, dino, siglip


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    scenes = [sample_scene(rng, max_shapes=2, sizes=(48, 64)) for _ in range(n)]
    return [s.render() for s in scenes], [caption(s) for s in scenes]


def test_one_token_per_grid_cell_with_concatenated_channels(encoders):
    llm, clip, dino, siglip = encoders
    model = FrozenVLModel.build(llm, [clip, {"path": dino, "select_layer": -1}, siglip],
                                workflows={"mm": {"family": "prefix"}})
    tower = model.vision
    assert tower.grid == (4, 4) and tower.hidden_size == 32 + 24 + 16
    assert model.tokens_per_image("mm") == 16
    imgs, _ = _scenes(2)
    pixels = model.pixel_values(imgs, "mm")
    with torch.no_grad():
        feats = tower(pixels)
    assert feats.shape == (2, 16, 72)
    # each block of channels is that encoder's own features on the primary's grid
    clip_t, dino_t, sig_t = (VisionTower.from_pretrained(p) for p in (clip, dino, siglip))
    with torch.no_grad():
        assert torch.equal(feats[..., :32], clip_t(pixels))
        dino_in = tower._view_for(1, pixels)
        assert dino_in.shape[-2:] == (32, 32)
        d = dino_t(dino_in, select_layer=-1)  # 8x8 -> 4x4: each token the mean of its 2x2 block
        blocks = d.reshape(2, 4, 2, 4, 2, 24).mean(dim=(2, 4)).reshape(2, 16, 24)
        torch.testing.assert_close(feats[..., 32:56], blocks, atol=1e-6, rtol=0)
        s = sig_t(tower._view_for(2, pixels))  # 2x2 -> 4x4: bilinear
        up = F.interpolate(s.transpose(1, 2).reshape(2, 16, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
        torch.testing.assert_close(feats[..., 56:], up.flatten(2).transpose(1, 2), atol=1e-6, rtol=0)
    assert feats[..., 32:56].abs().sum() > 0 and not torch.equal(feats[..., 32:56], feats[..., :24])
    # the other encoder's view is the same picture, re-normalised for it: back in [0, 1] both agree
    pre0, pre1 = tower.preprocessors[0], tower.preprocessors[1]
    unit0 = pixels * torch.tensor(pre0.image_std).view(1, 3, 1, 1) + torch.tensor(pre0.image_mean).view(1, 3, 1, 1)
    unit1 = dino_in * torch.tensor(pre1.image_std).view(1, 3, 1, 1) + torch.tensor(pre1.image_mean).view(1, 3, 1, 1)
    torch.testing.assert_close(unit0, unit1, atol=1e-5, rtol=0)


def test_two_layers_of_one_encoder_load_it_once(encoders):
    llm, clip, _, _ = encoders
    model = FrozenVLModel.build(llm, [clip, {"path": clip, "select_layer": -1}], workflows={"mm": {"family": "prefix"}})
    tower = model.vision
    assert tower.towers[0] is tower.towers[1] and tower.hidden_size == 64
    pixels = model.pixel_values(_scenes(1)[0], "mm")
    with torch.no_grad():
        feats = tower(pixels, select_layer=-2)
        single = tower.towers[0]
        assert torch.equal(feats[..., :32], single(pixels, select_layer=-2))
        assert torch.equal(feats[..., 32:], single(pixels, select_layer=-1))


def test_trains_on_shapesworld_and_saves(encoders, tmp_path):
    llm, clip, dino, _ = encoders
    model = FrozenVLModel.build(llm, [clip, dino], workflows={"mm": {"family": "prefix"}})
    imgs, captions = _scenes(4, seed=3)
    batch = model.prepare_inputs([f"<image> {c}" for c in captions], [[i] for i in imgs], task="mm")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100).masked_fill(
        batch["input_ids"] < 0, -100)
    opt = torch.optim.AdamW(model.trainable_parameters("mm"), lr=2e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(**batch, labels=labels, task="mm").loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    # only the connector learns (the tiny LLM is random and frozen): the loss falls every step, by > 0.2 nats
    assert all(b < a for a, b in itertools.pairwise(losses)) and losses[-1] < losses[0] - 0.2, losses
    assert all(p.grad is None for p in model.vision.parameters())  # the encoders stay frozen
    assert model.workflow("mm").connector.linear_1.in_features == 32 + 24
    model.save_pretrained(tmp_path)
    loaded = frozenvl.load(tmp_path)
    assert loaded.config.vision == [clip, dino]
    with torch.no_grad():
        assert torch.equal(loaded(**batch, task="mm").logits, model(**batch, task="mm").logits)


def test_bad_vision_lists():
    with pytest.raises(ConfigError, match=r"vision\[1\]"):
        ModelConfig(llm="x", vision=["a", {"path": "b", "layer": 3}])
    with pytest.raises(ConfigError, match="at least one"):
        ModelConfig(llm="x", vision=[])


def test_keep_cls_refused(encoders):
    llm, clip, dino, _ = encoders
    model = FrozenVLModel.build(llm, [clip, dino], workflows={"mm": {"family": "prefix", "keep_cls": True}})
    with pytest.raises(ValueError, match="keep_cls: false"), torch.no_grad():
        model(**model.prepare_inputs("<image> x", [_scenes(1)[0][0]], task="mm"), task="mm")


def test_mixed_encoders_with_tiles(encoders):
    llm, clip, dino, _ = encoders
    model = FrozenVLModel.build(llm, [clip, dino], workflows={
        "t": {"family": "prefix", "connector": "pixel_shuffle", "tiling": "dynamic", "max_tiles": 4}})
    img = _scenes(1)[0][0].resize((120, 40))
    batch = model.prepare_inputs("<image> x", [img], task="t")
    pv = batch["pixel_values"]
    assert pv.counts == [4] and model.image_token_counts("t", pv) == [4 * 4]  # 3 tiles + thumbnail, 4 tokens each
    with torch.no_grad():
        feats = model.vision(pv.tiles)
        logits = model(**batch, task="t").logits
    assert feats.shape == (4, 16, 56) and torch.isfinite(logits).all()


def test_a_single_pathlike_vision_is_one_encoder(encoders):
    from pathlib import Path

    llm, clip, _, _ = encoders
    model = FrozenVLModel.build(Path(llm), Path(clip), workflows={"mm": {"family": "prefix"}})
    assert isinstance(model.vision, VisionTower) and model.config.vision == clip
