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


def write_llava_data(root, n: int = 12, with_text_only: bool = True, bad: dict | None = None) -> str:
    """A small LLaVA-format JSON dataset with real PNG files; returns the JSON path.

    `bad` maps sample index -> "missing" (image file absent) or "corrupt" (truncated PNG).
    """
    import json

    root = os.fspath(root)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    names = list(colours)
    records = []
    for i in range(n):
        colour = names[i % 3]
        rec = {"id": f"s{i}"}
        if with_text_only and i % 4 == 3:
            rec["conversations"] = [
                {"from": "human", "value": f"what is {i} plus 1"},
                {"from": "gpt", "value": f"{i + 1}"},
            ]
        else:
            path = os.path.join("images", f"{i}.png")
            img = Image.new("RGB", (32 + 4 * (i % 3), 32), colours[colour])
            img.save(os.path.join(root, path))
            kind = (bad or {}).get(i)
            if kind == "missing":
                os.remove(os.path.join(root, path))
            elif kind == "corrupt":
                raw = open(os.path.join(root, path), "rb").read()
                open(os.path.join(root, path), "wb").write(raw[: len(raw) // 2])
            rec["image"] = path
            rec["conversations"] = [
                {"from": "human", "value": "<image>\nwhat colour is the image"},
                {"from": "gpt", "value": f"it is {colour}"},
            ]
        records.append(rec)
    out = os.path.join(root, "train.json")
    with open(out, "w") as f:
        json.dump(records, f)
    return out


def assert_cache_matches_recompute(model, task: str, images) -> None:
    """Cached generation == full recomputation (tokens), and a cached decode step's logits == the
    whole sequence recomputed (tolerance), with images that really change the output."""
    for prompt, imgs in [("<image>\nwhat is this", [images[0]]), ("<image> and <image> differ how", images[:2])]:
        cached = model.generate(prompt=prompt, images=imgs, task=task, max_new_tokens=8, eos_token_id=[])
        full = model.generate(prompt=prompt, images=imgs, task=task, max_new_tokens=8, eos_token_id=[],
                              use_cache=False)
        assert torch.equal(cached, full)
    inputs = batch_inputs(model, task, "<image>\nwhat is this", [images[0]])
    with torch.no_grad():
        out = model(**inputs, task=task, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(nxt)], 1)
        step = model(nxt, mask, task=task, past_key_values=out.past_key_values,
                     position_ids=mask.sum(-1, keepdim=True) - 1, use_cache=True).logits[:, -1]
        full_ids = torch.cat([inputs["input_ids"], nxt], 1)
        full = model(full_ids, mask, pixel_values=inputs["pixel_values"], task=task).logits[:, -1]
        other_image = model(full_ids, mask, pixel_values=model.pixel_values([images[1]], task), task=task).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)
    assert (full - other_image).abs().max() > 1e-4


def assert_gradients_only_in_workflow(model, task: str, other: str, images) -> None:
    """One backward pass of `task`: no gradient on the base, the vision tower or workflow `other`,
    and a non-zero gradient in every named part of `task`."""
    family = model.workflow(task)
    model.train()
    inputs = model.prepare_inputs(["<image>\na red circle"], [[images[0]]], task=task)
    model(**inputs, labels=inputs["input_ids"], task=task).loss.backward()
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.workflow(other).parameters())
    for part, params in family.parts().items():
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), part


def perturb(model, task: str, seed: int = 1, scale: float = 0.05) -> None:
    """Give a workflow non-trivial weights (noise of std `scale`), so tests do not pass on an identity init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters(task):
            p.add_(torch.randn(p.shape, generator=g) * scale)


def batch_inputs(model, task: str, prompts, images) -> dict:
    """prepare_inputs plus explicit position ids (as generation passes them)."""
    from frozenvl.data.prompt import position_ids_from_mask

    inputs = model.prepare_inputs(prompts, images, task=task)
    inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    return inputs
