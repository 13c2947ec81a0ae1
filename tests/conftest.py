"""Shared fixtures: tiny random base models built in code and saved to disk (no hub access)."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
torch.set_num_threads(2)

LLM_ARCHS = ["llama", "qwen2", "qwen3", "mistral"]  # the Llama-block archs most tests sweep


def _archs() -> tuple[list[str], list[str]]:
    from frozenvl.families.architectures import ARCHITECTURES

    return list(ARCHITECTURES), [a for a, spec in ARCHITECTURES.items() if spec.llama_block]


ALL_ARCHS, LLAMA_BLOCK_ARCHS = _archs()  # every architecture in the table; those with the Llama block


@pytest.fixture(autouse=True)
def _seeded():
    """Workflows initialise from torch's global RNG: seed it per test, so that what a test sees (e.g.
    whether greedy output is degenerate) does not depend on which tests ran before it."""
    torch.manual_seed(0)


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


CACHE_PROMPTS = (("<image>\nwhat is this", 1), ("<image> and <image> differ how", 2))


def capture_step_logits(model):
    """Context manager: the last-position logits [B, V] of every forward pass `model` runs (e.g. each
    step of generation.py's loop), recorded around `FrozenVLModel._step`, which the prefill (through
    `forward`) and every decode step call; the loop itself is not touched."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        steps: list[torch.Tensor] = []
        inner = model._step

        def recording(*args, **kwargs):
            out = inner(*args, **kwargs)
            steps.append(out.logits[:, -1].detach().clone())
            return out

        model._step = recording
        try:
            yield steps
        finally:
            del model._step

    return ctx()


def assert_cache_matches_recompute(model, task: str, images, max_new_tokens: int = 8, min_distinct: int = 3,
                                   tol: float = 1e-4) -> None:
    """Per-step logits of the real generation loop with the KV cache == the whole sequence recomputed
    without cache, for a left-padded batch of prompts with 1 and 2 images; the cached and uncached
    loops give the same tokens; the tokens are not degenerate (at least `min_distinct` distinct
    values per row); and the images matter (another image changes the recomputed logits)."""
    prompts = [p for p, _ in CACHE_PROMPTS]
    per_row = [list(images[k : k + n]) for k, (_, n) in enumerate(CACHE_PROMPTS)]
    kw = dict(task=task, max_new_tokens=max_new_tokens, eos_token_id=[])
    with capture_step_logits(model) as steps:
        cached = model.generate(prompt=prompts, images=per_row, **kw)
    assert len(steps) == max_new_tokens, f"{len(steps)} forward passes for {max_new_tokens} tokens"
    assert torch.equal(cached, model.generate(prompt=prompts, images=per_row, use_cache=False, **kw))
    for row, (prompt, imgs) in enumerate(zip(prompts, per_row)):
        tokens = cached[row]
        assert len(set(tokens.tolist())) >= min_distinct, f"row {row}: degenerate output {tokens.tolist()}"
        inputs = model.prepare_inputs(prompt, imgs, task=task)
        ids = torch.cat([inputs["input_ids"], tokens[None, :-1]], 1)
        with torch.no_grad():
            for k in range(max_new_tokens):  # step k predicted token k from the prompt and tokens < k
                n = inputs["input_ids"].shape[1] + k
                full = model(ids[:, :n], torch.ones_like(ids[:, :n]), pixel_values=inputs["pixel_values"],
                             task=task).logits[0, -1]
                torch.testing.assert_close(steps[k][row], full, atol=tol, rtol=tol,
                                           msg=lambda m, k=k: f"row {row}, step {k}: {m}")
            other = model(ids, torch.ones_like(ids), pixel_values=model.pixel_values(images[2:3] * len(imgs), task),
                          task=task).logits[0, -1]
        assert (full - other).abs().max() > 1e-5, "the images do not change the output"


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


def perturb(model, task: str, seed: int = 1, scale: float = 0.05, parts: list[str] | None = None) -> None:
    """Give a workflow non-trivial weights (noise of std `scale`), so tests do not pass on an identity init;
    `parts` limits it to those named parts of the workflow."""
    g = torch.Generator().manual_seed(seed)
    named = model.workflow(task).parts()
    params = [p for name in (parts if parts is not None else named) for p in named[name]]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


def batch_inputs(model, task: str, prompts, images) -> dict:
    """prepare_inputs plus explicit position ids (as generation passes them)."""
    from frozenvl.data.prompt import position_ids_from_mask

    inputs = model.prepare_inputs(prompts, images, task=task)
    inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    return inputs
