"""ShapesWorld scenes: a few flat-coloured shapes on a light grey background.

Everything is exact by construction, so every question about a scene has one right answer
that can be checked against the rendered pixels:

* colours are drawn without antialiasing (PIL ``ImageDraw``), so a shape's pixels have
  exactly its colour's RGB and no other pixel does;
* a shape of half extent ``r`` centred on ``(cx, cy)`` covers exactly the pixels
  ``cx-r..cx+r`` x ``cy-r..cy+r`` (its :meth:`Shape.bbox`, inclusive): squares fill it,
  circles are the inscribed ellipse, triangles point up with the apex at the top-middle
  pixel and the base on the bottom row;
* shapes never overlap and are separated by at least :data:`MIN_GAP` background pixels
  (unless ``allow_overlap=True``), so every shape is one connected blob of pixels;
* no two shapes of a scene share the same (colour, kind), so "the red circle" is unambiguous.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "KINDS",
    "LARGE_R",
    "MIN_GAP",
    "SIZES",
    "SMALL_R",
    "Scene",
    "Shape",
    "sample_scene",
]

#: Shape colours (name -> RGB). Black/white/greys are left out: they are too close to the
#: background and to the padding colours of vision preprocessors.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
#: Half extent ``r`` (pixels, inclusive range) of each size: a small shape is 13-19 px
#: across, a large one 27-37 px, so the two never look alike.
SMALL_R: tuple[int, int] = (6, 9)
LARGE_R: tuple[int, int] = (13, 18)
#: Light grey background; not a shape colour.
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
#: Minimum number of background pixels between the boxes of two shapes.
MIN_GAP = 3
#: Minimum number of background pixels between a shape and the image border.
BORDER = 1

_R_RANGE = {"small": SMALL_R, "large": LARGE_R}


@dataclass
class Shape:
    kind: str  # "circle" | "square" | "triangle"
    colour: str  # a key of COLOURS
    size: str  # "small" | "large"
    cx: int  # centre, pixels
    cy: int
    r: int  # half extent, pixels: the shape spans 2r+1 pixels each way

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {KINDS}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; valid: {tuple(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {SIZES}")
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    @property
    def name(self) -> str:
        """Referring name without the article: ``"red circle"``."""
        return f"{self.colour} {self.kind}"

    def bbox(self) -> tuple[int, int, int, int]:
        """``(x1, y1, x2, y2)``: first and last pixel column/row the shape covers (inclusive)."""
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    def draw(self, draw: ImageDraw.ImageDraw) -> None:
        x1, y1, x2, y2 = self.bbox()
        fill = self.rgb
        if self.kind == "square":
            draw.rectangle([x1, y1, x2, y2], fill=fill)
        elif self.kind == "circle":
            draw.ellipse([x1, y1, x2, y2], fill=fill)
        else:  # triangle pointing up
            draw.polygon([(self.cx, y1), (x1, y2), (x2, y2)], fill=fill)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "size": self.size, "cx": self.cx, "cy": self.cy, "r": self.r}


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int] = BACKGROUND
    shapes: list[Shape] = field(default_factory=list)

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), tuple(self.background))
        draw = ImageDraw.Draw(img)
        for shape in self.shapes:
            shape.draw(draw)
        return img

    def find(self, colour: str, kind: str) -> Shape | None:
        for shape in self.shapes:
            if shape.colour == colour and shape.kind == kind:
                return shape
        return None

    def to_dict(self) -> dict:
        return {
            "width": self.width,
            "height": self.height,
            "background": list(self.background),
            "shapes": [s.to_dict() for s in self.shapes],
        }


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Boxes (inclusive pixels) with at least ``gap`` free pixels between them on some axis."""
    return a[0] - b[2] - 1 >= gap or b[0] - a[2] - 1 >= gap or a[1] - b[3] - 1 >= gap or b[1] - a[3] - 1 >= gap


def sample_scene(
    rng: random.Random,
    *,
    min_shapes: int = 1,
    max_shapes: int = 4,
    sizes: tuple[int, int] = (64, 128),
    allow_overlap: bool = False,
    max_tries: int = 50,
) -> Scene:
    """A random scene: image width and height drawn independently from ``sizes`` (inclusive),
    then ``min_shapes..max_shapes`` shapes with distinct (colour, kind), placed by rejection sampling.

    Each shape gets ``max_tries`` positions; if one does not fit, the layout (sizes included) is
    redrawn, and after ``max_tries`` failed layouts the number of shapes is lowered by one (never
    below ``min_shapes``: then RuntimeError). Only ``rng`` is used, so a seeded rng gives the same scene.
    """
    lo, hi = int(sizes[0]), int(sizes[1])
    if lo > hi or lo < 2 * (LARGE_R[1] + BORDER) + 1:
        raise ValueError(f"sizes must be (lo, hi) with lo <= hi and lo >= {2 * (LARGE_R[1] + BORDER) + 1}, got {sizes!r}")
    if not 1 <= min_shapes <= max_shapes <= len(COLOURS) * len(KINDS):
        raise ValueError(f"need 1 <= min_shapes <= max_shapes <= {len(COLOURS) * len(KINDS)}")
    width, height = rng.randint(lo, hi), rng.randint(lo, hi)
    n = rng.randint(min_shapes, max_shapes)
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    while n >= min_shapes:
        for _layout in range(max_tries):
            chosen = rng.sample(pairs, n)
            shapes: list[Shape] = []
            for colour, kind in chosen:
                size = rng.choice(SIZES)
                r = rng.randint(*_R_RANGE[size])
                for _try in range(max_tries):
                    cx = rng.randint(BORDER + r, width - 1 - BORDER - r)
                    cy = rng.randint(BORDER + r, height - 1 - BORDER - r)
                    cand = Shape(kind=kind, colour=colour, size=size, cx=cx, cy=cy, r=r)
                    if allow_overlap or all(_separated(cand.bbox(), s.bbox(), MIN_GAP) for s in shapes):
                        shapes.append(cand)
                        break
                else:
                    break  # this shape did not fit: new layout
            if len(shapes) == n:
                return Scene(width=width, height=height, background=BACKGROUND, shapes=shapes)
        n -= 1
    raise RuntimeError(f"could not place {min_shapes} shape(s) in a {width}x{height} image")
