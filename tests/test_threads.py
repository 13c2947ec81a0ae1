"""Inference from several threads on one model: no error, and every answer equals the same call alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import frozenvl
from frozenvl.image_cache import EncodedImageCache

from .conftest import perturb

WORKFLOWS = {
    "mm": {"family": "prefix"},
    "xa": {"family": "cross_attention", "every": 1, "resampler_depth": 1, "resampler_latents": 4,
           "resampler_heads": 2, "resampler_head_dim": 8},
    "g": {"family": "inner_adaptor", "layers": [0, 2]},
}
THREADS = 8


def _requests(images) -> list[tuple[str, dict]]:
    """Distinct calls: text, three multimodal families, generate / chat / streamed chat, one and two
    images, the same images shared between calls and workflows."""
    chat = [{"role": "user", "content": "<image>\nwhat is this"}]
    gen = dict(max_new_tokens=6, eos_token_id=[])
    return [
        ("generate", dict(prompt="what colour is the big square", task="text", **gen)),
        ("generate", dict(prompt="<image> what is it", images=[images[0]], task="mm", **gen)),
        ("generate", dict(prompt="<image> which shape is red", images=[images[1]], task="mm", **gen)),
        ("generate", dict(prompt="<image> and <image> differ how", images=[images[1], images[2]], task="xa", **gen)),
        ("generate", dict(prompt=["<image> left", "<image> and <image> right"], images=[[images[2]], images[:2]],
                          task="g", **gen)),
        ("chat", dict(messages=chat, images=[images[0]], task="xa", max_new_tokens=6)),
        ("chat", dict(messages=chat, images=[images[2]], task="g", max_new_tokens=6)),
        ("stream", dict(messages=chat, images=[images[1]], task="mm", max_new_tokens=6, stream=True)),
    ]


def _call(model, kind: str, kw: dict):
    if kind == "generate":
        return model.generate(**kw).tolist()
    if kind == "stream":
        return "".join(model.chat(**kw))
    return model.chat(**kw)


@pytest.fixture(scope="module")
def model(bases):
    llm, vis = bases()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # family init draws from the global generator: fixed, so are the answers
        m = frozenvl.build(llm, vis, workflows=WORKFLOWS)
    for k, task in enumerate(WORKFLOWS):
        perturb(m, task, seed=k + 1)
    return m


def test_generate_and_chat_from_eight_threads_equal_each_call_alone(model, images):
    requests = _requests(images)
    model.encoded_images.size = 16
    alone = [_call(model, kind, kw) for kind, kw in requests]
    generated = [out for (kind, _), out in zip(requests, alone) if kind == "generate"]
    assert all(len({t for row in out for t in row}) > 1 for out in generated), generated  # not one repeated token
    assert len({str(out) for out in alone}) == len(alone)  # every request answers differently

    model.encoded_images.clear()
    # fewer entries than the 8 (workflow, image) pairs in use: calls hit entries that other calls evict
    model.encoded_images.size = 3
    order = [i for _ in range(6) for i in range(len(requests))]  # 48 calls, every request 6 times
    start = threading.Barrier(THREADS, timeout=120)

    def run(i: int):
        if i < THREADS:
            start.wait()  # the first wave starts together
        kind, kw = requests[i % len(requests)]
        return i % len(requests), _call(model, kind, kw)

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(run, [k for k in range(len(order))]))
    for index, out in results:
        assert out == alone[index], f"request {index}: {requests[index][0]} {requests[index][1].get('task')}"
    assert len(model.encoded_images) <= 3
    model.encoded_images.size = 16


def test_encoded_image_cache_survives_evictions_from_other_threads():
    """The cache alone, with an encoder slow enough that threads interleave inside every call."""
    cache = EncodedImageCache(size=2)
    weights = torch.nn.Linear(4, 4)
    images = [torch.full((1, 3), float(k)) for k in range(6)]

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        time.sleep(0.002)  # lets other threads run between the lookup and the read-back
        return pixels * 2 + 1

    def run(k: int) -> None:
        pixels = torch.cat([images[k % 6], images[(k + 1) % 6], images[(k + 3) % 6]])
        out = cache.get("t", [weights], pixels, encode)
        assert torch.equal(out, pixels * 2 + 1)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(run, range(200)))  # re-raises the first error from any thread
    assert len(cache) <= 2
