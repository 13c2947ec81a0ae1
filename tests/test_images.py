"""Tests for frozenvl.vision.images (CPU only, all inputs built in tmp_path)."""

from __future__ import annotations

import io
import json
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frozenvl.vision.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImagePreprocessor,
    expand_to_square,
    load_image,
    square_pad_offsets,
)

RED = (255, 0, 0)


# ----------------------------------------------------------------------------- helpers


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _patterned(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A non-uniform RGB image, so its PNG/JPEG encodings are not trivially tiny."""
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 3
    arr[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 5
    arr[..., 2] = (np.arange(w)[None, :] * np.arange(h)[:, None] % 251).astype(np.uint8)
    return Image.fromarray(arr)


def _png_with_header_size(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR claims width x height (no pixels are allocated)."""
    data = bytearray(_png_bytes(_patterned((8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC of type + data
    return bytes(data)


def _normalised(rgb: tuple[int, int, int], mean, std) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(mean)) / torch.tensor(std)


@pytest.fixture
def png_path(tmp_path: Path) -> Path:
    path = tmp_path / "ok.png"
    _patterned().save(path)
    return path


# ----------------------------------------------------------------------------- load_image


def test_valid_png_path_bytes_and_pil(png_path: Path) -> None:
    expected = np.asarray(_patterned())
    with Image.open(png_path) as opened:  # a lazily opened PIL image is decoded too
        for src in (png_path, str(png_path), png_path.read_bytes(), opened):
            img = load_image(src)
            assert img.mode == "RGB" and img.size == (64, 48)
            np.testing.assert_array_equal(np.asarray(img), expected)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as info:
        load_image(path)
    assert str(path) in str(info.value)
    with pytest.raises(ImageError, match="<bytes>.*empty"):
        load_image(b"")


def test_text_file_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_text("this is not a JPEG\n")
    with pytest.raises(ImageError, match="cannot decode") as info:
        load_image(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    full = tmp_path / f"full.{fmt.lower()}"
    _patterned((128, 96)).save(full, format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(cut)
    assert str(cut) in str(info.value)
    assert load_image(full).size == (128, 96)  # the intact file is fine


def test_huge_header_fails_fast_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header_size(20000, 20000))
    start = time.perf_counter()
    with pytest.raises(ImageError, match="limit") as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0  # nothing close to 1.2 GB was decoded
    assert str(path) in str(info.value)
    assert "400000000" in str(info.value)  # the size (pixels) is reported


def test_max_pixels_checked_from_header(tmp_path: Path) -> None:
    # 9000x9000 is below Pillow's own bomb threshold, so our header check must catch it.
    assert DEFAULT_MAX_PIXELS < 9000 * 9000
    with pytest.raises(ImageError, match=r"9000x9000.*limit.*64,000,000"):
        load_image(_png_with_header_size(9000, 9000), name="big.png")
    # A custom, smaller limit on a valid image, for every kind of input.
    for src in (_png_bytes(_patterned()), _patterned()):
        with pytest.raises(ImageError, match=r"64x48.*limit.*max_pixels=1,000"):
            load_image(src, max_pixels=1000)
    assert load_image(_patterned(), max_pixels=64 * 48).size == (64, 48)


def test_name_overrides_label() -> None:
    with pytest.raises(ImageError, match=r"^sample-7: cannot decode"):
        load_image(b"garbage bytes", name="sample-7")


def test_pillow_bomb_warning_is_not_leaked(tmp_path: Path) -> None:
    # 9500x9500 = 90.25 MP: over Pillow's warning threshold but under its error one.
    data = _png_with_header_size(9500, 9500)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any leaked warning would fail the test
        with pytest.raises(ImageError, match="limit"):
            load_image(data)


@pytest.mark.parametrize("bad", [42, 3.5, None, ["a.png"], {"path": "a.png"}])
def test_wrong_type(bad: object) -> None:
    with pytest.raises(TypeError, match=type(bad).__name__):
        load_image(bad)  # type: ignore[arg-type]


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 0)  # fully transparent
    arr[1, 0] = (0, 0, 0, 128)  # half-transparent black
    arr[1, 1] = (0, 0, 255, 255)
    path = tmp_path / "rgba.png"
    Image.fromarray(arr).save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in out.getpixel((0, 1)))
    assert out.getpixel((1, 1)) == (0, 0, 255)


def test_la_composited_on_white() -> None:
    img = Image.new("LA", (3, 3), (0, 0))  # black, fully transparent
    assert load_image(img).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 255, 0] + [0, 0, 255] + [0, 0, 0] * 254)  # 0 green, 1 blue
    img.putpixel((3, 3), 1)
    img.info["transparency"] = 0  # green index is transparent
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (0, 0, 255)


def test_palette_without_transparency() -> None:
    img = Image.new("P", (2, 2), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    assert load_image(img).getpixel((0, 0)) == (10, 20, 30)


def test_grayscale_and_bilevel() -> None:
    assert load_image(Image.new("L", (3, 2), 77)).getpixel((2, 1)) == (77, 77, 77)
    bilevel = Image.new("1", (3, 2), 0)
    bilevel.putpixel((1, 1), 1)
    out = load_image(bilevel)
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # red in CMYK
    out = load_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    img = Image.new("I;16", (4, 4), 0x8000)
    img.putpixel((0, 0), 0xFFFF)
    img.putpixel((1, 0), 0)
    path = tmp_path / "g16.png"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((2, 2)) == (128, 128, 128)  # mid-grey, not clipped to white
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 0)


def test_int32_and_float_modes() -> None:
    assert load_image(Image.new("I", (2, 2), 200)).getpixel((0, 0)) == (200, 200, 200)
    assert load_image(Image.new("F", (2, 2), 0.5)).getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # 40x20: left half red, right half blue. Orientation 6 = display rotated 90 deg CW,
    # so the upright image is 20x40 with red on top.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = RED
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 34))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_input_pil_image_not_modified() -> None:
    src = Image.new("RGBA", (5, 3), (1, 2, 3, 0))
    out = load_image(src)
    assert src.mode == "RGBA" and out is not src and out.mode == "RGB"


# ----------------------------------------------------------------------------- padding


def test_square_pad_offsets() -> None:
    assert square_pad_offsets(40, 20) == (40, 0, 10)
    assert square_pad_offsets(20, 40) == (40, 10, 0)
    assert square_pad_offsets(7, 4) == (7, 0, 1)  # odd extra pixel goes to the bottom
    assert square_pad_offsets(5, 5) == (5, 0, 0)
    with pytest.raises(ValueError):
        square_pad_offsets(0, 5)


def test_expand_to_square() -> None:
    out = expand_to_square(Image.new("RGB", (40, 20), RED), (1, 2, 3))
    assert out.size == (40, 40)
    arr = np.asarray(out)
    assert (arr[:10] == (1, 2, 3)).all() and (arr[30:] == (1, 2, 3)).all()
    assert (arr[10:30] == RED).all()
    tall = np.asarray(expand_to_square(Image.new("RGB", (20, 40), RED), (9, 9, 9)))
    assert (tall[:, :10] == 9).all() and (tall[:, 10:30] == RED).all()
    square = Image.new("RGB", (8, 8), RED)
    assert expand_to_square(square, (0, 0, 0)) is square


# ----------------------------------------------------------------------------- preprocessor


def _write_config(directory: Path, **cfg) -> Path:
    (directory / "preprocessor_config.json").write_text(json.dumps(cfg))
    return directory


def test_from_pretrained_clip_like_config(tmp_path: Path) -> None:
    _write_config(
        tmp_path,
        image_processor_type="CLIPImageProcessor",
        size={"shortest_edge": 336},
        crop_size={"height": 48, "width": 48},
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        resample=3,
        rescale_factor=0.00392156862745098,
    )
    pre = ImagePreprocessor.from_pretrained(tmp_path)
    assert pre.size == (48, 48)  # the crop size is the final size
    assert pre.image_mean == CLIP_MEAN and pre.image_std == CLIP_STD
    assert pre.resample == 3 and pre.mode == "pad"
    assert pre.rescale_factor == pytest.approx(1 / 255)
    assert pre.fill_color() == (123, 117, 104)  # round(m * 255)


def test_from_pretrained_siglip_like_config(tmp_path: Path) -> None:
    _write_config(tmp_path, size={"height": 24, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2)
    pre = ImagePreprocessor.from_pretrained(tmp_path, mode="resize")
    assert pre.size == (24, 32) and pre.resample == 2 and pre.mode == "resize"
    assert pre.fill_color() == (128, 128, 128)
    out = pre(_patterned())
    assert out.shape == (1, 3, 24, 32)


def test_from_pretrained_int_sizes(tmp_path: Path) -> None:
    _write_config(tmp_path, size=224, crop_size=16)
    assert ImagePreprocessor.from_pretrained(tmp_path).size == (16, 16)


def test_from_pretrained_fallback_clip(tmp_path: Path) -> None:
    from transformers import CLIPVisionConfig

    with pytest.warns(UserWarning, match="default"):
        pre = ImagePreprocessor.from_pretrained(tmp_path, vision_config=CLIPVisionConfig(image_size=32))
    assert pre.size == (32, 32)
    assert pre.image_mean == CLIP_MEAN and pre.image_std == CLIP_STD


def test_from_pretrained_fallback_siglip(tmp_path: Path) -> None:
    from transformers import SiglipVisionConfig

    with pytest.warns(UserWarning, match="default"):
        pre = ImagePreprocessor.from_pretrained(tmp_path, vision_config=SiglipVisionConfig(image_size=32))
    assert pre.size == (32, 32)
    assert pre.image_mean == (0.5, 0.5, 0.5) and pre.image_std == (0.5, 0.5, 0.5)


def test_from_pretrained_nothing_available(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImagePreprocessor.from_pretrained(tmp_path)


def test_invalid_mode(tmp_path: Path) -> None:
    _write_config(tmp_path, size=32)
    with pytest.raises(ValueError, match="pad.*resize"):
        ImagePreprocessor.from_pretrained(tmp_path, mode="crop")
    with pytest.raises(ValueError, match="pad.*resize"):
        ImagePreprocessor(size=(8, 8), image_mean=(0.5,) * 3, image_std=(0.5,) * 3, mode="stretch")


def test_pad_mode_exact_size_padding_is_mean_and_centre_red() -> None:
    pre = ImagePreprocessor(size=(40, 40), image_mean=CLIP_MEAN, image_std=CLIP_STD)
    out = pre(Image.new("RGB", (40, 20), RED))
    assert out.shape == (1, 3, 40, 40) and out.dtype == torch.float32
    # Rows 0-9 and 30-39 are padding in the mean colour: ~0 after normalisation.
    assert out[0, :, :10].abs().max() < 0.01
    assert out[0, :, 30:].abs().max() < 0.01
    red = _normalised(RED, CLIP_MEAN, CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0, :, 10:30], red.expand(3, 20, 40), atol=1e-5, rtol=0)


def test_pad_mode_with_resize() -> None:
    from transformers import CLIPVisionConfig

    with pytest.warns(UserWarning):
        pre = ImagePreprocessor.from_pretrained("/nonexistent-dir", vision_config=CLIPVisionConfig(image_size=32))
    out = pre(Image.new("RGB", (40, 20), RED))
    assert out.shape == (1, 3, 32, 32)
    # 40x40 padded -> 32x32: rows 0-7 are padding; keep clear of the bicubic support.
    assert out[0, :, :5].abs().max() < 0.01
    assert out[0, :, -5:].abs().max() < 0.01
    red = _normalised(RED, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(out[0, :, 16, 16], red, atol=1e-5, rtol=0)


def test_resize_mode_keeps_no_padding() -> None:
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    pre = ImagePreprocessor(size=(32, 32), image_mean=mean, image_std=std, mode="resize", resample=2)
    out = pre(Image.new("RGB", (40, 20), RED))
    red = _normalised(RED, mean, std).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    torch.testing.assert_close(out, red, atol=1e-5, rtol=0)  # red everywhere
    assert torch.allclose(out[0, 0], torch.ones(32, 32))  # R: (1 - .5) / .5
    assert torch.allclose(out[0, 1], -torch.ones(32, 32))  # G: (0 - .5) / .5


def test_batch_shape_dtype_and_mixed_inputs(png_path: Path) -> None:
    pre = ImagePreprocessor(size=(16, 24), image_mean=CLIP_MEAN, image_std=CLIP_STD)
    items = [png_path, str(png_path), png_path.read_bytes(), _patterned()]
    out = pre(items)
    assert out.shape == (4, 3, 16, 24) and out.dtype == torch.float32
    assert out.is_contiguous()
    for i in range(1, 4):  # same image through every input kind
        torch.testing.assert_close(out[i], out[0])
    single = pre(png_path)
    assert single.shape == (1, 3, 16, 24)
    torch.testing.assert_close(single[0], out[0])


def test_matches_manual_pipeline() -> None:
    pre = ImagePreprocessor(size=(20, 20), image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    img = _patterned((30, 30))
    expected = np.asarray(img.resize((20, 20), resample=3), dtype=np.float32) / 255
    expected = (expected - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    torch.testing.assert_close(pre(img)[0], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-5, rtol=0)


def test_error_on_second_item_names_index(tmp_path: Path, png_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_text("not an image")
    pre = ImagePreprocessor(size=(8, 8), image_mean=CLIP_MEAN, image_std=CLIP_STD)
    with pytest.raises(ImageError, match="index 1") as info:
        pre([png_path, bad, png_path])
    assert str(bad) in str(info.value)
    with pytest.raises(TypeError, match=r"index 1.*int"):
        pre([png_path, 5])


def test_preprocessor_honours_max_pixels() -> None:
    pre = ImagePreprocessor(size=(8, 8), image_mean=CLIP_MEAN, image_std=CLIP_STD, max_pixels=100)
    with pytest.raises(ImageError, match="limit"):
        pre(Image.new("RGB", (20, 20)))


# ----------------------------------------------------------------------------- bounded memory

# Peak RSS growth allowed while preprocessing extreme-aspect images, over a warmed-up baseline.
# A side x side pad canvas would be 768 MB for 1x16000 and 12 GB for 1x64000.
_RSS_BOUND_MB = 64

_RSS_SCRIPT = r"""
import json, resource, sys
import torch
torch.set_num_threads(1)
from PIL import Image
from frozenvl.vision.images import CLIP_MEAN, CLIP_STD, ImagePreprocessor

def vm_size_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1])

pres = [
    ImagePreprocessor(size=(32, 32), image_mean=CLIP_MEAN, image_std=CLIP_STD, mode="pad"),
    ImagePreprocessor(size=(28, 28), resize=(32, 32), image_mean=CLIP_MEAN, image_std=CLIP_STD, mode="pad"),
    ImagePreprocessor(size=(32, 32), image_mean=CLIP_MEAN, image_std=CLIP_STD, mode="resize"),
]
for pre in pres:  # warm up every code path on a normal image
    pre(Image.new("RGB", (64, 48), (10, 200, 30)))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
# Cap the address space so an unbounded allocation fails fast here instead of swapping the machine.
limit = (vm_size_kb() + 2 * 1024 * 1024) * 1024
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
shapes = []
for path in sys.argv[1:]:
    for pre in pres:
        shapes.append(list(pre(path).shape))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kb": base, "peak_kb": peak, "shapes": shapes}))
"""


def test_extreme_aspect_ratio_stays_within_memory_bound(tmp_path: Path) -> None:
    """Pad mode must not allocate a side x side canvas for a 1-pixel-wide strip (issue 13.2)."""
    import os
    import subprocess
    import sys

    paths = []
    for w, h in [(16000, 1), (64000, 1), (1, 64000), (3, 40000)]:
        path = tmp_path / f"strip_{w}x{h}.png"
        Image.new("RGB", (w, h), (200, 10, 10)).save(path)
        assert path.stat().st_size < 2000  # a few hundred bytes each
        paths.append(str(path))
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, *paths], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[1, 3, 32, 32], [1, 3, 28, 28], [1, 3, 32, 32]] * len(paths)
    grown_mb = (result["peak_kb"] - result["base_kb"]) / 1024
    assert grown_mb < _RSS_BOUND_MB, f"peak RSS grew by {grown_mb:.0f} MB (bound {_RSS_BOUND_MB} MB)"


def test_strip_is_shrunk_before_padding_and_stays_centred() -> None:
    """Beyond max_pixels for the canvas, the strip is resized first and pasted centred on the padding."""
    pre = ImagePreprocessor(size=(32, 32), image_mean=CLIP_MEAN, image_std=CLIP_STD, max_pixels=1_000_000)
    out = pre(Image.new("RGB", (16000, 1), RED))[0]  # canvas would be 256 M pixels
    red = _normalised(RED, CLIP_MEAN, CLIP_STD).view(3, 1)
    torch.testing.assert_close(out[:, 15], red.expand(3, 32), atol=1e-5, rtol=0)  # the strip: one row, centred
    rest = torch.cat([out[:, :15], out[:, 16:]], dim=1)
    assert rest.abs().max() < 0.01  # everything else is the mean-colour padding
    tall = pre(Image.new("RGB", (2, 40000), RED))[0]
    torch.testing.assert_close(tall[:, :, 15], red.expand(3, 32), atol=1e-5, rtol=0)
    assert torch.cat([tall[:, :, :15], tall[:, :, 16:]], dim=2).abs().max() < 0.01


def test_expand_to_square_refuses_huge_canvas() -> None:
    with pytest.raises(ImageError, match=r"16000x16000.*max_pixels=1,000,000"):
        expand_to_square(Image.new("RGB", (16000, 1)), (0, 0, 0), max_pixels=1_000_000)


# ----------------------------------------------------------------------------- parity with transformers

_SIZES = [(40, 20), (24, 36), (32, 32), (61, 17), (7, 90)]


def _llava_pad(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square, written out: centred on a mean-colour square, odd pixel right/bottom."""
    w, h = img.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
def test_pixels_equal_transformers_image_processor(tmp_path: Path, kind: str) -> None:
    """pad mode == LLaVA's expand2square + the HF processor; a square image == the HF processor alone.

    dinov2 is BitImageProcessor's config (resize shortest edge 256, centre crop 224) scaled down:
    resize and crop sizes differ, so the crop is a real crop of the resized image.
    """
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil

    if kind == "clip":
        hf = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    else:
        hf = BitImageProcessorPil(
            size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == {"clip": "CLIPImageProcessor", "dinov2": "BitImageProcessor"}[kind]
    pad = ImagePreprocessor.from_pretrained(tmp_path, mode="pad")
    stretch = ImagePreprocessor.from_pretrained(tmp_path, mode="resize")
    assert pad.size == ((30, 30) if kind == "clip" else (32, 32))
    for size in _SIZES:
        img = _patterned(size)
        ref = hf(images=_llava_pad(img, pad.fill_color()), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pad(img), ref, atol=1e-5, rtol=0)
    square = _patterned((45, 45))
    ref = hf(images=square, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(stretch(square), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(pad(square), ref, atol=1e-5, rtol=0)


def test_fallback_for_dinov2_uses_imagenet_statistics(tmp_path: Path) -> None:
    from transformers import Dinov2Config

    with pytest.warns(UserWarning, match="dinov2"):
        pre = ImagePreprocessor.from_pretrained(tmp_path, vision_config=Dinov2Config(image_size=28))
    assert pre.size == (28, 28) and pre.resample == 3
    assert pre.image_mean == (0.485, 0.456, 0.406) and pre.image_std == (0.229, 0.224, 0.225)


def test_resize_smaller_than_crop_is_refused() -> None:
    with pytest.raises(ValueError, match=r"resize \(20, 20\) is smaller than the crop size \(24, 24\)"):
        ImagePreprocessor(size=(24, 24), resize=(20, 20), image_mean=CLIP_MEAN, image_std=CLIP_STD)


def test_resize_mode_stretches_then_crops() -> None:
    """`resize` mode with a crop: stretch to the resize size, then the HF centre crop."""
    pre = ImagePreprocessor(size=(20, 20), resize=(26, 26), image_mean=(0.0,) * 3, image_std=(1.0,) * 3,
                            mode="resize", resample=2, rescale_factor=1.0)
    img = _patterned((50, 30))
    expected = np.asarray(img.resize((26, 26), resample=2), dtype=np.float32)[3:23, 3:23]
    torch.testing.assert_close(pre(img)[0], torch.from_numpy(expected).permute(2, 0, 1), atol=1e-4, rtol=0)


def test_hub_id_reads_the_cached_preprocessor_config(tmp_path: Path, monkeypatch) -> None:
    """A hub id (not a local directory) finds its preprocessor_config.json in the HF cache (offline)."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someorg--tiny-dino"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    _write_config(snap, size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=3,
                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                  image_processor_type="BitImageProcessor")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pre = ImagePreprocessor.from_pretrained("someorg/tiny-dino")
    assert pre.size == (32, 32) and pre.resize == (36, 36)
    assert pre.image_mean == (0.485, 0.456, 0.406)
