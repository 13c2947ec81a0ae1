"""EncodedImageCache: the last images each workflow encoded, for inference; safe to share across threads."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .vision.tiling import TiledPixels


class EncodedImageCache:
    """The last `size` images each workflow encoded (vision tower + family encoder), for inference.

    A chat sends every earlier image again with each turn; with this cache each is encoded once.
    Entries are keyed by workflow, the image's pixel bytes, and the storage and in-place version of the
    weights involved, so any weight change (an optimizer step, loading, casting) is a miss. Used
    only without autograd (generation, evaluation); `size=0` turns it off.

    Thread safety: the store is touched only under a lock, and each call works on its own snapshot of
    the entries it needs, so another thread's eviction cannot take an entry away mid-call. Encoding
    runs outside the lock (two threads missing the same image may both encode it; both results are
    equal, and one is kept).
    """

    def __init__(self, size: int = 16):
        self.size = size
        self._store: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        with self._lock:
            self._store.clear()

    def get(
        self,
        task: str,
        modules: Sequence[nn.Module],
        pixel_values: torch.Tensor | TiledPixels,
        encode: Callable[[Any], Any],
    ) -> torch.Tensor | list[torch.Tensor]:
        """`encode(pixel_values)`, from the store where possible. Tiled images (one entry per image, keyed by
        its tile set and layout) come back as a list of per-image tensors; a pixel tensor as one tensor."""
        tiled = isinstance(pixel_values, TiledPixels)
        params = [p for m in modules for p in m.parameters()]
        if self.size <= 0 or any(p.is_inference() for p in params):
            return encode(pixel_values)  # inference tensors keep no version counter: changes would go unseen
        # storage address + in-place version of every weight: moving, casting or updating any is a miss
        version = tuple((p.data_ptr(), p._version) for p in params)
        digests = pixel_values.digests() if tiled else [_digest(px) for px in pixel_values]
        keys = [(task, version, d) for d in digests]
        with self._lock:
            found = {k: self._store[k] for k in keys if k in self._store}
            for k in found:
                self._store.move_to_end(k)
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # an image given twice is encoded once
        missing = [i for k, i in first.items() if k not in found]
        if missing:
            fresh = encode(pixel_values.select(missing) if tiled else pixel_values[missing])
            with self._lock:
                for j, i in enumerate(missing):
                    found[keys[i]] = self._store[keys[i]] = fresh[j]
                    self._store.move_to_end(keys[i])
                while len(self._store) > max(self.size, 0):
                    self._store.popitem(last=False)
        out = [found[k] for k in keys]
        return out if tiled else torch.stack(out)


def _digest(pixels: torch.Tensor) -> str:
    data = pixels.detach().to("cpu").contiguous()
    head = f"{tuple(data.shape)}{data.dtype}".encode()
    return hashlib.sha1(head + data.view(torch.uint8).numpy().tobytes()).hexdigest()
