"""visual_experts (Mono-InternVL) speed: decode against the bare base, first-token latency against a ViT + prefix model.

One random Llama-style LLM (built in code with ``frozenvl.tiny``; ``--hidden`` 512, ``--layers`` 8,
``--intermediate`` 1408) is shared by three tasks of one model, in one run, fp32 on CPU:

* ``text``: the bare base (frozenvl's `text` task is the HF model itself);
* ``ve``: ``visual_experts`` without a vision encoder: the monolithic embedding (patch 14, pixel
  shuffle 0.5: 256 tokens per 448-px tile, between ``<img>`` and ``</img>``) and a visual FFN expert in
  every layer (``--attention-experts`` adds q/k/v/o experts);
* ``prefix``: a CLIP-style ViT at 448 px / patch 14 (1024 patches; ``--vit-hidden`` 512, ``--vit-layers``
  8: about the visual experts' parameter count, printed) with InternVL's pixel-shuffle connector, so the
  LLM sees the same 256 image tokens per image as ``ve``.

(a) Decode tokens/s of ``ve`` against ``text``: the same number of new tokens after a prompt of the same
length (``text`` gets text tokens where ``ve`` has the image slots, so both decode over equally long KV
caches). Each decode step of the real generation loop is timed (around ``FrozenVLModel._step``, which
every step calls); decode tokens/s = 1 / (best or median step time): per-step statistics stay readable
on a loaded machine where whole-call differences do not. Target >= 0.95x: a decode step's token is
text, so it runs the base's own layers.

(b) Time to first token (``generate`` with one new token) with one 448-px image, ``ve`` against
``prefix``: image embedding + prefill. The encoded-image cache is off (every call embeds the image).

Method: one warm-up call per task, then ``--repeats`` rounds, alternating the order of the tasks, each
round one first-token call and one N-token call per task; best (fastest) and median times are reported.

    python benchmarks/bench_visual_experts.py [--tokens 64] [--repeats 3] [--threads 1]

Nothing is downloaded. The default run takes about a minute on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import load_average, log, n_params, print_load_footer, print_table, quiet  # benchmarks/ is on sys.path

quiet()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per decode call")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vit-hidden", type=int, default=512)
    p.add_argument("--vit-layers", type=int, default=8)
    p.add_argument("--attention-experts", action="store_true")
    return p.parse_args()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t_start, load_start = time.perf_counter(), load_average()
    import frozenvl
    from frozenvl.tiny import build_tiny_bases

    root = Path(tempfile.mkdtemp(prefix="bench-ve-"))
    log("building the random bases ...")
    vit = dict(image_size=448, patch_size=14, hidden_size=args.vit_hidden, num_layers=args.vit_layers,
               num_heads=args.vit_hidden // 64)
    llm_dir, vit_dir = build_tiny_bases(root, arch="llama", vision="clip", vision_kwargs=vit, hidden_size=args.hidden,
                                        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads // 2,
                                        intermediate_size=args.intermediate, initializer_range=0.05)
    model = frozenvl.build(llm_dir, vit_dir, workflows={
        "ve": {"family": "visual_experts", "attention_experts": args.attention_experts},
        "prefix": {"family": "prefix", "connector": "pixel_shuffle", "image_mode": "resize"},
    }).eval()
    model.encoded_images.size = 0  # every call embeds its image (what a first request costs)
    ve, prefix = model.workflow("ve"), model.workflow("prefix")
    assert model.tokens_per_image("ve") == 258 and model.tokens_per_image("prefix") == 256

    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 448, 448, generator=g)
    prompt = "<image>\ndescribe the picture in a few words please"
    mm = {t: model.prepare_inputs(prompt, pixels, task=t) for t in ("ve", "prefix")}
    width = mm["ve"]["input_ids"].shape[1]
    text_ids = torch.randint(3, model.tokenizer.vocab_size - 1, (1, width), generator=g)  # as long as ve's prompt

    def call(task: str, n: int):
        kw = dict(max_new_tokens=n, eos_token_id=[], text_fallback=False)
        if task == "text":
            return lambda: model.generate(text_ids, task="text", **kw)
        b = mm[task]
        return lambda: model.generate(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"], task=task, **kw)

    tasks = ("text", "ve", "prefix")
    ttft: dict[str, list[float]] = {t: [] for t in tasks}
    steps: dict[str, list[float]] = {t: [] for t in tasks}  # seconds of each decode step (prefill excluded)
    inner = model._step  # every forward pass of the generation loop, prefill and decode steps, goes through it

    def timing_step(*a, **k):
        t0 = time.perf_counter()
        out = inner(*a, **k)
        record.append(time.perf_counter() - t0)
        return out

    model._step = timing_step
    with torch.no_grad():
        for t in tasks:  # warm-up
            record: list[float] = []
            call(t, args.tokens)()
        for r in range(args.repeats):
            order = tasks if r % 2 == 0 else tasks[::-1]
            log(f"round {r + 1}/{args.repeats} ...")
            for t in order:
                ttft[t].append(timed(call(t, 1)))
                record = []
                call(t, args.tokens)()
                assert len(record) == args.tokens
                steps[t].extend(record[1:])
    del model._step

    vis_params = n_params(ve)  # monolithic embedding + experts + <img>/</img>
    vit_params = n_params(model.vision) + n_params(prefix.connector)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s); LLM {n_params(model.llm):,} "
          f"params ({args.layers} layers, hidden {args.hidden}); one 448-px image, prompt {width} tokens")
    print(f"visual_experts params {vis_params:,} (embedding {n_params(ve.connector):,}, experts "
          f"{sum(p.numel() for k, ps in ve.parts().items() if 'experts' in k for p in ps):,}); "
          f"prefix ViT + connector {vit_params:,} (ratio {vis_params / vit_params:.2f})")
    rows = []
    for name, f in (("best", min), ("median", statistics.median)):
        base_tps, ve_tps, pre_tps = (1 / f(steps[t]) for t in tasks)
        rows.append([f"decode tok/s ({name} step)", f"{base_tps:.1f}", f"{ve_tps:.1f}", f"{pre_tps:.1f}",
                     f"ve/text {ve_tps / base_tps:.3f}"])
    for name, f in (("best", min), ("median", statistics.median)):
        base_t, ve_t, pre_t = (f(ttft[t]) for t in tasks)
        rows.append([f"TTFT s ({name})", f"{base_t:.3f}", f"{ve_t:.3f}", f"{pre_t:.3f}",
                     f"ve/prefix {ve_t / pre_t:.3f} ({100 * (1 - ve_t / pre_t):.0f}% lower)"])
    with torch.no_grad():  # where prefix's first token goes: the ViT alone on the one tile
        vit_t = min(timed(lambda: model.vision(mm["prefix"]["pixel_values"])) for _ in range(args.repeats))
        emb_t = min(timed(lambda: ve.encode_images(mm["ve"]["pixel_values"])) for _ in range(args.repeats))
    print_table("visual_experts vs bare base (decode) and vs ViT + prefix (first token)",
                ["", "text (bare base, text prompt of equal length)", "ve", "prefix", "ratio"], rows)
    print(f"image encoding alone (best): ViT {vit_t:.3f}s, monolithic embedding {emb_t:.4f}s; 'text' TTFT is the "
          "base's prefill of a text prompt of the same length (no image encoding)")
    print_load_footer(t_start, load_start, args.threads)


if __name__ == "__main__":
    main()
