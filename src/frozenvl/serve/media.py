"""`image_url` parts -> decoded images, under the server's limits.

`data:` URLs are always accepted; their size is read off the URL's length and refused before
any base64 decoding. `http(s)` URLs are fetched only from `allowed_media_domains`, local paths
read only under `allowed_local_media_path`: both are decided from the string alone, so a refused
URL or path causes no network or file access at all (tests assert it).
"""

from __future__ import annotations

import binascii
import os
import urllib.parse
import urllib.request
from base64 import b64decode

from PIL import Image

from ..vision.images import ImageError, load_image
from .limits import Limits
from .protocol import APIError, ImageRef, bad, too_large


def data_url_bytes(url: str) -> tuple[str, str]:
    """(media type, base64 payload) of a `data:` URL, without decoding it."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise ValueError("a data URL needs a ',' before its data")
    params = header[len("data:"):].split(";")
    if "base64" not in params[1:]:
        raise ValueError("only base64 data URLs are accepted (data:image/png;base64,...)")
    return params[0].lower(), payload


def _from_data_url(ref: ImageRef, limits: Limits) -> bytes:
    try:
        mime, payload = data_url_bytes(ref.url)
    except ValueError as e:
        raise bad(f"{ref.where}: {e}", ref.where) from None
    if mime and not mime.startswith("image/"):
        raise bad(f"{ref.where}: data URL of type {mime!r} is not an image", ref.where)
    size = len(payload) * 3 // 4  # what the payload decodes to (at most): known before decoding
    if size > limits.max_image_bytes:
        raise too_large(f"{ref.where}: image data of about {size:,} bytes is over the limit of "
                        f"{limits.max_image_bytes:,} bytes", ref.where)
    try:
        return b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"{ref.where}: invalid base64 in data URL ({e})", ref.where) from None


def _host_allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d or host.endswith("." + d) for d in allowed)


def _from_remote(ref: ImageRef, limits: Limits) -> bytes:
    host = urllib.parse.urlsplit(ref.url).hostname or ""
    if not _host_allowed(host, limits.allowed_media_domains):
        allowed = ", ".join(limits.allowed_media_domains) or "none (start the server with --allowed-media-domains)"
        raise bad(f"{ref.where}: remote images from {host or ref.url!r} are not allowed; allowed domains: {allowed}",
                  ref.where, "media_not_allowed")
    try:
        with urllib.request.urlopen(ref.url, timeout=limits.remote_timeout_s) as resp:
            data = resp.read(limits.max_image_bytes + 1)
    except OSError as e:
        raise bad(f"{ref.where}: cannot fetch {ref.url} ({e})", ref.where) from None
    if len(data) > limits.max_image_bytes:
        raise too_large(f"{ref.where}: {ref.url} is over the limit of {limits.max_image_bytes:,} bytes", ref.where)
    return data


def local_path(ref: ImageRef, limits: Limits) -> str:
    """The file a local reference names, if it lies under the allowed directory. The lexical check
    comes first and touches nothing; only a path inside is resolved (so a symlink cannot lead out)."""
    raw = urllib.parse.unquote(urllib.parse.urlsplit(ref.url).path) if ref.url.startswith("file:") else ref.url
    root = limits.allowed_local_media_path
    if root is None:
        raise bad(f"{ref.where}: local image paths are not allowed (start the server with "
                  "--allowed-local-media-path DIR)", ref.where, "media_not_allowed")
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, raw))
    if os.path.commonpath([root, path]) != root or os.path.commonpath([os.path.realpath(root),
                                                                         os.path.realpath(path)]) != os.path.realpath(root):
        raise bad(f"{ref.where}: {raw!r} is outside the allowed media directory", ref.where, "media_not_allowed")
    return path


def _from_local(ref: ImageRef, limits: Limits) -> bytes:
    path = local_path(ref, limits)
    try:
        size = os.path.getsize(path)
        if size > limits.max_image_bytes:
            raise too_large(f"{ref.where}: file of {size:,} bytes is over the limit of {limits.max_image_bytes:,}",
                            ref.where)
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise bad(f"{ref.where}: cannot read {ref.url!r} ({e.strerror or e})", ref.where) from None


def load(ref: ImageRef, limits: Limits) -> Image.Image:
    """One image part -> a decoded RGB image, or an APIError (400 / 413) naming the part."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url[:16] else ""
    if scheme == "data":
        data = _from_data_url(ref, limits)
    elif scheme in ("http", "https"):
        data = _from_remote(ref, limits)
    elif scheme in ("", "file"):
        data = _from_local(ref, limits)
    else:
        raise bad(f"{ref.where}: unsupported image URL scheme {scheme!r} (data:, http(s) or a local path)", ref.where)
    try:
        return load_image(data, name=ref.where, max_pixels=limits.max_pixels)
    except ImageError as e:
        if "max_pixels" in str(e):
            raise APIError(413, str(e), param=ref.where, code="image_too_large") from None
        raise bad(str(e), ref.where, "invalid_image") from None


def load_all(refs: list[ImageRef], limits: Limits) -> list[Image.Image]:
    return [load(r, limits) for r in refs]


__all__ = ["APIError", "data_url_bytes", "load", "load_all", "local_path"]
