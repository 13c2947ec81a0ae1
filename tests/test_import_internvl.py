"""frozenvl.importers.internvl: a tiny random InternVL checkpoint (Qwen2 text, pixel shuffle 0.5, dynamic
tiles) saved to disk and imported as a tiled prefix workflow computes what transformers'
InternVLForConditionalGeneration computes on images that give several tiles (CPU, fp32, eager)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

import frozenvl
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.importers import import_internvl_hf
from frozenvl.tiny import build_tokenizer

TILE, PATCH, MAX_TILES = 28, 7, 6
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2  # 4x4 patches, 2x2 merged: 4


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("internvl")
    src, out = str(root / "src"), str(root / "out")
    os.makedirs(src)
    n_text = len(build_tokenizer(src, template="chatml", vocab_size=300))
    torch.manual_seed(0)
    text = Qwen2Config(vocab_size=n_text + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.1, tie_word_embeddings=False)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=TILE, patch_size=PATCH, use_mean_pooling=True)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=n_text, downsample_ratio=0.5,
                            vision_feature_layer=-1, image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)
    hf = InternVLForConditionalGeneration(config)
    with torch.no_grad():  # make the projector and the image count
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(src)
    GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=MAX_TILES,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(src)
    assert import_internvl_hf(src, out) == out
    hf = InternVLForConditionalGeneration.from_pretrained(src, attn_implementation="eager").eval()
    ours = frozenvl.load(out, attn_implementation="eager").eval()
    proc = GotOcr2ImageProcessorPil.from_pretrained(src)
    return config, hf, ours, proc, out


def _inputs(config, ours, proc, sizes, seed):
    """HF and frozenvl inputs for one prompt: text, every image's tokens (tiles x tokens per tile), text."""
    imgs = [_image(w, h, seed + k) for k, (w, h) in enumerate(sizes)]
    ref = proc(imgs, return_tensors="pt")
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n_tiles in ref["num_patches"].tolist():
        words = torch.randint(1, config.image_token_id, (4,), generator=g)
        parts += [words, torch.full((n_tiles * TOKENS_PER_TILE,), config.image_token_id)]
    parts.append(torch.randint(1, config.image_token_id, (6,), generator=g))
    ids = torch.cat(parts)[None]
    pv = ours.pixel_values(imgs, "mm")
    return imgs, ids, ref["pixel_values"], ids.masked_fill(ids == config.image_token_id, IMAGE_TOKEN_ID), pv


def test_workflow_config(pair):
    _, _, ours, _, out = pair
    with open(os.path.join(out, "frozenvl.json"), encoding="utf-8") as f:
        wf = json.load(f)["workflows"]["mm"]
    assert (wf["family"], wf["connector"], wf["tiling"], wf["max_tiles"], wf["select_layer"]) == (
        "prefix", "pixel_shuffle:factor=2", "dynamic", MAX_TILES, -1)
    assert ours.tokens_per_image("mm") == TOKENS_PER_TILE


@pytest.mark.parametrize("sizes", [[(90, 30)], [(40, 100), (28, 28)], [(300, 20)]])
def test_logits_match_on_several_tiles(pair, sizes):
    config, hf, ours, proc, _ = pair
    _, ids, hf_pixels, our_ids, pv = _inputs(config, ours, proc, sizes, seed=sum(map(sum, sizes)))
    assert max(pv.counts) > 2  # several tiles (and a thumbnail)
    torch.testing.assert_close(pv.tiles, hf_pixels, atol=1e-5, rtol=0)  # the same tiles
    assert ours.image_token_counts("mm", pv) == [n * TOKENS_PER_TILE for n in pv.counts]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=hf_pixels).logits
        got = ours(input_ids=our_ids, attention_mask=torch.ones_like(ids), pixel_values=pv, task="mm").logits
        other = ours(input_ids=our_ids, pixel_values=ours.pixel_values(
            [_image(*s, seed=99) for s in sizes], "mm"), task="mm").logits
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4, diff
    assert (other[0, -1] - got[0, -1]).abs().max() > 1e-3  # the image reaches the text after it


def test_greedy_tokens_match(pair):
    config, hf, ours, proc, _ = pair
    _, ids, hf_pixels, our_ids, pv = _inputs(config, ours, proc, [(120, 50)], seed=5)
    assert pv.counts[0] > 2
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=hf_pixels,
                          do_sample=False, max_new_tokens=10, min_new_tokens=10)[:, ids.shape[1]:]
    got = ours.generate(our_ids, torch.ones_like(ids), pixel_values=pv, task="mm", max_new_tokens=10, eos_token_id=[])
    assert len(set(ref[0].tolist())) >= 3, ref  # not degenerate
    assert got.tolist() == ref.tolist()


def test_not_internvl_raises(tmp_path):
    Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'qwen2'"):
        import_internvl_hf(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_variants_raise(tmp_path):
    base = dict(text_config=Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2),
                vision_config=InternVLVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=28, patch_size=7, use_mean_pooling=False))
    InternVLConfig(**base).save_pretrained(tmp_path / "ln")
    with pytest.raises(NotImplementedError, match="use_mean_pooling=False"):
        import_internvl_hf(tmp_path / "ln", tmp_path / "out")
    InternVLConfig(**base, vision_feature_select_strategy="full", vision_feature_layer=-2).save_pretrained(tmp_path / "f")
    with pytest.raises(NotImplementedError, match="'full'"):
        import_internvl_hf(tmp_path / "f", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import(pair, tmp_path):
    from typer.testing import CliRunner

    from frozenvl.cli import app

    src = os.path.join(os.path.dirname(pair[-1]), "src")
    result = CliRunner().invoke(app, ["import", "internvl-hf", src, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "wrote frozenvl model" in result.output and (tmp_path / "out" / "frozenvl.json").is_file()
    bad = CliRunner().invoke(app, ["import", "internvl-hf", str(tmp_path / "missing"), str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "not a directory" in bad.output
