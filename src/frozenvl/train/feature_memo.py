"""The frozen vision tower's features of each training image, kept for the rest of the run.

The vision tower never trains and its preprocessing has no randomness, so an image's features are the
same at every step. Reading and decoding the file and running the tower again each time the image
comes round costs a fifth of a tiny workflow's training step on a CPU (measured in docs/training.md,
"Speed"), and the tower's share grows with a real encoder. The memo keeps each image's features
after its first use, up to a memory bound, after which images are read and encoded as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class VisionFeatureMemo:
    """Features per image path, up to `max_bytes` in all (then new images are no longer kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._store: dict[Path, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def has_all(self, paths: Sequence[Path]) -> bool:
        return bool(paths) and all(p in self._store for p in paths)

    def get(self, path: Path) -> torch.Tensor:
        return self._store[path]

    def put(self, path: Path, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if path in self._store or self.bytes + size > self.max_bytes:
            return
        # a copy of its own: a view would keep the whole batch's tensor alive
        self._store[path] = features.detach().to("cpu", copy=True)
        self.bytes += size
