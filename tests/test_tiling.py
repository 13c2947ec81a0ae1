"""frozenvl.vision.tiling: InternVL's dynamic tiling and LLaVA-NeXT's anyres cut, checked against
transformers' own processors (the Pil ones: no torchvision), and the token layouts they give."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import unpad_image

import frozenvl
from frozenvl.model import FrozenVLModel
from frozenvl.vision.images import ImagePreprocessor
from frozenvl.vision.tiling import (
    TiledPreprocessor,
    TileLayout,
    anyres_tiles,
    arrange_tokens,
    dynamic_tiles,
    padding_tiles,
    select_best_resolution,
    select_tile_grid,
)

from .conftest import assert_cache_matches_recompute, perturb

TILE = 28
# (width, height): squares, common photo ratios, near-ties and extreme strips both ways
SIZES = [
    (28, 28), (100, 100), (640, 480), (480, 640), (1920, 1080), (1080, 1920), (56, 28), (28, 56), (300, 100),
    (100, 300), (1000, 10), (10, 1000), (2000, 3), (3, 2000), (90, 60), (60, 90), (123, 45), (45, 123), (400, 131),
    (131, 400), (77, 33), (500, 250), (250, 500), (13, 7), (7, 13), (84, 28), (333, 111),
]


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed + width * 7919 + height)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("max_tiles", [6, 12])
def test_dynamic_grid_and_crops_equal_got_ocr2(max_tiles):
    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=max_tiles)
    grids = set()
    for width, height in SIZES:
        img = _image(width, height)
        cols, rows = get_optimal_tiled_canvas((height, width), (TILE, TILE), 1, max_tiles)
        assert select_tile_grid((height, width), (TILE, TILE), 1, max_tiles) == (rows, cols), (width, height)
        ref = proc.crop_image_to_patches(np.asarray(img).transpose(2, 0, 1), 1, max_tiles,
                                         patch_size=SizeDict(height=TILE, width=TILE),
                                         resample=PILImageResampling.BICUBIC)
        tiles, layout = dynamic_tiles(img, (TILE, TILE), max_tiles, use_thumbnail=True)
        assert layout.grid == (rows, cols) and layout.num_tiles == len(ref) == len(tiles), (width, height)
        assert layout.global_view == ("after" if rows * cols > 1 else None)
        for k, (mine, theirs) in enumerate(zip(tiles, ref)):
            assert np.array_equal(np.asarray(mine).transpose(2, 0, 1), theirs), f"{width}x{height} tile {k}"
        grids.add((rows, cols))
    assert len(grids) >= 8, grids  # the sizes really exercise many grids, strips included
    assert (1, max_tiles) in grids and (max_tiles, 1) in grids


def test_dynamic_normalised_pixels_equal_got_ocr2():
    proc = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, max_patches=12,
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    base = ImagePreprocessor((TILE, TILE), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), mode="resize")
    ours = TiledPreprocessor(base, "dynamic", max_tiles=12)
    imgs = [_image(w, h, 1) for w, h in [(300, 100), (28, 28), (64, 200)]]
    ref = proc(imgs, return_tensors="pt")
    got = ours(imgs)
    assert got.counts == ref["num_patches"].tolist() == [13, 1, 13]  # 6x2 and 2x6 grids + thumbnail
    torch.testing.assert_close(got.tiles, ref["pixel_values"], atol=1e-5, rtol=0)


LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def test_best_resolution_equals_transformers():
    picked = set()
    for width, height in SIZES + [(336, 336), (1008, 336), (672, 672), (2000, 2000), (5, 5000)]:
        for pins in (LLAVA_NEXT_PINPOINTS, [[56, 56], [56, 112], [112, 56], [84, 84], [28, 84]]):
            ours = select_best_resolution((height, width), pins)
            assert ours == tuple(hf_select_best_resolution((height, width), pins)), (width, height, pins)
            picked.add(ours)
    assert len(picked) >= 7


@pytest.mark.parametrize("size", [(50, 80), (300, 40), (40, 300), (90, 90), (200, 7)])
def test_anyres_pixels_equal_llava_next(size):
    pins = [[56, 56], [28, 56], [56, 28], [84, 28], [28, 84]]
    proc = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=pins)
    base = ImagePreprocessor((TILE, TILE), (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
                             mode="resize")
    img = _image(*size, seed=3)
    ref = proc([img], return_tensors="pt")["pixel_values"][0]
    got = TiledPreprocessor(base, "anyres", pinpoints=pins)([img])
    assert got.tiles.shape == ref.shape
    torch.testing.assert_close(got.tiles, ref, atol=1e-5, rtol=0)


def test_padding_tiles_are_skipped_and_not_built():
    # a wide strip on a 3x3 canvas: only the middle row of tiles holds image pixels
    img = _image(300, 20)
    tiles, layout = anyres_tiles(img, (TILE, TILE), [[84, 84]], skip_padding=True, unpad=False)
    assert layout.grid == (3, 3)
    assert layout.skipped == (True,) * 3 + (False,) * 3 + (True,) * 3
    assert len(tiles) == layout.num_tiles == 1 + 3
    full, _ = anyres_tiles(img, (TILE, TILE), [[84, 84]], skip_padding=False, unpad=False)
    canvas_rows = [np.asarray(t) for t in full[1:]]
    for k, skipped in enumerate(layout.skipped):  # the geometric rule agrees with the pixels
        assert skipped == (canvas_rows[k].max() == 0), k
    assert padding_tiles((20, 300), (84, 84), (TILE, TILE)) == layout.skipped


def test_arrange_tokens_layouts():
    dim, t = 3, 4  # 4 tokens per tile (2x2)
    glob = torch.full((1, t, dim), -1.0)
    tiles = torch.arange(4 * t * dim, dtype=torch.float32).reshape(4, t, dim)
    newline, skip = torch.full((dim,), 7.0), torch.full((dim,), 9.0)
    # InternVL: tiles in reading order, thumbnail after
    lay = TileLayout("dynamic", (2, 2), (10, 10), "after", (False,) * 4)
    out = arrange_tokens(lay, torch.cat([tiles, glob]))
    assert torch.equal(out, torch.cat([tiles.reshape(-1, dim), glob[0]])) and lay.num_tokens(t) == len(out) == 20
    # SPHINX: a skipped tile becomes one skip token, newline after each row of tiles
    lay = TileLayout("anyres", (2, 2), (10, 10), "before", (False, True, False, False), newline=True, unpad=False)
    out = arrange_tokens(lay, torch.cat([glob, tiles[:3]]), newline, skip)
    want = torch.cat([glob[0], tiles[0], skip[None], newline[None], tiles[1], tiles[2], newline[None]])
    assert torch.equal(out, want) and lay.num_tokens(t) == len(out) == 4 + 4 + 1 + 1 + 8 + 1


@pytest.mark.parametrize("image_hw", [(10, 40), (40, 10), (30, 31), (7, 100)])
def test_unpad_equals_llava_next(image_hw):
    side, dim = 4, 2
    tiles = torch.randn(6, side * side, dim)
    lay = TileLayout("anyres", (2, 3), image_hw, None, (False,) * 6, newline=False, unpad=True)
    got = arrange_tokens(lay, tiles)
    grid = tiles.view(2, 3, side, side, dim).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    ref = unpad_image(grid, image_hw).flatten(1, 2).transpose(0, 1)
    assert torch.equal(got, ref) and lay.num_tokens(side * side) == len(got)


# ------------------------------------------------------------------------------------ in a model

TILED = {
    "dyn": {"family": "prefix", "connector": "pixel_shuffle", "tiling": "dynamic", "max_tiles": 6},
    "sph": {"family": "prefix", "tiling": "anyres", "unpad": False, "skip_token": True, "image_newline": True,
            "grid_pinpoints": [[96, 96], [32, 64], [64, 32]]},
    "nxt": {"family": "prefix", "tiling": "anyres", "image_newline": True, "max_tiles": 4},
}


@pytest.fixture(scope="module")
def tiled_model(tmp_path_factory):
    from frozenvl.tiny import build_tiny_bases

    torch.manual_seed(0)
    llm, vis = build_tiny_bases(tmp_path_factory.mktemp("tiled"))
    model = FrozenVLModel.build(llm, vis, workflows=TILED, attn_implementation="eager").eval()
    for task in TILED:
        perturb(model, task)
    return model


def _wide(w=300, h=20, colour=(30, 60, 200)):
    img = Image.new("RGB", (w, h), colour)
    for x in range(0, w, 7):
        img.putpixel((x, h // 2), (255, 255, 0))
    return img


@contextlib.contextmanager
def counting_encoder_calls(model):
    """Yields a list that gets the batch size of every vision-tower call made inside the block."""
    calls: list[int] = []
    inner = model.vision.forward

    def counting(pixel_values, *args, **kwargs):
        calls.append(pixel_values.shape[0])
        return inner(pixel_values, *args, **kwargs)

    model.vision.forward = counting
    try:
        yield calls
    finally:
        del model.vision.forward


def _tiled_data(root):
    """8 llava samples whose images are wide and of different sizes: several tiles, not alike."""
    from .conftest import write_llava_data

    data = write_llava_data(root, n=8, with_text_only=False)
    for i, rec in enumerate(json.load(open(data))):
        _image(60 + 30 * i, 20 + 2 * i, seed=i).save(root / rec["image"])
    return data


def _train_four_steps(llm, vis, data, out, name, workflow):
    """Four steps on the same batch of 8 (every part trained): the result and the logged losses."""
    from frozenvl.train import train

    res = train({"llm": llm, "vision": vis, "output_dir": str(out), "workflow": {"name": name, **workflow},
                 "data": {"train": data, "max_length": 1024},
                 "stages": [{"name": "s", "train": ["*"], "lr": 1e-2, "steps": 4, "batch_size": 8, "warmup_ratio": 0.0,
                             "schedule": "constant"}],
                 "save_every": 0, "seed": 0, "log_every": 1}, show_progress=False)
    losses = [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if "loss" in json.loads(line)]
    return res, losses


def test_layout_from_the_size_alone_equals_the_cut(tiled_model):
    """The dataset counts slots from `layout(size)` without cutting: it must be `cut`'s layout."""
    for task in TILED:
        pre = tiled_model.preprocessor(task)
        for w, h in [(32, 32), (300, 20), (20, 300), (40, 90), (200, 25), (64, 33), (97, 61), (1, 50), (500, 499)]:
            assert pre.layout((h, w)) == pre.cut(_image(w, h))[1], (task, w, h)


def test_slots_follow_each_images_tiles(tiled_model, images):
    for task in TILED:
        pv = tiled_model.pixel_values([images[0], images[1], _wide()], task)
        counts = tiled_model.image_token_counts(task, pv)
        assert len(set(counts)) > 1, (task, counts)  # per image, not one number
        assert max(pv.counts) > 2, (task, pv.counts)  # several tiles
        batch = tiled_model.prepare_inputs(["<image> a", "<image> b <image>"], [[images[0]], [images[1], _wide()]],
                                           task=task)
        slots = (batch["input_ids"] == -200).sum(-1).tolist()
        assert slots == [counts[0], counts[1] + counts[2]]
        with torch.no_grad():
            out = tiled_model(**batch, task=task)
        assert out.logits.shape[:2] == batch["input_ids"].shape
        # rows read off the slots when not given
        rows = tiled_model._image_rows(batch["input_ids"], 3, task, None, batch["pixel_values"])
        assert rows.tolist() == [0, 1, 1]


@pytest.mark.parametrize("task,size", [("dyn", (40, 90)), ("sph", (200, 25)), ("nxt", (40, 90))])
def test_cached_generation_equals_recompute_with_tiles(tiled_model, task, size):
    # the helper swaps each row's images for the third one: all of one size, so the same slots
    same_size = [_image(*size, seed=k) for k in range(3)]
    layout = tiled_model.pixel_values(same_size[:1], task).layouts[0]
    assert layout.num_tiles > 2 and (task != "sph" or sum(layout.skipped) == 6)  # several tiles; skip tokens in sph
    assert_cache_matches_recompute(tiled_model, task, same_size)


def test_text_stays_bit_identical(tiled_model):
    ids = tiled_model.tokenizer(["the cat sat on the mat"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = tiled_model.llm(input_ids=ids).logits
        got = tiled_model(ids, task="text").logits
    assert torch.equal(ref, got)
    kw = dict(max_new_tokens=6, eos_token_id=[])
    assert torch.equal(tiled_model.generate(ids, task="text", **kw),
                       tiled_model.generate(ids, task="dyn", **kw))  # image-free: the base answers


def test_padding_tile_is_not_encoded_and_becomes_the_skip_token(tiled_model):
    tiled_model.encoded_images.clear()  # earlier tests encoded this strip already
    pv = tiled_model.pixel_values([_wide()], "sph")
    layout = pv.layouts[0]
    assert layout.grid == (3, 3) and sum(layout.skipped) == 6  # only the middle row holds the strip
    with counting_encoder_calls(tiled_model) as calls, torch.no_grad():
        embeds = tiled_model._image_embeds("sph", pv)[0]
    assert calls == [1 + 3]  # the global view and the 3 tiles with pixels, nothing else
    connector = tiled_model.workflow("sph").connector
    per_tile = tiled_model.tokens_per_image("sph")
    assert embeds.shape[0] == layout.num_tokens(per_tile) == per_tile + 3 * 1 + 1 + 3 * per_tile + 1 + 3 * 1 + 1
    first_row = embeds[per_tile : per_tile + 4]  # after the global view: 3 skip tokens and a newline
    assert torch.equal(first_row[:3], connector.skip_token.expand(3, -1))
    assert torch.equal(first_row[3], connector.image_newline)
    assert not torch.equal(embeds[per_tile + 4], connector.skip_token)  # the middle row is real


def test_encoded_image_cache_keyed_per_tile_set(tiled_model, images):
    tiled_model.encoded_images.clear()
    with counting_encoder_calls(tiled_model) as calls, torch.no_grad():
        a = tiled_model.pixel_values([images[1]], "dyn")
        b = tiled_model.pixel_values([images[1], _wide()], "dyn")
        first = tiled_model._image_embeds("dyn", a)
        both = tiled_model._image_embeds("dyn", b)  # images[1] again: only the strip is encoded
    assert calls == [a.counts[0], b.counts[1]]
    assert torch.equal(both[0, : first.shape[1]], first[0])


def test_token_budget_errors(tiled_model, images):
    big = _wide(600, 20)
    model = tiled_model
    cfg = model.workflow("dyn").cfg
    cfg.max_image_tokens = 10
    try:
        with pytest.raises(ValueError, match=r"max_image_tokens=10.*lower max_tiles"):
            model.prepare_inputs("<image> x", [big], task="dyn")
    finally:
        cfg.max_image_tokens = None
    limit = model.llm.config.max_position_embeddings
    n = -(-limit // model.image_token_counts("dyn", model.pixel_values([big], "dyn"))[0]) + 1
    with pytest.raises(ValueError, match=r"images take \d+ tokens .*max_position_embeddings"):
        model.prepare_inputs(" ".join(["<image>"] * n), [big] * n, task="dyn")


def test_config_errors():
    from frozenvl.config import ConfigError, parse_workflow

    with pytest.raises(ConfigError, match="tiling 'tiles'"):
        parse_workflow("w", {"family": "prefix", "tiling": "tiles"})
    with pytest.raises(ConfigError, match="need tiling: anyres"):
        parse_workflow("w", {"family": "prefix", "tiling": "dynamic", "skip_token": True, "unpad": False})
    with pytest.raises(ConfigError, match="unpad: false"):
        parse_workflow("w", {"family": "prefix", "tiling": "anyres", "skip_token": True})
    with pytest.raises(ConfigError, match="min_tiles"):
        parse_workflow("w", {"family": "prefix", "tiling": "dynamic", "max_tiles": 0})


def test_tiling_refused_for_families_without_the_splice(bases):
    llm, vis = bases()
    with pytest.raises(ValueError, match="tiling needs a family that splices"):
        FrozenVLModel.build(llm, vis, workflows={"b": {"family": "bind", "tiling": "dynamic"}})


# ------------------------------------------------------------------ cross_attention: tiles as media
XA = {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4, "resampler_heads": 2,
      "resampler_head_dim": 8, "tiling": "dynamic", "max_tiles": 6}
XA_SKIP = {**XA, "tiling": "anyres", "skip_token": True, "grid_pinpoints": [[96, 96], [32, 64], [64, 32]]}


@pytest.fixture(scope="module")
def media_model(bases, tmp_path_factory):
    from frozenvl.tiny import build_llm

    # a sharper base (std 0.2, as test_cache_equivalence's) so that greedy output is not one repeated token
    llm_dir, vis = bases()
    llm = build_llm(tmp_path_factory.mktemp("sharp"), arch="llama", tokenizer_dir=llm_dir, initializer_range=0.2)
    model = FrozenVLModel.build(llm, vis, workflows={"xa": XA, "xs": XA_SKIP}, attn_implementation="eager").eval()
    for task in ("xa", "xs"):
        perturb(model, task, scale=0.1, parts=["resampler", "xattn"])  # opens the zero gates; new tokens at init
        model.workflow(task).cfg.text_fallback = False
    return model


def test_cross_attention_reads_an_images_tiles_as_one_medium(media_model, images):
    """One <image> slot per tiled image; its medium is its own tiles' resampled latents in the layout's
    order, padded to the batch's longest image."""
    model, family = media_model, media_model.workflow("xa")
    imgs = [_image(40, 90, seed=1), _wide(), _image(30, 30, seed=2)]
    pv = model.pixel_values(imgs, "xa")
    assert len(set(pv.counts)) == 3 and max(pv.counts) > 2, pv.counts  # different tile counts
    assert model.image_token_counts("xa", pv) == 1
    batch = model.prepare_inputs(["<image> a", "<image> b <image>"], [imgs[:1], imgs[1:]], task="xa")
    assert (batch["input_ids"] == -200).sum(-1).tolist() == [1, 2]
    with torch.no_grad():
        media = model._image_embeds("xa", pv)
        latents = XA["resampler_latents"]
        assert media.lengths.tolist() == [n * latents for n in pv.counts]
        for k, tiles in enumerate(pv.per_image()):
            own = family.encode_images(model.vision(tiles)).flatten(0, 1)
            # (encoded with the other images' tiles: equal up to batched-matmul rounding)
            torch.testing.assert_close(media.tokens[k, : len(own)], own, atol=1e-6, rtol=1e-6)
            assert not media.tokens[k, len(own):].any()  # padding
        out = model(**batch, task="xa").logits
    assert out.shape[:2] == batch["input_ids"].shape and torch.isfinite(out).all()


def test_cross_attention_tiled_padding_is_masked(media_model):
    """An image's logits do not depend on the padding a longer image in the batch forces on it."""
    model = media_model
    small, big = _image(30, 30, seed=3), _wide()
    alone = model.prepare_inputs(["<image> what"], [[small]], task="xa")
    both = model.prepare_inputs(["<image> what", "<image> what"], [[small], [big]], task="xa")
    with torch.no_grad():
        a = model(**alone, task="xa").logits[0]
        b = model(**both, task="xa").logits[0]
        c = model(**model.prepare_inputs(["<image> what"], [[big]], task="xa"), task="xa").logits[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4  # and the image matters


@pytest.mark.parametrize("task", ["xa", "xs"])
def test_cross_attention_cached_generation_equals_recompute_with_tiles(media_model, task):
    # different sizes: rows' media differ in length, so the padded (masked) path runs in the batch
    imgs = [_image(40, 90, seed=1), _wide(), _image(30, 30, seed=2)]
    assert len(set(media_model.pixel_values(imgs, task).counts)) > 1
    assert_cache_matches_recompute(media_model, task, imgs)


def test_cross_attention_skipped_tile_is_not_encoded_and_leaves_no_media(media_model):
    media_model.encoded_images.clear()
    pv = media_model.pixel_values([_wide()], "xs")
    assert pv.layouts[0].grid == (3, 3) and sum(pv.layouts[0].skipped) == 6
    with counting_encoder_calls(media_model) as calls, torch.no_grad():
        media = media_model._image_embeds("xs", pv)
    assert calls == [1 + 3] and media.lengths.tolist() == [(1 + 3) * XA["resampler_latents"]]


def test_cross_attention_tiling_config_errors(bases):
    from frozenvl.config import ConfigError, parse_workflow

    with pytest.raises(ConfigError, match="image_newline does not apply"):
        parse_workflow("w", {**XA, "tiling": "anyres", "image_newline": True})
    with pytest.raises(ConfigError, match="unpad does not apply"):
        parse_workflow("w", {**XA, "tiling": "anyres", "unpad": True})
    parse_workflow("w", {**XA, "tiling": "anyres"})  # unpad defaults to off for this family


def test_cross_attention_trains_on_tiled_images(bases, tmp_path):
    """Training samples keep one <image> slot per tiled image (not one per tile token), the batch's
    tiled media train the resampler and blocks, and the base stays bit-identical."""
    from frozenvl.data.dataset import ConversationDataset
    from frozenvl.train.trainer import base_checksum

    llm, vis = bases()
    data = _tiled_data(tmp_path / "d")
    model = FrozenVLModel.build(llm, vis, workflows={"xa": XA})
    before = base_checksum(model)
    ds = ConversationDataset(data, tokenizer=model.tokenizer, tokens_per_image=model.tokens_per_image("xa"),
                             preprocessor=model.preprocessor("xa"), max_length=1024, tiles_in_sequence=False)
    assert [int((ds[i]["input_ids"] == -200).sum()) for i in range(len(ds))] == [1] * len(ds)
    assert len({ds[i]["pixel_values"].counts[0] for i in range(len(ds))}) > 1  # tile counts differ
    out = tmp_path / "run"
    res, losses = _train_four_steps(llm, vis, data, out, "xa", XA)
    assert res.steps == 4 and res.base_unchanged
    assert losses[-1] < losses[0], losses
    trained = frozenvl.load(out)
    assert base_checksum(trained) == before
    with torch.no_grad():
        inputs = trained.prepare_inputs("<image>\nwhat is it", [_wide()], task="xa")
        assert torch.isfinite(trained(**inputs, task="xa").logits).all()


def test_newline_and_skip_tokens_save_and_load(tiled_model, tmp_path, images):
    tiled_model.save_pretrained(tmp_path, tasks=["sph"])
    loaded = frozenvl.load(tmp_path, attn_implementation="eager")
    for name in ("image_newline", "skip_token"):
        assert torch.equal(getattr(loaded.workflow("sph").connector, name),
                           getattr(tiled_model.workflow("sph").connector, name))
    batch = tiled_model.prepare_inputs("<image> a", [_wide()], task="sph")
    with torch.no_grad():
        assert torch.equal(loaded(**batch, task="sph").logits, tiled_model(**batch, task="sph").logits)


def test_ready_tensor_is_single_views(tiled_model, images):
    pixels = tiled_model.preprocessor("dyn").base(images[:2])  # [2, 3, 32, 32]: one view each
    batch = tiled_model.prepare_inputs("<image> <image> x", pixels, task="dyn")
    assert int((batch["input_ids"] == -200).sum()) == 2 * tiled_model.tokens_per_image("dyn")
    with torch.no_grad():
        got = tiled_model(**batch, task="dyn").logits
        flat = tiled_model.workflow("dyn").encode_images(tiled_model.vision(pixels))
        ref = tiled_model._step(batch["input_ids"], batch["attention_mask"], "dyn", image_embeds=flat).logits
    assert torch.equal(got, ref)


@pytest.mark.parametrize("task", sorted(TILED))
def test_training_batches_tiled_images(task, bases, tmp_path):
    """A training batch of tiled samples (different tile counts per image) collates into one TiledPixels,
    trains the workflow (its connector and layout tokens) and leaves the base bit-identical; the
    trained workflow saves and loads. Failed with a TypeError in collate before TiledPixels.cat."""
    from frozenvl.data.dataset import collate
    from frozenvl.train.trainer import base_checksum
    from frozenvl.vision.tiling import TiledPixels

    llm, vis = bases()
    data = _tiled_data(tmp_path / "d")
    model = FrozenVLModel.build(llm, vis, workflows={task: TILED[task]})
    before = base_checksum(model)
    pv = [model.pixel_values([_wide()], task), model.pixel_values([_image(40, 90, seed=1), _image(30, 30, seed=2)], task)]
    item = lambda p: {"input_ids": [1, 2], "labels": [1, 2], "pixel_values": p}  # noqa: E731
    batch = collate([item(pv[0]), item(None), item(pv[1])], pad_token_id=0)
    joined = batch["pixel_values"]
    assert isinstance(joined, TiledPixels) and len(joined) == 3
    assert joined.counts == pv[0].counts + pv[1].counts and torch.equal(joined.tiles, torch.cat([p.tiles for p in pv]))
    assert batch["image_rows"].tolist() == [0, 2, 2]

    # each sample's slots follow its own image's tiles (the images differ in size)
    from frozenvl.data.dataset import ConversationDataset

    ds = ConversationDataset(data, tokenizer=model.tokenizer, tokens_per_image=model.tokens_per_image(task),
                             preprocessor=model.preprocessor(task), max_length=1024)
    slots = [int((ds[i]["input_ids"] == -200).sum()) for i in range(len(ds))]
    assert slots == [sum(model.image_token_counts(task, ds[i]["pixel_values"])) for i in range(len(ds))]
    assert min(slots) > model.tokens_per_image(task) and len(set(slots)) > 1, slots  # several tiles, per image

    out = tmp_path / "run"
    res, losses = _train_four_steps(llm, vis, data, out, task, TILED[task])
    assert res.steps == 4 and res.base_unchanged and res.final_loss is not None and np.isfinite(res.final_loss)
    assert len(losses) == 4 and losses[-1] < losses[0], losses  # it learns (the same batch of 8 every step)
    trained = frozenvl.load(out)
    assert base_checksum(trained) == before
    with torch.no_grad():
        inputs = trained.prepare_inputs("<image>\nwhat is it", [_wide()], task=task)
        assert torch.isfinite(trained(**inputs, task=task).logits).all()
