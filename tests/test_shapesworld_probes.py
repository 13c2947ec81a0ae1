"""Linear probes of a vision tower on ShapesWorld scenes (shapesworld/probes.py): the patch under a
shape's centre is found through the preprocessing's pad, resize and centre crop, so a tower whose
features are each patch's mean colour probes colour near-perfectly, and the probes are read in the
real track's report."""

from __future__ import annotations

import random

import torch
from torch import nn

from frozenvl.shapesworld.probes import centre_patch, probe_tower
from frozenvl.shapesworld.world import sample_scene
from frozenvl.vision.images import ImagePreprocessor

PATCH = 8


class MeanColourTower(nn.Module):
    """A stand-in vision tower: each patch's feature is its mean RGB and their products (so that a
    linear probe can tell the six colours apart), nothing about shape, on a grid of PATCH-px patches."""

    def __init__(self, side: int):
        super().__init__()
        self.grid = (side // PATCH, side // PATCH)

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
        n, c, h, w = pixel_values.shape
        x = pixel_values.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH).mean(dim=(3, 5))
        x = x.flatten(2).transpose(1, 2)  # [n, patches, 3], row-major
        return torch.cat([x, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(2)], -1)


def _pre(**kw) -> ImagePreprocessor:
    return ImagePreprocessor(size=(64, 64), image_mean=(0.5,) * 3, image_std=(0.5,) * 3, **kw)


def test_centre_patch_follows_pad_resize_and_crop():
    scene = next(s for s in (sample_scene(random.Random(k)) for k in range(200)) if s.width > s.height)
    shape = scene.shapes[0]
    grid = 8
    plain = centre_patch(scene, shape, grid)
    assert centre_patch(scene, shape, grid, _pre()) == plain  # pad, no crop: the same cell
    # a 2x resize then a crop of the middle half: the crop's grid is twice as fine, shifted by a quarter
    cropped = centre_patch(scene, shape, grid, _pre(resize=(128, 128)))
    side = max(scene.width, scene.height)
    left = (side - scene.width) // 2
    ux = (shape.cx + left + 0.5) / side
    assert cropped % grid == min(grid - 1, max(0, int((ux * 128 - 32) / 64 * grid)))
    if 0.25 < ux < 0.75:
        assert cropped % grid != plain % grid or ux == 0.5
    # stretched (mode resize): the width alone decides the column
    stretched = centre_patch(scene, shape, grid, _pre(mode="resize"))
    assert stretched % grid == min(grid - 1, int((shape.cx + 0.5) / scene.width * grid))


def test_a_mean_colour_tower_probes_colour_and_not_kind():
    for pre in (_pre(), _pre(resize=(80, 80))):
        got = probe_tower(MeanColourTower(64), pre, n_scenes=120, seed=0)
        assert got["colour"] >= 0.9, got  # a wrong patch (background) would give chance, ~1/6
        assert got["kind"] < 0.8, got  # a mean colour says little of the shape's kind
        assert got["n_shapes_scored"] > 50 and got["layer"] == -2


def test_the_crop_aware_cell_is_the_one_that_sees_the_shape():
    from frozenvl import inputs
    from frozenvl.shapesworld.probes import linear_probes

    pre = _pre(resize=(128, 128))  # the crop keeps the middle half: many centres move, some leave it
    rng = random.Random("shapesworld:0:tower-probe")
    scenes = [sample_scene(rng) for _ in range(120)]
    feats = MeanColourTower(64)(inputs.to_pixel_values([s.render() for s in scenes], pre))
    aware, blind = linear_probes(scenes, feats, 8, pre)["colour"], linear_probes(scenes, feats, 8)["colour"]
    assert aware > blind + 0.15, (aware, blind)  # measured 0.81 vs 0.58


def test_the_real_tracks_report_shows_the_encoders_probes_and_the_llms_zero_shot_floor():
    from frozenvl.shapesworld.report import _bases_section

    probes = {"vit": {"colour": 0.879, "kind": 1.0, "size": 0.918, "count": 0.5, "box_acc50": 0.6,
                      "n_shapes_scored": 200, "layer": -2},
              "llm": {"colour": 0.5, "shape": 0.25, "box": 0.0, "overall": 0.4}}
    real = "\n".join(_bases_section({"track": "real", "bases": {"probes": probes}}))
    assert "DINOv2's patch features (hidden layer -2" in real and "| 87.9% | 100.0% | 91.8% |" in real
    assert "zero-shot" in real and "| 50.0% | 25.0% | 0.0% | 40.0% |" in real
    tiny = "\n".join(_bases_section({"track": "tiny", "bases": {"probes": {**probes, "vit": {
        k: v for k, v in probes["vit"].items() if k != "layer"}}}}))
    assert "the ViT's patch features, on 200" in tiny and "zero-shot" not in tiny
    assert _bases_section({"track": "real", "bases": {}}) == []
