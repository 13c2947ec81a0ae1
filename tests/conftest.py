"""Shared fixtures: tiny random base models built in code and saved to disk (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(2)

LLM_ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """Build-once cache of (llm_dir, vision_dir) per (arch, vision)."""
    from frozenvl.tiny import build_tiny_bases

    built: dict[tuple[str, str], tuple[str, str]] = {}

    def get(arch: str = "llama", vision: str = "clip") -> tuple[str, str]:
        key = (arch, vision)
        if key not in built:
            root = tmp_path_factory.mktemp(f"bases-{arch}-{vision}")
            built[key] = build_tiny_bases(root, arch=arch, vision=vision)
        return built[key]

    return get


@pytest.fixture(scope="session")
def images():
    """A few small real RGB images with different content and sizes."""
    out = []
    for k, (w, h) in enumerate([(40, 20), (24, 36), (32, 32)]):
        img = Image.new("RGB", (w, h), (40 * k, 200 - 50 * k, 90))
        for x in range(w // 3):
            for y in range(h // 2):
                img.putpixel((x + k, y), (255, 20 * k, 10))
        out.append(img)
    return out
