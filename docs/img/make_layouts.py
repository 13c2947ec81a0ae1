"""Draw docs/img/layout-*.png from a real run: a ShapesWorld scene cut by frozenvl's own tiled
preprocessing (the tiles are the normalised pixels the encoder gets, mapped back to colours), and each
image's token sequence as frozenvl lays it out (the counts come from the model's layout code).

    PYTHONPATH=src python docs/img/make_layouts.py
"""

from __future__ import annotations

import os
import random
import tempfile

import torch
from PIL import Image, ImageDraw

from frozenvl.model import FrozenVLModel
from frozenvl.shapesworld import sample_scene
from frozenvl.tiny import build_tiny_bases

HERE = os.path.dirname(os.path.abspath(__file__))
KIND_COLOURS = {"tile": (70, 130, 180), "global": (230, 150, 40), "newline": (200, 40, 40), "skip": (150, 150, 150)}
WORKFLOWS = {
    "dynamic": {"family": "prefix", "connector": "pixel_shuffle", "tiling": "dynamic", "max_tiles": 6},
    "anyres-unpad-newline": {"family": "prefix", "tiling": "anyres", "image_newline": True, "max_tiles": 6},
    "anyres-skip": {"family": "prefix", "tiling": "anyres", "unpad": False, "skip_token": True,
                    "image_newline": True, "grid_pinpoints": [[96, 96], [32, 64], [64, 32]]},
}


def _tile_picture(tile: torch.Tensor, pre) -> Image.Image:
    mean = torch.tensor(pre.image_mean).view(3, 1, 1)
    std = torch.tensor(pre.image_std).view(3, 1, 1)
    arr = ((tile * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _token_kinds(layout, per_tile: int) -> list[str]:
    """What each token of the image's sequence is, in order (the order arrange_tokens writes)."""
    from frozenvl.vision.tiling import token_side

    glob = ["global"] * per_tile if layout.global_view else []
    rows, cols = layout.grid
    if layout.unpad:
        map_h, map_w = layout._unpadded(token_side(per_tile))
        body = (["tile"] * map_w + ["newline"] * layout.newline) * map_h
    else:
        body = []
        for r in range(rows):
            for c in range(cols):
                body += ["skip"] if layout.skipped[r * cols + c] else ["tile"] * per_tile
            body += ["newline"] * layout.newline
    return glob + body if layout.global_view == "before" else body + glob


def draw(name: str, model: FrozenVLModel, img: Image.Image) -> str:
    pre = model.preprocessor(name)
    pv = pre([img])
    layout, tiles = pv.layouts[0], pv.per_image()[0]
    per_tile = model.tokens_per_image(name)
    kinds = _token_kinds(layout, per_tile)
    assert len(kinds) == model.image_token_counts(name, pv)[0]  # the picture shows what the model does
    scale, gap = 3, 6
    t = tiles.shape[-1] * scale
    rows, cols = layout.grid
    pics = [_tile_picture(x, pre.base).resize((t, t), Image.NEAREST) for x in tiles]
    glob = pics.pop(0) if layout.global_view == "before" else (pics.pop() if layout.global_view else None)
    width = max(cols * (t + gap) + (t + 3 * gap if glob else 0), 40 + 12 * 64) + 20
    cell = 12
    lines = -(-len(kinds) // 64)
    height = rows * (t + gap) + 60 + lines * (cell + 2) + 40
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    d.text((10, 5), f"{name}: image {img.width}x{img.height} -> grid {rows}x{cols}, "
           f"{layout.num_tiles} encoded tiles, {len(kinds)} tokens", fill=(0, 0, 0))
    it = iter(pics)
    for r in range(rows):
        for c in range(cols):
            x, y = 10 + c * (t + gap), 25 + r * (t + gap)
            if layout.skipped[r * cols + c]:
                d.rectangle((x, y, x + t, y + t), fill=(220, 220, 220), outline=KIND_COLOURS["skip"], width=2)
                d.text((x + 4, y + t // 2 - 5), "skip: not encoded", fill=(90, 90, 90))
            else:
                canvas.paste(next(it), (x, y))
                d.rectangle((x, y, x + t, y + t), outline=KIND_COLOURS["tile"], width=2)
    if glob is not None:
        x = 10 + cols * (t + gap) + 2 * gap
        canvas.paste(glob, (x, 25))
        d.rectangle((x, 25, x + t, 25 + t), outline=KIND_COLOURS["global"], width=3)
        d.text((x, 28 + t), "thumbnail (after)" if layout.global_view == "after" else "global view (first)",
               fill=(0, 0, 0))
    y0 = 25 + rows * (t + gap) + 25
    d.text((10, y0 - 15), "token sequence (64 per line): " + ", ".join(
        f"{k}" for k in KIND_COLOURS if k in kinds), fill=(0, 0, 0))
    for k, kind in enumerate(kinds):
        x, y = 10 + (k % 64) * cell, y0 + (k // 64) * (cell + 2)
        d.rectangle((x, y, x + cell - 2, y + cell - 2), fill=KIND_COLOURS[kind])
    path = os.path.join(HERE, f"layout-{name}.png")
    canvas.save(path)
    return path


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as root:
        llm, vis = build_tiny_bases(root)  # CLIP 32 px / 8: 16 patches per tile
        model = FrozenVLModel.build(llm, vis, workflows=WORKFLOWS)
        scene = sample_scene(random.Random(4), max_shapes=3, sizes=(60, 60))
        scene.width, scene.height = 150, 60  # widen the canvas (shapes stay where drawn): several tiles
        wide = scene.render()
        strip = sample_scene(random.Random(7), max_shapes=2, sizes=(48, 48)).render().resize((200, 25))
        for name, img in (("dynamic", wide), ("anyres-unpad-newline", wide), ("anyres-skip", strip)):
            print(draw(name, model, img))


if __name__ == "__main__":
    main()
