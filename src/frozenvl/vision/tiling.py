"""High-resolution images as several encoder-sized tiles: InternVL's dynamic tiling and LLaVA-NeXT's anyres.

The cutting is pure image geometry (a function of the image, the tile size and the options; no
encoder involved), so any vision side can reuse it:

* :func:`dynamic_tiles` (InternVL, ``tiling: dynamic``): pick the grid of at most ``max_tiles``
  tiles whose aspect ratio is closest to the image's, stretch the image onto it, cut it, and add a
  thumbnail of the whole image after the tiles (when there is more than one tile). The rule is the
  one of transformers' ``GotOcr2ImageProcessor`` ``crop_to_patches``.
* :func:`anyres_tiles` (LLaVA-NeXT / SPHINX, ``tiling: anyres``): pick the best resolution among
  grid pinpoints, resize keeping the aspect ratio, pad centred with black, cut into tiles, and put a
  global view (the whole image stretched to one tile) first. A tile that holds no image pixel at all
  is marked ``skipped`` (SPHINX-X): it is never built nor encoded, and becomes one skip token.

:class:`TileLayout` records what was cut; :func:`arrange_tokens` turns the encoded tiles of one image
into its token sequence (tiles in reading order, thumbnail / global view, LLaVA-NeXT's unpadding
and newline tokens, skip tokens) and :meth:`TileLayout.num_tokens` counts that sequence without
encoding anything, so prompts get the right number of placeholder slots.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .images import ImageError, ImageInput, ImagePreprocessor, _center_crop, load_image

TILING_MODES = ("dynamic", "anyres")
Size = tuple[int, int]  # (height, width)


# ------------------------------------------------------------------------------------ grids
def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Every (columns, rows) with min_tiles <= columns * rows <= max_tiles, fewest tiles first.

    Within one tile count the order is by columns, then rows: ties in :func:`select_tile_grid` are
    settled in this order, as InternVL does.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got min_tiles={min_tiles}, max_tiles={max_tiles}")
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles]
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable: keeps the column-then-row order within a count


def select_tile_grid(image_hw: Size, tile_hw: Size, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """(rows, columns) of the grid whose aspect ratio (columns / rows) is closest to the image's.

    On an exact tie the later (larger) grid wins only while the image has more than half the pixels
    of that grid at the tile size: more tiles are worth it only for an image large enough to fill them.
    """
    height, width = image_hw
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_hw[0] * tile_hw[1] * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def select_best_resolution(image_hw: Size, resolutions: Sequence[Sequence[int]]) -> Size:
    """The (height, width) among `resolutions` that keeps most of the image's pixels once the image is
    scaled to fit in it (at most its own pixel count), then the one that wastes the fewest pixels."""
    if not resolutions:
        raise ValueError("grid_pinpoints is empty: give at least one (height, width)")
    height, width = image_hw
    best: Size | None = None
    best_kept, best_waste = -1, math.inf
    for res_h, res_w in resolutions:
        scale = min(res_w / width, res_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = res_w * res_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(res_h), int(res_w)), kept, waste
    return best  # type: ignore[return-value]


def default_pinpoints(tile_hw: Size, max_tiles: int) -> list[list[int]]:
    """Every grid of at most `max_tiles` tiles, as (height, width) pinpoints at the tile size."""
    return [[r * tile_hw[0], c * tile_hw[1]] for c, r in candidate_grids(1, max_tiles) if r * c > 1]


def fit_inside(image_hw: Size, target_hw: Size) -> Size:
    """(height, width) of the image scaled to fit `target_hw` keeping its aspect ratio (the long side
    fills the target; the other rounds up, capped at the target)."""
    height, width = image_hw
    t_h, t_w = target_hw
    if t_w / width < t_h / height:
        return min(math.ceil(height * t_w / width), t_h), t_w
    return t_h, min(math.ceil(width * t_h / height), t_w)


def _padding(inner: int, outer: int) -> int:
    """Offset of a centred span: the odd pixel of padding goes after."""
    return (outer - inner) // 2


# ------------------------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class TileLayout:
    """How one image was cut, and hence how its tokens are laid out.

    `grid` is (rows, columns) of sub-image tiles; `skipped[k]` says tile k (reading order) is entirely
    padding and was not encoded. `global_view` is where the whole-image view goes: "after" the tiles
    (InternVL's thumbnail), "before" them (LLaVA-NeXT's base image) or None. `image_hw` is the original
    size (for LLaVA-NeXT's unpadding).
    """

    mode: str
    grid: tuple[int, int]
    image_hw: Size
    global_view: str | None
    skipped: tuple[bool, ...]
    newline: bool = False
    unpad: bool = False

    @property
    def num_tiles(self) -> int:
        """Tiles in the pixel tensor: the encoded sub-images plus the global view."""
        return sum(not s for s in self.skipped) + (self.global_view is not None)

    def _unpadded(self, side: int) -> Size:
        """(rows, columns) of the tile-token map left after LLaVA-NeXT's unpadding."""
        cur_h, cur_w = self.grid[0] * side, self.grid[1] * side
        height, width = self.image_hw
        if width / height > cur_w / cur_h:
            new_h = int(round(height * (cur_w / width), 7))
            pad = (cur_h - new_h) // 2
            return cur_h - 2 * pad, cur_w
        new_w = int(round(width * (cur_h / height), 7))
        pad = (cur_w - new_w) // 2
        return cur_h, cur_w - 2 * pad

    def num_tokens(self, tile_tokens: int) -> int:
        """Length of the image's token sequence when each encoded tile gives `tile_tokens` tokens."""
        n_global = tile_tokens if self.global_view is not None else 0
        rows, cols = self.grid
        if self.unpad:
            map_h, map_w = self._unpadded(token_side(tile_tokens))
            return n_global + map_h * (map_w + self.newline)
        per_tile = sum(1 if s else tile_tokens for s in self.skipped)
        return n_global + per_tile + (rows if self.newline else 0)


def token_side(tile_tokens: int) -> int:
    side = math.isqrt(tile_tokens)
    if side * side != tile_tokens:
        raise ValueError(f"unpadding needs each tile's tokens to form a square grid; a tile gives {tile_tokens}")
    return side


def arrange_tokens(
    layout: TileLayout,
    tiles: torch.Tensor,
    newline: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encoded tiles of one image [num_tiles, T, D] (in the layout's tile order) -> its tokens [L, D].

    Sub-image tiles go in reading order, each tile's tokens row-major; skipped tiles become `skip`;
    with `unpad` (LLaVA-NeXT) the tiles are first joined into one token map whose padding rows /
    columns are cut off, and `newline` ends each row of that map; otherwise `newline` ends each row of
    tiles. The global view goes before or after, as the layout says.
    """
    if tiles.shape[0] != layout.num_tiles:
        raise ValueError(f"{tiles.shape[0]} encoded tiles for a layout of {layout.num_tiles}")
    if layout.newline and newline is None:
        raise ValueError("the layout has newline tokens but no newline embedding was given")
    if any(layout.skipped) and skip is None:
        raise ValueError("the layout has skipped tiles but no skip embedding was given")
    glob = None
    if layout.global_view == "before":
        glob, tiles = tiles[0], tiles[1:]
    elif layout.global_view == "after":
        glob, tiles = tiles[-1], tiles[:-1]
    rows, cols = layout.grid
    dim = tiles.shape[-1]
    if layout.unpad:
        side = token_side(tiles.shape[1])
        grid = tiles.reshape(rows, cols, side, side, dim).permute(0, 2, 1, 3, 4).reshape(rows * side, cols * side, dim)
        map_h, map_w = layout._unpadded(side)
        top, left = (grid.shape[0] - map_h) // 2, (grid.shape[1] - map_w) // 2
        grid = grid[top : top + map_h, left : left + map_w]
        if layout.newline:
            grid = torch.cat([grid, newline.to(grid.dtype).expand(map_h, 1, dim)], dim=1)
        body = grid.reshape(-1, dim)
    else:
        it = iter(tiles)
        pieces: list[torch.Tensor] = []
        for r in range(rows):
            for c in range(cols):
                pieces.append(skip.to(tiles.dtype)[None] if layout.skipped[r * cols + c] else next(it))
            if layout.newline:
                pieces.append(newline.to(tiles.dtype)[None])
        body = torch.cat(pieces)
    if glob is None:
        return body
    return torch.cat([glob, body] if layout.global_view == "before" else [body, glob])


# ------------------------------------------------------------------------------------ cutting
def _crop_grid(img: Image.Image, tile_hw: Size, grid: tuple[int, int], keep: Sequence[bool] | None = None) -> list[Image.Image]:
    t_h, t_w = tile_hw
    rows, cols = grid
    return [
        img.crop((c * t_w, r * t_h, (c + 1) * t_w, (r + 1) * t_h))
        for r in range(rows)
        for c in range(cols)
        if keep is None or keep[r * cols + c]
    ]


def dynamic_tiles(
    img: Image.Image,
    tile_hw: Size,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    *,
    min_tiles: int = 1,
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], TileLayout]:
    """InternVL's dynamic tiling of an RGB image: (tiles in reading order [+ thumbnail], layout)."""
    layout = dynamic_layout((img.height, img.width), tile_hw, max_tiles, use_thumbnail, min_tiles=min_tiles)
    rows, cols = layout.grid
    t_h, t_w = tile_hw
    canvas = img.resize((cols * t_w, rows * t_h), resample=resample)
    tiles = _crop_grid(canvas, tile_hw, (rows, cols))
    if layout.global_view is not None:
        tiles.append(img.resize((t_w, t_h), resample=resample))
    return tiles, layout


def dynamic_layout(image_hw: Size, tile_hw: Size, max_tiles: int = 12, use_thumbnail: bool = True, *,
                   min_tiles: int = 1) -> TileLayout:
    """The layout :func:`dynamic_tiles` gives an image of size `image_hw`, without cutting it."""
    rows, cols = select_tile_grid(image_hw, tile_hw, min_tiles, max_tiles)
    thumbnail = use_thumbnail and rows * cols > 1
    return TileLayout("dynamic", (rows, cols), tuple(image_hw), "after" if thumbnail else None, (False,) * (rows * cols))


def padding_tiles(image_hw: Size, target_hw: Size, tile_hw: Size) -> tuple[bool, ...]:
    """Which tiles (reading order) of a `target_hw` canvas, with the image resized to fit it and pasted
    centred, hold no image pixel at all."""
    new_h, new_w = fit_inside(image_hw, target_hw)
    top, left = _padding(new_h, target_hw[0]), _padding(new_w, target_hw[1])
    t_h, t_w = tile_hw
    rows, cols = target_hw[0] // t_h, target_hw[1] // t_w
    return tuple(
        not (r * t_h < top + new_h and top < (r + 1) * t_h and c * t_w < left + new_w and left < (c + 1) * t_w)
        for r in range(rows)
        for c in range(cols)
    )


def anyres_tiles(
    img: Image.Image,
    tile_hw: Size,
    pinpoints: Sequence[Sequence[int]],
    *,
    global_hw: Size | None = None,
    skip_padding: bool = False,
    newline: bool = False,
    unpad: bool = True,
    resample: int = Image.Resampling.BICUBIC,
) -> tuple[list[Image.Image], TileLayout]:
    """LLaVA-NeXT's anyres cut: ([global view, sub-image tiles...], layout).

    The global view is the image stretched to `global_hw` (default: the tile size; a processor that
    resizes before a centre crop passes its resize size, and crops it itself). With `skip_padding`, tiles
    that hold only padding are left out and marked skipped.
    """
    layout = anyres_layout((img.height, img.width), tile_hw, pinpoints, skip_padding=skip_padding, newline=newline,
                           unpad=unpad)
    grid = layout.grid
    target = (grid[0] * tile_hw[0], grid[1] * tile_hw[1])
    new_h, new_w = fit_inside((img.height, img.width), target)
    resized = img.resize((new_w, new_h), resample=resample)
    canvas = Image.new("RGB", (target[1], target[0]), (0, 0, 0))
    canvas.paste(resized, (_padding(new_w, target[1]), _padding(new_h, target[0])))
    g_h, g_w = global_hw or tile_hw
    kept = [not s for s in layout.skipped]
    return [img.resize((g_w, g_h), resample=resample), *_crop_grid(canvas, tile_hw, grid, kept)], layout


def anyres_layout(image_hw: Size, tile_hw: Size, pinpoints: Sequence[Sequence[int]], *, skip_padding: bool = False,
                  newline: bool = False, unpad: bool = True) -> TileLayout:
    """The layout :func:`anyres_tiles` gives an image of size `image_hw`, without cutting it."""
    for res in pinpoints:
        if len(res) != 2 or res[0] % tile_hw[0] or res[1] % tile_hw[1]:
            raise ValueError(f"grid pinpoint {list(res)} is not a (height, width) multiple of the tile size {tile_hw}")
    target = select_best_resolution(image_hw, pinpoints)
    grid = (target[0] // tile_hw[0], target[1] // tile_hw[1])
    skipped = padding_tiles(image_hw, target, tile_hw) if skip_padding else (False,) * (grid[0] * grid[1])
    return TileLayout("anyres", grid, tuple(image_hw), "before", skipped, newline, unpad)


# ------------------------------------------------------------------------------------ batches
@dataclass
class TiledPixels:
    """Pixel values of tiled images: every image's tiles, flat in order, and each image's layout.

    Travels where a ``[N, 3, H, W]`` pixel tensor does (``len`` is the number of images, ``.to``
    moves the tiles).
    """

    tiles: torch.Tensor  # [total tiles, 3, H, W]
    layouts: tuple[TileLayout, ...]

    def __post_init__(self) -> None:
        self.layouts = tuple(self.layouts)
        if self.tiles.dim() != 4 or self.tiles.shape[0] != sum(self.counts):
            raise ValueError(
                f"tiles of shape {tuple(self.tiles.shape)} do not hold the {sum(self.counts)} tiles of the layouts"
            )

    def __len__(self) -> int:
        return len(self.layouts)

    @property
    def counts(self) -> list[int]:
        return [layout.num_tiles for layout in self.layouts]

    def to(self, *args, **kwargs) -> TiledPixels:
        return TiledPixels(self.tiles.to(*args, **kwargs), self.layouts)

    def per_image(self) -> list[torch.Tensor]:
        return list(self.tiles.split(self.counts))

    def select(self, indices: Sequence[int]) -> TiledPixels:
        parts = self.per_image()
        return TiledPixels(torch.cat([parts[i] for i in indices]), tuple(self.layouts[i] for i in indices))

    def digests(self) -> list[str]:
        """One key per image: its tile set (pixel bytes) and its layout."""
        out = []
        for layout, tiles in zip(self.layouts, self.per_image()):
            data = tiles.detach().to("cpu").contiguous()
            head = f"{layout}{tuple(data.shape)}{data.dtype}".encode()
            out.append(hashlib.sha1(head + data.view(torch.uint8).numpy().tobytes()).hexdigest())
        return out

    @staticmethod
    def cat(parts: Sequence[TiledPixels]) -> TiledPixels:
        return TiledPixels(torch.cat([p.tiles for p in parts]), tuple(lay for p in parts for lay in p.layouts))


@dataclass
class TiledMedia:
    """Tiled images as cross-attention media (families with `tiles_as_media`): each image's encoded
    tiles joined into one medium, zero-padded to the longest image. The padding is masked out of the
    attention (`valid`), so an image's medium is exactly its own tiles' tokens.

    tokens [n images, longest, D]; lengths [n] (tokens per image).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @classmethod
    def pad(cls, per_image: Sequence[torch.Tensor]) -> TiledMedia:
        """Each image's media [L_i, D] -> one padded batch."""
        tokens = torch.nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
        lengths = torch.tensor([t.shape[0] for t in per_image], dtype=torch.long, device=tokens.device)
        return cls(tokens, lengths)

    def valid(self) -> torch.Tensor:
        """[n, longest] bool: True at an image's own tokens, False at padding."""
        return torch.arange(self.tokens.shape[1], device=self.tokens.device) < self.lengths[:, None]


# ------------------------------------------------------------------------------------ preprocessing
@dataclass
class TiledPreprocessor:
    """Loads images, cuts them into tiles and normalises them with `base` (the encoder's preprocessor).

    Tiles have `base.size`; anyres tiles (and the global view) then go through `base`'s resize and
    centre crop as LLaVA-NeXT's processor does (a no-op when it has no separate resize size).
    `image_mode` (pad / resize) does not apply: dynamic tiling stretches, anyres pads with black.
    """

    base: ImagePreprocessor
    mode: str
    max_tiles: int = 12
    min_tiles: int = 1
    use_thumbnail: bool = True
    pinpoints: Sequence[Sequence[int]] | None = None
    skip_padding: bool = False
    newline: bool = False
    unpad: bool = True

    def __post_init__(self) -> None:
        if self.mode not in TILING_MODES:
            raise ValueError(f"tiling {self.mode!r} is not one of {list(TILING_MODES)}")
        if self.mode == "anyres" and self.pinpoints is None:
            self.pinpoints = default_pinpoints(self.base.size, self.max_tiles)

    def layout(self, image_hw: Size) -> TileLayout:
        """The layout `cut` gives an image of size `image_hw` (its slot count), without cutting it."""
        if self.mode == "dynamic":
            return dynamic_layout(image_hw, self.base.size, self.max_tiles, self.use_thumbnail, min_tiles=self.min_tiles)
        return anyres_layout(image_hw, self.base.size, self.pinpoints, skip_padding=self.skip_padding,
                             newline=self.newline, unpad=self.unpad)

    def cut(self, img: Image.Image) -> tuple[list[Image.Image], TileLayout]:
        size = self.base.size
        if self.mode == "dynamic":
            return dynamic_tiles(img, size, self.max_tiles, self.use_thumbnail, min_tiles=self.min_tiles,
                                 resample=self.base.resample)
        tiles, layout = anyres_tiles(img, size, self.pinpoints, global_hw=self.base.resize or size,
                                     skip_padding=self.skip_padding, newline=self.newline, unpad=self.unpad,
                                     resample=self.base.resample)
        resize = self.base.resize or size
        out = []
        for tile in tiles:
            if tile.size != (resize[1], resize[0]):
                tile = tile.resize((resize[1], resize[0]), resample=self.base.resample)
            out.append(_center_crop(tile, size))
        return out, layout

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> TiledPixels:
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given (empty list)")
        arrays, layouts = [], []
        for index, item in enumerate(items):
            if isinstance(item, torch.Tensor):
                raise TypeError(
                    f"image at index {index}: a tiled workflow cuts the image itself; give PIL images, paths or "
                    "bytes (or a ready TiledPixels), not a pixel tensor"
                )
            try:
                img = load_image(item, max_pixels=self.base.max_pixels)
            except ImageError as exc:
                raise ImageError(f"image at index {index}: {exc}") from exc
            tiles, layout = self.cut(img)
            arrays.extend(np.asarray(t, dtype=np.uint8) for t in tiles)
            layouts.append(layout)
        return TiledPixels(self.base.normalize(arrays), tuple(layouts))
