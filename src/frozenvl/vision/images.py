"""Image loading and preprocessing for the vision encoder.

Everything here is Pillow + numpy/torch only (no torchvision, no transformers image
processors), so it runs in a minimal CPU environment.

* :func:`load_image` turns a path / bytes / PIL image into a fully decoded RGB image and
  converts every failure into an :class:`ImageError` that names the input.
* :func:`expand_to_square` / :func:`square_pad_offsets` implement LLaVA's "pad" mode.
* :class:`ImagePreprocessor` reproduces the HF CLIP/SigLIP preprocessing pipeline from a
  ``preprocessor_config.json`` and returns normalised ``[N, 3, H, W]`` float32 tensors.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageError",
    "ImageInput",
    "ImagePreprocessor",
    "expand_to_square",
    "load_image",
    "square_pad_offsets",
]

#: Refuse images with more than this many pixels (width * height). 64 MP is far above
#: anything an encoder needs and below Pillow's own bomb threshold (~89 MP).
DEFAULT_MAX_PIXELS = 64_000_000

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Image.Image]

PRETRAINED_CONFIG_NAME = "preprocessor_config.json"
VALID_MODES = ("pad", "resize")
# PIL resample codes: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING.
_VALID_RESAMPLE = (0, 1, 2, 3, 4, 5)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image could not be loaded or is unacceptable (missing, corrupt, too large...).

    The message always starts with the input's label (path, ``<bytes>``, ``<PIL image>``
    or the ``name=`` given to :func:`load_image`).
    """


# --------------------------------------------------------------------------- loading


def _label_for(src: object, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(os.fspath(src))
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return "<PIL image>"


def _check_pixels(label: str, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, "
            f"over the limit of max_pixels={max_pixels:,}"
        )


def _bomb_error(label: str, exc: BaseException, max_pixels: int) -> ImageError:
    return ImageError(
        f"{label}: image too large, refused as a possible decompression bomb "
        f"({exc}); limit is max_pixels={max_pixels:,}"
    )


def _decode_error(label: str, exc: BaseException) -> ImageError:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return ImageError(f"{label}: truncated image data, cannot decode ({text})")
    return ImageError(f"{label}: cannot decode image ({text})")


def _open_and_decode(fp: io.BufferedIOBase | io.BytesIO, label: str, max_pixels: int) -> Image.Image:
    """Open from a binary stream, check the header size, then fully decode the pixels."""
    # Pillow warns above Image.MAX_IMAGE_PIXELS (and raises above twice that). When our
    # limit is at or below Pillow's, any such warning means we would refuse the image
    # anyway, so it becomes an exception. When the caller raised max_pixels above
    # Pillow's threshold, the warning is silenced and our own header check decides.
    # (A local filter: Image.MAX_IMAGE_PIXELS is never modified.)
    pil_limit = Image.MAX_IMAGE_PIXELS
    action = "error" if pil_limit is None or max_pixels <= pil_limit else "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(label, exc, max_pixels) from exc
        except Image.UnidentifiedImageError as exc:
            raise ImageError(f"{label}: cannot decode, not a recognised image format") from exc
        except Exception as exc:  # Pillow raises many types on corrupt headers
            raise _decode_error(label, exc) from exc

        # Header is parsed, pixels are not: refuse oversized images before allocating.
        _check_pixels(label, img.size, max_pixels)
        try:
            # load() forces a full decode so truncated files fail here, not later.
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb_error(label, exc, max_pixels) from exc
        except MemoryError:
            raise
        except Exception as exc:
            raise _decode_error(label, exc) from exc
    # Some formats (ICO, multi-size containers) settle their size only on load.
    _check_pixels(label, img.size, max_pixels)
    return img


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Map single-channel 16/32-bit integer or float images to 8-bit "L".

    Pillow's own ``convert("L")`` clips these to 0..255, which turns typical 16-bit data
    white. Policy:
    * ``I;16*``: full 0..65535 range scaled to 0..255.
    * ``I``: kept if already within 0..255, treated as 16-bit if within 0..65535
      (older Pillow opens 16-bit PNGs as "I"), otherwise min..max stretched.
    * ``F``: values within 0..1 are scaled by 255, within 0..255 kept, otherwise
      min..max stretched.
    """
    arr = np.asarray(img).astype(np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        out = arr / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        out = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = arr
    elif img.mode == "I" and lo >= 0.0 and hi <= 65535.0:
        out = arr / 257.0
    else:
        out = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _to_rgb(img: Image.Image, label: str) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
    try:
        has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
        if has_alpha:
            rgba = img.convert("RGBA")
            background = Image.new("RGBA", rgba.size, _WHITE + (255,))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{label}: cannot convert image mode {img.mode!r} to RGB ({exc})") from exc


def load_image(
    src: ImageInput,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load ``src`` (path, bytes or PIL image) as a fully decoded RGB image.

    EXIF orientation is applied, transparency is composited on white and any Pillow
    mode is converted to RGB. Every problem with the image itself raises
    :class:`ImageError` naming the input; a ``src`` of the wrong type raises
    :class:`TypeError`. Images over ``max_pixels`` (width * height) are refused from
    their header, before any pixel is decoded.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        raise TypeError(
            "load_image expects a path (str / os.PathLike), bytes or a PIL.Image.Image, "
            f"got {type(src).__name__}"
        )
    label = _label_for(src, name)

    if isinstance(src, Image.Image):
        _check_pixels(label, src.size, max_pixels)
        img = src
        try:
            img.load()  # a lazily opened image may still be truncated
        except MemoryError:
            raise
        except Exception as exc:
            raise _decode_error(label, exc) from exc
    elif isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise ImageError(f"{label}: empty data (0 bytes), cannot decode")
        img = _open_and_decode(io.BytesIO(data), label, max_pixels)
    else:
        path = Path(os.fsdecode(os.fspath(src)))
        try:
            if not path.exists():
                raise ImageError(f"{label}: file not found")
            if path.is_dir():
                raise ImageError(f"{label}: is a directory, not an image file")
            if path.stat().st_size == 0:
                raise ImageError(f"{label}: empty file (0 bytes), cannot decode")
            with path.open("rb") as fh:
                # Decoding happens inside the with-block, so the file is closed after.
                img = _open_and_decode(fh, label, max_pixels)
        except OSError as exc:  # permissions, I/O errors
            raise ImageError(f"{label}: cannot read file ({exc})") from exc

    try:
        # Always returns a new image, so a caller's PIL image is never modified.
        img = ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception as exc:  # corrupt EXIF block
        raise ImageError(f"{label}: cannot apply EXIF orientation ({exc})") from exc
    return _to_rgb(img, label)


# --------------------------------------------------------------------------- padding


def square_pad_offsets(width: int, height: int) -> tuple[int, int, int]:
    """Return ``(side, left, top)`` of the square canvas used by :func:`expand_to_square`.

    The image is pasted at ``(left, top)`` on a ``side x side`` canvas; when the
    difference is odd the extra pixel of padding goes to the right/bottom (as LLaVA).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def _check_canvas(side: int, max_pixels: int) -> None:
    if side * side > max_pixels:
        raise ImageError(
            f"padding to a square would need a {side}x{side} = {side * side:,} pixel canvas, "
            f"over the limit of max_pixels={max_pixels:,}"
        )


def expand_to_square(
    img: Image.Image, fill: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """LLaVA "pad" mode: centre ``img`` on a square canvas of side ``max(w, h)``.

    The result is RGB (non-RGB inputs are converted first). A square RGB input is
    returned unchanged (same object). A canvas over ``max_pixels`` raises
    :class:`ImageError` (a 1x16000 strip would need 256 M pixels); :class:`ImagePreprocessor`
    shrinks such images before padding instead.
    """
    if img.mode != "RGB":
        img = _to_rgb(img, "<PIL image>")
    width, height = img.size
    if width == height:
        return img
    side, left, top = square_pad_offsets(width, height)
    _check_canvas(side, max_pixels)
    canvas = Image.new("RGB", (side, side), tuple(int(c) for c in fill))
    canvas.paste(img, (left, top))
    return canvas


def _pad_then_resize(
    img: Image.Image, fill: tuple[int, int, int], out_hw: tuple[int, int], resample: int, max_pixels: int
) -> Image.Image:
    """Pad to a square, then resize the square to ``out_hw`` (height, width), allocating a bounded amount.

    While the square canvas fits in ``max_pixels`` this is exactly :func:`expand_to_square` followed
    by one resize (LLaVA's pixels). Beyond that (extreme aspect ratios: the canvas grows with the
    square of the long side) the image is first resized to the size it would have inside the
    resized canvas and then pasted centred, so nothing larger than the source or ``out_hw`` is ever
    allocated; the values differ from the ideal only by resampling at the padding border.
    """
    width, height = img.size
    side, left, top = square_pad_offsets(width, height)
    out_h, out_w = out_hw
    if side * side <= max_pixels:
        img = expand_to_square(img, fill, max_pixels)
        return img if img.size == (out_w, out_h) else img.resize((out_w, out_h), resample=resample)
    new_w = max(1, round(width * out_w / side))
    new_h = max(1, round(height * out_h / side))
    small = img.resize((new_w, new_h), resample=resample)
    canvas = Image.new("RGB", (out_w, out_h), tuple(int(c) for c in fill))
    canvas.paste(small, ((out_w - new_w) // 2, (out_h - new_h) // 2))
    return canvas


def _center_crop(img: Image.Image, out_hw: tuple[int, int]) -> Image.Image:
    """HF's center_crop on an image at least ``out_hw`` large: top/left offsets round down."""
    out_h, out_w = out_hw
    width, height = img.size
    if (width, height) == (out_w, out_h):
        return img
    if width < out_w or height < out_h:
        raise ValueError(f"cannot centre-crop a {width}x{height} image to {out_w}x{out_h}")
    top, left = (height - out_h) // 2, (width - out_w) // 2
    return img.crop((left, top, left + out_w, top + out_h))


# --------------------------------------------------------------------------- preprocessing


def _parse_size(value: Any, key: str, source: str) -> tuple[int, int]:
    """HF size spec -> (height, width)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return int(value["height"]), int(value["width"])
        if "shortest_edge" in value:
            # Without a crop the output of a shortest-edge resize is not fixed; a square
            # of that edge is what the encoder expects (and what pad mode produces).
            edge = int(value["shortest_edge"])
            return edge, edge
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    raise ValueError(f"{source}: unsupported {key!r} value {value!r}")


def _hub_config_file(repo_id: str) -> Path | None:
    """A hub id's preprocessor_config.json through the HF cache (and the hub unless offline), or None."""
    try:
        from transformers.utils import cached_file

        found = cached_file(repo_id, PRETRAINED_CONFIG_NAME, _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError):  # not a valid repo id, unreachable hub, nothing cached
        return None
    return Path(found) if found else None


def _family_defaults(model_type: str) -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(mean, std, resample) of HF's image processor for that encoder family."""
    if "clip" in model_type.lower():
        return CLIP_MEAN, CLIP_STD, 3  # CLIPImageProcessor: bicubic
    if "dinov2" in model_type.lower() or "bitimageprocessor" in model_type.lower():
        return IMAGENET_MEAN, IMAGENET_STD, 3  # DINOv2's BitImageProcessor: ImageNet statistics, bicubic
    return SIGLIP_MEAN, SIGLIP_STD, 2  # SiglipImageProcessor: bilinear


@dataclass
class ImagePreprocessor:
    """HF-compatible preprocessing: load -> (pad) -> resize -> (centre crop) -> rescale -> normalise.

    ``size`` is what the encoder gets. ``resize`` (default: ``size``) is what the (padded) image is
    resized to before a centre crop to ``size``: HF processors with ``size: {shortest_edge: 256}`` and
    ``crop_size: 224`` (DINOv2's BitImageProcessor) see a square image at 256x256, then crop 224.
    """

    size: tuple[int, int]  # (height, width) fed to the encoder
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    mode: str = "pad"  # "pad": pad to square with the mean colour, then resize | "resize"
    resample: int = 3  # PIL resample code (3 = BICUBIC), as in preprocessor_config.json
    rescale_factor: float = 1 / 255
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize: tuple[int, int] | None = None  # (height, width) before the centre crop; None: size

    def __post_init__(self) -> None:
        if self.mode not in VALID_MODES:
            raise ValueError(f"mode must be one of {VALID_MODES}, got {self.mode!r}")
        height, width = (int(v) for v in self.size)
        if height <= 0 or width <= 0:
            raise ValueError(f"size must be positive (height, width), got {self.size!r}")
        self.size = (height, width)
        if self.resize is not None:
            r_height, r_width = (int(v) for v in self.resize)
            if r_height < height or r_width < width:
                raise ValueError(
                    f"resize {self.resize!r} is smaller than the crop size {self.size!r}: "
                    "the centre crop needs an image at least as large"
                )
            self.resize = None if (r_height, r_width) == self.size else (r_height, r_width)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (RGB)")
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        self.resample = int(self.resample)
        if self.resample not in _VALID_RESAMPLE:
            raise ValueError(f"resample must be a PIL code in {_VALID_RESAMPLE}, got {self.resample}")

    @classmethod
    def from_pretrained(
        cls,
        path_or_dir: str | os.PathLike[str],
        vision_config: Any = None,
        mode: str = "pad",
    ) -> ImagePreprocessor:
        """Build from ``preprocessor_config.json`` in a local directory (or that file itself).

        If the file is absent, fall back on ``vision_config`` (``image_size`` and
        ``model_type``) with CLIP or SigLIP defaults, and warn. Neither -> ValueError.
        """
        path = Path(path_or_dir)
        config_file = path if path.is_file() else path / PRETRAINED_CONFIG_NAME
        if not path.exists():
            config_file = _hub_config_file(str(path_or_dir)) or config_file
        model_type = str(getattr(vision_config, "model_type", "") or "")

        if config_file.is_file():
            try:
                cfg = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{config_file}: cannot read preprocessor config ({exc})") from exc
            if not isinstance(cfg, dict):
                raise ValueError(f"{config_file}: expected a JSON object")
            source = str(config_file)

            # With a centre crop the crop size is the final size and `size` what the image is
            # resized to first (a square for a shortest edge: the image is square by then).
            resize = None
            if cfg.get("crop_size") is not None and cfg.get("do_center_crop", True):
                size = _parse_size(cfg["crop_size"], "crop_size", source)
                if cfg.get("size") is not None and cfg.get("do_resize", True):
                    resize = _parse_size(cfg["size"], "size", source)
            elif cfg.get("size") is not None:
                size = _parse_size(cfg["size"], "size", source)
            elif vision_config is not None and getattr(vision_config, "image_size", None):
                size = _parse_size(vision_config.image_size, "image_size", "vision_config")
            else:
                raise ValueError(f"{source}: no 'size' or 'crop_size' in the preprocessor config")

            family = model_type or str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
            default_mean, default_std, default_resample = _family_defaults(family)
            mean = cfg.get("image_mean") or default_mean
            std = cfg.get("image_std") or default_std
            if cfg.get("do_normalize") is False:
                mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
            rescale = float(cfg.get("rescale_factor", 1 / 255))
            if cfg.get("do_rescale") is False:
                rescale = 1.0
            resample = cfg.get("resample")
            return cls(
                size=size,
                image_mean=tuple(mean),  # type: ignore[arg-type]
                image_std=tuple(std),  # type: ignore[arg-type]
                mode=mode,
                resample=default_resample if resample is None else int(resample),
                rescale_factor=rescale,
                resize=resize,
            )

        if vision_config is None or not getattr(vision_config, "image_size", None):
            raise ValueError(
                f"{path}: no {PRETRAINED_CONFIG_NAME} found and no vision_config with "
                "image_size to fall back on"
            )
        height, width = _parse_size(vision_config.image_size, "image_size", "vision_config")
        mean, std, resample = _family_defaults(model_type)
        warnings.warn(
            f"{path}: no {PRETRAINED_CONFIG_NAME}; using default preprocessing for "
            f"model_type={model_type!r}: size=({height}, {width}), image_mean={mean}, "
            f"image_std={std}, resample={resample}",
            stacklevel=2,
        )
        return cls(size=(height, width), image_mean=mean, image_std=std, mode=mode, resample=resample)

    def fill_color(self) -> tuple[int, int, int]:
        """Padding colour: the normalisation mean in 0..255, so padding becomes ~0."""
        r, g, b = (round(m * 255) for m in self.image_mean)
        return r, g, b

    def _prepare(self, src: ImageInput, name: str | None = None) -> np.ndarray:
        img = load_image(src, name=name, max_pixels=self.max_pixels)
        height, width = self.resize or self.size
        if self.mode == "pad":
            img = _pad_then_resize(img, self.fill_color(), (height, width), self.resample, self.max_pixels)
        elif img.size != (width, height):
            img = img.resize((width, height), resample=self.resample)
        img = _center_crop(img, self.size)
        return np.asarray(img, dtype=np.uint8)  # [H, W, 3]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess one image or a list of images into a float32 ``[N, 3, H, W]`` tensor."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given (empty list)")
            arrays = []
            for index, item in enumerate(images):
                try:
                    arrays.append(self._prepare(item))
                except ImageError as exc:
                    raise ImageError(f"image at index {index}: {exc}") from exc
                except TypeError as exc:
                    raise TypeError(f"image at index {index}: {exc}") from exc
        else:
            arrays = [self._prepare(images)]
        return self.normalize(arrays)

    def normalize(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``[H, W, 3]`` arrays of one size -> rescaled, normalised float32 ``[N, 3, H, W]``."""
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(torch.float32)
        batch = batch * self.rescale_factor
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        return ((batch - mean) / std).contiguous()
