"""Decode speed of the ``wings`` workflow against ``prefix`` on the same base, and against no-cache decoding.

One random Llama (built in code with ``frozenvl.tiny``: hidden 512, 8 layers, 8 heads / 4 key/value heads,
intermediate 2048; ``--hidden`` scales it: heads of 64, half as many key/value heads, MLP 4x) and a CLIP tower (112 px / patch 16, so 49 image tokens per image), one model with two
workflows on it: ``prefix`` and ``wings`` (learners in all 8 layers, rank 8, router hidden 16) with the same
connector; the wings learners and router are perturbed (noise of std 0.05) so that they do real work
(at init B = 0 and every learner adds zeros). Greedy, fp32 on CPU, exactly ``--tokens`` new tokens per row
(``eos_token_id=[]``), rows of different lengths with one image each, left padded.

Method, per batch size (``--batches``, default 1 and 4): one warm-up call of N tokens per side, then
``--repeats`` rounds; each round times ``generate`` with 1 new token (prefill: image encoding and prompt)
and with N new tokens on both sides, alternating which side goes first. Decode tokens/s = batch * (N - 1)
/ (time(N tokens) - time(1 token)), from the best (fastest) times and from the median times. The ratio
wings / prefix is what the target (>= 0.85) is read on.

The anchor: Wings' release decodes without a KV cache, every new token recomputing the whole sequence and
the vision tower. ``recompute`` times that loop at batch 1 (the model's forward on the whole sequence
with the pixels, the encoded-image cache cleared before each step, ``--recompute-tokens`` tokens) and the
table prints wings' cached decode tokens/s over it.

    python benchmarks/bench_wings.py [--tokens 128] [--repeats 3] [--threads 1] [--batches 1,4] [--hidden 512]

Nothing is downloaded. A short check: ``--tokens 16 --repeats 1 --recompute-tokens 16``.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import load_average, log, print_load_footer, print_table, quiet  # benchmarks/ is on sys.path

quiet()

import frozenvl  # noqa: E402
from frozenvl.tiny import build_llm, build_tokenizer, build_vision  # noqa: E402

TARGET = 0.85  # wings / prefix decode tokens/s (the target)
PROMPTS = [
    "<image>\nDescribe the picture in detail.",
    "<image>\nWhat colour is the large shape on the left, and what is next to it?",
    "<image>\nCount the shapes.",
    "<image>\nIs there a red circle anywhere in this image? Answer with a full sentence please.",
]


@dataclass
class Side:
    name: str
    task: str
    first: list[float] = field(default_factory=list)
    full: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def decode_rate(first: float, full: float, new_tokens: int, batch: int) -> float:
    dt = full - first
    return float("inf") if dt <= 0 else batch * (new_tokens - 1) / dt


def build(root: Path, args) -> frozenvl.FrozenVLModel:
    tok = build_tokenizer(root / "tok")
    hidden = args.hidden
    llm = build_llm(root / "llm", tokenizer_dir=root / "tok", hidden_size=hidden, num_layers=8, num_heads=hidden // 64,
                    num_kv_heads=hidden // 128, intermediate_size=4 * hidden, initializer_range=0.1)
    vis = build_vision(root / "vision", image_size=112, patch_size=16, hidden_size=256, num_layers=4, num_heads=4)
    del tok
    model = frozenvl.build(llm, vis, workflows={"wings": {"family": "wings"}, "prefix": {"family": "prefix"}})
    wings = model.workflow("wings")
    model.workflow("prefix").connector.load_state_dict(wings.connector.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part in ("visual", "textual", "router"):
            for p in wings.parts()[part]:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for name in ("wings", "prefix"):
        model.workflow(name).cfg.text_fallback = False
    return model.eval()


def images(n: int):
    from PIL import Image

    out = []
    for k in range(n):
        img = Image.new("RGB", (96 + 8 * k, 80), (40 * k, 200 - 40 * k, 90))
        for x in range(30):
            for y in range(20 + 5 * k):
                img.putpixel((x + 10 * k, y), (250, 30, 30 * k))
        out.append(img)
    return out


def recompute_rate(model, prompt: str, image, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Tokens/s of decoding without a KV cache: each token a forward pass of the whole sequence and the pixels."""
    inputs = model.prepare_inputs([prompt], [[image]], task="wings")
    ids, pixels = inputs["input_ids"], inputs["pixel_values"]
    cache = getattr(model, "encoded_images", None)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(new_tokens):
            if cache is not None:
                cache.clear()  # the release re-runs the vision tower every step
            logits = model(ids, torch.ones_like(ids), pixel_values=pixels, task="wings").logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return new_tokens / (time.perf_counter() - t0), ids[:, -new_tokens:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--recompute-tokens", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512,
                    help="the LLM's hidden size (heads of 64, half as many key/value heads, MLP 4x)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), load_average()
    n = args.tokens
    with tempfile.TemporaryDirectory() as tmp:
        log("building the random base and workflows ...")
        model = build(Path(tmp), args)
        imgs = images(len(PROMPTS))
        rows, mismatched = [], False
        cached_b1 = None
        for batch in (int(b) for b in args.batches.split(",")):
            prompts, per_row = PROMPTS[:batch], [[im] for im in imgs[:batch]]
            sides = [Side("wings", "wings"), Side("prefix", "prefix")]

            def run(side: Side, k: int) -> torch.Tensor:
                cache = getattr(model, "encoded_images", None)
                if cache is not None:
                    cache.clear()
                return model.generate(prompt=prompts, images=per_row, task=side.task, max_new_tokens=k,
                                      eos_token_id=[])

            for side in sides:
                log(f"batch {batch}: warm-up {side.name}")
                side.tokens = run(side, n)
            for r in range(args.repeats):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    side.first.append(timed(lambda: run(side, 1))[0])
                    side.full.append(timed(lambda: run(side, n))[0])
            best = {s.name: decode_rate(min(s.first), min(s.full), n, batch) for s in sides}
            med = {s.name: decode_rate(statistics.median(s.first), statistics.median(s.full), n, batch) for s in sides}
            distinct = min(len(set(t.tolist())) for t in sides[0].tokens)
            if batch == 1:
                cached_b1 = best["wings"]
            ratio = best["wings"] / best["prefix"]
            rows.append([str(batch), f"{best['wings']:.1f}", f"{best['prefix']:.1f}", f"{ratio:.2f}",
                         f"{med['wings'] / med['prefix']:.2f}", "yes" if ratio >= TARGET else "NO", str(distinct)])
            mismatched |= distinct < 3
        print(f"python {platform.python_version()}, torch {torch.__version__}, {args.threads} thread(s), "
              f"{n} new tokens, {args.repeats} repeat(s), LLM hidden {args.hidden}")
        print_table("decode tokens/s: wings vs prefix (same base, same connector)",
                    ["batch", "wings tok/s (best)", "prefix tok/s (best)", "ratio best", "ratio median",
                     f">= {TARGET}", "distinct tokens/row (wings)"], rows)
        if cached_b1 is not None:
            log("timing the no-cache recompute loop ...")
            slow, _ = recompute_rate(model, PROMPTS[0], imgs[0], args.recompute_tokens)
            print(f"no-cache recompute (batch 1, {args.recompute_tokens} tokens, vision tower every step): "
                  f"{slow:.2f} tok/s; wings cached decode is {cached_b1 / slow:.1f}x that")
    print_load_footer(t_start, load_start, args.threads)
    if mismatched:
        print("warning: the wings output is degenerate (fewer than 3 distinct tokens in a row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
