"""frozenvl.importers.llava_next: a tiny random LLaVA-NeXT checkpoint (Llama text, CLIP vision, anyres with
unpadding and the image newline) saved to disk and imported as a tiled prefix workflow computes what
transformers' LlavaNextForConditionalGeneration computes on images that give several tiles."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

import frozenvl
from frozenvl.constants import IMAGE_TOKEN_ID
from frozenvl.importers import import_llava_next_hf
from frozenvl.tiny import build_tokenizer

TILE, PATCH = 28, 7
PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_next")
    src, out = str(root / "src"), str(root / "out")
    os.makedirs(src)
    n_text = len(build_tokenizer(src, template="chatml", vocab_size=300))
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=n_text + 1, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.1)
    vision = CLIPVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=4)
    config = LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=n_text,
                             image_grid_pinpoints=PINPOINTS, image_seq_length=(TILE // PATCH) ** 2)
    hf = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.3)
        hf.model.image_newline.normal_(0.0, 1.0)
    hf.save_pretrained(src)
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=PINPOINTS)
    proc.save_pretrained(src)
    assert import_llava_next_hf(src, out) == out
    hf = LlavaNextForConditionalGeneration.from_pretrained(src, attn_implementation="eager").eval()
    ours = frozenvl.load(out, attn_implementation="eager").eval()
    return config, hf, ours, proc, out


def _inputs(config, ours, proc, sizes, seed):
    imgs = [_image(w, h, seed + k) for k, (w, h) in enumerate(sizes)]
    ref = proc(imgs, return_tensors="pt")
    pv = ours.pixel_values(imgs, "mm")
    g = torch.Generator().manual_seed(seed)
    parts = []
    for n_tokens in ours.image_token_counts("mm", pv):
        parts += [torch.randint(1, config.image_token_index, (4,), generator=g),
                  torch.full((n_tokens,), config.image_token_index)]
    parts.append(torch.randint(1, config.image_token_index, (6,), generator=g))
    ids = torch.cat(parts)[None]
    return ids, ref, ids.masked_fill(ids == config.image_token_index, IMAGE_TOKEN_ID), pv


def test_workflow_config(pair):
    _, _, ours, _, out = pair
    with open(os.path.join(out, "frozenvl.json"), encoding="utf-8") as f:
        wf = json.load(f)["workflows"]["mm"]
    assert (wf["family"], wf["connector"], wf["tiling"], wf["unpad"], wf["image_newline"]) == (
        "prefix", "mlp2x_gelu", "anyres", True, True)
    assert wf["grid_pinpoints"] == PINPOINTS


# (200, 13): so flat that LLaVA-NeXT's unpadding keeps no row of the tile map, only the global view
@pytest.mark.parametrize("sizes", [[(90, 30)], [(30, 80), (50, 50)], [(120, 20)], [(200, 13)]])
def test_logits_match_on_several_tiles(pair, sizes):
    config, hf, ours, proc, _ = pair
    ids, ref_in, our_ids, pv = _inputs(config, ours, proc, sizes, seed=sum(map(sum, sizes)))
    assert max(pv.counts) >= 3  # the global view and at least two tiles
    for k, n in enumerate(pv.counts):  # the same tiles as transformers' processor (which pads the batch)
        torch.testing.assert_close(pv.per_image()[k], ref_in["pixel_values"][k, :n], atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ref_in["pixel_values"],
                 image_sizes=ref_in["image_sizes"]).logits  # its own check: our slot counts are its feature counts
        got = ours(input_ids=our_ids, attention_mask=torch.ones_like(ids), pixel_values=pv, task="mm").logits
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4, diff
    if sum(ours.image_token_counts("mm", pv)) == len(sizes) * ours.tokens_per_image("mm"):
        return  # nothing but global views: no newline to check
    # the newline matters: without it the output moves
    connector = ours.workflow("mm").connector
    saved = connector.image_newline.detach().clone()
    with torch.no_grad():
        connector.image_newline.zero_()
        ours.encoded_images.clear()
        moved = ours(input_ids=our_ids, pixel_values=pv, task="mm").logits
        connector.image_newline.copy_(saved)
    ours.encoded_images.clear()
    assert (moved[0, -1] - got[0, -1]).abs().max() > 1e-3


def test_greedy_tokens_match(pair):
    config, hf, ours, proc, _ = pair
    ids, ref_in, our_ids, pv = _inputs(config, ours, proc, [(50, 90)], seed=3)
    assert pv.counts[0] >= 3
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=ref_in["pixel_values"],
                          image_sizes=ref_in["image_sizes"], do_sample=False, max_new_tokens=10,
                          min_new_tokens=10)[:, ids.shape[1]:]
    got = ours.generate(our_ids, torch.ones_like(ids), pixel_values=pv, task="mm", max_new_tokens=10, eos_token_id=[])
    assert len(set(ref[0].tolist())) >= 3, ref
    assert got.tolist() == ref.tolist()


def test_prompt_slots_from_prepare_inputs(pair):
    """A prompt with <image> gets exactly the tokens LLaVA-NeXT splices for that image."""
    config, hf, ours, proc, _ = pair
    img = _image(60, 25, 11)
    batch = ours.prepare_inputs("<image> describe", [img], task="mm")
    ref_in = proc([img], return_tensors="pt")
    with torch.no_grad():
        n_hf = hf.model.get_image_features(pixel_values=ref_in["pixel_values"], image_sizes=ref_in["image_sizes"],
                                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                                           return_dict=True).pooler_output
    n_hf = sum(t.shape[0] for t in n_hf) if isinstance(n_hf, (list, tuple)) else n_hf.shape[0]
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == n_hf


def test_not_llava_next_raises(tmp_path):
    LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type 'llama'"):
        import_llava_next_hf(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_import(pair, tmp_path):
    from typer.testing import CliRunner

    from frozenvl.cli import app

    src = os.path.join(os.path.dirname(pair[-1]), "src")
    result = CliRunner().invoke(app, ["import", "llava-next-hf", src, str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "wrote frozenvl model" in result.output and (tmp_path / "out" / "frozenvl.json").is_file()
    bad = CliRunner().invoke(app, ["import", "llava-next-hf", str(tmp_path / "missing"), str(tmp_path / "o2")])
    assert bad.exit_code == 2 and "not a directory" in bad.output
