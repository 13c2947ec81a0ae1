"""Vision encoders beyond CLIP/SigLIP: DINOv2, DINOv2 with registers, any ViT-style HF encoder.

Tiny random encoders are built from configs and saved to disk (frozenvl.tiny), then loaded the way
users load real ones (frozenvl.build with a directory).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

import frozenvl
from frozenvl.families.base import IMAGE_TOKEN_ID
from frozenvl.tiny import build_vision
from frozenvl.vision.encoder import VisionTower

GRID = 16  # tiny towers: 32 px crops, patch 8 -> 4x4 patches
REGISTERS = 4  # frozenvl.tiny's default for dinov2_registers
PREFIX_TOKENS = {"clip": 1, "siglip": 0, "dinov2": 1, "dinov2_registers": 1 + REGISTERS}


def _pixels(seed: int = 0, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["clip", "siglip", "dinov2", "dinov2_registers"])
def test_tower_drops_prefix_tokens_and_keeps_cls_on_request(bases, arch):
    _, vdir = bases("llama", arch)
    tower = VisionTower.from_pretrained(vdir)
    hf = AutoModel.from_pretrained(vdir).eval()
    n_cls = 0 if arch == "siglip" else 1
    assert (tower.num_cls, tower.num_registers) == (n_cls, PREFIX_TOKENS[arch] - n_cls)
    assert tower.num_tokens(keep_cls=False) == GRID and tower.num_tokens(keep_cls=True) == GRID + n_cls
    pixels = _pixels()
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        patches = tower(pixels, select_layer=-2)
        with_cls = tower(pixels, select_layer=-2, keep_cls=True)
    assert ref.shape[1] == PREFIX_TOKENS[arch] + GRID
    assert torch.equal(patches, ref[:, PREFIX_TOKENS[arch]:])
    assert with_cls.shape[1] == GRID + n_cls
    assert torch.equal(with_cls[:, n_cls:], patches)
    if n_cls:
        assert torch.equal(with_cls[:, 0], ref[:, 0])


def test_registers_and_cls_come_from_config_not_class_name(tmp_path):
    """A renamed subclass, and other register counts, are read off the config and embeddings."""
    from transformers import Dinov2WithRegistersModel

    class SomeOtherEncoder(Dinov2WithRegistersModel):
        pass

    for n_reg in (0, 2):
        hf = AutoModel.from_pretrained(build_vision(tmp_path / f"r{n_reg}", arch="dinov2_registers",
                                                    num_register_tokens=n_reg))
        renamed = SomeOtherEncoder(hf.config)
        renamed.load_state_dict(hf.state_dict())
        tower = VisionTower(renamed.eval(), input_size=(32, 32))
        assert (tower.num_cls, tower.num_registers) == (1, n_reg)
        pixels = _pixels(1)
        with torch.no_grad():
            ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
            assert torch.equal(tower(pixels, select_layer=-1), ref[:, 1 + n_reg:])


def test_position_embeddings_are_interpolated_for_another_input_size(tmp_path):
    """CLIP trained at 32 px, preprocessed to 48 px: 6x6 patches through interpolate_pos_encoding."""
    vdir = Path(build_vision(tmp_path / "clip", arch="clip"))
    cfg = json.loads((vdir / "preprocessor_config.json").read_text())
    cfg["crop_size"] = {"height": 48, "width": 48}
    cfg["size"] = {"shortest_edge": 48}
    (vdir / "preprocessor_config.json").write_text(json.dumps(cfg))
    tower = VisionTower.from_pretrained(str(vdir))
    assert tower.input_size == (48, 48) and tower.num_tokens() == 36
    hf = AutoModel.from_pretrained(vdir).eval()
    pixels = _pixels(2, size=48)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
        assert torch.equal(tower(pixels), ref[:, 1:])
        with pytest.raises(ValueError, match=r"takes \(48, 48\)"):
            tower(_pixels(2, size=32))


def test_any_vit_style_encoder_without_preprocessor_config(tmp_path):
    """A plain ViTModel (CLS via `cls_token`, pooler on top) works as a tower from its config alone."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    torch.manual_seed(0)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    model = frozenvl.build(*_llm_only(tmp_path), str(tmp_path / "vit"),
                           workflows={"mm": {"family": "prefix", "keep_cls": True}})
    assert model.vision.num_cls == 1 and model.tokens_per_image("mm") == GRID + 1
    with pytest.warns(UserWarning, match="default preprocessing"):
        pixels = model.pixel_values([Image.new("RGB", (40, 20), (200, 30, 30))], "mm")
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        out = model(**model.prepare_inputs("<image>\nhi", [Image.new("RGB", (40, 20))], task="mm"), task="mm")
    assert torch.isfinite(out.logits).all()


def _llm_only(tmp_path) -> tuple[str]:
    from frozenvl.tiny import build_llm, build_tokenizer

    d = tmp_path / "llm"
    build_tokenizer(d)
    build_llm(d, tokenizer_dir=d, num_layers=2)
    return (str(d),)


def test_dinov2_preprocessing_equals_bit_image_processor(bases, images):
    """The tiny DINOv2's preprocessor_config (BitImageProcessor: shortest edge 36, crop 32), as loaded by
    the model, gives transformers' pixels for square images and LLaVA-padded ones."""
    from transformers import BitImageProcessorPil

    llm, vdir = bases("llama", "dinov2")
    model = frozenvl.build(llm, vdir, workflows={"mm": {"family": "prefix"}})
    hf = BitImageProcessorPil.from_pretrained(vdir)
    assert hf.size["shortest_edge"] == 36 and hf.crop_size["height"] == 32
    pre = model.preprocessor("mm")
    for img in images:
        side = max(img.size)
        padded = Image.new("RGB", (side, side), pre.fill_color())
        padded.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        ref = hf(images=padded, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(model.pixel_values([img], "mm"), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["dinov2", "dinov2_registers"])
def test_dinov2_workflows_count_tokens_and_train(bases, images, arch):
    """prefix and inner_adaptor with keep_cls off and on: token counts, finite logits, a training step."""
    llm, vdir = bases("llama", arch)
    workflows = {
        f"{family}_{'cls' if keep else 'patches'}": {"family": family, "keep_cls": keep,
                                                      **({"layers": [0, 1]} if family == "inner_adaptor" else {})}
        for family in ("prefix", "inner_adaptor")
        for keep in (False, True)
    }
    model = frozenvl.build(llm, vdir, workflows=workflows)
    for task, wf in workflows.items():
        expected = GRID + (1 if wf["keep_cls"] else 0)
        assert model.tokens_per_image(task) == expected
        inputs = model.prepare_inputs(["<image>\nwhat shape", "<image> and <image> differ"],
                                      [[images[0]], images[1:3]], task=task)
        assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 3 * expected
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        params = model.trainable_parameters(task)
        opt = torch.optim.AdamW(params, lr=1e-2)
        before = [p.detach().clone() for p in params]
        model.train()
        out = model(**inputs, labels=labels, task=task)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
        out.loss.backward()
        assert all(p.grad is None for p in model.vision.parameters())
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, params)), task
    model.eval()
    answer = model.generate(prompt="<image>\nwhat shape", images=[images[0]], task="prefix_cls",
                            max_new_tokens=3, eos_token_id=[])
    assert answer.shape == (1, 3)


def test_dinov2_with_registers_in_the_pooling_and_resampler_families(bases, images):
    """bind, adaption_prompt (v1 mean / cls pool, v2) and cross_attention take DINOv2 features too
    (registers dropped, CLS kept where asked): finite logits and a training step each."""
    llm, vdir = bases("llama", "dinov2_registers")
    workflows = {
        "bind": {"family": "bind"},
        "ap_mean": {"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1"},
        "ap_cls": {"family": "adaption_prompt", "adapter_len": 4, "adapter_layers": 2, "visual": "v1",
                   "pool": "cls", "keep_cls": True},
        "ap_v2": {"family": "adaption_prompt", "adapter_len": 3, "adapter_layers": 2, "visual": "v2",
                  "v2_queries": 3, "v2_blocks": 1},
        "xattn": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
                  "resampler_heads": 2, "resampler_head_dim": 8},
    }
    model = frozenvl.build(llm, vdir, workflows=workflows)
    for task in workflows:
        inputs = model.prepare_inputs(["<image>\nwhat shape is it"], [[images[0]]], task=task)
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] < 0, -100)
        params = model.trainable_parameters(task)
        opt = torch.optim.AdamW(params, lr=1e-2)
        before = [p.detach().clone() for p in params]
        model.train()
        out = model(**inputs, labels=labels, task=task)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss), task
        out.loss.backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, params)), task
