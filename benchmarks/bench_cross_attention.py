"""Decode speed of frozenvl's ``cross_attention`` workflow against transformers' IDEFICS, same weights, one run.

Two sides on one random IDEFICS (built in code with ``frozenvl.tiny.build_tiny_idefics``, IDEFICS-9B's
proportions scaled down: a gated cross-attention block every 4 decoder layers, a 64-latent perceiver
resampler of depth 6, float gates and no query/key norms as transformers' ``IdeficsConfig`` defaults;
random matrices of std 0.1 (``--init-std``; IDEFICS' default 0.02 makes the greedy output one token
repeated)), greedy, fp32 on CPU:

* ``idefics``: transformers' ``IdeficsForVisionText2Text.generate`` on the saved checkpoint;
* ``frozenvl``: the same checkpoint converted with ``frozenvl.importers.import_idefics`` and opened with
  ``frozenvl.load``, whose ``cross_attention`` workflow ``mm`` runs through ``FrozenVLModel.generate``.

One prompt per image count (``--images``, default 1 and 4): per image ``<fake_token_around_image>
<image> <fake_token_around_image>`` followed by some text. IDEFICS gets the ids with its ``<image>`` id,
``pixel_values`` [batch, images, 3, H, W] and ``image_attention_mask`` (each token attends to the most
recent ``<image>`` at or before it, none before the first); frozenvl gets the same ids with
``IMAGE_TOKEN_ID`` at the ``<image>`` positions and the same pixels flattened to [batch * images, 3, H, W].
Every call yields exactly the requested number of tokens (``max_new_tokens=min_new_tokens=N`` for
IDEFICS, ``eos_token_id=[]`` for frozenvl; the random model's head row for eos is zeroed so greedy
decoding never picks it and both sides stay comparable token for token). The script checks that both
sides generate identical greedy tokens (exit status 1 if not) and prints the largest prefill-logit
difference between them, and how much other pixels change frozenvl's logits (the images matter).
frozenvl's encoded-image cache (``model.encoded_images``, when the model has one) is turned off unless
``--image-cache``: every call here sends the same pixels, and IDEFICS re-encodes them in every call.

Method: per image count, one warm-up call of N tokens per side (also the token check), then ``--repeats``
rounds; each round times ``generate`` with 1 new token (prefill: image encoding, resampler and prompt)
and with N new tokens on both sides, alternating which side goes first. Decode tokens/s = (N - 1) /
(time(N tokens) - time(1 token)), computed from the best (fastest) times and from the median times;
the ratio frozenvl / IDEFICS of decode tokens/s is what the target (>= 1.5 at 4 images) is read on.
Raw seconds of every call follow the table.

    python benchmarks/bench_cross_attention.py [--tokens 128] [--repeats 3] [--threads 1] [--images 1,4] [--batch 1]

Model sizes: ``--hidden --layers --heads --cross-every --vision-hidden --vision-layers --image-size
--patch-size --latents --resampler-depth`` (see ``--help``). Nothing is downloaded. The default run takes
about 35 s on 2 CPU cores; a short check: ``--tokens 16 --repeats 1`` (about 10 s).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from _common import load_average, log, n_params, print_load_footer, print_table, quiet  # benchmarks/ is on sys.path

quiet()

import frozenvl  # noqa: E402
from frozenvl.families.base import IMAGE_TOKEN_ID  # noqa: E402
from frozenvl.importers import import_idefics  # noqa: E402
from frozenvl.tiny import build_tiny_idefics  # noqa: E402

WORKFLOW = "mm"
TARGET = 1.5  # frozenvl / IDEFICS decode tokens/s at 4 images (the target)
TARGET_IMAGES = 4
INTRO = "User: Look at these pictures."
CAPTIONS = [" This is the first one.", " And a second picture.", " Here is a third image, a bit different.",
            " The last one."]
OUTRO = " Describe what changes from one picture to the next. Assistant:"


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Side:
    name: str
    run: Callable[[int], torch.Tensor]  # new tokens -> [batch, new tokens]
    first: list[float] = field(default_factory=list)  # wall seconds of generate(1 token)
    full: list[float] = field(default_factory=list)  # wall seconds of generate(N tokens)
    first_cpu: list[float] = field(default_factory=list)
    full_cpu: list[float] = field(default_factory=list)
    tokens: torch.Tensor | None = None


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, float, torch.Tensor]:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def decode_rate(first: float, full: float, new_tokens: int, batch: int) -> float:
    """Decode tokens/s from the times of generate(1) and generate(N): the N - 1 steps after the prefill."""
    dt = full - first
    return float("inf") if dt <= 0 else batch * (new_tokens - 1) / dt


@dataclass
class Case:
    images: int
    prompt_len: int
    hf: Side
    fz: Side
    logit_diff: float = 0.0
    image_effect: float = 0.0  # max |frozenvl logits - frozenvl logits with other pixels|
    same: bool = False
    note: str = ""


# ------------------------------------------------------------------------------------------ inputs
def prompt_ids(tok, n_images: int) -> tuple[list[int], int]:
    """The prompt's ids with IDEFICS' `<image>` id, and that id."""
    fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
    image = tok.convert_tokens_to_ids("<image>")

    def text(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + text(INTRO)
    for k in range(n_images):
        ids += [fake, image, fake] + text(CAPTIONS[k % len(CAPTIONS)])
    return ids + text(OUTRO), image


def inputs(tok, n_images: int, batch: int, pixels: torch.Tensor):
    """(IDEFICS kwargs, frozenvl args): the same prompt (repeated `batch` times) and the same pixels."""
    row, image_id = prompt_ids(tok, n_images)
    ids = torch.tensor([row] * batch)
    mask = torch.ones_like(ids)
    pv = pixels[:n_images].unsqueeze(0).expand(batch, -1, -1, -1, -1).contiguous()  # [B, n, 3, H, W]
    is_image = ids == image_id
    latest = torch.cumsum(is_image.long(), 1) - 1  # index of the most recent <image>; -1 before the first
    iam = torch.nn.functional.one_hot(latest.clamp(min=0), n_images) * (latest >= 0).unsqueeze(-1)
    hf = dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_attention_mask=iam)
    fz = dict(input_ids=ids.masked_fill(is_image, IMAGE_TOKEN_ID), attention_mask=mask, pixel_values=pv.flatten(0, 1))
    return hf, fz


# ------------------------------------------------------------------------------------------ models
def build(root: Path, args) -> tuple[Path, Path, int]:
    """A random IDEFICS saved in root/idefics (eos head row zeroed), converted into root/frozenvl."""
    from transformers import IdeficsForVisionText2Text

    src = Path(
        build_tiny_idefics(
            root / "idefics", hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
            cross_layer_interval=args.cross_every, alpha_type="float", qk_layer_norms=False,
            vision_hidden=args.vision_hidden, vision_layers=args.vision_layers, image_size=args.image_size,
            patch_size=args.patch_size, latents=args.latents, resampler_depth=args.resampler_depth,
            initializer_range=args.init_std, seed=args.seed,
        )
    )
    ref = IdeficsForVisionText2Text.from_pretrained(src, dtype=torch.float32)
    eos = ref.config.eos_token_id
    with torch.no_grad():
        # eos gets logit 0 while the best of the other ~500 logits is always well above 0: greedy decoding
        # never picks it, so min_new_tokens (which masks eos on the IDEFICS side) cannot change the tokens.
        ref.lm_head.weight[eos].zero_()
    ref.save_pretrained(src)
    del ref
    out = Path(import_idefics(src, root / "frozenvl", workflow=WORKFLOW))
    return src, out, eos


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per timed call (default 128; >= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per side and image count (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--images", default="1,4", help="comma-separated images per prompt (default 1,4)")
    ap.add_argument("--batch", type=int, default=1, help="rows per call, all the same prompt (default 1)")
    ap.add_argument("--image-cache", action="store_true",
                    help="leave frozenvl's encoded-image cache on (default off: both sides encode every call)")
    g = ap.add_argument_group("model sizes (IDEFICS-9B's proportions, scaled down)")
    g.add_argument("--hidden", type=int, default=512, help="text hidden size (default 512; intermediate 2x)")
    g.add_argument("--layers", type=int, default=8, help="text decoder layers (default 8)")
    g.add_argument("--heads", type=int, default=8, help="text attention heads (default 8)")
    g.add_argument("--cross-every", type=int, default=4, help="cross_layer_interval (default 4, as IDEFICS-9B)")
    g.add_argument("--vision-hidden", type=int, default=256, help="vision width (default 256)")
    g.add_argument("--vision-layers", type=int, default=4, help="vision layers (default 4)")
    g.add_argument("--image-size", type=int, default=224, help="image side in pixels (default 224)")
    g.add_argument("--patch-size", type=int, default=14, help="vision patch size (default 14: 256 patches)")
    g.add_argument("--latents", type=int, default=64, help="resampler latents per image (default 64)")
    g.add_argument("--resampler-depth", type=int, default=6, help="resampler depth (default 6)")
    g.add_argument("--init-std", type=float, default=0.1,
                   help="std of the random matrices (IDEFICS' initializer_range; default 0.1)")
    g.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n = args.tokens
    image_counts = [int(x) for x in args.images.split(",")]
    if n < 2 or args.repeats < 1 or args.threads < 1 or args.batch < 1:
        ap.error("--tokens must be >= 2; --repeats, --threads and --batch >= 1")
    if not image_counts or min(image_counts) < 1:
        ap.error("--images: positive counts, e.g. 1,4")
    torch.set_num_threads(args.threads)

    from transformers import IdeficsForVisionText2Text

    print(
        f"frozenvl {frozenvl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {platform.machine()}, {args.threads} thread(s) of {os.cpu_count()} "
        f"cores, fp32 CPU, batch {args.batch}, greedy, {n} new tokens, {args.repeats} round(s) per side after a "
        "warm-up"
    )
    t_start = time.perf_counter()
    load_start = load_average()
    cases: list[Case] = []
    with tempfile.TemporaryDirectory(prefix="frozenvl-bench-xattn-") as tmp:
        log("building a random IDEFICS, importing it into frozenvl ...")
        src, out, eos = build(Path(tmp), args)
        # Loaded outside inference mode (weights made inside it are inference tensors); run inside it.
        ref = IdeficsForVisionText2Text.from_pretrained(src, dtype=torch.float32).eval()
        model = frozenvl.load(out, dtype="float32").eval()
    image_cache = getattr(model, "encoded_images", None)
    if image_cache is not None and not args.image_cache:
        # frozenvl keeps the last images it encoded; every timed call here sends the same pixels, so the
        # cache would skip frozenvl's image encoding in all calls but the first while IDEFICS re-encodes.
        # Off, both sides encode the images in every call (the decode rate is the same either way).
        image_cache.size = 0
    with torch.inference_mode():
        tok = model.tokenizer
        pad = ref.config.pad_token_id
        family = model.workflow(WORKFLOW)
        print(
            f"IDEFICS: {n_params(ref) / 1e6:.1f}M parameters; text hidden {args.hidden}, {args.layers} layers, "
            f"{args.heads} heads, intermediate {2 * args.hidden}, vocab 512 + 2; gated cross-attention before "
            f"layers {family.block_layers} (every {args.cross_every}); vision {args.image_size}px / "
            f"{args.patch_size} ({(args.image_size // args.patch_size) ** 2} patches), hidden {args.vision_hidden}, "
            f"{args.vision_layers} layers; perceiver {args.latents} latents, depth {args.resampler_depth}; "
            f"frozenvl: {n_params(model) / 1e6:.1f}M parameters"
        )
        if image_cache is not None:
            print("frozenvl's encoded-image cache: " + ("on (--image-cache)" if args.image_cache else "off"))
        log(f"built in {time.perf_counter() - t_start:.1f}s; measuring ...")
        g = torch.Generator().manual_seed(args.seed)
        pixels = torch.randn(max(image_counts), 3, args.image_size, args.image_size, generator=g)

        for n_img in image_counts:
            hf_in, fz_in = inputs(tok, n_img, args.batch, pixels)
            plen = hf_in["input_ids"].shape[1]

            def run_hf(k: int, hf_in=hf_in, plen=plen) -> torch.Tensor:
                return ref.generate(**hf_in, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                                    eos_token_id=eos, pad_token_id=pad)[:, plen:]

            def run_fz(k: int, fz_in=fz_in) -> torch.Tensor:
                return model.generate(fz_in["input_ids"], fz_in["attention_mask"], pixel_values=fz_in["pixel_values"],
                                      task=WORKFLOW, max_new_tokens=k, eos_token_id=[])

            case = Case(n_img, plen, Side("idefics", run_hf), Side("frozenvl", run_fz))
            r = ref(**hf_in).logits
            o = model(fz_in["input_ids"], fz_in["attention_mask"], pixel_values=fz_in["pixel_values"],
                      task=WORKFLOW).logits
            case.logit_diff = (r - o).abs().max().item()
            other = torch.randn(fz_in["pixel_values"].shape, generator=g)  # the images matter: other pixels
            o2 = model(fz_in["input_ids"], fz_in["attention_mask"], pixel_values=other, task=WORKFLOW).logits
            case.image_effect = (o2 - o).abs().max().item()
            del r, o, o2

            # warm-up, also the token check
            sides = [case.hf, case.fz]
            for s in sides:
                *_, s.tokens = timed(lambda s=s: s.run(n))
                assert s.tokens.shape == (args.batch, n), (s.name, tuple(s.tokens.shape))
            case.same = torch.equal(case.hf.tokens, case.fz.tokens)
            if not case.same:
                r_, c_ = (case.hf.tokens != case.fz.tokens).nonzero()[0].tolist()
                case.note = (f"first difference row {r_} step {c_}: IDEFICS {int(case.hf.tokens[r_, c_])}, "
                             f"frozenvl {int(case.fz.tokens[r_, c_])}")
            for k in range(args.repeats):
                for s in (sides if k % 2 == 0 else sides[::-1]):
                    for steps, wall, cpu in ((1, s.first, s.first_cpu), (n, s.full, s.full_cpu)):
                        dt, c, _ = timed(lambda s=s, steps=steps: s.run(steps))
                        wall.append(dt)
                        cpu.append(c)
                rates = ", ".join(
                    f"{s.name} {decode_rate(s.first[-1], s.full[-1], n, args.batch):.1f}" for s in sides
                )
                log(f"  {n_img} image(s), round {k + 1}/{args.repeats}: decode tok/s {rates}")
            cases.append(case)

    print()
    rows = []
    for c in cases:
        hf, fz = c.hf, c.fz
        best = [decode_rate(min(s.first), min(s.full), n, args.batch) for s in (hf, fz)]
        med = [decode_rate(statistics.median(s.first), statistics.median(s.full), n, args.batch) for s in (hf, fz)]
        ratio_best, ratio_med = best[1] / best[0], med[1] / med[0]
        target = f">= {TARGET:.1f}" if c.images == TARGET_IMAGES else ""
        ok = ("yes" if ratio_best >= TARGET else "NO") if target else ""
        rows.append([
            str(c.images), str(c.prompt_len),
            f"{1000 * min(hf.first):.0f}", f"{1000 * min(fz.first):.0f}",
            f"{best[0]:.1f}", f"{best[1]:.1f}", f"{med[0]:.1f}", f"{med[1]:.1f}",
            f"{ratio_best:.3f}", f"{ratio_med:.3f}", target, ok, "yes" if c.same else "NO",
        ])
    print_table(
        f"greedy decode, batch {args.batch}, {n} new tokens; decode tok/s = batch * ({n} - 1) / (time(generate "
        f"{n}) - time(generate 1)); prefill = best time(generate 1); ratio = frozenvl / IDEFICS decode tok/s",
        ["images", "prompt len", "prefill ms IDEFICS", "prefill ms frozenvl", "decode tok/s IDEFICS (best)",
         "decode tok/s frozenvl (best)", "IDEFICS (median)", "frozenvl (median)", "ratio (best)",
         "ratio (median)", "target", "ok", "same tokens"],
        rows,
    )
    for c in cases:
        if c.note:
            print(f"{c.images} image(s): {c.note}")
    print("prefill logits, max |frozenvl - IDEFICS|: "
          + ", ".join(f"{c.images} image(s) {c.logit_diff:.2e}" for c in cases)
          + "; max |frozenvl - frozenvl with other random pixels| (the images change the output): "
          + ", ".join(f"{c.images} image(s) {c.image_effect:.2e}" for c in cases))
    print("distinct tokens among the new tokens: "
          + ", ".join(f"{c.images} image(s) {len(set(c.fz.tokens[0].tolist()))}/{n}" for c in cases))
    print("seconds per call, wall (process CPU, all threads), generate 1 | generate N:")
    for c in cases:
        for s in (c.hf, c.fz):
            one = ", ".join(f"{w:.3f} ({p:.3f})" for w, p in zip(s.first, s.first_cpu))
            full = ", ".join(f"{w:.3f} ({p:.3f})" for w, p in zip(s.full, s.full_cpu))
            print(f"  {c.images} image(s) {s.name:>8}: {one} | {full}")

    print_load_footer(t_start, load_start, args.threads)
    ok = all(c.same for c in cases)
    print("correctness: frozenvl and IDEFICS generated identical greedy tokens for every image count" if ok
          else "correctness: TOKENS DIFFER between frozenvl and IDEFICS (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
